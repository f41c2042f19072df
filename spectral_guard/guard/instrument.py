"""``instrument(model)`` and the :class:`Guard` it returns: a thin facade.

A guarded step: the forward reads weights through identity parametrizations and the root hook
adds the penalty to the loss (:mod:`.penalty`); ``optimizer.step()`` runs under the
learning-rate back-off (:mod:`.backoff`); its post-hook advances the clock, one cycle of the
async check protocol (:mod:`.protocol`): apply the check launched a step ago (:mod:`.cycle`,
:mod:`.attention`), sign where due (:mod:`.signs`), launch this step's. Installation:
:mod:`.install`; state: :mod:`.persist`; reports: :mod:`.stats`. See ``docs/guard.md``.
"""

from __future__ import annotations

import copy
import time
import weakref
from typing import Any

import torch
import torch.nn as nn

from . import persist, sharded
from . import stats as report
from .attention import AttentionGuard
from .backoff import LRBackoff
from .blocks import BlockGuard
from .clock import Follower
from .config import GuardConfig
from .cycle import LayerChecks
from .hooks import get_loss, set_loss
from .install import install_layers, rewire_copy, root_hooks, uninstall
from .penalty import PenaltyCopy, build
from .protocol import AsyncChecks
from .signs import Alarm, MatrixSigns, SignStep, quorum_alarm, warn_if_blind

Tensor = torch.Tensor
STATE_VERSION = persist.STATE_VERSION


class Guard:
    """The handle returned by :func:`instrument`. See ``docs/guard.md`` for the contract.

    Args:
        alarm: the alarm policy ``alarm(guard) -> bool`` (default :func:`.signs.quorum_alarm`).
        backoff: the learning-rate back-off (default from the ``lr_*`` settings).
    """

    def __init__(self, model: nn.Module, config: GuardConfig, alarm: Alarm | None = None,
                 backoff: LRBackoff | None = None) -> None:
        warn_if_blind(config)
        self.model, self.config, self.penalty_scale = model, config, 1.0
        self.backoff = backoff or LRBackoff(config.lr_backoff, config.lr_floor,
                                            config.lr_policy, config.lr_recovery,
                                            config.lr_grace)
        self.signs = MatrixSigns(config, alarm or quorum_alarm, self.backoff)
        self.attention: AttentionGuard | None = None
        self.blocks: BlockGuard | None = None
        self.last_penalty: Tensor | None = None
        self.penalty_host: tuple[int, float] | None = None   # (step, value): PenaltyCopy
        self._penalty_copy = PenaltyCopy(self)
        self._step = self._forwards = self._ns = 0
        self.follower = Follower(lambda: [layer.weight for layer in self.layers])
        self._removed, self._root_handles = False, []
        ref = weakref.ref(self)
        self.layers, self.skipped = install_layers(model, config, ref)  # undoes itself
        self.checks = AsyncChecks()   # the worker thread: started once nothing can fail before
        self.cycle = LayerChecks(self.layers, config)
        self.by_name, self.history = self.cycle.by_name, self.cycle.history
        try:
            self._root_handles = root_hooks(model, ref)
            model._spectral_guard = self  # lets spectral_guard.remove(model) find the guard
            self.cycle.take_baselines(range(len(self.layers)), self.checks, 0)
            if config.attention:
                self.attention = AttentionGuard(model, config, self.layer_names, self.checks)
            if config.block_guard:
                self.blocks = BlockGuard(model, config, self.attention.pairs
                                         if self.attention is not None else None)
            self.checks.advance(0, self._components(), apply=False)
        except BaseException:
            self._uninstall()
            raise

    # -- the clock (hook entry points) --------------------------------------------------------

    def _components(self) -> list[Any]:
        """The check cycle's order: layers, the matrix sign, attention, blocks, the penalty's
        copy."""
        return [self.cycle, SignStep(self)] + ([self.attention] if self.attention else []) \
            + ([self.blocks] if self.blocks else []) + [self._penalty_copy]

    def step(self) -> None:
        """Advance the guard's clock by one optimizer step (automatic with ``step_on``)."""
        t0 = time.perf_counter_ns()
        self._step += 1
        self._forwards = 0
        self.backoff.recover()
        self.checks.advance(self._step, self._components())
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
        if not self._removed and self.follower.follows(optimizer):
            self.backoff.before_step(optimizer)

    def after_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Optimizer step post-hook: put the lr back, advance the clock."""
        self.backoff.after_step()
        if self._removed or self.config.step_on != "optimizer" \
                or not self.follower.follows(optimizer):
            return
        self.follower.tick(optimizer)
        self.step()

    def rebaseline(self, index: int) -> None:
        """Weights were loaded into layer ``index``: take its baseline again."""
        self.cycle.rebaseline(index, self.checks, self._step)

    def _build(self, device: torch.device | None) -> Tensor | None:
        total = build(self.layers, self.config.actuator, self.attention, device,
                      self.penalty_scale, self.blocks)
        self.last_penalty = None if total is None else total.detach()
        return total

    # -- public API ---------------------------------------------------------------------------

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
        """``count * penalty_scale * sum_treated lambda P(W)`` for the training forwards not
        already added to a loss (zero when none), on ``device`` (default: the last layer's)."""
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
        self.follower.attach(optimizer)
        return self

    def stats(self) -> dict[str, Any]:
        """Latest applied readings, lambdas, counters per layer, and totals (host values)."""
        self.backoff.recover()
        return report.stats(self)

    def metrics(self) -> dict[str, float]:
        """Flat numbers for loggers (:func:`.stats.metrics`; host values only)."""
        return report.metrics(self)

    def report(self, console: Any = None) -> None:
        """Print :meth:`stats` as a rich table."""
        report.render(self, console)

    def log_to(self, writer: Any, step: int | None = None) -> None:
        """Write per-layer scalars to a TensorBoard ``SummaryWriter`` (tensorboard extra)."""
        report.log_to(self, writer, self._step if step is None else step)

    def plot(self, path: Any) -> None:
        """Draw each layer's readings over the steps, interventions marked (plot extra)."""
        report.plot(self, path)

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
        self.backoff.recover()   # removed from inside a step, or after one that raised
        uninstall(self.model, self, self.layers, self._root_handles)
        self._root_handles, self._forwards = [], 0
        if self.attention is not None:
            self.attention.remove()
        if self.blocks is not None:
            self.blocks.remove()
        self.checks.shutdown()

    def __deepcopy__(self, memo: dict) -> Guard:
        """A guard for the copied model (``copy.deepcopy(model)``: EMA, ``AveragedModel``)."""
        new = Guard.__new__(Guard)
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            if key != "_root_handles":   # checks, follower: fresh (their __deepcopy__)
                setattr(new, key, copy.deepcopy(value, memo))
        new.follower = Follower(lambda: [layer.weight for layer in new.layers])
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
        alarm: the alarm policy ``alarm(guard) -> bool`` (default :func:`.signs.quorum_alarm`).
        backoff: the learning-rate back-off (default from the ``lr_*`` settings).
        **overrides: :class:`GuardConfig` fields to replace.

    Returns the :class:`Guard`; if instrumenting fails part-way, the model is left as it was.

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
