"""``spectral-guard esd``: one matrix's empirical spectral density and its power-law fit.

Exit codes (:mod:`spectral_guard.cli.common`): 0 the spectrum was fitted (and drawn with
``--plot``); 1 the matrix has non-finite values, so it has no spectrum (nothing drawn); 2 usage or
input error (unknown name, not a matrix, unreadable checkpoint, the plot extra missing; one line
on stderr); 3 internal error; 130 interrupted.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

import typer

from .common import EXIT_FINDINGS, check_writable, exit_codes_help, fail, guarded

HELP = """Fit and draw the empirical spectral density (ESD) of one matrix of a checkpoint.

PATH is a checkpoint file, an index.json or a folder (as for audit); NAME is a tensor name as
audit reports it (a stacked expert is NAME[e], a fused q/k/v projection's blocks NAME[q],
NAME[k], NAME[v]). The ESD is the eigenvalues of W^T W (squared singular values of a full
SVD); the power-law exponent alpha is fitted to the eigenvalues above
xmin, chosen by minimum KS distance (Clauset, Shalizi and Newman 2009: the fit the audit's alpha
and WeightWatcher report). --plot draws it on log-log axes.

""" + exit_codes_help("the spectrum was fitted", "the matrix has non-finite values (no spectrum)")


def plot_output_ready(path: Path) -> None:
    """``--plot PATH``: the plot extra is installed and PATH can be written (else exit 2)."""
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        raise fail("--plot needs matplotlib: pip install 'spectral-guard[plot]'") from None
    formats = FigureCanvasBase.get_supported_filetypes()
    if path.suffix.lower().lstrip(".") not in formats:
        raise fail(f"--plot {path}: unknown image format {path.suffix or '(no suffix)'!r} "
                   f"(use one of {', '.join('.' + f for f in sorted(formats))})")
    check_writable(path, "--plot")


def find_matrix(ckpt: Any, name: str) -> tuple[Any, Any, int]:
    """``(tensor info, its plan, index of the matrix in the plan)`` of the matrix ``name`` as
    the audit plans it (config.json next to the checkpoint says the head counts of fused q/k/v
    projections); ``ValueError`` with one line (and close names) when there is none."""
    from spectral_guard.audit import plan_tensor
    from spectral_guard.audit.plan import source_config, source_heads

    heads = source_heads(None, source_config(ckpt, None)[0])
    names: list[str] = []
    for info in ckpt.tensors:
        plan = plan_tensor(info, heads=heads)
        if isinstance(plan, str):
            if info.name == name:
                raise ValueError(f"{name}: not a matrix ({plan})")
            continue
        if name in plan.names:
            return info, plan, plan.names.index(name)
        if info.name == name:
            raise ValueError(f"{name} is audited as {len(plan.names)} matrices: give one, "
                             f"e.g. {plan.names[0]}")
        names.extend(plan.names)
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else \
        f" ({len(names)} matrices; `spectral-guard audit` lists them)"
    raise ValueError(f"no matrix named {name!r} in the checkpoint{hint}")


def esd_command(
    path: Path = typer.Argument(..., metavar="PATH", show_default=False,
                                help="Checkpoint file, index.json or folder."),
    name: str = typer.Argument(..., metavar="NAME", show_default=False,
                               help="Matrix name, e.g. model.layers.0.mlp.up_proj.weight."),
    plot: Path | None = typer.Option(None, "--plot", help="Draw the ESD to FILE (.png, .svg, "
                                     ".pdf; needs spectral-guard[plot])."),
    as_json: bool = typer.Option(False, "--json", help="Write one JSON document to stdout."),
    debug: bool = typer.Option(False, "--debug", help="On an internal error, print the "
                               "traceback too."),
) -> None:
    """Fit and draw the empirical spectral density of one matrix."""
    import torch

    from spectral_guard.checkpoint import CheckpointError, TensorStream, open_checkpoint
    from spectral_guard.integrations.plot import fit_esd, plot_esd

    if plot is not None:
        plot_output_ready(plot)

    def run() -> tuple[dict, Any]:
        ckpt = open_checkpoint(path)
        info, plan, i = find_matrix(ckpt, name)
        rows, cols = plan.shape_of(i)
        with TensorStream(info) as stream:
            W = plan.matrix(stream.full(), i).to(torch.float64)
        bad = int((~torch.isfinite(W)).sum())
        out = {"name": name, "tensor": info.name, "file": str(info.file),
               "dtype": info.dtype, "nonfinite": bad}
        if bad:
            return {**out, "shape": [rows, cols], "alpha": None, "xmin": None}, None
        fit = fit_esd(W)
        return {**out, **fit.as_dict()}, fit

    result, fit = guarded(run, debug=debug, input_errors=(CheckpointError, ValueError))
    if fit is not None and plot is not None:
        guarded(lambda: plot_esd(fit, plot, name), debug=debug, input_errors=(ValueError,))
        result["plot"] = str(plot)
    if as_json:
        typer.echo(json.dumps(result))
    else:
        m, n = result["shape"]
        if fit is None:
            typer.echo(f"{name} ({m} x {n}, {result['dtype']}): {result['nonfinite']} non-finite "
                       "value(s): no spectrum to fit")
        else:
            alpha = "nan" if result["alpha"] is None else f"{result['alpha']:.3f}"
            xmin = "nan" if result["xmin"] is None else f"{result['xmin']:.4g}"
            typer.echo(f"{name} ({m} x {n}, {result['dtype']}): {result['eigenvalues']} non-zero "
                       f"eigenvalues; alpha={alpha} fitted on the {result['n_tail']} above "
                       f"xmin={xmin}" + (f"; plot: {plot}" if "plot" in result else ""))
    if fit is None:
        raise typer.Exit(code=EXIT_FINDINGS)


def register(app: typer.Typer) -> None:
    """Add the ``esd`` command to the ``spectral-guard`` app."""
    app.command("esd", help=HELP)(esd_command)
