"""The layer checks' cycle on the host: which layers a step samples, what each launch puts into
the step's packer (:mod:`.worker`), and how a measurement is applied one step later (relative
readings, verdict, thermostat, the alarm's fall record, the conditioning pairs, history).

Pure host logic over :class:`~.install.GuardedLayer` records; the device half is
:func:`.worker.launch` and the transport is :mod:`.protocol`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import Any

import torch

from .alarm import remember, update_fall
from .check import Law, Readings, baseline_from, condition_pairs, judge, relative, update_lambdas
from .config import GuardConfig
from .install import GuardedLayer
from .msign import looks_random_init
from .protocol import AsyncChecks, HostFn, Packer
from .sampling import LayerSchedule, check_index
from .state import LayerState
from .worker import LayerEntry, Measurement, launch, refresh_many

Tensor = torch.Tensor
BASELINE_POWER_ITERS = 20
NAME = "layers"


class LayerChecks:
    """The guarded layers and their check cycle (a :class:`~.protocol.Component`).

    Args:
        layers: the installed layers (their ``state`` is read and written here).
        config: the guard's configuration.
    """

    name = NAME

    def __init__(self, layers: list[GuardedLayer], config: GuardConfig) -> None:
        self.layers = layers
        self.by_name = {layer.name: layer for layer in layers}
        self.config = config
        self.schedule = LayerSchedule(len(layers), config.ratio, config.seed)
        self.law = Law(config.base, config.gain, config.decay, config.lambda_floor)
        self.history: deque[dict[str, Any]] = deque(maxlen=config.history)
        self.collapse_flagged: list[GuardedLayer] = []   # for the "msign" actuator

    def entry(self, layer: GuardedLayer, vectors: bool) -> LayerEntry:
        fiedler_rows = self.config.fiedler_rows if "fiedler" in layer.sensors else 0
        return LayerEntry(layer.index, layer.state.generation, layer.probe, layer.weight,
                          vectors, fiedler_rows, layer.state.nonfinite)

    def sampled(self, step: int) -> list[int]:
        check = check_index(step, self.config.every)
        return self.schedule.layers_for_check(check) if check is not None else []

    # -- device half -----------------------------------------------------------------------

    def launch(self, step: int, packer: Packer) -> HostFn | None:
        """The check of ``step`` into ``packer`` plus the treated layers' vector refresh."""
        sampled = self.sampled(step)
        with torch.no_grad():
            if self.config.actuator == "spectral":
                checked = set(sampled)  # a check refreshes its own layers' vectors
                refresh_many([(layer.probe, layer.weight) for layer in self.layers
                              if layer.index not in checked and layer.state.treated
                              and layer.state.lambdas["collapse"] > 0],
                             self.config.power_iters)
            entries = [self.entry(self.layers[i], self._conditioning(self.layers[i]))
                       for i in sampled]
            return launch(entries, self.config.power_iters, packer)

    def _conditioning(self, layer: GuardedLayer) -> bool:
        return "condition_number" in layer.sensors and self.config.actuator != "l2"

    def take_baselines(self, indices: Iterable[int], checks: AsyncChecks, step: int) -> None:
        """Measure now and wait (instrumentation and loading are not training steps)."""
        packer = Packer()
        host = launch([self.entry(self.layers[i], False) for i in indices],
                      BASELINE_POWER_ITERS, packer)
        if host is None:
            return
        for m in checks.now(packer, {NAME: host})[NAME]:
            layer = self.layers[m.index]
            state = layer.state
            state.baseline = None if m.error or m.nonfinite_entries else \
                baseline_from(m.readings)
            state.recent_retention = remember([], step, 1.0, self.config.alarm_fall_steps)
            state.random_init = state.baseline is not None and looks_random_init(
                m.readings.stable_rank, m.readings.effective_rank,
                layer.probe.biopsy_shape(tuple(layer.weight.shape)))
            self._judge_baseline(layer, m, step)

    def _judge_baseline(self, layer: GuardedLayer, m: Measurement, step: int) -> None:
        """A layer whose baseline reading is already collapsed by the absolute rule (retention
        reads 1, so only ``collapse_rule`` can fire) is treated from the first step instead of
        at its sample turn."""
        st = layer.state
        if st.baseline is None or not layer.penalized or not self.config.collapse_rule:
            return
        readings = relative(m.readings, st.baseline)
        verdict = judge(readings, {}, layer.rule, layer.min_dim, True)   # the absolute rule
        if not verdict.triggered["collapse"]:
            return
        st.readings = readings
        st.lambdas = update_lambdas(st.lambdas, verdict, self.law)
        st.interventions += 1
        if self.config.actuator == "msign":
            self.collapse_flagged.append(layer)
        self.record(layer, step, True)

    def rebaseline(self, index: int, checks: AsyncChecks, step: int) -> None:
        """New weights were loaded into layer ``index``: forget what the guard knew of it."""
        layer = self.layers[index]
        layer.state = LayerState(generation=layer.state.generation + 1)
        self.take_baselines([index], checks, step)

    # -- host half, one step later -------------------------------------------------------------

    def apply(self, measured: list[Measurement] | None, step: int) -> None:
        """Apply the check launched at ``step`` (measurements of replaced weights dropped)."""
        for m in measured or []:
            layer = self.layers[m.index]
            if m.generation == layer.state.generation:
                self._apply(layer, m, step)

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
            self.record(layer, step, False)
            return
        if st.baseline is None:
            st.baseline = baseline_from(m.readings)  # deferred: the layer just became non-zero
            st.recent_retention = remember([], step, 1.0, self.config.alarm_fall_steps)
        st.readings = relative(m.readings, st.baseline)
        verdict = judge(st.readings, layer.sensors, layer.rule, layer.min_dim,
                        self.config.collapse_rule)
        if not layer.penalized:
            self.record(layer, step, verdict.fired)
            return
        st.lambdas = update_lambdas(st.lambdas, verdict, self.law)
        st.recent_retention, st.collapse_fall = update_fall(
            st.recent_retention, st.collapse_fall, step, st.readings.effective_rank_retention,
            st.lambdas["collapse"] > 0, self.config.alarm_fall_steps)
        st.interventions += int(verdict.fired)
        if self.config.actuator == "msign" and verdict.triggered["collapse"]:
            self.collapse_flagged.append(layer)
        self._set_condition_pairs(layer, m)
        self.record(layer, step, verdict.fired)

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

    def record(self, layer: GuardedLayer, step: int, fired: bool) -> None:
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


def _to_device(t: Tensor, device: torch.device) -> Tensor:
    """Host -> device without a synchronizing copy (pinned memory, ``non_blocking``)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
