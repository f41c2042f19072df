"""``spectral-guard audit``: thin command over :func:`spectral_guard.auditing.audit`.

Exit codes: 0 no matrix fails the ``--fail-on`` policy; 1 at least one does; 2 usage or input
error (one line on stderr, no traceback).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

HELP = """Audit safetensors checkpoints for rank collapse, ill-conditioning and corruption.

PATH is a .safetensors file, a *.safetensors.index.json, or a folder holding either.
Exit codes: 0 healthy, 1 a matrix fails the --fail-on policy, 2 usage or input error.
See docs/audit.md for the status rules and the JSON schema."""


def _error(message: str) -> typer.Exit:
    text = " ".join(str(message).split("\n"))
    typer.echo(f"error: {text}", err=True)
    return typer.Exit(code=2)


def _parse_fail_on(value: str) -> tuple[str, ...]:
    parts = [p.strip() for p in value.split(",") if p.strip()]
    if parts == ["none"]:
        return ()
    return tuple(parts)


def audit_command(
    paths: list[Path] = typer.Argument(..., metavar="PATH...", show_default=False,
                                       help="Checkpoint file(s), index.json or folder(s)."),
    mode: str = typer.Option("biopsy", "--mode", help="biopsy (seeded submatrix) or exact "
                             "(full SVD)."),
    limit: int = typer.Option(128, "--limit", help="Biopsy size: LIMIT x 0.75 LIMIT for a "
                              "matrix with a side longer than LIMIT."),
    seed: int = typer.Option(0, "--seed", help="Seed of the biopsy sample."),
    include: list[str] = typer.Option([], "--include", help="Only tensors whose name matches "
                                      "this regex (repeatable)."),
    exclude: list[str] = typer.Option([], "--exclude", help="Skip tensors whose name matches "
                                      "this regex (repeatable)."),
    thresholds: Path | None = typer.Option(None, "--thresholds", help="Thresholds JSON file "
                                           "(default: the shipped defaults)."),
    fail_on: str = typer.Option("collapsed,nonfinite,dead_units", "--fail-on",
                                help="Comma-separated statuses that make the exit code 1, or "
                                "'none'."),
    as_json: bool = typer.Option(False, "--json", help="Write one JSON document to stdout and "
                                 "nothing else."),
    csv_path: Path | None = typer.Option(None, "--csv", help="Also write a CSV table to FILE."),
    top: int | None = typer.Option(None, "--top", help="Show only the N worst matrices."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No table or progress bar: only "
                               "the verdict."),
    show_skipped: bool = typer.Option(False, "--show-skipped", help="List skipped tensors."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
) -> None:
    """Audit safetensors checkpoints for rank collapse, ill-conditioning and corruption."""
    from rich.console import Console

    from spectral_guard.auditing import audit
    from spectral_guard.checkpoint import CheckpointError
    from spectral_guard.report import render_csv, render_json, render_text
    from spectral_guard.thresholds import ThresholdsError

    if mode not in ("biopsy", "exact"):
        raise _error(f"--mode: {mode!r} is not one of 'biopsy', 'exact'")
    if top is not None and top < 1:
        raise _error(f"--top must be at least 1, got {top}")
    err_console = Console(stderr=True)
    show_progress = not (quiet or no_progress) and sys.stderr.isatty()
    try:
        if show_progress:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            with Progress(TextColumn("audit"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                          TimeElapsedColumn(), TextColumn("{task.description}"),
                          console=err_console, transient=True) as bar:
                task = bar.add_task("", total=1)

                def progress(done: int, total: int, name: str) -> None:
                    bar.update(task, completed=done, total=total, description=name[-40:])

                report = audit(paths, mode=mode, limit=limit, seed=seed, include=include,
                               exclude=exclude, thresholds=thresholds,
                               fail_on=_parse_fail_on(fail_on), progress=progress)
        else:
            report = audit(paths, mode=mode, limit=limit, seed=seed, include=include,
                           exclude=exclude, thresholds=thresholds,
                           fail_on=_parse_fail_on(fail_on))
    except (CheckpointError, ThresholdsError, ValueError) as exc:
        raise _error(str(exc)) from None
    except OSError as exc:
        raise _error(f"{getattr(exc, 'filename', '') or ''}: {exc.strerror or exc}") from None
    except MemoryError:
        raise _error("out of memory (try --mode biopsy or a smaller --limit)") from None
    except Exception as exc:  # never a traceback; SPECTRAL_GUARD_DEBUG=1 shows it
        if os.environ.get("SPECTRAL_GUARD_DEBUG"):
            raise
        raise _error(f"internal error ({type(exc).__name__}: {exc}); "
                     "set SPECTRAL_GUARD_DEBUG=1 for the traceback") from None

    if csv_path is not None:
        try:
            csv_path.write_text(render_csv(report))
        except OSError as exc:
            raise _error(f"{csv_path}: cannot write CSV ({exc.strerror or exc})") from None
    if as_json:
        typer.echo(render_json(report))
    else:
        console = Console(width=None if sys.stdout.isatty() else 160)
        render_text(report, console, top=top, quiet=quiet, show_skipped=show_skipped)
    raise typer.Exit(code=report.exit_code)


def register(app: typer.Typer) -> None:
    """Add the ``audit`` command to the ``spectral-guard`` app."""
    app.command("audit", help=HELP)(audit_command)
