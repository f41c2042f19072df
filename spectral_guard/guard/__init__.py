"""Training-time guard: ``spectral_guard.instrument(model)``.

Modules: :mod:`.config` (GuardConfig), :mod:`.sampling` (which layers a check visits),
:mod:`.thermostat` (the per-layer lambda law), :mod:`.penalties` (differentiable terms),
:mod:`.instrument` (parametrization, hooks and the :class:`Guard` object).
See ``docs/guard.md``.
"""

from __future__ import annotations

from .config import GuardConfig

__all__ = ["GuardConfig"]
