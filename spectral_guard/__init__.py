"""spectral_guard: keep the weight matrices of PyTorch models spectrally healthy.

* ``spectral_guard.instrument(model)``: training-time guard (sampled sensors, adaptive penalty).
* ``spectral_guard.audit(path_or_model)``: streaming audit of safetensors and PyTorch
  checkpoints, live models and state_dicts.
* ``spectral_guard.sensors`` / ``spectral_guard.estimators``: the math, as pure functions.

Heavy submodules are imported on first use, so ``import spectral_guard`` stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

from .thresholds import Rule, Thresholds, load_thresholds

__version__ = "0.1.0"

_LAZY = {
    "audit": ("spectral_guard.audit", "audit"),
    "instrument": ("spectral_guard.guard.instrument", "instrument"),
    "remove": ("spectral_guard.guard.instrument", "remove"),
    "Guard": ("spectral_guard.guard.instrument", "Guard"),
    "GuardConfig": ("spectral_guard.guard.config", "GuardConfig"),
    "auto_calibrate": ("spectral_guard.guard.auto", "auto_calibrate"),
    "sensors": ("spectral_guard.sensors", None),
    "estimators": ("spectral_guard.estimators", None),
}

__all__ = ["Rule", "Thresholds", "load_thresholds", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'spectral_guard' has no attribute {name!r}")
    module_name, attr = _LAZY[name]
    module = importlib.import_module(module_name)
    return module if attr is None else getattr(module, attr)
