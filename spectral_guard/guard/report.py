"""Rich table of :meth:`spectral_guard.guard.instrument.Guard.stats` (renders, computes nothing)."""

from __future__ import annotations

import math
from typing import Any

from .sensors import RELATIVE


def _fmt(x: float | None, spec: str = ".3g") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def render_stats(stats: dict[str, Any], console: Any = None) -> None:
    """Print one row per guarded layer and a totals line.

    Sensor columns are those of the sensors that drive some layer's thermostat (the effective
    rank alone by default; also shown when no layer has one, e.g. only watched layers).
    """
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    t = stats["totals"]
    layers = stats["layers"]
    active = {sensor for row in layers.values() for sensor in row["thresholds"]}
    shown = [(s.reading, s.column) for s in RELATIVE.values()
             if s.name in active or (not active and s.name == "effective_rank")]
    table = Table(title=f"spectral_guard: step {t['step']}, {t['layers']} guarded layers")
    table.add_column("layer", no_wrap=True)
    for _, header in shown:
        table.add_column(header, justify="right")
    for header in ("lambda", "checks", "interventions", "last checked"):
        table.add_column(header, justify="right")
    table.add_column("flags")
    for name, row in layers.items():
        flags = "NON-FINITE" if row["nonfinite"] else ("treated" if row["lambda"] > 0 else
                                                         "frozen" if row["frozen"] else "")
        table.add_row(name, *(_fmt(row["sensors"][key]) for key, _ in shown),
                      _fmt(row["lambda"]), str(row["checks"]), str(row["interventions"]),
                      str(row["last_checked_step"]), flags)
    console.print(table)
    console.print(f"checks {t['checks']}, interventions {t['interventions']}, treated layers "
                  f"{t['treated_layers']}, non-finite layers {t['nonfinite_layers']}, skipped "
                  f"{t['skipped']}, guard time {t['guard_time_s']:.3f} s")
