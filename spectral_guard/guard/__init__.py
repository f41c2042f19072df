"""Training-time guard: ``spectral_guard.instrument(model)``.

Modules, one idea each: :mod:`.config` (GuardConfig), :mod:`.sensors` (the sensor registry),
:mod:`.select` (which layers), :mod:`.state` (per-layer state, device and host),
:mod:`.check` (readings, verdict and thermostat update as pure functions), :mod:`.worker`
(checks off the critical path), :mod:`.sampling` (which layers a check visits),
:mod:`.thermostat` (the lambda law), :mod:`.penalties` (differentiable terms), :mod:`.hooks`
(forward hook, clock, state_dict hooks) and :mod:`.instrument` (the :class:`Guard` object).
See ``docs/guard.md``.
"""

from __future__ import annotations

from .config import GuardConfig

__all__ = ["GuardConfig"]
