"""Entry point of the ``spectral-guard`` command.

Exit codes (all commands): 0 success/healthy, 1 findings that fail the policy, 2 usage or input
error. Errors are printed as one line on stderr, never as a traceback.
"""

from __future__ import annotations

import typer

from spectral_guard import __version__

app = typer.Typer(
    name="spectral-guard",
    help="Keep the weight matrices of PyTorch models spectrally healthy.",
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
    """Audit checkpoints and guard training against rank collapse and ill-conditioning."""


def _register_commands() -> None:
    # Each command lives in its own module; an absent module means that command is not built yet.
    import importlib

    for module_name in ("spectral_guard.cli.audit",):
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
