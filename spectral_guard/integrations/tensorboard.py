"""TensorBoard: ``guard.log_to(writer, step)`` = :func:`log_guard`.

Writes, at ``step``:

* the summary metrics, ``spectral_guard/<metric>`` (the keys of ``guard.metrics()``);
* per guarded layer, ``spectral_guard/layers/<layer>/<reading>`` for the readings in
  :data:`LAYER_SCALARS` that the layer has (a reading a check did not measure is skipped) and its
  ``lambda``;
* a histogram over layers of the latest effective-rank retention,
  ``spectral_guard/effective_rank_retention``.

``writer`` is anything with TensorBoard's ``add_scalar`` / ``add_histogram`` (a
``torch.utils.tensorboard.SummaryWriter``), or a log directory: a ``SummaryWriter`` is then
opened on it, written and closed. Reads the guard's state on the host: call it when logging.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from . import PREFIX, guard_metrics, require

LAYER_SCALARS = ("effective_rank_retention", "stable_rank_retention", "condition_growth",
                 "effective_rank", "stable_rank", "sigma_max")
"""Per-layer readings written as scalars (with the layer's ``lambda``)."""


def log_guard(guard: Any, writer: Any, step: int) -> None:
    """Write the guard's metrics, per-layer scalars and the retention histogram at ``step``."""
    if isinstance(writer, (str, Path)):
        require("tensorboard", "guard.log_to(<log dir>, step)")
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(log_dir=str(writer)) as opened:
            log_guard(guard, opened, step)
        return
    for key, value in guard_metrics(guard).items():
        writer.add_scalar(key, value, step)
    retention: list[float] = []
    for name, layer in guard.stats()["layers"].items():
        readings = layer["sensors"]
        for key in LAYER_SCALARS:
            value = readings.get(key, math.nan)
            if math.isfinite(value):
                writer.add_scalar(f"{PREFIX}layers/{name}/{key}", value, step)
        writer.add_scalar(f"{PREFIX}layers/{name}/lambda", float(layer["lambda"]), step)
        value = readings.get("effective_rank_retention", math.nan)
        if math.isfinite(value):
            retention.append(value)
    if retention:
        numpy = require("numpy", "the effective-rank retention histogram")
        writer.add_histogram(f"{PREFIX}effective_rank_retention",
                             numpy.asarray(retention, dtype=numpy.float64), step)


__all__ = ["LAYER_SCALARS", "log_guard"]
