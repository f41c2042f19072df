"""``spectral-guard calibrate``: thin command over :func:`spectral_guard.calibrate.calibrate`.

Exit codes (:mod:`spectral_guard.cli.common`): 0 thresholds written; 1 the references look
randomly initialized and nothing was written (``--allow-random`` proceeds); 2 usage or input
error; 3 internal error; 130 interrupted.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from .audit import Mode
from .common import (
    EXIT_FINDINGS,
    check_writable,
    exit_codes_help,
    fail,
    guarded,
    progress_bar,
    show_progress,
    stdout_console,
)

HELP = ("Learn a thresholds file from healthy reference checkpoints.\n\n"
        "REF is what audit takes: a .safetensors file, a *.safetensors.index.json, or a folder "
        "holding either; give several. Each role group (attention, mlp, embeddings, heads, "
        "other) gets floors P10 x 0.8 (stable rank, its ratio, effective-rank ratio, alpha) and "
        "ceilings P90 x 1.5 (condition number, alpha). The file works with audit --thresholds "
        "and instrument(model, FILE). See docs/calibration.md.\n\n"
        + exit_codes_help("thresholds written", "the references look randomly "
                          "initialized: nothing written (--allow-random proceeds)"))


def calibrate_command(
    references: list[Path] = typer.Argument(..., metavar="REF...", show_default=False,
                                            help="Healthy reference checkpoint(s): file(s), "
                                            "index.json or folder(s)."),
    out: Path = typer.Option(..., "--out", "-o", help="Thresholds file to write (JSON)."),
    mode: Mode = typer.Option(Mode.biopsy, "--mode", help="biopsy (seeded submatrix) or exact "
                              "(full SVD); use the mode you will audit with."),
    limit: int = typer.Option(128, "--limit", help="Biopsy size, as in audit."),
    seed: int = typer.Option(0, "--seed", help="Seed of the biopsy sample."),
    include: list[str] = typer.Option([], "--include", help="Only tensors whose name matches "
                                      "this regex (repeatable)."),
    exclude: list[str] = typer.Option([], "--exclude", help="Skip tensors whose name matches "
                                      "this regex (repeatable)."),
    floor_percentile: float = typer.Option(10.0, "--floor-percentile",
                                           help="Percentile floors are learned from."),
    floor_margin: float = typer.Option(0.8, "--floor-margin", help="Floor = percentile x this."),
    ceiling_percentile: float = typer.Option(90.0, "--ceiling-percentile",
                                             help="Percentile ceilings are learned from."),
    ceiling_margin: float = typer.Option(1.5, "--ceiling-margin",
                                         help="Ceiling = percentile x this."),
    min_group: int = typer.Option(8, "--min-group", help="A role group with fewer matrices "
                                  "uses the global rule."),
    run: bool = typer.Option(False, "--run", help="The references are successive checkpoints "
                             "of one run, earliest first: derive the guard's retention floors "
                             "from their drift."),
    allow_random: bool = typer.Option(False, "--allow-random", help="Write the file even if "
                                      "the references look randomly initialized."),
    as_json: bool = typer.Option(False, "--json", help="Write one JSON document to stdout and "
                                 "nothing else."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No table or progress bar: only "
                               "the summary paragraph."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
    debug: bool = typer.Option(False, "--debug", help="On an internal error, print the "
                               "traceback too."),
) -> None:
    """Learn a thresholds file from healthy reference checkpoints."""
    from spectral_guard.calibrate import (
        CalibrationRule,
        calibrate,
        calibration_table,
        calibration_text,
        rejudge,
    )
    from spectral_guard.checkpoint import CheckpointError
    from spectral_guard.thresholds import ThresholdsError, load_thresholds

    if as_json and quiet:
        raise fail("--quiet shapes the table and cannot be combined with --json")
    try:
        rule = CalibrationRule(floor_percentile, floor_margin, ceiling_percentile,
                               ceiling_margin, min_group)
    except ValueError as exc:
        raise fail(f"--{exc}") from None
    check_writable(out, "--out")

    def work():
        with progress_bar("calibrate", show_progress(quiet or as_json, no_progress)) as progress:
            return calibrate(references, mode=mode.value, limit=limit, seed=seed, rule=rule,
                             run=run, include=include, exclude=exclude, progress=progress)

    cal = guarded(work, debug=debug, input_errors=(CheckpointError, ThresholdsError, ValueError))
    refused = cal.looks_random and not allow_random
    if not refused:
        try:
            cal.thresholds.save(out)
        except OSError as exc:
            raise fail(f"--out {out}: cannot write ({exc.strerror or exc})") from None
        # the self-audit reads the file just written: what audit --thresholds OUT would say
        cal.self_audit = guarded(lambda: rejudge(cal.matrices, load_thresholds(out)),
                                 debug=debug, input_errors=(ThresholdsError,))
    warnings = list(cal.warnings)
    if cal.looks_random:
        warnings.insert(0, cal.random.message() + ("; nothing written (--allow-random writes "
                                                   "it anyway)" if refused else
                                                   "; written anyway (--allow-random)"))
    if as_json:
        doc = {**cal.to_json_dict(), "out": str(out), "written": not refused,
               "warnings": warnings}
        typer.echo(json.dumps(doc, indent=2))
    else:
        console = stdout_console()
        if not quiet:
            console.print(calibration_table(cal))
        for line in warnings:
            typer.echo(f"warning: {line}", err=True)
        console.print(calibration_text(cal, None if refused else out), highlight=False)
    raise typer.Exit(code=EXIT_FINDINGS if refused else 0)


def register(app: typer.Typer) -> None:
    """Add the ``calibrate`` command to the ``spectral-guard`` app."""
    app.command("calibrate", help=HELP)(calibrate_command)
