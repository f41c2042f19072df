"""Rich table of :meth:`spectral_guard.guard.instrument.Guard.stats` (renders, computes nothing)."""

from __future__ import annotations

import math
from typing import Any


def _fmt(x: float, spec: str = ".3g") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def render_stats(stats: dict[str, Any], console: Any = None) -> None:
    """Print one row per guarded layer and a totals line."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    t = stats["totals"]
    table = Table(title=f"spectral_guard: step {t['step']}, {t['layers']} guarded layers")
    for col in ("layer", "erank ret.", "SR ret.", "kappa growth", "fiedler", "lambda",
                "checks", "interv.", "last step", "flags"):
        table.add_column(col, justify="left" if col in ("layer", "flags") else "right")
    for name, row in stats["layers"].items():
        s = row["sensors"]
        flags = "NON-FINITE" if row["nonfinite"] else ("treated" if row["lambda"] > 0 else "")
        table.add_row(name, _fmt(s["effective_rank_retention"]), _fmt(s["stable_rank_retention"]),
                      _fmt(s["condition_growth"]), _fmt(s["fiedler"]), _fmt(row["lambda"], ".2e"),
                      str(row["checks"]), str(row["interventions"]),
                      str(row["last_checked_step"]), flags)
    console.print(table)
    console.print(f"checks {t['checks']}, interventions {t['interventions']}, treated layers "
                  f"{t['treated_layers']}, non-finite layers {t['nonfinite_layers']}, skipped "
                  f"{t['skipped']}, guard time {t['guard_time_s']:.3f} s")
