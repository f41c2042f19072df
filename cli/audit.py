"""``spectral-guard audit``: thin command over :func:`spectral_guard.audit.audit`.

Exit codes (:mod:`spectral_guard.cli.common`): 0 no matrix fails the ``--fail-on`` policy; 1 at
least one does; 2 usage or input error (one line on stderr, no traceback); 3 internal error;
130 interrupted.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

import typer

from .common import (
    check_writable,
    exit_codes_help,
    fail,
    guarded,
    progress_bar,
    show_progress,
    stdout_console,
)

HELP = """Audit checkpoints for rank collapse, ill-conditioning and corruption.

PATH is a .safetensors file, a PyTorch .pt/.bin/.pth/.ckpt file (zip format, loaded
weights-only), a *.safetensors.index.json or pytorch_model.bin.index.json, or a folder holding
any of these (safetensors preferred).
See docs/audit.md for the status rules and the JSON schema.

""" + exit_codes_help("healthy: no matrix fails the --fail-on policy",
                      "at least one matrix fails the policy")


class Mode(StrEnum):
    """How each matrix is decomposed."""

    biopsy = "biopsy"
    exact = "exact"


class AlphaEstimator(StrEnum):
    """Which HT-SR estimator gives the alpha column."""

    csn = "csn"
    hill_median = "hill-median"


STATUS_CHOICES = ("nonfinite", "dead_units", "collapsed", "ill_conditioned", "logit_risk",
                  "suspicious", "ok")
"""The statuses ``--fail-on`` accepts (``spectral_guard.verdict.STATUSES``, kept here so that
``--help`` needs no torch import; a test checks they are equal), plus ``none``."""

FAIL_ON_METAVAR = "[" + "|".join((*STATUS_CHOICES, "none")) + "],..."


def parse_fail_on(value: str) -> tuple[str, ...]:
    """``--fail-on``: comma-separated statuses, or ``none``; a usage error names a bad one."""
    parts = [p.strip() for p in value.split(",") if p.strip()]
    if parts == ["none"]:
        return ()
    bad = [p for p in parts if p not in STATUS_CHOICES]
    if bad or not parts:
        raise typer.BadParameter(f"unknown status {bad[0]!r} (choose from "
                                 f"{', '.join(STATUS_CHOICES)}, or none)" if bad
                                 else "give at least one status, or none")
    return tuple(parts)


def check_patterns(flag: str, patterns: list[str]) -> None:
    """A bad regular expression is a usage error naming its flag, before any work starts."""
    import re

    for p in patterns:
        try:
            re.compile(p)
        except re.error as exc:
            raise fail(f"{flag} {p!r}: bad regular expression ({exc})") from None


def audit_command(
    paths: list[Path] = typer.Argument(..., metavar="PATH...", show_default=False,
                                       help="Checkpoint file(s), index.json or folder(s)."),
    mode: Mode = typer.Option(Mode.biopsy, "--mode", help="biopsy (seeded submatrix) or exact "
                              "(full SVD)."),
    limit: int = typer.Option(128, "--limit", min=2, help="Biopsy size: LIMIT x 0.75 LIMIT for a "
                              "matrix with a side longer than LIMIT."),
    seed: int = typer.Option(0, "--seed", help="Seed of the biopsy sample."),
    alpha: AlphaEstimator = typer.Option(AlphaEstimator.csn, "--alpha", help="HT-SR alpha "
                                         "estimator: csn (power-law fit, xmin by minimum KS "
                                         "distance: WeightWatcher's alpha) or hill-median (a "
                                         "faster Hill estimator at the median eigenvalue: a "
                                         "different number)."),
    include: list[str] = typer.Option([], "--include", help="Only tensors whose name matches "
                                      "this regex (repeatable)."),
    exclude: list[str] = typer.Option([], "--exclude", help="Skip tensors whose name matches "
                                      "this regex (repeatable)."),
    thresholds: Path | None = typer.Option(None, "--thresholds", help="Thresholds JSON file "
                                           "(default: the shipped defaults)."),
    fail_on: str = typer.Option("collapsed,nonfinite,dead_units", "--fail-on",
                                metavar=FAIL_ON_METAVAR, callback=parse_fail_on,
                                help="Comma-separated statuses that make the exit code 1, or "
                                "'none'."),
    as_json: bool = typer.Option(False, "--json", help="Write one JSON document to stdout and "
                                 "nothing else."),
    csv_path: Path | None = typer.Option(None, "--csv", help="Also write a CSV table to FILE."),
    plot_path: Path | None = typer.Option(None, "--plot", help="Also draw each matrix's health "
                                          "by depth to FILE (.png, .svg, .pdf; needs "
                                          "spectral-guard[plot])."),
    top: int | None = typer.Option(None, "--top", help="Show only the N worst matrices."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No table or progress bar: only "
                               "the verdict."),
    show_skipped: bool = typer.Option(False, "--show-skipped", help="List skipped tensors."),
    heads: int | None = typer.Option(None, "--heads", min=1, help="Attention heads per layer "
                                     "for the q-k logit check (default: config.json next to "
                                     "the checkpoint; without either the check is skipped)."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
    debug: bool = typer.Option(False, "--debug", help="On an internal error, print the "
                               "traceback too."),
) -> None:
    """Audit checkpoints for rank collapse, ill-conditioning and corruption."""
    from spectral_guard.audit import audit
    from spectral_guard.checkpoint import CheckpointError
    from spectral_guard.report import render_csv, render_json, render_text
    from spectral_guard.thresholds import ThresholdsError

    if top is not None and top < 1:
        raise fail(f"--top must be at least 1, got {top}")
    if as_json and (top is not None or quiet):
        flag = "--top" if top is not None else "--quiet"
        raise fail(f"{flag} shapes the table and cannot be combined with --json, which always "
                   "holds every matrix (filter the JSON instead)")
    for flag, patterns in (("--include", include), ("--exclude", exclude)):
        check_patterns(flag, patterns)
    if csv_path is not None:
        check_writable(csv_path, "--csv")
    if plot_path is not None:
        from .esd import plot_output_ready

        plot_output_ready(plot_path)

    def run() -> object:
        with progress_bar("audit", show_progress(quiet, no_progress)) as progress:
            return audit(paths, mode=mode.value, limit=limit, seed=seed, include=include,
                         exclude=exclude, thresholds=thresholds, fail_on=fail_on,
                         progress=progress, heads=heads,
                         alpha=alpha.value.replace("-", "_"))

    report = guarded(run, debug=debug,
                     input_errors=(CheckpointError, ThresholdsError, ValueError))
    if csv_path is not None:
        try:
            csv_path.write_text(render_csv(report))
        except OSError as exc:
            raise fail(f"--csv {csv_path}: cannot write ({exc.strerror or exc})") from None
    if as_json:
        typer.echo(render_json(report))
    else:
        console = stdout_console()
        render_text(report, console, top=top, quiet=quiet, show_skipped=show_skipped)
        if report.logit_needs_heads:
            console.print("Hint: give the attention head count with --heads N to check the q-k "
                          "logit scale.")
    if plot_path is not None:
        from spectral_guard.integrations.plot import plot_audit

        guarded(lambda: plot_audit(report, plot_path), debug=debug, input_errors=(ValueError,))
    raise typer.Exit(code=report.exit_code)


def register(app: typer.Typer) -> None:
    """Add the ``audit`` command to the ``spectral-guard`` app."""
    app.command("audit", help=HELP)(audit_command)
