"""``instrument(model)``: identity parametrizations, forward hooks and the :class:`Guard`.

Per guarded ``nn.Linear`` (subclasses included):

* an identity parametrization :class:`GuardProbe` on ``weight``: it never changes the weight
  (outputs stay bit-for-bit identical) and holds the layer's guard state in non-persistent
  buffers (power-iteration vectors, lambdas, baselines, latest readings, counters), so the state
  follows ``model.to(device)`` but never enters the model's ``state_dict``;
* a forward-pre hook (on the parent ``nn.MultiheadAttention`` for its ``out_proj``, whose
  forward MHA never calls); it is a few attribute reads unless the layer is *armed* this step;
* state_dict hooks that keep the keys ``<path>.weight`` both ways.

On the root module: a forward-pre hook that opens a training forward (grad enabled, training
mode, not inside backward) and a forward hook that closes it and adds the pending penalty to
``output.loss`` / ``output["loss"]`` when there is one.

One optimizer step (the guard's clock) arms the layers sampled by the schedule (a *check*) and
those whose lambda is still positive (*treated*). At an armed layer's first training forward in
the step, the no-grad work runs once (sensors, thermostat, power iteration); at each training
forward (each micro-batch) its differentiable penalty term is queued, see ``docs/guard.md``.
"""

from __future__ import annotations

import math
import re
import time
import warnings
import weakref
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch.nn.utils import parametrize
from torch.optim.optimizer import register_optimizer_step_post_hook

from ..estimators import (
    PowerState,
    biopsy_indices,
    gram_singular_values,
    intra_op_threads,
    name_seed,
    power_iteration,
    take_biopsy,
)
from ..sensors import (
    as_compute_tensor,
    condition_number_from_sv,
    count_nonfinite,
    effective_rank_from_sv,
    fiedler_value,
    rank_rtol,
    stable_rank_from_sv,
)
from . import thermostat
from .config import SENSOR_KIND, GuardConfig, active_sensors
from .penalties import condition_term, l2_term, spectral_collapse_term
from .sampling import LayerSchedule, check_index

Tensor = torch.Tensor

_ORIGINAL = "parametrizations.weight.original"
# Reading slots of GuardProbe.readings
READINGS = ("effective_rank", "stable_rank", "condition_number", "fiedler", "sigma_max",
            "effective_rank_retention", "stable_rank_retention", "condition_growth")
_R = {name: i for i, name in enumerate(READINGS)}
# Baseline slots
BASELINES = ("effective_rank", "stable_rank", "condition_number", "fiedler")
_B = {name: i for i, name in enumerate(BASELINES)}
# Counter slots
COUNTERS = ("checks", "interventions", "last_checked_step", "nonfinite", "prepared_step",
            "nonfinite_entries")
_C = {name: i for i, name in enumerate(COUNTERS)}
STATE_VERSION = 1


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


class GuardProbe(nn.Module):
    """Identity parametrization ``W -> W`` carrying one layer's guard state in buffers.

    Buffers (non-persistent): ``u`` (m), ``v`` (n) power-iteration vectors; ``lam`` =
    ``[lambda_collapse, lambda_conditioning]``; ``baseline`` (values at instrumentation, see
    :data:`BASELINES`); ``readings`` (latest, :data:`READINGS`); ``counters``
    (:data:`COUNTERS`); ``cond_u``/``cond_v``/``cond_par`` the conditioning term's singular
    pairs and ``[log kappa_t, eps]``.
    """

    def __init__(self, shape: tuple[int, int], seed: int) -> None:
        super().__init__()
        m, n = shape
        gen = torch.Generator(device="cpu").manual_seed(seed)
        u, v = torch.randn(m, generator=gen), torch.randn(n, generator=gen)
        self.register_buffer("u", u / u.norm(), persistent=False)
        self.register_buffer("v", v / v.norm(), persistent=False)
        self.register_buffer("lam", torch.zeros(2, dtype=torch.float64), persistent=False)
        self.register_buffer("baseline", torch.full((len(BASELINES),), math.nan,
                                                    dtype=torch.float64), persistent=False)
        self.register_buffer("readings", torch.full((len(READINGS),), math.nan,
                                                    dtype=torch.float64), persistent=False)
        counters = torch.zeros(len(COUNTERS), dtype=torch.int64)
        counters[_C["last_checked_step"]] = -1
        counters[_C["prepared_step"]] = -1
        self.register_buffer("counters", counters, persistent=False)
        self.register_buffer("cond_u", torch.zeros(0, 0), persistent=False)
        self.register_buffer("cond_v", torch.zeros(0, 0), persistent=False)
        self.register_buffer("cond_par", torch.zeros(2, dtype=torch.float64), persistent=False)

    def forward(self, W: Tensor) -> Tensor:
        """Identity: the weight is returned as is (the penalty is a separate loss term)."""
        return W

    def state_tensors(self) -> dict[str, Tensor]:
        return {name: buf.detach().clone() for name, buf in self.named_buffers()}


@dataclass
class _Layer:
    """Per-layer bookkeeping that is not state (handles, names, biopsy indices)."""

    index: int
    name: str
    module: nn.Module
    probe: GuardProbe
    sensors: dict[str, float]
    rows: Tensor | None
    cols: Tensor | None
    hook_owner: nn.Module
    param_order: list[str] = field(default_factory=list)
    handles: list[Any] = field(default_factory=list)
    forward_id: int = -1


@dataclass
class _Skipped:
    name: str
    reason: str


class Guard:
    """The handle returned by :func:`instrument`. See ``docs/guard.md`` for the contract."""

    def __init__(self, model: nn.Module, config: GuardConfig) -> None:
        self.model = model
        self.config = config
        self._thresholds = config.resolved_thresholds()
        self._layers: list[_Layer] = []
        self._by_name: dict[str, _Layer] = {}
        self.skipped: list[_Skipped] = []
        self._step = 0
        self._forward_id = 0
        self._live = False
        self._armed_step = -1
        self._armed: frozenset[int] = frozenset()
        self._sampled: frozenset[int] = frozenset()
        self._treated: set[int] = set()
        self._pending: dict[int, int] = {}  # layer index -> forwards that queued its term
        self._ns = [0]
        self._root_handles: list[Any] = []
        self._attached: weakref.ref | None = None
        self._owner_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._removed = False
        self._install()
        self._schedule = LayerSchedule(len(self._layers), config.ratio, config.seed)

    # ------------------------------------------------------------------------------------------
    # Installation

    def _select(self) -> list[tuple[str, nn.Linear, dict[str, float]]]:
        cfg = self.config
        counts: dict[int, int] = {}
        for mod in self.model.modules():
            for p in mod.parameters(recurse=False):
                counts[id(p)] = counts.get(id(p), 0) + 1
        chosen = []
        for name, mod in self.model.named_modules():
            if not isinstance(mod, nn.Linear):
                continue
            if cfg.include is not None and not any(re.search(p, name) for p in cfg.include):
                continue
            if any(re.search(p, name) for p in cfg.exclude):
                self.skipped.append(_Skipped(name, "excluded by pattern"))
                continue
            if parametrize.is_parametrized(mod, "weight"):
                self.skipped.append(_Skipped(name, "weight already parametrized"))
                continue
            W = mod.weight
            if W.dim() != 2 or min(W.shape) < 2:
                self.skipped.append(_Skipped(name, "matrix too small"))
                continue
            if counts.get(id(W), 0) > 1:
                self.skipped.append(_Skipped(name, "tied weight (shared with another module)"))
                continue
            sensors = active_sensors(cfg, self._thresholds.rule_for(f"{name}.weight"))
            if not sensors and not cfg.watch_unguarded:
                group = self._thresholds.group_for(f"{name}.weight")
                self.skipped.append(_Skipped(name, f"no guard threshold (group {group})"))
                continue
            chosen.append((name, mod, sensors))
        return chosen

    def _install(self) -> None:
        cfg = self.config
        modules = dict(self.model.named_modules())
        for name, mod, sensors in self._select():
            shape = (int(mod.weight.shape[0]), int(mod.weight.shape[1]))
            seed = name_seed(cfg.seed, name)
            probe = GuardProbe(shape, seed).to(mod.weight.device)
            rows, cols = biopsy_indices(shape, cfg.biopsy_limit, seed)
            parent_name = name.rpartition(".")[0]
            parent = modules.get(parent_name) if "." in name else self.model
            owner = parent if isinstance(parent, nn.MultiheadAttention) else mod
            layer = _Layer(len(self._layers), name, mod, probe, sensors, rows, cols, owner,
                           list(mod._parameters))
            parametrize.register_parametrization(mod, "weight", probe)
            layer.handles.append(owner.register_forward_pre_hook(self._make_layer_hook(layer)))
            layer.handles.append(mod.register_state_dict_post_hook(_state_dict_post_hook))
            layer.handles.append(mod.register_load_state_dict_pre_hook(_load_pre_hook))
            self._layers.append(layer)
            self._by_name[name] = layer
            with intra_op_threads(1):
                self._baseline(layer)
        self._root_handles.append(self.model.register_forward_pre_hook(self._root_pre))
        self._root_handles.append(self.model.register_forward_hook(self._root_post))
        ref = weakref.ref(self)

        def opt_hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            guard = ref()
            if guard is not None:
                guard._on_optimizer_step(optimizer)

        self._root_handles.append(register_optimizer_step_post_hook(opt_hook))
        self.model._spectral_guard = self  # lets spectral_guard.remove(model) find the guard

    @torch.no_grad()
    def _baseline(self, layer: _Layer) -> None:
        """Reference readings at instrumentation (20 power iterations, one biopsy SVD)."""
        probe = layer.probe
        W = _original(layer.module).detach()
        sigma, state = power_iteration(W, PowerState(probe.u, probe.v), n_iter=20)
        B = as_compute_tensor(take_biopsy(W, layer.rows, layer.cols))
        if not (bool(torch.isfinite(sigma)) and bool(torch.isfinite(B).all())):
            return  # no baseline: relative sensors stay silent for this layer
        probe.u.copy_(state.u)
        probe.v.copy_(state.v)
        s = _singular_values(B, precise="condition_number" in layer.sensors)
        base = probe.baseline
        base[_B["effective_rank"]] = float(effective_rank_from_sv(s))
        base[_B["stable_rank"]] = float(stable_rank_from_sv(s))
        base[_B["condition_number"]] = float(condition_number_from_sv(
            s, rank_rtol(tuple(B.shape), W.dtype)))
        if "fiedler" in layer.sensors:
            base[_B["fiedler"]] = fiedler_value(B[: self.config.fiedler_rows])

    # ------------------------------------------------------------------------------------------
    # Hooks

    def _root_pre(self, module: nn.Module, args: Any) -> None:
        t0 = time.perf_counter_ns()
        self._live = module.training and torch.is_grad_enabled() and not _in_backward()
        if self._live:
            self._forward_id += 1
            if self._armed_step != self._step:
                self._arm()
        self._ns[0] += time.perf_counter_ns() - t0

    def _root_post(self, module: nn.Module, args: Any, output: Any) -> Any:
        t0 = time.perf_counter_ns()
        live, self._live = self._live, False
        result = None
        if live and self.config.auto_loss and self._pending:
            result = self._add_to_loss(output)
        self._ns[0] += time.perf_counter_ns() - t0
        return result

    def _make_layer_hook(self, layer: _Layer):
        index = layer.index

        def hook(module: nn.Module, args: Any) -> None:
            if not self._live or index not in self._armed or not module.training:
                return
            t0 = time.perf_counter_ns()
            self._layer_forward(layer)
            self._ns[0] += time.perf_counter_ns() - t0

        return hook

    def _add_to_loss(self, output: Any) -> Any:
        if isinstance(output, MutableMapping):
            loss = output.get("loss")
        else:
            loss = getattr(output, "loss", None)
        if not isinstance(loss, Tensor):
            return None
        if not isinstance(output, MutableMapping):
            try:
                output.loss = loss  # settable? (else the terms stay for guard.penalty())
            except (AttributeError, TypeError):
                return None
        new_loss = loss + self._take_pending().to(loss.dtype)
        if isinstance(output, MutableMapping):
            output["loss"] = new_loss
        else:
            output.loss = new_loss
        return output

    def _on_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self._removed or self.config.step_on != "optimizer":
            return
        if self._attached is not None:
            if self._attached() is not optimizer:
                return
        elif not self._owns(optimizer):
            return
        self.step()

    def _owns(self, optimizer: torch.optim.Optimizer) -> bool:
        key = (len(optimizer.param_groups), sum(len(g["params"]) for g in optimizer.param_groups))
        cached = self._owner_cache.get(optimizer)
        if cached is not None and cached[0] == key:
            return cached[1]
        ours = {id(_original(layer.module)) for layer in self._layers}
        owns = any(id(p) in ours for g in optimizer.param_groups for p in g["params"])
        self._owner_cache[optimizer] = (key, owns)
        return owns

    # ------------------------------------------------------------------------------------------
    # The work

    def _arm(self) -> None:
        """Layers with work this step: the scheduled check's chunk plus treated layers."""
        check = check_index(self._step, self.config.every)
        sampled = set(self._schedule.layers_for_check(check)) if check is not None else set()
        self._sampled = frozenset(sampled)
        self._armed = frozenset(sampled | self._treated)
        self._armed_step = self._step

    def _layer_forward(self, layer: _Layer) -> None:
        probe = layer.probe
        if int(probe.counters[_C["prepared_step"]]) != self._step:
            with torch.no_grad(), intra_op_threads(1):
                if layer.index in self._sampled:
                    self._check(layer)
                else:
                    self._refresh(layer)
                probe.counters[_C["prepared_step"]] = self._step
        if layer.forward_id == self._forward_id:
            return  # already queued for this forward (layer called twice, or MHA + out_proj)
        layer.forward_id = self._forward_id
        self._pending[layer.index] = self._pending.get(layer.index, 0) + 1

    def _refresh(self, layer: _Layer) -> None:
        """Treated, not sampled: one warm power step keeps the spectral term's u, v current."""
        probe = layer.probe
        if self.config.actuator != "spectral" or float(probe.lam[0]) <= 0:
            return
        W = _original(layer.module).detach()
        sigma, state = power_iteration(W, PowerState(probe.u, probe.v), self.config.power_iters)
        if not bool(torch.isfinite(sigma)):
            self._flag_nonfinite(layer, W)
            return
        probe.u.copy_(state.u)
        probe.v.copy_(state.v)
        probe.readings[_R["sigma_max"]] = float(sigma)

    def _flag_nonfinite(self, layer: _Layer, W: Tensor) -> None:
        nan, inf = count_nonfinite(W)
        layer.probe.counters[_C["nonfinite"]] = 1
        layer.probe.counters[_C["nonfinite_entries"]] = nan + inf

    def _check(self, layer: _Layer) -> None:
        """Sensors (no grad, one SVD of the biopsy), then the thermostat update."""
        cfg, probe = self.config, layer.probe
        W = _original(layer.module).detach()
        probe.counters[_C["checks"]] += 1
        probe.counters[_C["last_checked_step"]] = self._step
        sigma, state = power_iteration(W, PowerState(probe.u, probe.v), cfg.power_iters)
        B = as_compute_tensor(take_biopsy(W, layer.rows, layer.cols))
        if not (bool(torch.isfinite(sigma)) and bool(torch.isfinite(B).all())):
            self._flag_nonfinite(layer, W)
            probe.readings.fill_(math.nan)
            return
        probe.counters[_C["nonfinite"]] = 0
        probe.counters[_C["nonfinite_entries"]] = 0
        probe.u.copy_(state.u)
        probe.v.copy_(state.v)
        cond_on = "condition_number" in layer.sensors and cfg.actuator == "spectral"
        if cond_on:
            U, s, Vh = torch.linalg.svd(B, full_matrices=False)
        else:
            s = _singular_values(B, precise="condition_number" in layer.sensors)
        r, base = probe.readings, probe.baseline
        r[_R["sigma_max"]] = float(sigma)
        r[_R["effective_rank"]] = float(effective_rank_from_sv(s))
        r[_R["stable_rank"]] = float(stable_rank_from_sv(s))
        kappa = float(condition_number_from_sv(s, rank_rtol(tuple(B.shape), W.dtype)))
        r[_R["condition_number"]] = kappa
        r[_R["effective_rank_retention"]] = r[_R["effective_rank"]] / base[_B["effective_rank"]]
        r[_R["stable_rank_retention"]] = r[_R["stable_rank"]] / base[_B["stable_rank"]]
        r[_R["condition_growth"]] = kappa / float(base[_B["condition_number"]])
        if "fiedler" in layer.sensors:
            r[_R["fiedler"]] = fiedler_value(B[: cfg.fiedler_rows])
        severity = {"collapse": 0.0, "conditioning": 0.0}
        fired = {"collapse": False, "conditioning": False}
        for sensor, threshold in layer.sensors.items():
            x, is_floor = self._reading_for(sensor, r)
            if is_floor:
                hit = thermostat.floor_triggered(x, threshold)
                sev = thermostat.floor_severity(x, threshold)
            else:
                hit = thermostat.ceiling_triggered(x, threshold)
                sev = thermostat.ceiling_severity(x, threshold)
            kind = SENSOR_KIND[sensor]
            fired[kind] = fired[kind] or hit
            severity[kind] = max(severity[kind], sev)
        for slot, kind in enumerate(("collapse", "conditioning")):
            probe.lam[slot] = thermostat.update_lambda(
                float(probe.lam[slot]), fired[kind], severity[kind], cfg.base, cfg.gain,
                cfg.decay, cfg.lambda_floor)
        if fired["collapse"] or fired["conditioning"]:
            probe.counters[_C["interventions"]] += 1
        if bool((probe.lam > 0).any()):
            self._treated.add(layer.index)
        else:
            self._treated.discard(layer.index)
        if cond_on and float(probe.lam[1]) > 0:
            self._store_condition_pairs(layer, U, s, Vh)

    def _reading_for(self, sensor: str, r: Tensor) -> tuple[float, bool]:
        if sensor == "effective_rank":
            return float(r[_R["effective_rank_retention"]]), True
        if sensor == "stable_rank":
            return float(r[_R["stable_rank_retention"]]), True
        if sensor == "condition_number":
            return float(r[_R["condition_growth"]]), False
        return float(r[_R["fiedler"]]), False

    def _store_condition_pairs(self, layer: _Layer, U: Tensor, s: Tensor, Vh: Tensor) -> None:
        """Keep the top pair and the pairs whose ``s_1 / s_i`` exceeds ``kappa_t``."""
        probe = layer.probe
        kappa_t = layer.sensors["condition_number"] * float(probe.baseline[_B["condition_number"]])
        if not math.isfinite(kappa_t) or kappa_t <= 0:
            probe.cond_u = U[:, :0].clone()
            probe.cond_v = Vh[:0].mT.clone()
            return
        eps = 1e-3 * float(s[0])
        gap = torch.log(s[0] + eps) - torch.log(s + eps) - math.log(kappa_t)
        idx = torch.cat([torch.zeros(1, dtype=torch.long), torch.nonzero(gap > 0).flatten()])
        probe.cond_u = U[:, idx].clone()
        probe.cond_v = Vh[idx].mT.clone()
        probe.cond_par = torch.tensor([math.log(kappa_t), eps], dtype=torch.float64,
                                      device=probe.cond_par.device)

    def _term(self, layer: _Layer) -> Tensor | None:
        """The layer's differentiable penalty for this forward, or ``None``."""
        probe = layer.probe
        if int(probe.counters[_C["nonfinite"]]):
            return None
        lam_c, lam_k = float(probe.lam[0]), float(probe.lam[1])
        if lam_c <= 0 and lam_k <= 0:
            return None
        W = _original(layer.module)
        if self.config.actuator == "l2":
            term = (lam_c + lam_k) * l2_term(W)
        else:
            term = None
            if lam_c > 0:
                term = lam_c * spectral_collapse_term(W, probe.u, probe.v)
            if lam_k > 0 and probe.cond_u.shape[-1] > 1:
                B = take_biopsy(W, layer.rows, layer.cols)
                log_k, eps = float(probe.cond_par[0]), float(probe.cond_par[1])
                t = lam_k * condition_term(B, probe.cond_u, probe.cond_v, log_k, eps)
                term = t if term is None else term + t
            if term is None:
                return None
        if not bool(torch.isfinite(term.detach())):
            self._flag_nonfinite(layer, W.detach())
            return None
        return term

    def _take_pending(self) -> Tensor:
        """Build the queued terms: ``sum_layers count * lambda * P(W)``.

        Terms are built here (at the end of the root forward, or in :meth:`penalty`), not in
        the layer's hook, so no tensor is saved for backward inside an activation-checkpoint
        region (whose recompute must save exactly what the first forward saved).
        """
        pending, self._pending = self._pending, {}
        t0 = time.perf_counter_ns()
        total: Tensor | None = None
        for index, count in pending.items():
            term = self._term(self._layers[index])
            if term is None:
                continue
            term = term if count == 1 else term * count
            total = term if total is None else total + term.to(total.device)
        self._ns[0] += time.perf_counter_ns() - t0
        return total if total is not None else torch.zeros((), device=self._device())

    def _device(self) -> torch.device:
        if self._layers:
            return _original(self._layers[0].module).device
        return torch.device("cpu")

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
        """Seconds spent inside the guard's hooks and parametrizations (monotonic clock)."""
        return self._ns[0] * 1e-9

    def sampled_layers(self, step: int | None = None) -> list[str]:
        """Names of the layers the schedule checks at optimizer step ``step`` (default: now)."""
        check = check_index(self._step if step is None else step, self.config.every)
        if check is None:
            return []
        return [self._layers[i].name for i in self._schedule.layers_for_check(check)]

    def penalty(self) -> Tensor:
        """Sum of the penalty terms queued since the last call and not yet added to a loss.

        Differentiable with respect to the weights; a zero scalar when nothing is pending.
        """
        return self._take_pending()

    def step(self) -> None:
        """Advance the guard's clock by one optimizer step (automatic with ``step_on``)."""
        self._step += 1
        self._pending = {}
        self._armed_step = -1

    def attach(self, optimizer: torch.optim.Optimizer) -> Guard:
        """Follow only ``optimizer``'s steps (instead of any optimizer holding guarded weights)."""
        self._attached = weakref.ref(optimizer)
        return self

    def stats(self) -> dict[str, Any]:
        """Latest readings, lambdas, counters per layer, and totals."""
        layers: dict[str, dict[str, Any]] = {}
        for layer in self._layers:
            p = layer.probe
            c = p.counters.tolist()
            lam = p.lam.tolist()
            layers[layer.name] = {
                "shape": tuple(int(d) for d in _original(layer.module).shape),
                "sensors": {k: float(v) for k, v in zip(READINGS, p.readings.tolist(),
                                                        strict=True)},
                "baseline": {k: float(v) for k, v in zip(BASELINES, p.baseline.tolist(),
                                                         strict=True)},
                "thresholds": dict(layer.sensors),
                "lambda": lam[0] + lam[1],
                "lambda_collapse": lam[0],
                "lambda_conditioning": lam[1],
                "checks": c[_C["checks"]],
                "interventions": c[_C["interventions"]],
                "last_checked_step": c[_C["last_checked_step"]],
                "nonfinite": bool(c[_C["nonfinite"]]),
                "nonfinite_entries": c[_C["nonfinite_entries"]],
            }
        totals = {
            "step": self._step,
            "layers": len(layers),
            "skipped": len(self.skipped),
            "checks": sum(v["checks"] for v in layers.values()),
            "interventions": sum(v["interventions"] for v in layers.values()),
            "treated_layers": sum(v["lambda"] > 0 for v in layers.values()),
            "nonfinite_layers": sum(v["nonfinite"] for v in layers.values()),
            "guard_time_s": self.guard_time_s,
        }
        return {"layers": layers, "totals": totals,
                "skipped": {s.name: s.reason for s in self.skipped}}

    def report(self, console: Any = None) -> None:
        """Print :meth:`stats` as a rich table."""
        from .report import render_stats

        render_stats(self.stats(), console)

    def state_dict(self) -> dict[str, Any]:
        """Thermostat and power-iteration state (and the clock) for exact resumption."""
        return {
            "version": STATE_VERSION,
            "step": self._step,
            "config": {"seed": self.config.seed, "ratio": self.config.ratio,
                       "every": self.config.every},
            "layers": {layer.name: layer.probe.state_tensors() for layer in self._layers},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output into a guard on the same architecture."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported guard state version {state.get('version')!r}")
        missing = set(self._by_name) - set(state["layers"])
        extra = set(state["layers"]) - set(self._by_name)
        if missing or extra:
            raise ValueError(f"guard state does not match the guarded layers: missing "
                             f"{sorted(missing)[:5]}, unexpected {sorted(extra)[:5]}")
        saved = state.get("config", {})
        now = {"seed": self.config.seed, "ratio": self.config.ratio, "every": self.config.every}
        if saved and saved != now:
            warnings.warn(f"guard state saved with {saved}, loaded into a guard with {now}: the "
                          "schedule will differ from an uninterrupted run", stacklevel=2)
        for name, tensors in state["layers"].items():
            probe = self._by_name[name].probe
            for key, value in tensors.items():
                current = getattr(probe, key)
                setattr(probe, key, value.detach().clone().to(device=current.device,
                                                              dtype=current.dtype))
        self._step = int(state["step"])
        self._treated = {lay.index for lay in self._layers if bool((lay.probe.lam > 0).any())}
        self._pending = {}
        self._armed_step = -1

    def remove(self) -> nn.Module:
        """Take every hook and parametrization off; returns the plain model."""
        if self._removed:
            return self.model
        for layer in self._layers:
            for handle in layer.handles:
                handle.remove()
            parametrize.remove_parametrizations(layer.module, "weight", leave_parametrized=False)
            params = layer.module._parameters  # restore the registration order (state_dict order)
            ordered = {k: params[k] for k in layer.param_order if k in params}
            ordered.update({k: v for k, v in params.items() if k not in ordered})
            params.clear()
            params.update(ordered)
        for handle in self._root_handles:
            handle.remove()
        self._pending = {}
        self._removed = True
        if getattr(self.model, "_spectral_guard", None) is self:
            del self.model._spectral_guard
        return self.model


def _singular_values(B: Tensor, precise: bool) -> Tensor:
    """Descending singular values of the biopsy by one decomposition: ``svdvals`` when
    ``precise`` (the conditioning sensor), else the Gram eigenvalues in B's dtype
    (:func:`~spectral_guard.estimators.gram_singular_values`), 2-5x faster at 256 x 256 and
    enough for effective and stable rank, all the default sensors read."""
    return torch.linalg.svdvals(B) if precise else gram_singular_values(B)


def _original(module: nn.Module) -> Tensor:
    """The stored weight Parameter behind the (identity) parametrization."""
    return module.parametrizations.weight.original


def _state_dict_post_hook(module: nn.Module, state_dict: dict, prefix: str,
                          local_metadata: Any) -> None:
    """Rename ``<prefix>parametrizations.weight.original`` back to ``<prefix>weight``, first."""
    key = prefix + _ORIGINAL
    if key not in state_dict:
        return
    tail = []
    for k in reversed(state_dict):
        if not k.startswith(prefix):
            break
        tail.append(k)
    items = [(k, state_dict.pop(k)) for k in reversed(tail)]
    state_dict[prefix + "weight"] = next(v for k, v in items if k == key)
    for k, v in items:
        if k != key:
            state_dict[k] = v


def _load_pre_hook(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any,
                   strict: bool, missing_keys: list, unexpected_keys: list,
                   error_msgs: list) -> None:
    """Accept plain checkpoints: ``<prefix>weight`` loads into the parametrization's original."""
    if prefix + "weight" in state_dict:
        state_dict[prefix + _ORIGINAL] = state_dict.pop(prefix + "weight")


def instrument(model: nn.Module, config: GuardConfig | str | Any = None,
               **overrides: Any) -> Guard:
    """Guard every selected ``nn.Linear`` of ``model``; returns the :class:`Guard`.

    ``config``: a :class:`GuardConfig`, a :class:`~spectral_guard.thresholds.Thresholds`, or
    the path of a thresholds file; ``overrides`` replace GuardConfig fields.
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
