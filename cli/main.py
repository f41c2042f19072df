"""Entry point of the ``spectral-guard`` command.

Exit codes (all commands, see :mod:`spectral_guard.cli.common`): 0 success/healthy, 1 findings,
2 usage or input error, 3 internal error, 130 interrupted. Errors, usage errors included, are
printed as one line ``error: ...`` on stderr, never as a traceback or a boxed panel.
"""

from __future__ import annotations

import warnings

# torch warns "Failed to initialize NumPy" at import when numpy is absent (the CLI needs no
# numpy); a user's first screen should be clean. Set before any module imports torch.
warnings.filterwarnings("ignore", message=r"Failed to initialize NumPy", category=UserWarning)

from collections.abc import Sequence  # noqa: E402
from typing import Any  # noqa: E402

import typer  # noqa: E402
from typer.core import TyperGroup  # noqa: E402

from spectral_guard import __version__  # noqa: E402

from .common import EXIT_CODES_HELP, EXIT_INTERRUPTED, EXIT_USAGE, one_line  # noqa: E402


def _click_exceptions():
    """The Click exception classes Typer uses (Typer >= 0.2x vendors its own Click)."""
    try:
        from typer._click import exceptions
    except ImportError:  # older Typer: the click package
        from click import exceptions
    return exceptions


class OneLineErrorGroup(TyperGroup):
    """The app's command group: Click usage errors as one line ``error: ...`` (exit 2)
    instead of Typer's boxed panel; Ctrl-C outside a command's own handler exits 130."""

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True,
             **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        exc_types = _click_exceptions()
        try:
            rv = super().main(args, prog_name, complete_var, False, **extra)
        except exc_types.ClickException as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":  # the help was printed: not an error
                raise SystemExit(exc.exit_code) from None
            if isinstance(exc, exc_types.UsageError) and exc.ctx is not None:
                hint = f" (see '{exc.ctx.command_path} --help')"
            else:
                hint = ""
            typer.echo(f"error: {one_line(exc.format_message())}{hint}", err=True)
            raise SystemExit(exc.exit_code if exc.exit_code else EXIT_USAGE) from None
        except typer.Abort:  # Click's EOF on a prompt; this CLI never prompts
            typer.echo("error: aborted", err=True)
            raise SystemExit(EXIT_INTERRUPTED) from None
        raise SystemExit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    name="spectral-guard",
    cls=OneLineErrorGroup,
    help="Keep the weight matrices of PyTorch models spectrally healthy.\n\n" + EXIT_CODES_HELP,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"spectral-guard {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """Audit checkpoints, calibrate thresholds and guard training against rank collapse and
    ill-conditioning."""


def _register_commands() -> None:
    # Each command lives in its own module; an absent module means that command is not built yet.
    import importlib

    for module_name in ("spectral_guard.cli.audit", "spectral_guard.cli.calibrate",
                        "spectral_guard.cli.esd"):
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        module.register(app)


_register_commands()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
