"""A calibration as a rich table and a summary paragraph (computes nothing)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from .groups import UNGUARDED_GROUPS
from .rule import Learned

if TYPE_CHECKING:
    from .offline import Calibration

SUMMARY_FIELDS = ("stable_rank_ratio_min", "stable_rank_min", "effective_rank_ratio_min",
                  "condition_number_max", "alpha_min", "alpha_max")
_SHORT = {"stable_rank_ratio_min": "SR/k min", "stable_rank_min": "SR min",
          "effective_rank_ratio_min": "erank/k min", "condition_number_max": "kappa max",
          "alpha_min": "alpha min", "alpha_max": "alpha max"}


def _fmt(x: float | None) -> str:
    if x is None:
        return "off"
    if math.isinf(x):
        return "inf"
    return f"{x:.3g}" if (abs(x) >= 1e4 or (x != 0 and abs(x) < 1e-2)) else f"{x:.4g}"


def _cell(learned: Learned | None) -> str:
    """``value (P10 x)`` for a percentile, ``value (shipped)`` for a fallback; ``*`` marks a
    value the law widened to pass the references."""
    if learned is None:
        return "-"
    mark = "*" if learned.widened else ""
    if learned.value is None:
        return "off" + mark
    if learned.source == "percentile":
        return f"{_fmt(learned.value)}{mark} (P{learned.percentile:g} " \
               f"{_fmt(learned.at_percentile)})"
    return f"{_fmt(learned.value)}{mark} (shipped)"


def calibration_table(cal: Calibration):  # -> rich.table.Table
    """Per group: matrices and each learned threshold with where it came from."""
    from rich.table import Table

    table = Table(title=f"spectral-guard calibrate ({cal.mode}"
                  + (f", limit {cal.limit}" if cal.mode == "biopsy" else "") + ")",
                  header_style="bold", caption="* widened to pass every reference "
                  f"(floor <= {cal.rule.reference_margin:g} x smallest, ceiling >= largest / "
                  f"{cal.rule.reference_margin:g})")
    table.add_column("group")
    table.add_column("matrices", justify="right")
    for f in SUMMARY_FIELDS:
        table.add_column(_SHORT[f], justify="right")
    if cal.run:
        table.add_column("erank retention", justify="right")
    for g in [cal.glob, *cal.groups]:
        row = [g.name, str(g.matrices), *(_cell(g.learned.get(f)) for f in SUMMARY_FIELDS)]
        if cal.run:
            guard = g.guard.get("effective_rank_retention_min")
            row.append("-" if g.name in UNGUARDED_GROUPS or g.name == "global"
                       else _cell(guard) if guard else "shipped")
        table.add_row(*row)
    return table


def calibration_text(cal: Calibration, out: str | Path | None) -> str:
    """The paragraph printed under the table; ``out`` is ``None`` when nothing was written
    (then the self-audit is not reported: it would describe a file that does not exist)."""
    r = cal.rule
    text = (f"Rule: floors min(P{r.floor_percentile:g} x {r.floor_margin:g}, "
            f"{r.reference_margin:g} x smallest reference), ceilings max(P"
            f"{r.ceiling_percentile:g} x {r.ceiling_margin:g}, largest reference / "
            f"{r.reference_margin:g}); groups with fewer than {r.min_group} matrices start "
            "from the shipped rule of their role.")
    if out is None:
        return "Nothing written. " + text
    sa = cal.self_audit
    flagged = sum(sa.flagged.values())
    text = f"Wrote {out}. {text} Self-audit: the file flags {flagged} of {sa.matrices} " \
           "reference matrices"
    if flagged:
        text += " (" + ", ".join(f"{n} {s}" for s, n in sa.flagged.items()) + "): " \
                + sa.describe()
    return text + "."
