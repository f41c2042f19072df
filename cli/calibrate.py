"""``spectral-guard calibrate``: thin command over :func:`spectral_guard.calibration.calibrate`.

Exit codes (:mod:`spectral_guard.cli.common`): 0 thresholds written; 1 nothing written: the
references look randomly initialized (``--allow-random`` writes) or the new thresholds flag a
reference (``--force`` writes), the message says which matrix and why; 2 usage or input error;
3 internal error; 130 interrupted.
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

HELP = ("Learn a thresholds file from healthy reference checkpoints; every reference passes "
        "it.\n\n"
        "REF is what audit takes: a .safetensors file, a *.safetensors.index.json, or a folder "
        "holding either; give several. Each group (conv kernels; output heads, position and "
        "token embeddings, attention, mlp, other) gets floors min(P10 x 0.8, 0.9 x smallest "
        "reference) (stable rank, its ratio, effective-rank ratio, alpha) and ceilings max(P90 "
        "x 1.5, largest reference / 0.9) (condition number, alpha, q-k logit scale); a group "
        "with fewer than 8 matrices starts from the shipped rule of its role. The file works "
        "with audit --thresholds and instrument(model, FILE). See docs/calibration.md.\n\n"
        + exit_codes_help("thresholds written", "nothing written: the references look randomly "
                          "initialized (--allow-random writes), or the new thresholds flag a "
                          "reference (--force writes)"))

_RULE_OPTIONS = {"floor_percentile": "--floor-percentile", "floor_margin": "--floor-margin",
                 "ceiling_percentile": "--ceiling-percentile",
                 "ceiling_margin": "--ceiling-margin", "min_group": "--min-group",
                 "reference_margin": "--reference-margin"}


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
    heads: int | None = typer.Option(None, "--heads", min=1, help="Attention heads per layer, for "
                                     "the q-k logit scale (as in audit; default: config.json "
                                     "next to the checkpoint)."),
    floor_percentile: float = typer.Option(10.0, "--floor-percentile",
                                           help="Percentile floors are learned from."),
    floor_margin: float = typer.Option(0.8, "--floor-margin", help="Floor = percentile x this "
                                       "(at most --reference-margin x the smallest reference)."),
    ceiling_percentile: float = typer.Option(90.0, "--ceiling-percentile",
                                             help="Percentile ceilings are learned from."),
    ceiling_margin: float = typer.Option(1.5, "--ceiling-margin",
                                         help="Ceiling = percentile x this (at least the "
                                         "largest reference / --reference-margin)."),
    min_group: int = typer.Option(8, "--min-group", help="A group with fewer matrices starts "
                                  "from the shipped rule of its role."),
    reference_margin: float = typer.Option(0.9, "--reference-margin", help="In (0, 1]: every "
                                           "reference lies at least 1 - this inside its "
                                           "limits."),
    run: bool = typer.Option(False, "--run", help="The references are successive checkpoints "
                             "of one run, earliest first: derive the guard's retention floors "
                             "from their drift."),
    allow_random: bool = typer.Option(False, "--allow-random", help="Write the file even if "
                                      "the references look randomly initialized."),
    force: bool = typer.Option(False, "--force", help="Write the file even if it flags a "
                               "reference (NaN/Inf, dead units, duplicate rows: limits that "
                               "are not learned)."),
    as_json: bool = typer.Option(False, "--json", help="Write one JSON document to stdout and "
                                 "nothing else."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No table or progress bar: only "
                               "the summary paragraph."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
    debug: bool = typer.Option(False, "--debug", help="On an internal error, print the "
                               "traceback too."),
) -> None:
    """Learn a thresholds file from healthy reference checkpoints."""
    from spectral_guard.calibration import (
        CalibrationRule,
        RuleError,
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
                               ceiling_margin, min_group, reference_margin)
    except RuleError as exc:
        raise fail(f"{_RULE_OPTIONS[exc.option]} {exc.detail}") from None
    if run and len(references) < 2:
        raise fail("--run needs at least two references (successive checkpoints of one run, "
                   "earliest first)")
    check_writable(out, "--out")

    def work():
        with progress_bar("calibrate", show_progress(quiet or as_json, no_progress)) as progress:
            return calibrate(references, mode=mode.value, limit=limit, seed=seed, rule=rule,
                             run=run, include=include, exclude=exclude, heads=heads,
                             progress=progress)

    cal = guarded(work, debug=debug, input_errors=(CheckpointError, ThresholdsError, ValueError))
    warnings = list(cal.warnings)
    refusals = []
    if cal.looks_random:
        if allow_random:
            warnings.insert(0, cal.random.message() + "; written anyway (--allow-random)")
        else:
            refusals.append(cal.random.message() + "; nothing written (--allow-random writes "
                            "it anyway)")
    sa = cal.self_audit
    if not sa.clean:
        flagged = (f"the new thresholds flag {len(sa.names)} of {sa.matrices} reference "
                   f"matrices: {sa.describe()}")
        if force:
            warnings.append(flagged + "; written anyway (--force)")
        else:
            refusals.append(flagged + "; nothing written (--force writes it anyway)")
    if not refusals:
        try:
            cal.thresholds.save(out)
        except OSError as exc:
            raise fail(f"--out {out}: cannot write ({exc.strerror or exc})") from None
        # the self-audit reads the file just written: what audit --thresholds OUT would say
        cal.self_audit = guarded(lambda: rejudge(cal.matrices, load_thresholds(out)),
                                 debug=debug, input_errors=(ThresholdsError,))
    if as_json:
        doc = {**cal.to_json_dict(), "out": str(out), "written": not refusals,
               "refused": refusals, "warnings": warnings}
        typer.echo(json.dumps(doc, indent=2))
    else:
        console = stdout_console()
        if not quiet:
            console.print(calibration_table(cal))
        for line in refusals:
            typer.echo(f"error: {line}", err=True)
        for line in warnings:
            typer.echo(f"warning: {line}", err=True)
        console.print(calibration_text(cal, None if refusals else out), highlight=False)
    raise typer.Exit(code=EXIT_FINDINGS if refusals else 0)


def register(app: typer.Typer) -> None:
    """Add the ``calibrate`` command to the ``spectral-guard`` app."""
    app.command("calibrate", help=HELP)(calibrate_command)
