"""Conventions shared by every ``spectral-guard`` command: exit codes, one-line errors,
Ctrl-C, internal errors, progress bars and output-path checks.

| code | meaning |
|---|---|
| 0 | success: healthy (audit), thresholds written (calibrate) |
| 1 | findings: a matrix fails the ``--fail-on`` policy (audit); the references look randomly
      initialized and nothing was written (calibrate, without ``--allow-random``) |
| 2 | usage or input error: one line ``error: ...`` on stderr, nothing on stdout |
| 3 | internal error (a bug): one line; ``--debug`` (or ``SPECTRAL_GUARD_DEBUG=1``) adds the
      traceback |
| 130 | interrupted (Ctrl-C): one line |
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import typer

EXIT_OK = 0
EXIT_FINDINGS = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 3
EXIT_INTERRUPTED = 130



def exit_codes_help(success: str, findings: str) -> str:
    """The exit-code table as one help paragraph, with a command's meaning of 0 and 1."""
    return (f"Exit codes: 0 {success}; 1 {findings}; 2 usage or input error (one line on "
            "stderr); 3 internal error (--debug shows the traceback); 130 interrupted (Ctrl-C).")


EXIT_CODES_HELP = exit_codes_help("success", "findings (audit: a matrix fails --fail-on; "
                                  "calibrate: the references look random, nothing written)")
"""The app-level exit-code paragraph (``spectral-guard --help``)."""

T = TypeVar("T")


def one_line(message: object) -> str:
    """``message`` with every run of whitespace (newlines included) folded to one space."""
    return " ".join(str(message).split())


def fail(message: object, code: int = EXIT_USAGE) -> typer.Exit:
    """Print ``error: <message>`` as one line on stderr; return the Exit to raise."""
    typer.echo(f"error: {one_line(message)}", err=True)
    return typer.Exit(code=code)


def debug_enabled(flag: bool) -> bool:
    return flag or bool(os.environ.get("SPECTRAL_GUARD_DEBUG"))


def guarded(fn: Callable[[], T], *, debug: bool, input_errors: tuple[type[BaseException], ...]
            ) -> T:
    """Run ``fn`` under the conventions: input errors -> one line, exit 2; Ctrl-C -> one line,
    exit 130; ``MemoryError`` -> one line, exit 2; anything else -> one line, exit 3 (with the
    traceback when ``debug``)."""
    try:
        return fn()
    except typer.Exit:
        raise
    except KeyboardInterrupt:
        raise fail("interrupted (Ctrl-C); nothing was written", EXIT_INTERRUPTED) from None
    except input_errors as exc:
        raise fail(str(exc)) from None
    except OSError as exc:
        where = getattr(exc, "filename", "") or ""
        raise fail(f"{where}: {exc.strerror or exc}" if where else exc.strerror or exc) from None
    except MemoryError:
        raise fail("out of memory (try --mode biopsy or a smaller --limit)") from None
    except Exception as exc:  # a bug: one line, the traceback only on request
        if debug_enabled(debug):
            traceback.print_exc()
        raise fail(f"internal error ({type(exc).__name__}: {exc}); run again with --debug for "
                   "the traceback and please report it", EXIT_INTERNAL) from None


def check_writable(path: Path, flag: str) -> None:
    """Refuse an output path that cannot be written, before any long work starts.

    Creates the file if it does not exist (and removes it again), so it also catches read-only
    file systems and permission rules that ``os.access`` does not see (it answers yes to root).
    """
    if path.is_dir():
        raise fail(f"{flag} {path}: is a directory")
    existed = path.exists()
    try:
        with open(path, "a"):
            pass
    except OSError as exc:
        raise fail(f"{flag} {path}: cannot write ({exc.strerror or exc})") from None
    if not existed:
        path.unlink(missing_ok=True)


def show_progress(quiet: bool, no_progress: bool) -> bool:
    """Progress bars go to stderr, and only when it is a terminal."""
    return not (quiet or no_progress) and sys.stderr.isatty()


@contextmanager
def progress_bar(label: str, enabled: bool) -> Iterator[Callable[[int, int, str], None] | None]:
    """A transient rich progress bar on stderr; yields its ``progress(done, total, name)``
    callback, or ``None`` when disabled."""
    if not enabled:
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn(label), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                  TimeElapsedColumn(), TextColumn("{task.description}"),
                  console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("", total=1)

        def progress(done: int, total: int, name: str) -> None:
            bar.update(task, completed=done, total=total, description=name[-40:])

        yield progress


def stdout_console():  # -> rich.console.Console
    """The console tables are printed on: the terminal's width, or 160 columns when piped."""
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 160)
