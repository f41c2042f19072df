"""The attention-logit guard: per-head query-key spectral scale, a hinge penalty, a rescale.

For an attention head ``h`` with query rows ``W_q,h`` and key rows ``W_k,h`` (``d_h x n``
each), the pre-softmax logit between a query input ``x_i`` and a key input ``x_j`` is
``x_i^T M_h x_j / sqrt(d_h)`` with ``M_h = W_q,h^T W_k,h`` (biases left out). The guard's
reading is the head's **logit scale**

    ``s_h = sigma_max(M_h) / sqrt(d_h)``,

so ``|logit_ij| <= s_h ||x_i|| ||x_j||``; behind a LayerNorm/RMSNorm with unit gains
``||x|| ~ sqrt(n)``, hence ``|logit| <~ s_h n``. Attention entropy collapse is the growth of
this scale (sigmaReparam, Zhai et al. 2023, bound the entropy from below by a decreasing function
of ``||W_q W_k^T||``; Wortsman et al. 2023, arXiv 2309.14322, show the logit growth at high
learning rates).

Measurement, on the device with no host read: a warm power iteration on ``M_h`` that never forms
the ``n x n`` product, batched over heads: ``u <- normalize(W_q,h^T (W_k,h v))``,
``v <- normalize(W_k,h^T (W_q,h u))``, ``sigma = (W_q,h u) . (W_k,h v)``. ``M_h`` has rank
``<= d_h``, and the vectors persist across steps, so one iteration per check tracks it.

Actuators (``GuardConfig.attention_actuator``; ``"penalty"`` is the default, chosen by
``bench/efficacy.py``: see docs/efficacy.md):

* ``"penalty"``: ``lambda * sum_h relu(s_h / t - 1)^2`` with ``s_h`` computed as
  ``(W_q,h u_h) . (W_k,h v_h) / sqrt(d_h)`` with ``u_h, v_h`` held constant (the exact first-order
  gradient of ``sigma_max``, as ``torch.nn.utils.parametrizations.spectral_norm`` does) and
  ``t`` the pair's target scale; ``lambda`` per pair follows the guard's thermostat
  (:mod:`.thermostat`) with severity ``clip(1 - t / max_h s_h, 0, 1)``;
* ``"rescale"``: after the optimizer step, a direct weight surgery like QK-Clip (Kimi K2,
  arXiv 2507.20534) on the measured spectral scale instead of observed logits:
  ``r_h = min(1, t / s_h)``; the key head ``j`` shared by a group ``G_j`` of query heads (GQA) is
  scaled by ``f_j = sqrt(min_{h in G_j} r_h)`` and each query head by ``r_h / f_j``, so every
  head's product ``M_h`` is scaled by exactly ``r_h`` (heads under the target are unchanged).
  Device ops only (``torch.where``), every pair at every step.

Pairing: :func:`spectral_guard.attention_pairs.find_pairs` (shared with the audit).

Timing: the readings of the pairs sampled at the advance to step ``s`` go through the guard's
async check protocol (:mod:`.protocol`: in the same packed copy as the layer checks, read on
the worker thread) and are applied at the advance to ``s + 1``, as the layer checks are: a
fixed one-step lag, so runs are deterministic and resumable.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from ..attention_pairs import AttentionPair, find_pairs
from ..estimators import name_seed, no_autocast
from .protocol import AsyncChecks, HostFn, Packer, Slot
from .sampling import LayerSchedule, check_index
from .thermostat import ceiling_update

Tensor = torch.Tensor

DEFAULT_MAX_LOGIT = 64.0
"""With ``attention_max_scale=None`` a pair's target is
``t = max(DEFAULT_MAX_LOGIT / n, BASELINE_MARGIN * s_0)`` (``n`` the input width, ``s_0`` the
pair's largest head scale when instrumented): a bound of ``DEFAULT_MAX_LOGIT`` on ``s_h n``,
the logit reachable by unit-RMS inputs aligned with the head's top singular pair; weights that
start above it (a pretrained model) are held within ``BASELINE_MARGIN`` of their own starting
scale instead of being cut down to it."""

RESCALE_ITERS = 3
"""Warm power-iteration steps per pair and step for the rescale actuator (at least). One step
reads a lower bound of ``sigma_max``; when a step moves the weights far (Adam at a high learning
rate), that bound lags and the cut falls short (measured: up to 2.2x over the target with one
step, 1.2x with two, 1.03x with three, on a 2-layer model at lr 0.02, weights of std 0.02)."""

BASELINE_MARGIN = 1.5
"""How far above its instrumented scale a pair may grow when that is above the default target."""

# ----------------------------------------------------------------------------------------------
# Math (pure, on tensors)


def power_step(Wq: Tensor, Wk: Tensor, u: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One batched power-iteration step on ``M_h = W_q,h^T W_k,h`` (``heads x d_h x n`` inputs,
    ``heads x n`` vectors) without forming ``M_h``; returns ``(sigma_h, u, v)``."""
    tiny = torch.finfo(Wq.dtype).tiny
    Mv = torch.einsum("hdn,hd->hn", Wq, torch.einsum("hdn,hn->hd", Wk, v))
    u = Mv / Mv.norm(dim=-1, keepdim=True).clamp_min(tiny)
    a = torch.einsum("hdn,hn->hd", Wq, u)
    Mtu = torch.einsum("hdn,hd->hn", Wk, a)
    v = Mtu / Mtu.norm(dim=-1, keepdim=True).clamp_min(tiny)
    sigma = (a * torch.einsum("hdn,hn->hd", Wk, v)).sum(-1)
    return sigma, u, v


def head_scales(Wq: Tensor, Wk: Tensor, u: Tensor, v: Tensor) -> Tensor:
    """``s_h = (W_q,h u_h) . (W_k,h v_h) / sqrt(d_h)``, differentiable in the weights (``u, v``
    constant: the first-order gradient of ``sigma_max(M_h) / sqrt(d_h)`` at converged vectors)."""
    d_h = Wq.shape[-2]
    a = torch.einsum("hdn,hn->hd", Wq, u.to(Wq.dtype))
    b = torch.einsum("hdn,hn->hd", Wk, v.to(Wk.dtype))
    return (a * b).sum(-1) / math.sqrt(d_h)


def hinge(scales: Tensor, target: float) -> Tensor:
    """``sum_h relu(s_h / t - 1)^2`` (zero while every head is at or under its target)."""
    return torch.relu(scales / target - 1.0).square().sum()


def rescale_factors(scales: Tensor, target: float, n_kv: int) -> tuple[Tensor, Tensor]:
    """Per query head and per key head factors of the rescale actuator (module docstring).

    ``r_h = min(1, t / s_h)`` (1 for non-finite or non-positive ``s_h``); key head
    ``f_j = sqrt(min_{h in G_j} r_h)``; query head ``r_h / f_kv(h)``.
    """
    ok = torch.isfinite(scales) & (scales > target)
    r = torch.where(ok, target / torch.where(ok, scales, torch.ones_like(scales)),
                    torch.ones_like(scales))
    group = scales.numel() // n_kv
    f_k = r.view(n_kv, group).amin(dim=1).sqrt()
    f_q = r / f_k.repeat_interleave(group)
    return f_q, f_k


# ----------------------------------------------------------------------------------------------
# The component


@dataclass
class PairState:
    """Host state of one pair: target, thermostat lambda, latest reading, counters."""

    target: float
    lam: float = 0.0
    scale: float = math.nan
    baseline: float = math.nan
    checks: int = 0
    interventions: int = 0
    last_checked_step: int = -1
    head_scales: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class Launched:
    """The pairs whose readings a launch put into the shipment, in order."""

    step: int
    pairs: list[int]


class AttentionGuard:
    """Attention-logit component of the guard (interface: ``on_step``, ``penalty``, ``metrics``,
    ``state_dict``, ``load_state_dict``, ``remove``; see the module docstring for the math).

    Args:
        model: the (possibly instrumented) model.
        config: the :class:`~spectral_guard.guard.config.GuardConfig` (``attention_*`` fields,
            ``ratio``/``every``/``seed`` for the schedule, ``power_iters``, ``gain``, ``decay``,
            ``lambda_floor`` for the thermostat).
        layer_names: the main guard's instrumented layers (kept for reports; the pairs are found
            by :func:`find_pairs` whether or not their projections are instrumented).
        checks: the guard's :class:`~.protocol.AsyncChecks` (the guard then drives the cycle
            with :meth:`launch` and :meth:`apply`); ``None``: its own, driven by
            :meth:`on_step`.
    """

    BASELINE_ITERS = 30
    name = "attention"

    def __init__(self, model: nn.Module, config: Any, layer_names: Sequence[str] = (),
                 checks: AsyncChecks | None = None) -> None:
        self.model = model
        self.config = config
        self.layer_names = list(layer_names)
        named = getattr(config, "attention_pairs", None)
        self.pairs, self.skipped = find_pairs(model, named)
        self.actuator = getattr(config, "attention_actuator", "penalty")
        self.lambda_base = float(getattr(config, "attention_lambda", 0.1))
        max_scale = getattr(config, "attention_max_scale", None)
        self.states = [PairState(float(max_scale) if max_scale is not None
                                 else DEFAULT_MAX_LOGIT / p.in_features) for p in self.pairs]
        self._u: list[Tensor] = []
        self._v: list[Tensor] = []
        for p in self.pairs:
            gen = torch.Generator().manual_seed(name_seed(config.seed, "attn:" + p.name))
            u = torch.randn(p.n_heads, p.in_features, generator=gen)
            v = torch.randn(p.n_heads, p.in_features, generator=gen)
            dev, dt = p.q.param.device, _vec_dtype(p.q.param)
            self._u.append((u / u.norm(dim=-1, keepdim=True)).to(dev, dt))
            self._v.append((v / v.norm(dim=-1, keepdim=True)).to(dev, dt))
        self._schedule = LayerSchedule(len(self.pairs), config.ratio, config.seed + 7919)
        self._owns_checks = checks is None
        self.checks = AsyncChecks() if checks is None else checks
        self._launched: Launched | None = None
        self._rescaled: Tensor | int = 0  # device counter of (pair, step) rescales
        self._step = 0
        with torch.no_grad():
            for i in range(len(self.pairs)):  # instrumentation: may synchronize
                s = self._power(i, self.BASELINE_ITERS)
                self.states[i].baseline = float(s.max())
                if max_scale is None and math.isfinite(self.states[i].baseline):
                    self.states[i].target = max(self.states[i].target,
                                                BASELINE_MARGIN * self.states[i].baseline)
        self._armed = False   # the launch at instrumentation measures, never rescales
        if self._owns_checks:
            self.checks.advance(0, [self], apply=False)

    # -- device half ---------------------------------------------------------------------------

    def _power(self, i: int, iters: int) -> Tensor:
        """Warm power iteration for pair ``i`` (in place on its vectors); ``s_h`` on device."""
        p = self.pairs[i]
        with torch.no_grad(), no_autocast(p.q.param.device.type):
            Wq, Wk = p.heads()
            dt = self._u[i].dtype
            Wq, Wk = Wq.detach().to(dt), Wk.detach().to(dt)
            u, v = self._u[i], self._v[i]
            sigma = None
            for _ in range(iters):
                sigma, u, v = power_step(Wq, Wk, u, v)
            self._u[i].copy_(u)
            self._v[i].copy_(v)
        return sigma / math.sqrt(p.head_dim)

    def launch(self, step: int, packer: Packer) -> HostFn | None:
        """Device half at the advance to ``step``: power iterations of the sampled and treated
        pairs (every pair, and the rescale itself, for that actuator, after the first launch),
        the sampled pairs' scales put into ``packer``. Returns the host half (``None`` when
        nothing is sampled)."""
        check = check_index(step, self.config.every)
        sampled = set(self._schedule.layers_for_check(check)) if check is not None else set()
        rescale, self._armed = self._armed and self.actuator == "rescale", True
        iters = max(self.config.power_iters, RESCALE_ITERS) if rescale else \
            self.config.power_iters
        if rescale:
            packer.freeze()   # the rescale writes weights whose views may have been put
        slots: list[Slot] = []
        order: list[int] = []
        with torch.no_grad():
            for i, p in enumerate(self.pairs):
                if not (i in sampled or rescale or self.states[i].lam > 0):
                    continue
                s = self._power(i, iters)
                if rescale:
                    f_q, f_k = rescale_factors(s, self.states[i].target, p.n_kv_heads)
                    p.q.scale_rows(f_q.repeat_interleave(p.head_dim))
                    p.k.scale_rows(f_k.repeat_interleave(p.head_dim))
                    hit = (f_q != 1).any() | (f_k != 1).any()
                    self._rescaled = self._rescaled + hit.to(torch.int64)
                if i in sampled:
                    order.append(i)
                    slots.append(packer.put(s.float()))
        self._launched = Launched(step, order) if order else None
        if not slots:
            return None
        return lambda shipment: [x for slot in slots for x in shipment.read(slot).tolist()]

    def apply(self, values: list[float] | None, step: int = -1) -> None:
        """Host half's result of the last launch (``None``: nothing was launched): the
        thermostat update of the pairs it read."""
        launched, self._launched = self._launched, None
        if launched is None or values is None:
            return
        at = 0
        for i in launched.pairs:
            p, st = self.pairs[i], self.states[i]
            heads = values[at:at + p.n_heads]
            at += p.n_heads
            finite = [x for x in heads if math.isfinite(x)]
            st.head_scales = heads
            st.scale = max(finite) if finite else math.nan
            st.checks += 1
            st.last_checked_step = launched.step
            lam, fired = ceiling_update(st.lam, st.scale, st.target, self.lambda_base,
                                        self.config.gain, self.config.decay,
                                        self.config.lambda_floor)
            st.interventions += int(fired)
            if self.actuator == "penalty":
                st.lam = lam

    def on_step(self, step: int) -> None:
        """Clock advance to ``step`` (standalone): apply the readings launched at
        ``step - 1`` (thermostat), then launch this step's power iterations (and rescale, for
        that actuator). Driven by a guard, the guard's cycle calls :meth:`apply` and
        :meth:`launch`."""
        self._step = int(step)
        self.checks.advance(self._step, [self])

    def alarm(self, factor: float = 1.0) -> bool:
        """Is any pair's latest scale over ``factor`` times its target?"""
        return any(st.scale > factor * st.target for st in self.states)

    def penalty(self, device: torch.device | str | None = None) -> Tensor | None:
        """``sum_pairs lambda * sum_h relu(s_h / t - 1)^2`` in float32 with autocast off (the
        pairs with ``lambda > 0``), on ``device``; ``None`` when no pair is treated."""
        if self.actuator != "penalty":
            return None
        total: Tensor | None = None
        for i, p in enumerate(self.pairs):
            st = self.states[i]
            if st.lam <= 0:
                continue
            with no_autocast(p.q.param.device.type):
                Wq, Wk = p.heads()
                s = head_scales(Wq.float(), Wk.float(), self._u[i].float(), self._v[i].float())
                term = st.lam * hinge(s, st.target)
                term = torch.where(torch.isfinite(term), term, torch.zeros_like(term))
            term = term.to(device) if device is not None else term
            total = term if total is None else total + term
        return total

    def metrics(self) -> dict[str, float]:
        """``attention_logit_scale`` (max over pairs of the latest reading),
        ``attention_treated_pairs``, ``attention_interventions``, ``attention_pairs``."""
        scales = [st.scale for st in self.states if math.isfinite(st.scale)]
        return {
            "attention_logit_scale": max(scales) if scales else math.nan,
            "attention_treated_pairs": float(sum(st.lam > 0 for st in self.states)),
            "attention_interventions": float(sum(st.interventions for st in self.states)),
            "attention_pairs": float(len(self.pairs)),
            "attention_rescales": float(self._rescaled),
        }

    def stats(self) -> dict[str, Any]:
        """Per pair: geometry, target, reading, lambda, counters; and skipped candidates."""
        return {
            "pairs": {p.name: {"heads": p.n_heads, "kv_heads": p.n_kv_heads,
                               "head_dim": p.head_dim, "target": st.target, "scale": st.scale,
                               "baseline": st.baseline, "lambda": st.lam, "checks": st.checks,
                               "interventions": st.interventions,
                               "last_checked_step": st.last_checked_step}
                      for p, st in zip(self.pairs, self.states, strict=True)},
            "skipped": dict(self.skipped),
        }

    def state_dict(self) -> dict[str, Any]:
        """Host state per pair, the power-iteration vectors and the readings in flight."""
        pending = None
        inflight = self.checks.pending(self.name)
        if inflight is not None and self._launched is not None:
            pending = {"step": self._launched.step,
                       "pairs": [self.pairs[i].name for i in self._launched.pairs],
                       "values": torch.tensor(inflight[1], dtype=torch.float32)}
        return {
            "version": 1,
            "step": self._step,
            "pairs": {p.name: {"state": {k: getattr(st, k) for k in (
                "target", "lam", "scale", "baseline", "checks", "interventions",
                "last_checked_step", "head_scales")},
                "u": self._u[i].detach().cpu().clone(), "v": self._v[i].detach().cpu().clone()}
                for i, (p, st) in enumerate(zip(self.pairs, self.states, strict=True))},
            "pending": pending,
            "rescales": int(self._rescaled),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (same pairs required)."""
        if state.get("version") != 1:
            raise ValueError(f"unsupported attention guard state {state.get('version')!r}")
        names = [p.name for p in self.pairs]
        if sorted(names) != sorted(state["pairs"]):
            raise ValueError("attention guard state is for other pairs")
        for i, name in enumerate(names):
            saved = state["pairs"][name]
            st = saved["state"]
            self.states[i] = PairState(**{**st, "head_scales": list(st["head_scales"])})
            self._u[i] = saved["u"].to(self._u[i].device, self._u[i].dtype)
            self._v[i] = saved["v"].to(self._v[i].device, self._v[i].dtype)
        self._step = int(state["step"])
        self._rescaled = int(state.get("rescales", 0))
        pending = state.get("pending")
        self._launched = None
        if pending is not None:
            self._launched = Launched(int(pending["step"]),
                                      [names.index(n) for n in pending["pairs"]])
            self.checks.restore(int(pending["step"]), self.name,
                                [float(x) for x in pending["values"].tolist()])

    def remove(self) -> None:
        """Drop device state (the component installs no hooks)."""
        self._launched = None
        if self._owns_checks:
            self.checks.shutdown()
        self._u, self._v = [], []
        self.pairs, self.states = [], []


def _vec_dtype(W: Tensor) -> torch.dtype:
    return torch.float64 if W.dtype == torch.float64 else torch.float32


def pair_names(pairs: Iterable[AttentionPair]) -> list[str]:
    """Names of the pairs (for reports)."""
    return [p.name for p in pairs]

