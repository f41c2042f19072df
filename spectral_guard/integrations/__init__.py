"""Integrations of the guard and the audit with training frameworks, loggers and plots.

Each module imports its framework lazily and is usable only with its extra installed:

* :mod:`.hf`: ``SpectralGuardCallback`` for the Hugging Face ``Trainer`` (``spectral-guard[hf]``);
* :mod:`.lightning`: ``SpectralGuard`` Callback for Lightning (``spectral-guard[lightning]``);
* :mod:`.tensorboard`: ``log_guard(guard, writer, step)`` (``spectral-guard[tensorboard]``);
* :mod:`.plot`: audit, ESD and guard-history figures (``spectral-guard[plot]``).

:func:`guard_metrics` is the framework-free part they share: the guard's summary metrics under
the ``spectral_guard/`` prefix. See ``docs/integrations.md``.
"""

from __future__ import annotations

import importlib
from typing import Any

PREFIX = "spectral_guard/"
"""Prefix of every metric name the integrations log."""

EXTRA_FOR = {
    "transformers": "hf",
    "accelerate": "hf",
    "lightning": "lightning",
    "matplotlib": "plot",
    "tensorboard": "tensorboard",
    "numpy": "tensorboard",
}
"""Top-level module -> the ``spectral-guard`` extra that installs it."""


def require(module: str, feature: str) -> Any:
    """Import ``module`` or raise an ImportError whose one-line message names the extra."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.partition(".")[0]
        extra = EXTRA_FOR.get(top, "all")
        raise ImportError(f"{feature} needs {top}: pip install 'spectral-guard[{extra}]'"
                          f" ({exc})") from None


def guard_metrics(guard: Any) -> dict[str, float]:
    """``guard.metrics()`` with every key prefixed by ``spectral_guard/``, values as floats.

    Reads the guard's state on the host: call it when logging, not at every micro-batch.
    """
    return {PREFIX + key: float(value) for key, value in guard.metrics().items()}


__all__ = ["PREFIX", "EXTRA_FOR", "guard_metrics", "require"]
