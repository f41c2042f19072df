"""``instrument(model)`` and the :class:`Guard` it returns.

One optimizer step of a guarded model, on the training thread:

1. forward: the weights are read through an identity parametrization (outputs are bit for bit
   those of the plain model). At the end of a training forward the root hook adds
   ``penalty_scale * sum_treated lambda_l * P_l(W_l)`` to the output's loss (``auto_loss``), or
   leaves it for :meth:`Guard.penalty`;
2. backward, ``optimizer.step()``;
3. the optimizer-step hook advances the clock to ``s``: the check launched at ``s - 1`` is applied
   (its thermostat update sets the lambdas of step ``s``; with ``actuator="msign"`` a layer it
   flags for collapse gets its matrix sign now, :mod:`.msign`, as every penalized layer does
   at multiples of ``msign_every``), treated layers refresh their power-iteration vectors, and
   the check of step ``s`` is launched (device work only; the decompositions run on the worker
   thread, :mod:`.worker`).

Nothing in the step reads a device tensor on the host. See ``docs/guard.md``.
"""

from __future__ import annotations

import copy
import time
import warnings
import weakref
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch.nn.utils import parametrize
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

from ..estimators import biopsy_indices, name_seed, no_autocast
from ..thresholds import Rule
from . import hooks, sharded
from .alarm import fell_suddenly, remember, update_fall
from .attention import AttentionGuard
from .backoff import LRBackoff
from .check import (
    Law,
    Readings,
    baseline_from,
    condition_pairs,
    judge,
    relative,
    update_lambdas,
)
from .config import GuardConfig
from .msign import looks_random_init, msign_
from .penalties import condition_term, l2_term, spectral_collapse_term
from .sampling import LayerSchedule, check_index
from .select import Skipped, select_layers
from .state import GuardProbe, LayerState
from .worker import CheckWorker, Measurement, done, launch, refresh

Tensor = torch.Tensor
STATE_VERSION = 2
BASELINE_POWER_ITERS = 20


@dataclass
class GuardedLayer:
    """One instrumented layer: its module, probe, rule and host state."""

    index: int
    name: str
    module: nn.Module
    probe: GuardProbe
    rule: Rule
    sensors: dict[str, float]
    state: LayerState = field(default_factory=LayerState)
    param_order: list[str] = field(default_factory=list)
    handles: list[Any] = field(default_factory=list)

    @property
    def weight(self) -> Tensor:
        """The stored weight Parameter behind the identity parametrization."""
        return self.module.parametrizations.weight.original

    @property
    def min_dim(self) -> int:
        return int(min(self.weight.shape))


@dataclass
class _InFlight:
    step: int
    future: Future


class Guard:
    """The handle returned by :func:`instrument`. See ``docs/guard.md`` for the contract."""

    def __init__(self, model: nn.Module, config: GuardConfig) -> None:
        if not config.sees_falls:
            warnings.warn(f"a layer is checked every {config.check_period} steps (every="
                          f"{config.every}, ratio={config.ratio}), more than msign_fall="
                          f"{config.msign_fall}: the alarm cannot see a sudden collapse, so "
                          "only its attention half can raise it; raise ratio or msign_fall "
                          "(guard/alarm.py)", stacklevel=3)
        self.model = model
        self.config = config
        self.penalty_scale = 1.0
        self.history: deque[dict[str, Any]] = deque(maxlen=config.history)
        self.skipped: list[Skipped] = []
        self._law = Law(config.base, config.gain, config.decay, config.lambda_floor)
        self._layers: list[GuardedLayer] = []
        self._by_name: dict[str, GuardedLayer] = {}
        self._root_handles: list[Any] = []
        self._step = 0
        self._forwards = 0
        self._ns = 0
        self._last_penalty: Tensor | None = None
        self._inflight: _InFlight | None = None
        self._msign_due: list[GuardedLayer] = []
        self._alarm_seen = False
        self._backoff = LRBackoff(config.lr_backoff, config.lr_floor)
        self._attached: weakref.ref | None = None
        self._owner_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._removed = False
        self._attention: AttentionGuard | None = None
        self._worker = CheckWorker()
        try:
            self._install()
            self._schedule = LayerSchedule(len(self._layers), config.ratio, config.seed)
            self._take_baselines(range(len(self._layers)))
            self._launch(0)
            if config.attention:
                self._attention = AttentionGuard(model, config, self.layer_names)
        except BaseException:
            self._uninstall()
            raise

    # ------------------------------------------------------------------------------------------
    # Installation

    def _install(self) -> None:
        chosen, self.skipped = select_layers(self.model, self.config,
                                             self.config.resolved_thresholds())
        ref = weakref.ref(self)
        for c in chosen:
            sharded.check_order(c.name, c.module.weight)  # FSDP2: instrument, then shard
        for c in chosen:
            W = c.module.weight
            shape = (int(W.shape[0]), int(W.shape[1]))
            seed = name_seed(self.config.seed, c.name)
            rows, cols = biopsy_indices(shape, self.config.biopsy_limit, seed)
            probe = GuardProbe(shape, seed, rows, cols).to(W.device)
            layer = GuardedLayer(len(self._layers), c.name, c.module, probe, c.rule, c.sensors,
                                 param_order=list(c.module._parameters))
            self._layers.append(layer)
            parametrize.register_parametrization(c.module, "weight", probe)
            layer.handles += [
                c.module.register_state_dict_post_hook(hooks.state_dict_post_hook),
                c.module.register_load_state_dict_pre_hook(hooks.load_pre_hook),
                c.module.register_load_state_dict_post_hook(hooks.load_post_hook(ref,
                                                                                 layer.index)),
            ]
            self._by_name[c.name] = layer
        self._root_handles += [
            self.model.register_forward_hook(hooks.RootForwardHook(ref)),
            *_optimizer_hooks(ref),
        ]
        self.model._spectral_guard = self  # lets spectral_guard.remove(model) find the guard

    def _uninstall(self) -> None:
        for layer in self._layers:
            for handle in layer.handles:
                handle.remove()
            if parametrize.is_parametrized(layer.module, "weight"):
                parametrize.remove_parametrizations(layer.module, "weight",
                                                    leave_parametrized=False)
            params = layer.module._parameters  # the registration order (state_dict order)
            ordered = {k: params[k] for k in layer.param_order if k in params}
            ordered.update({k: v for k, v in params.items() if k not in ordered})
            params.clear()
            params.update(ordered)
        self._backoff.after_step()   # removed from inside a step: the lr goes back now
        for handle in self._root_handles:
            handle.remove()
        self._root_handles = []
        if self._attention is not None:
            self._attention.remove()
        self._inflight = None
        self._forwards = 0
        self._worker.shutdown()
        if getattr(self.model, "_spectral_guard", None) is self:
            del self.model._spectral_guard

    # ------------------------------------------------------------------------------------------
    # Checks

    def _entry(self, layer: GuardedLayer, vectors: bool) -> tuple:
        fiedler_rows = self.config.fiedler_rows if "fiedler" in layer.sensors else 0
        return (layer.index, layer.state.generation, layer.probe, layer.weight, vectors,
                fiedler_rows, layer.state.nonfinite)

    def _conditioning(self, layer: GuardedLayer) -> bool:
        return "condition_number" in layer.sensors and self.config.actuator != "l2"

    def _take_baselines(self, indices: Any) -> None:
        """Measure now and wait (instrumentation and loading are not training steps)."""
        entries = [self._entry(self._layers[i], False) for i in indices]
        if not entries:
            return
        measured = self._worker.submit(launch(entries, BASELINE_POWER_ITERS)).result()
        for m in measured:
            layer = self._layers[m.index]
            state = layer.state
            state.baseline = None if m.error or m.nonfinite_entries else \
                baseline_from(m.readings)
            state.recent_retention = remember([], self._step, 1.0, self.config.msign_fall)
            state.random_init = state.baseline is not None and looks_random_init(
                m.readings.stable_rank, m.readings.effective_rank,
                layer.probe.biopsy_shape(tuple(layer.weight.shape)))

    def _launch(self, step: int) -> None:
        """Device half of the check of ``step`` plus the treated layers' vector refresh."""
        t0 = time.perf_counter_ns()
        check = check_index(step, self.config.every)
        sampled = self._schedule.layers_for_check(check) if check is not None else []
        with torch.no_grad():
            if self.config.actuator == "spectral":
                checked = set(sampled)  # a check refreshes its own layers' vectors
                for layer in self._layers:
                    if layer.index not in checked and layer.state.treated \
                            and layer.state.lambdas["collapse"] > 0:
                        refresh(layer.probe, layer.weight, self.config.power_iters)
            entries = [self._entry(self._layers[i], self._conditioning(self._layers[i]))
                       for i in sampled]
            packet = launch(entries, self.config.power_iters)
        self._inflight = _InFlight(step, self._worker.submit(packet)) if entries else None
        self._ns += time.perf_counter_ns() - t0

    def _apply_due(self) -> None:
        """Apply the check launched at the previous step (waits for the worker if needed)."""
        inflight, self._inflight = self._inflight, None
        if inflight is None:
            return
        for m in inflight.future.result():
            layer = self._layers[m.index]
            if m.generation == layer.state.generation:
                self._apply(layer, m, inflight.step)

    def _apply(self, layer: GuardedLayer, m: Measurement, step: int) -> None:
        st = layer.state
        st.checks += 1
        st.last_checked_step = step
        if m.error:
            st.failed_checks += 1
            st.last_error = m.error
            st.readings = Readings()
            return
        st.nonfinite = m.nonfinite_entries != 0  # -1: non-finite, entries not counted yet
        st.nonfinite_entries = max(m.nonfinite_entries, 0)
        if st.nonfinite:
            st.readings = Readings()
            self._record(layer, step, False)
            return
        if st.baseline is None:
            st.baseline = baseline_from(m.readings)  # deferred: the layer just became non-zero
            st.recent_retention = remember([], step, 1.0, self.config.msign_fall)
        st.readings = relative(m.readings, st.baseline)
        verdict = judge(st.readings, layer.sensors, layer.rule, layer.min_dim,
                        self.config.collapse_rule)
        penalized = bool(layer.sensors) and layer.weight.requires_grad
        if not penalized:
            self._record(layer, step, verdict.fired)
            return
        st.lambdas = update_lambdas(st.lambdas, verdict, self._law)
        st.recent_retention, st.collapse_fall = update_fall(
            st.recent_retention, st.collapse_fall, step, st.readings.effective_rank_retention,
            st.lambdas["collapse"] > 0, self.config.msign_fall)
        st.interventions += int(verdict.fired)
        if self.config.actuator == "msign" and verdict.triggered["collapse"]:
            self._msign_due.append(layer)
        self._set_condition_pairs(layer, m)
        self._record(layer, step, verdict.fired)

    def _set_condition_pairs(self, layer: GuardedLayer, m: Measurement) -> None:
        st, probe = layer.state, layer.probe
        pairs = None
        if m.svd is not None and st.lambdas["conditioning"] > 0 and st.baseline is not None:
            kappa_max = layer.sensors["condition_number"] * st.baseline.condition_number
            pairs = condition_pairs(*m.svd, kappa_max)
        if pairs is None:
            st.cond_pairs = 0
            return
        dtype = probe.cond_u.dtype
        probe.cond_u = _to_device(pairs.U.to(dtype), probe.u.device)
        probe.cond_v = _to_device(pairs.V.to(dtype), probe.u.device)
        st.cond_pairs = int(pairs.U.shape[1])
        st.log_kappa_max, st.cond_eps = pairs.log_kappa_max, pairs.eps

    def _record(self, layer: GuardedLayer, step: int, fired: bool) -> None:
        if self.history.maxlen == 0:
            return
        r = layer.state.readings
        self.history.append({
            "step": step, "layer": layer.name,
            "effective_rank_retention": r.effective_rank_retention,
            "stable_rank_retention": r.stable_rank_retention,
            "condition_growth": r.condition_growth, "effective_rank": r.effective_rank,
            "stable_rank": r.stable_rank, "sigma_max": r.sigma_max,
            "lambda": layer.state.lam, "triggered": fired,
        })

    def _rebaseline(self, index: int) -> None:
        """New weights were loaded into layer ``index``: forget what the guard knew of it."""
        layer = self._layers[index]
        old = layer.state
        layer.state = LayerState(generation=old.generation + 1)
        self._take_baselines([index])

    def _matrix_signs(self, step: int) -> None:
        """The ``"msign"`` actuator on the layers flagged by the check just applied, and the
        periodic matrix sign of every penalized layer at multiples of ``msign_every``."""
        due, self._msign_due = self._msign_due, []
        every, gate = self.config.msign_every, self.config.msign_gate
        if every and gate == "alarm":
            self._alarm_seen = self._alarm_seen or self._alarm()   # latched between signs
        alarmed: list[GuardedLayer] = []
        if every and step % every == 0 and (gate == "always" or self._alarm_seen):
            chosen = [layer for layer in self._layers
                      if layer.sensors and layer.weight.requires_grad
                      and (gate == "always" or layer.state.random_init)]
            if gate == "always":
                due = due + chosen   # a schedule, not an alarm: no back-off
            else:
                alarmed = chosen
            self._alarm_seen = False
        by_alarm, signed_by_alarm = {id(layer) for layer in alarmed}, False
        for layer in {id(layer): layer for layer in due + alarmed}.values():
            st = layer.state
            if st.nonfinite or sharded.is_sharded(layer.weight):
                st.msigns_skipped += 1   # FSDP2 shards: no full matrix here (docs/guard.md)
                continue
            msign_(layer.weight)
            st.msigns += 1
            signed_by_alarm |= id(layer) in by_alarm
        if signed_by_alarm:
            self._backoff.on_alarm()   # the alarm signed: the lr is too high (backoff.py)

    def _alarm(self) -> bool:
        """The matrix sign's gate (``guard/alarm.py``; host values only): at least
        ``msign_quorum`` of the penalized layers treated for collapse at once, each fallen
        within ``msign_fall`` steps, or an attention pair's latest scale over ``msign_alarm``
        times its target."""
        config = self.config
        if self._attention is not None and self._attention.alarm(config.msign_alarm):
            return True
        collapsing, penalized = self._collapse_treated(sudden=True)
        return penalized > 0 and len(collapsing) >= config.msign_quorum * penalized

    def _collapse_treated(self, sudden: bool) -> tuple[list[GuardedLayer], int]:
        """The penalized layers treated for collapse (only those fallen within ``msign_fall``
        steps with ``sudden``), and how many layers are penalized."""
        penalized = [layer for layer in self._layers if layer.sensors]
        treated = [layer for layer in penalized
                   if layer.state.treated and layer.state.lambdas["collapse"] > 0
                   and (not sudden
                        or fell_suddenly(layer.state.collapse_fall, self.config.msign_fall))]
        return treated, len(penalized)

    # ------------------------------------------------------------------------------------------
    # Penalty

    def _build(self, device: torch.device | None) -> Tensor | None:
        """``penalty_scale * sum_treated lambda P(W)`` on ``device``, or ``None``."""
        total: Tensor | None = None
        for layer in self._layers:
            st = layer.state
            if not st.treated or not layer.sensors:
                continue
            W = layer.weight
            if not W.requires_grad:
                continue
            with no_autocast(W.device.type):
                term = self._term(layer, W)
            if term is None:
                continue
            term = torch.where(torch.isfinite(term), term, torch.zeros_like(term))
            target = device or W.device
            term = term.to(target)
            total = term if total is None else total + term
        if self._attention is not None:
            term = self._attention.penalty(device)
            if term is not None:
                total = term if total is None else total + term.to(total.device)
        if total is None:
            return None
        if self.penalty_scale != 1.0:
            total = total * self.penalty_scale
        self._last_penalty = total.detach()
        return total

    def _term(self, layer: GuardedLayer, W: Tensor) -> Tensor | None:
        st, probe = layer.state, layer.probe
        if sharded.is_sharded(W):  # FSDP2: local rows, global value (guard/sharded.py)
            return sharded.term(W, probe, st, self.config.actuator)
        lam_c, lam_k = st.term_lambdas(self.config.actuator)
        if self.config.actuator == "l2":
            return (lam_c + lam_k) * l2_term(W)
        term = lam_c * spectral_collapse_term(W, probe.u, probe.v) if lam_c > 0 else None
        if lam_k > 0 and st.cond_pairs > 1:
            B = probe.biopsy(W)
            t = lam_k * condition_term(B, probe.cond_u, probe.cond_v, st.log_kappa_max,
                                       st.cond_eps)
            term = t if term is None else term + t
        return term

    def _after_forward(self, output: Any) -> Any:
        """Root forward hook body (training forwards only)."""
        t0 = time.perf_counter_ns()
        self._forwards += 1
        result = None
        loss = hooks.get_loss(output) if self.config.auto_loss else None
        if loss is not None:
            self._forwards -= 1  # consumed here, whatever is treated
            pen = self._build(loss.device)
            if pen is not None and hooks.set_loss(output, loss + pen.to(loss.dtype)):
                result = output
            elif pen is not None:
                self._forwards += 1  # the output took no loss: leave it for penalty()
        self._ns += time.perf_counter_ns() - t0
        return result

    # ------------------------------------------------------------------------------------------
    # Clock

    def _before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if not self._removed and self._backoff.scale != 1.0 and self._follows(optimizer):
            self._backoff.before_step(optimizer)

    def _on_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self._backoff.after_step()
        if self._removed or self.config.step_on != "optimizer" or not self._follows(optimizer):
            return
        self.step()

    def _follows(self, optimizer: torch.optim.Optimizer) -> bool:
        """The optimizer given to :meth:`attach`, else any optimizer holding a guarded weight."""
        if self._attached is not None:
            return self._attached() is optimizer
        return self._owns(optimizer)

    def _owns(self, optimizer: torch.optim.Optimizer) -> bool:
        key = (len(optimizer.param_groups), sum(len(g["params"]) for g in optimizer.param_groups))
        cached = self._owner_cache.get(optimizer)
        if cached is not None and cached[0] == key:
            return cached[1]
        ours = {id(layer.weight) for layer in self._layers}
        owns = any(id(p) in ours for g in optimizer.param_groups for p in g["params"])
        self._owner_cache[optimizer] = (key, owns)
        return owns

    # ------------------------------------------------------------------------------------------
    # Public API

    @property
    def layer_names(self) -> list[str]:
        return [layer.name for layer in self._layers]

    @property
    def global_step(self) -> int:
        """Optimizer steps seen by the guard (its clock)."""
        return self._step

    @property
    def guard_time_s(self) -> float:
        """Seconds the training thread spent in the guard (hooks, launches, applies)."""
        return self._ns * 1e-9

    def sampled_layers(self, step: int | None = None) -> list[str]:
        """Names of the layers the schedule checks at optimizer step ``step`` (default: now)."""
        check = check_index(self._step if step is None else step, self.config.every)
        if check is None:
            return []
        return [self._layers[i].name for i in self._schedule.layers_for_check(check)]

    def penalty(self, device: torch.device | str | None = None) -> Tensor:
        """The penalty of the training forwards since the last call not already added to a loss.

        ``count * penalty_scale * sum_treated lambda P(W)``, differentiable with respect to the
        weights; a zero scalar when nothing is pending or nothing is treated.

        Args:
            device: where to return it (default: the device of the last guarded layer, which
                is where a model spread over devices usually computes its loss).
        """
        count, self._forwards = self._forwards, 0
        if device is None:
            device = self._layers[-1].weight.device if self._layers else torch.device("cpu")
        device = torch.device(device)
        pen = self._build(device) if count else None
        if pen is None:
            return torch.zeros((), device=device)
        return pen if count == 1 else pen * count

    def step(self) -> None:
        """Advance the guard's clock by one optimizer step (automatic with ``step_on``)."""
        t0 = time.perf_counter_ns()
        self._step += 1
        self._forwards = 0
        self._apply_due()
        self._matrix_signs(self._step)
        self._ns += time.perf_counter_ns() - t0
        self._launch(self._step)
        if self._attention is not None:
            t0 = time.perf_counter_ns()
            self._attention.on_step(self._step)
            self._ns += time.perf_counter_ns() - t0

    def attach(self, optimizer: torch.optim.Optimizer) -> Guard:
        """Follow only ``optimizer``'s steps (instead of any optimizer holding guarded weights)."""
        self._attached = weakref.ref(optimizer)
        return self

    def stats(self) -> dict[str, Any]:
        """Latest applied readings, lambdas, counters per layer, and totals (host values)."""
        layers: dict[str, dict[str, Any]] = {}
        for layer in self._layers:
            st = layer.state
            layers[layer.name] = {
                "shape": tuple(int(d) for d in layer.weight.shape),
                "sensors": st.readings.as_dict(),
                "baseline": None if st.baseline is None else st.baseline.as_dict(),
                "thresholds": dict(layer.sensors),
                "lambda": st.lam,
                "lambda_collapse": st.lambdas["collapse"],
                "lambda_conditioning": st.lambdas["conditioning"],
                "checks": st.checks,
                "interventions": st.interventions,
                "msigns": st.msigns,
                "msigns_skipped": st.msigns_skipped,
                "last_checked_step": st.last_checked_step,
                "collapse_fall": st.collapse_fall,
                "nonfinite": st.nonfinite,
                "nonfinite_entries": st.nonfinite_entries,
                "failed_checks": st.failed_checks,
                "frozen": not layer.weight.requires_grad,
                "penalized": bool(layer.sensors),
            }
        totals = {
            "step": self._step,
            "layers": len(layers),
            "skipped": len(self.skipped),
            "checks": sum(v["checks"] for v in layers.values()),
            "interventions": sum(v["interventions"] for v in layers.values()),
            "msigns": sum(v["msigns"] for v in layers.values()),
            "lr_scale": self._backoff.scale,
            "lr_backoffs": self._backoff.backoffs,
            "treated_layers": sum(layer.state.treated for layer in self._layers),
            "nonfinite_layers": sum(v["nonfinite"] for v in layers.values()),
            "failed_checks": sum(v["failed_checks"] for v in layers.values()),
            "guard_time_s": self.guard_time_s,
        }
        return {"layers": layers, "totals": totals,
                "skipped": {s.name: s.reason for s in self.skipped}}

    def metrics(self) -> dict[str, float]:
        """Flat numbers for loggers (reads the last penalty from the device: not in the step).

        ``interventions``, ``msigns`` (matrix signs applied), ``treated_layers``,
        ``nonfinite_layers`` (totals); ``lr_scale`` (the learning-rate back-off, 1 if none);
        ``min_effective_rank_retention`` (over layers with a reading); ``mean_stable_rank_ratio``
        (``SR / k`` of the biopsies, mean over layers with a reading); ``penalty`` (the last
        penalty built, 0 if none).
        """
        t = self.stats()["totals"]
        readings = [layer.state.readings for layer in self._layers]
        retention = [r.effective_rank_retention for r in readings
                     if r.effective_rank_retention == r.effective_rank_retention]
        ratios = [r.stable_rank_ratio for r in readings
                  if r.stable_rank_ratio == r.stable_rank_ratio]
        return {
            "interventions": float(t["interventions"]),
            "msigns": float(t["msigns"]),
            "lr_scale": float(t["lr_scale"]),
            "treated_layers": float(t["treated_layers"]),
            "min_effective_rank_retention": min(retention) if retention else float("nan"),
            "mean_stable_rank_ratio": sum(ratios) / len(ratios) if ratios else float("nan"),
            "nonfinite_layers": float(t["nonfinite_layers"]),
            "penalty": float(self._last_penalty) if self._last_penalty is not None else 0.0,
        } | (self._attention.metrics() if self._attention is not None else {})

    def report(self, console: Any = None) -> None:
        """Print :meth:`stats` as a rich table."""
        from .report import render_stats

        render_stats(self.stats(), console)

    def log_to(self, writer: Any, step: int | None = None) -> None:
        """Write per-layer scalars to a TensorBoard ``SummaryWriter`` (tensorboard extra)."""
        from ..integrations.tensorboard import log_guard

        log_guard(self, writer, self._step if step is None else step)

    def plot(self, path: Any) -> None:
        """Draw each layer's readings over the steps, interventions marked (plot extra)."""
        from ..integrations.plot import plot_guard_history

        plot_guard_history(self, path)

    def state_dict(self) -> dict[str, Any]:
        """Clock, per-layer host state and device vectors, and the check still in flight.

        Waits for the in-flight check (not a training-step call). A resumed run applies it at
        the same step as an uninterrupted one.
        """
        inflight = None
        if self._inflight is not None:
            measured = self._inflight.future.result()
            inflight = {"step": self._inflight.step,
                        "measurements": [_measurement_to_dict(m, self._layers[m.index].name)
                                         for m in measured]}
        return {
            "version": STATE_VERSION,
            "step": self._step,
            "config": _schedule_config(self.config),
            "layers": {layer.name: {
                "state": layer.state.to_dict(),
                "tensors": {k: v.detach().cpu().clone() for k, v in (
                    ("u", layer.probe.u), ("v", layer.probe.v), ("cond_u", layer.probe.cond_u),
                    ("cond_v", layer.probe.cond_v))},
            } for layer in self._layers},
            "inflight": inflight,
            "attention": None if self._attention is None else self._attention.state_dict(),
            "msign_alarm_seen": self._alarm_seen,
            "lr_backoff": self._backoff.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (load the model's weights first: loading weights
        into an instrumented model retakes its baselines)."""
        version = state.get("version") if isinstance(state, dict) else None
        if version != STATE_VERSION:
            raise ValueError(f"unsupported guard state version {version!r} (expected "
                             f"{STATE_VERSION})")
        missing = sorted(set(self._by_name) - set(state["layers"]))
        extra = sorted(set(state["layers"]) - set(self._by_name))
        if missing or extra:
            raise ValueError(f"guard state is for other layers: missing {missing[:3]}, "
                             f"unexpected {extra[:3]}")
        saved, now = dict(state.get("config", {})), _schedule_config(self.config)
        # states saved before the matrix sign, its fall rule and the back-off: switched off
        off = GuardConfig(msign_every=0, lr_backoff=1.0, msign_fall=0)
        for key, value in _schedule_config(off).items():
            if key.startswith(("msign_", "lr_")):
                saved.setdefault(key, value)
        changed = {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v}
        if saved.get("msign_every") == now["msign_every"] == 0:   # no sign: its gate is moot
            changed = {k: v for k, v in changed.items() if not k.startswith("msign_")}
        if changed:
            what = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items())
            warnings.warn(f"guard state saved with other settings ({what}): the run will "
                          "differ from an uninterrupted one", stacklevel=2)
        for name, saved_layer in state["layers"].items():
            layer = self._by_name[name]
            layer.state = LayerState.from_dict(saved_layer["state"])
            for key, value in saved_layer["tensors"].items():
                current = getattr(layer.probe, key)
                setattr(layer.probe, key, value.detach().clone().to(device=current.device,
                                                                    dtype=current.dtype))
        self._step = int(state["step"])
        self._forwards = 0
        self._alarm_seen = bool(state.get("msign_alarm_seen", False))
        self._backoff.load_state_dict(state.get("lr_backoff", {}))
        if self._attention is not None and state.get("attention") is not None:
            self._attention.load_state_dict(state["attention"])
        inflight = state.get("inflight")
        self._inflight = None if inflight is None else _InFlight(
            int(inflight["step"]), done([_measurement_from_dict(d, self._by_name)
                                         for d in inflight["measurements"]]))

    def remove(self) -> nn.Module:
        """Take every hook and parametrization off; returns the plain model."""
        if not self._removed:
            sharded.check_removable(self.model)  # not under FSDP2 (one-line ValueError)
            self._uninstall()
            self._removed = True
        return self.model

    # ------------------------------------------------------------------------------------------
    # Copies

    def __deepcopy__(self, memo: dict) -> Guard:
        """A guard for the copied model (``copy.deepcopy(model)``: EMA, ``AveragedModel``)."""
        new = Guard.__new__(Guard)
        memo[id(self)] = new
        fresh = {"_worker", "_owner_cache", "_attached", "_root_handles", "_inflight"}
        for key, value in self.__dict__.items():
            if key not in fresh:
                setattr(new, key, copy.deepcopy(value, memo))
        new._inflight = None if self._inflight is None else _InFlight(
            self._inflight.step, done(copy.deepcopy(self._inflight.future.result(), memo)))
        new._worker = CheckWorker()
        new._owner_cache = weakref.WeakKeyDictionary()
        new._attached = None
        ref = weakref.ref(new)
        # The copied model is still being assembled (its __dict__ is set after this returns),
        # but its hook dicts are copied already: reach them through the copied handles.
        forward = copy.deepcopy(self._root_handles[0], memo)
        forward.hooks_dict_ref()[forward.id] = hooks.RootForwardHook(ref)
        new._root_handles = [forward, *_optimizer_hooks(ref)]
        for layer in new._layers:
            post = layer.handles[2]
            post.hooks_dict_ref()[post.id] = hooks.load_post_hook(ref, layer.index)
        return new

    def __reduce__(self) -> Any:
        raise TypeError("a Guard cannot be pickled: save guard.state_dict() (and "
                        "model.state_dict())")


def _optimizer_hooks(ref: weakref.ref) -> list[Any]:
    """The global optimizer hooks of the guard behind ``ref``: the step post-hook (its clock)
    and the pre-hook (the learning-rate back-off)."""
    return [register_optimizer_step_post_hook(hooks.optimizer_hook(ref, "_on_optimizer_step")),
            register_optimizer_step_pre_hook(hooks.optimizer_hook(ref, "_before_optimizer_step"))]


def _schedule_config(config: GuardConfig) -> dict[str, Any]:
    return {"seed": config.seed, "ratio": config.ratio, "every": config.every,
            "sensors": list(config.sensors), "biopsy_limit": config.biopsy_limit,
            "actuator": config.actuator, "msign_every": config.msign_every,
            "msign_gate": config.msign_gate, "msign_alarm": config.msign_alarm,
            "msign_quorum": config.msign_quorum, "msign_fall": config.msign_fall,
            "lr_backoff": config.lr_backoff,
            "lr_floor": config.lr_floor}


def _to_device(t: Tensor, device: torch.device) -> Tensor:
    """Host -> device without a synchronizing copy (pinned memory, ``non_blocking``)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _measurement_to_dict(m: Measurement, name: str) -> dict[str, Any]:
    return {"layer": name, "generation": m.generation, "readings": m.readings.as_dict(),
            "nonfinite_entries": m.nonfinite_entries, "error": m.error,
            "svd": None if m.svd is None else [t.clone() for t in m.svd]}


def _measurement_from_dict(d: dict[str, Any], by_name: dict[str, GuardedLayer]) -> Measurement:
    svd = d.get("svd")
    return Measurement(by_name[d["layer"]].index, int(d["generation"]), Readings(**d["readings"]),
                       int(d["nonfinite_entries"]), None if svd is None else tuple(svd),
                       d.get("error", ""))


def instrument(model: nn.Module, config: GuardConfig | str | Any = None,
               **overrides: Any) -> Guard:
    """Guard every selected ``nn.Linear`` of ``model``.

    Args:
        model: the model; parameters keep their identity (an existing optimizer keeps working).
        config: a :class:`GuardConfig`, a :class:`~spectral_guard.thresholds.Thresholds`, or
            the path of a thresholds file; ``None`` for the defaults.
        **overrides: :class:`GuardConfig` fields to replace.

    Returns:
        The :class:`Guard`. If instrumenting fails part-way, the model is left as it was.

    Example:
        >>> guard = spectral_guard.instrument(model, ratio=0.1)
        >>> loss = model(**batch).loss          # the penalty is already in the loss
    """
    if getattr(model, "_spectral_guard", None) is not None:
        raise RuntimeError("model is already instrumented: call spectral_guard.remove(model) "
                           "first")
    return Guard(model, GuardConfig.coerce(config, **overrides))


def remove(model: nn.Module) -> nn.Module:
    """Remove the guard installed on ``model`` by :func:`instrument`; returns ``model``."""
    guard = getattr(model, "_spectral_guard", None)
    if guard is None:
        raise ValueError("model is not instrumented by spectral_guard")
    return guard.remove()
