"""The guard's loss term: ``penalty_scale * (sum_treated lambda_l P_l(W_l) + attention hinge +
block-update hinge)``.

Built in the training forward (``auto_loss``) or by :meth:`Guard.penalty`, with autocast off
(the terms of :mod:`.penalties` choose their own precision: 16-bit weights stay 16-bit) and
non-finite terms dropped on the device (``torch.where``: no host read).
"""

from __future__ import annotations

from typing import Any

import torch

from ..estimators import no_autocast
from . import sharded
from .install import GuardedLayer
from .penalties import condition_term, l2_term, spectral_collapse_term

Tensor = torch.Tensor


def layer_term(layer: GuardedLayer, actuator: str) -> Tensor | None:
    """``lambda P(W)`` of one treated layer (``None`` when no term applies)."""
    W, st, probe = layer.weight, layer.state, layer.probe
    if sharded.is_sharded(W):  # FSDP2: local rows, global value (guard/sharded.py)
        return sharded.term(W, probe, st, actuator)
    lam_c, lam_k = st.term_lambdas(actuator)
    if actuator == "l2":
        return (lam_c + lam_k) * l2_term(W)
    term = lam_c * spectral_collapse_term(W, probe.u, probe.v) if lam_c > 0 else None
    if lam_k > 0 and st.cond_pairs > 1:
        t = lam_k * condition_term(probe.biopsy(W), probe.cond_u, probe.cond_v,
                                   st.log_kappa_max, st.cond_eps)
        term = t if term is None else term + t
    return term


def build(layers: list[GuardedLayer], actuator: str, attention: Any,
          device: torch.device | None, scale: float = 1.0, blocks: Any = None) -> Tensor | None:
    """The whole penalty on ``device`` (each term on its weight's device when ``None``), or
    ``None`` when nothing is treated (``blocks``: the block-update terms of the latest
    training forward, :mod:`.blocks`)."""
    total: Tensor | None = None
    for layer in layers:
        if not layer.state.treated or not layer.penalized:
            continue
        W = layer.weight
        with no_autocast(W.device.type):
            term = layer_term(layer, actuator)
        if term is None:
            continue
        term = torch.where(torch.isfinite(term), term, torch.zeros_like(term))
        term = term.to(device or W.device)
        total = term if total is None else total + term
    for component in (attention, blocks):
        term = component.penalty(device) if component is not None else None
        if term is not None:
            total = term if total is None else total + term.to(total.device)
    if total is not None and scale != 1.0:
        total = total * scale
    return total


class PenaltyCopy:
    """The penalty's value on the host, carried by the step's packed copy (a
    :class:`~.protocol.Component`): the last penalty built before the advance to step ``s``
    (``last_penalty``, one micro-batch's) rides that step's shipment and is applied at the
    advance to ``s + 1``; ``metrics()["penalty"]`` reads it, one step behind, with no host
    read of a device tensor on the training thread."""

    name = "penalty"

    def __init__(self, guard: Any) -> None:
        self.guard = guard

    def apply(self, result: Any | None, step: int) -> None:
        if result is not None:
            self.guard.penalty_host = (step, result)

    def launch(self, step: int, packer: Any) -> Any:
        last = self.guard.last_penalty
        if last is None:
            return None
        slot = packer.put(last.reshape(1))
        return lambda shipment: float(shipment.read(slot)[0])
