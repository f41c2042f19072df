"""Renderers for an audit :class:`~spectral_guard.audit.Report`: rich table, verdict, JSON, CSV.

Nothing here computes a metric or a status; it only formats what the report holds.
"""

from __future__ import annotations

import csv
import io
import json
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    from .audit import MatrixResult, Report

STATUS_STYLE = {
    "ok": "green",
    "suspicious": "yellow",
    "ill_conditioned": "yellow",
    "logit_risk": "yellow",
    "collapsed": "bold red",
    "dead_units": "bold red",
    "nonfinite": "bold red",
}

CSV_FIELDS = ("name", "tensor", "file", "shape", "read_as", "dtype", "group", "mode",
              "measured_shape", "status", "reasons", "stable_rank", "stable_rank_ratio",
              "row_stable_rank", "condition_number",
              "singular", "sigma_max", "sigma_min", "effective_rank", "effective_rank_ratio",
              "alpha", "nonfinite", "dead_rows", "dead_cols", "duplicate_rows",
              "duplicate_sample", "logit_typical", "logit_scale", "logit_head", "logit_pair")


def _g(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "-"
    if x != 0 and (abs(x) >= 1e5 or abs(x) < 1e-3):
        return f"{x:.{digits}g}"
    return f"{x:.{digits}g}" if abs(x) >= 1000 else f"{x:.{digits}f}".rstrip("0").rstrip(".")


def _kappa(m: MatrixResult) -> str:
    if m.singular:
        return "inf"
    return _g(m.condition_number)


def _shape(shape: tuple[int, ...] | list[int]) -> str:
    return "x".join(str(d) for d in shape)


def audit_table(report: Report, top: int | None = None) -> Table:
    """Worst-first table of the audited matrices (the report is already sorted)."""
    rows = report.matrices if top is None else report.matrices[:top]
    title = f"spectral-guard audit ({report.mode})"
    if top is not None and top < len(report.matrices):
        title += f": worst {top} of {len(report.matrices)}"
    table = Table(title=title, header_style="bold", show_lines=False)
    for col, justify in (("name", "left"), ("shape", "right"), ("read as", "left"),
                         ("dtype", "left"),
                         ("SR", "right"), ("SR/k", "right"), ("row SR", "right"),
                         ("kappa", "right"),
                         ("erank/k", "right"), ("alpha", "right"), ("status", "left"),
                         ("reason", "left")):
        table.add_column(col, justify=justify, overflow="fold")
    logit = any(m.logit_scale is not None for m in report.matrices)
    if logit:  # only when the attention-logit pass measured a pair: max_h tau_h, max_h s_h n
        table.add_column("qk logit", justify="right", overflow="fold")
        table.add_column("qk bound", justify="right", overflow="fold")
    for m in rows:
        table.add_row(
            m.name, _shape(m.shape), m.read_as, m.dtype, _g(m.stable_rank), _g(m.stable_rank_ratio),
            _g(m.row_stable_rank), _kappa(m), _g(m.effective_rank_ratio), _g(m.alpha),
            Text(m.status, style=STATUS_STYLE.get(m.status, "")),
            (m.reasons[0] + (f" (+{len(m.reasons) - 1})" if len(m.reasons) > 1 else ""))
            if m.reasons else "",
            *((_g(m.logit_typical), _g(m.logit_scale)) if logit else ()))
    return table


def skipped_table(report: Report) -> Table:
    table = Table(title="skipped tensors", header_style="bold")
    for col in ("name", "shape", "dtype", "reason"):
        table.add_column(col, overflow="fold")
    for s in report.skipped:
        table.add_row(s.name, _shape(s.shape) or "()", s.dtype, s.reason)
    return table


def render_text(report: Report, console: Console, top: int | None = None,
                quiet: bool = False, show_skipped: bool = False) -> None:
    """Table (unless ``quiet``), optional skipped list, then the verdict paragraph."""
    if not quiet:
        console.print(audit_table(report, top))
        if show_skipped and report.skipped:
            console.print(skipped_table(report))
        elif report.skipped:
            console.print(f"{len(report.skipped)} tensor(s) skipped (1-D, integer, ...); "
                          "--show-skipped lists them.", style="dim")
    style = "bold green" if report.healthy else "bold red"
    console.print(Text(report.verdict_text(), style=style))


def render_json(report: Report) -> str:
    """The JSON document (strict: raises if a NaN/Inf slipped through)."""
    return json.dumps(report.to_json_dict(), indent=2, allow_nan=False)


def render_csv(report: Report) -> str:
    """One CSV row per matrix, worst first; shapes as ``MxN``, reasons joined by ``; ``."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for m in report.matrices:
        d = m.to_json_dict()
        row = {k: d[k] for k in CSV_FIELDS}
        row["shape"] = _shape(d["shape"])
        row["measured_shape"] = _shape(d["measured_shape"])
        row["reasons"] = "; ".join(d["reasons"])
        row = {k: ("" if v is None else v) for k, v in row.items()}
        writer.writerow(row)
    return buf.getvalue()
