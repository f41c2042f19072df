"""``instrument(model)`` and the :class:`Guard` it returns: a thin facade.

One optimizer step of a guarded model, on the training thread:

1. forward: the weights are read through an identity parametrization (outputs are bit for bit
   those of the plain model). At the end of a training forward the root hook adds
   ``penalty_scale * sum_treated lambda_l * P_l(W_l)`` to the output's loss (``auto_loss``,
   :mod:`.penalty`), or leaves it for :meth:`Guard.penalty`;
2. backward, ``optimizer.step()`` (the learning-rate back-off scales it, :mod:`.backoff`);
3. the step post-hook advances the clock to ``s``, one cycle of the async check protocol
   (:mod:`.protocol`): the check launched at ``s - 1`` is applied (layers: :mod:`.cycle`;
   attention: :mod:`.attention`), the matrix sign runs where due (:mod:`.signs`), and the
   check of step ``s`` is launched (device work only; the host half runs on the worker).

Installation: :mod:`.install`; state: :mod:`.persist`; reports: :mod:`.stats`. Nothing in the
step reads a device tensor on the host. See ``docs/guard.md``.
"""

from __future__ import annotations

import copy
import time
import warnings
import weakref
from typing import Any

import torch
import torch.nn as nn

from . import persist, sharded
from . import stats as report
from .attention import AttentionGuard
from .backoff import LRBackoff
from .config import GuardConfig
from .cycle import NAME, LayerChecks
from .hooks import get_loss, set_loss
from .install import GuardedLayer, install_layers, rewire_copy, root_hooks, uninstall_layers
from .penalty import build
from .protocol import AsyncChecks, Packer
from .signs import Alarm, MatrixSigns, quorum_alarm

Tensor = torch.Tensor
STATE_VERSION = persist.STATE_VERSION


class Guard:
    """The handle returned by :func:`instrument`. See ``docs/guard.md`` for the contract.

    Args:
        alarm: the alarm policy ``alarm(guard) -> bool`` (default :func:`.signs.quorum_alarm`).
        backoff: the learning-rate back-off (default ``LRBackoff(lr_backoff, lr_floor)``).
    """

    def __init__(self, model: nn.Module, config: GuardConfig, alarm: Alarm | None = None,
                 backoff: LRBackoff | None = None) -> None:
        if not config.sees_falls:
            warnings.warn(f"a layer is checked every {config.check_period} steps (every="
                          f"{config.every}, ratio={config.ratio}), more than msign_fall="
                          f"{config.msign_fall}: the alarm cannot see a sudden collapse, so "
                          "only its attention half can raise it; raise ratio or msign_fall "
                          "(guard/alarm.py)", stacklevel=3)
        self.model, self.config, self.penalty_scale = model, config, 1.0
        self.backoff = backoff or LRBackoff(config.lr_backoff, config.lr_floor)
        self.signs = MatrixSigns(config, alarm or quorum_alarm, self.backoff)
        self.checks = AsyncChecks()
        self.attention: AttentionGuard | None = None
        self.last_penalty: Tensor | None = None
        self._step = self._forwards = self._ns = 0
        self._attached: weakref.ref | None = None
        self._owner_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._ticked: weakref.WeakSet = weakref.WeakSet()
        self._removed, self._root_handles = False, []
        ref = weakref.ref(self)
        layers, self.skipped = install_layers(model, config, ref)
        self.cycle = LayerChecks(layers, config)
        try:
            self._root_handles = root_hooks(model, ref)
            model._spectral_guard = self  # lets spectral_guard.remove(model) find the guard
            self.cycle.take_baselines(range(len(layers)), self.checks, 0)
            if config.attention:
                self.attention = AttentionGuard(model, config, self.layer_names, self.checks)
            self._launch(0, act=False)
        except BaseException:
            self._uninstall()
            raise

    # -- the clock (hook entry points) --------------------------------------------------------

    def _launch(self, step: int, act: bool = True) -> None:
        packer = Packer()
        host = {NAME: self.cycle.launch(step, packer)}
        if self.attention is not None:
            host[AttentionGuard.NAME] = self.attention.launch(step, packer, act)
        self.checks.launch(step, packer, {k: v for k, v in host.items() if v is not None})

    def step(self) -> None:
        """Advance the guard's clock by one optimizer step (automatic with ``step_on``)."""
        t0 = time.perf_counter_ns()
        self._step += 1
        self._forwards = 0
        self.backoff.recover()
        inflight = self.checks.collect()
        results = {} if inflight is None else inflight.result()
        if NAME in results:
            self.cycle.apply(results[NAME], inflight.step)
        flagged, self.cycle.collapse_flagged = self.cycle.collapse_flagged, []
        self.signs.run(self, self._step, flagged)
        if self.attention is not None:
            self.attention.apply(results.get(AttentionGuard.NAME))
        self._launch(self._step)
        self._ns += time.perf_counter_ns() - t0

    def after_forward(self, output: Any) -> Any:
        """Root forward hook body (training forwards only): count it, add the penalty."""
        t0 = time.perf_counter_ns()
        self.backoff.recover()   # a step that raised left the lr scaled
        self._forwards += 1
        result = None
        loss = get_loss(output) if self.config.auto_loss else None
        if loss is not None:
            self._forwards -= 1  # consumed here, whatever is treated
            pen = self._build(loss.device)
            if pen is not None and set_loss(output, loss + pen.to(loss.dtype)):
                result = output
            elif pen is not None:
                self._forwards += 1  # the output took no loss: leave it for penalty()
        self._ns += time.perf_counter_ns() - t0
        return result

    def before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Optimizer step pre-hook: the learning-rate back-off."""
        if self._removed or not self._follows(optimizer):
            return
        self.backoff.before_step(optimizer) if self.backoff.scale != 1.0 else \
            self.backoff.recover()

    def after_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Optimizer step post-hook: put the lr back, advance the clock."""
        self.backoff.after_step()
        if self._removed or self.config.step_on != "optimizer" or not self._follows(optimizer):
            return
        self._warn_second_optimizer(optimizer)
        self.step()

    def rebaseline(self, index: int) -> None:
        """Weights were loaded into layer ``index``: take its baseline again."""
        self.cycle.rebaseline(index, self.checks, self._step)

    def _build(self, device: torch.device | None) -> Tensor | None:
        total = build(self.layers, self.config.actuator, self.attention, device,
                      self.penalty_scale)
        self.last_penalty = None if total is None else total.detach()
        return total

    def _follows(self, optimizer: torch.optim.Optimizer) -> bool:
        """The optimizer given to :meth:`attach`, else any optimizer holding a guarded weight."""
        if self._attached is not None:
            return self._attached() is optimizer
        key = (len(optimizer.param_groups), sum(len(g["params"]) for g in optimizer.param_groups))
        cached = self._owner_cache.get(optimizer)
        if cached is None or cached[0] != key:
            ours = {id(layer.weight) for layer in self.layers}
            cached = (key, any(id(p) in ours for g in optimizer.param_groups
                               for p in g["params"]))
            self._owner_cache[optimizer] = cached
        return cached[1]

    def _warn_second_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        if self._attached is None and optimizer not in self._ticked:
            self._ticked.add(optimizer)
            if len(self._ticked) == 2:
                warnings.warn("two optimizers holding guarded weights step the guard: its "
                              "clock advances at each of their steps (twice per iteration); "
                              "call guard.attach(optimizer) to follow one", stacklevel=4)

    # -- public API ---------------------------------------------------------------------------

    @property
    def layers(self) -> list[GuardedLayer]:
        return self.cycle.layers

    @property
    def by_name(self) -> dict[str, GuardedLayer]:
        return self.cycle.by_name

    @property
    def history(self) -> Any:
        return self.cycle.history

    @property
    def layer_names(self) -> list[str]:
        return [layer.name for layer in self.layers]

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
        return [self.layers[i].name
                for i in self.cycle.sampled(self._step if step is None else step)]

    def penalty(self, device: torch.device | str | None = None) -> Tensor:
        """The penalty of the training forwards since the last call not already added to a
        loss: ``count * penalty_scale * sum_treated lambda P(W)``, differentiable in the
        weights; a zero scalar when nothing is pending or treated. ``device``: default the
        device of the last guarded layer (where a split model usually computes its loss)."""
        count, self._forwards = self._forwards, 0
        if device is None:
            device = self.layers[-1].weight.device if self.layers else torch.device("cpu")
        device = torch.device(device)
        pen = self._build(device) if count else None
        if pen is None:
            return torch.zeros((), device=device)
        return pen if count == 1 else pen * count

    def attach(self, optimizer: torch.optim.Optimizer) -> Guard:
        """Follow only ``optimizer``'s steps (instead of any optimizer holding guarded weights)."""
        self._attached = weakref.ref(optimizer)
        return self

    def stats(self) -> dict[str, Any]:
        """Latest applied readings, lambdas, counters per layer, and totals (host values)."""
        self.backoff.recover()
        return report.stats(self)

    def metrics(self) -> dict[str, float]:
        """Flat numbers for loggers (reads the last penalty from the device: not in the step):
        ``interventions``, ``msigns``, ``treated_layers``, ``nonfinite_layers`` (totals);
        ``lr_scale``; ``min_effective_rank_retention``; ``mean_stable_rank_ratio`` (``SR / k``
        of the biopsies); ``penalty`` (the last penalty built, 0 if none); attention metrics."""
        return report.metrics(self)

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
        """Clock, per-layer state, the check in flight (:mod:`.persist`; waits for it)."""
        self.backoff.recover()
        return persist.save(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (load the model's weights first: loading weights
        into an instrumented model retakes its baselines)."""
        self._step = persist.load(self, state)
        self._forwards = 0

    def remove(self) -> nn.Module:
        """Take every hook and parametrization off; returns the plain model."""
        if not self._removed:
            sharded.check_removable(self.model)  # not under FSDP2 (one-line ValueError)
            self._uninstall()
            self._removed = True
        return self.model

    def _uninstall(self) -> None:
        uninstall_layers(self.layers if hasattr(self, "cycle") else [])
        self.backoff.recover()   # removed from inside a step, or after one that raised
        for handle in self._root_handles:
            handle.remove()
        self._root_handles = []
        if self.attention is not None:
            self.attention.remove()
        self._forwards = 0
        self.checks.shutdown()
        if getattr(self.model, "_spectral_guard", None) is self:
            del self.model._spectral_guard

    def __deepcopy__(self, memo: dict) -> Guard:
        """A guard for the copied model (``copy.deepcopy(model)``: EMA, ``AveragedModel``)."""
        new = Guard.__new__(Guard)
        memo[id(self)] = new
        fresh = {"_owner_cache", "_attached", "_root_handles", "_ticked"}
        for key, value in self.__dict__.items():
            if key not in fresh:   # checks: a fresh worker (AsyncChecks.__deepcopy__)
                setattr(new, key, copy.deepcopy(value, memo))
        new._owner_cache, new._attached = weakref.WeakKeyDictionary(), None
        new._ticked = weakref.WeakSet()
        new._root_handles = rewire_copy(self._root_handles, new.layers, memo, weakref.ref(new))
        return new

    def __reduce__(self) -> Any:
        raise TypeError("a Guard cannot be pickled: save guard.state_dict() (and "
                        "model.state_dict())")


def instrument(model: nn.Module, config: GuardConfig | str | Any = None, *,
               alarm: Alarm | None = None, backoff: LRBackoff | None = None,
               **overrides: Any) -> Guard:
    """Guard every selected ``nn.Linear`` of ``model``.

    Args:
        model: the model; parameters keep their identity (an existing optimizer keeps working).
        config: a :class:`GuardConfig`, a :class:`~spectral_guard.thresholds.Thresholds`, or
            the path of a thresholds file; ``None`` for the defaults.
        alarm: the alarm policy (``alarm(guard) -> bool``; default
            :func:`~spectral_guard.guard.signs.quorum_alarm`).
        backoff: the learning-rate back-off object (default from ``lr_backoff``, ``lr_floor``).
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
    return Guard(model, GuardConfig.coerce(config, **overrides), alarm=alarm, backoff=backoff)


def remove(model: nn.Module) -> nn.Module:
    """Remove the guard installed on ``model`` by :func:`instrument`; returns ``model``."""
    guard = getattr(model, "_spectral_guard", None)
    if guard is None:
        raise ValueError("model is not instrumented by spectral_guard")
    return guard.remove()
