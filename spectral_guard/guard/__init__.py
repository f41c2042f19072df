"""Training-time guard: ``spectral_guard.instrument(model)``.

Modules, one idea each: :mod:`.config` (GuardConfig), :mod:`.sensors` (the sensor registry),
:mod:`.select` (which layers), :mod:`.state` (per-layer state, device and host),
:mod:`.check` (readings, verdict and thermostat update as pure functions),
:mod:`.protocol` (the async check: packed copy, event, worker, one-step lag),
:mod:`.worker` (the layer checks' device half and decompositions), :mod:`.cycle` (the layer
checks' host logic), :mod:`.attention` (the attention-logit checks), :mod:`.sampling` (which
layers a check visits), :mod:`.thermostat` (the lambda law), :mod:`.alarm` and :mod:`.signs`
(the alarm policy, the matrix sign's schedule), :mod:`.msign`, :mod:`.backoff`,
:mod:`.penalties` (differentiable terms) and :mod:`.penalty` (the loss term), :mod:`.install`
(parametrizations and hooks), :mod:`.hooks`, :mod:`.clock` (which optimizers advance it),
:mod:`.persist` (state dict), :mod:`.stats` (reports) and :mod:`.instrument` (the
:class:`Guard` facade). See ``docs/guard.md``.
"""

from __future__ import annotations

from .config import GuardConfig

__all__ = ["GuardConfig"]
