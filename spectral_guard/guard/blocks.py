"""The block-update guard: how much each transformer block writes into the residual stream.

A pre-norm block computes ``y = x + f(norm(x))``: its branches read the normalized stream
(root-mean-square 1 behind a norm with unit gains), so a block that adds much more than that
scale to the stream amplifies its own input. The guard's reading for block ``b`` at a training
forward is its **update scale**

    ``u_b = RMS(y_b - x_b)``   (over every element of the batch, float32, autocast off),

and its target ``t_b = max(1, BLOCK_MARGIN * u_0)``: the scale of a normalized input, or, for a
block that already wrote more than that when first seen (pretrained weights: large,
structured activations are part of what such models learned), a margin over its own first
reading ``u_0``. Why this reading, and the runs it was chosen and validated on:
docs/efficacy-client.md ("What damages the 4x run") and docs/efficacy.md.

Actuator: the thermostat's hinge on the training forward's own activations,
``lambda_b * relu(u_b / t_b - 1)^2`` (:func:`update_hinge`), with ``lambda_b`` following the
guard's thermostat (:mod:`.thermostat`, severity ``clip(1 - t_b / u_b, 0, 1)``); the gradient
reaches every weight that wrote the update. While no block is treated, the forward hooks only
read ``u_b`` (no graph, no term): a healthy run computes exactly what it computes without the
guard.

Blocks (:func:`find_blocks`): the elements of an ``nn.ModuleList`` or ``nn.Sequential`` that hold
an attention pair (:func:`~spectral_guard.attention_pairs.find_pairs`), whose forward returns a
tensor (or a tuple starting with one) of its first input's shape. A block is read during the
model's own training forward only: not when activation checkpointing re-runs it in backward,
nor at all under reentrant checkpointing (whose forward runs without grad).

Timing: the latest readings ride the guard's packed copy (:mod:`.protocol`) at each check and
are applied one step later, as the layer and attention checks are; no host read in the step.

Example:
    >>> x = torch.zeros(2, 4, 8)
    >>> float(update_scale(x, x + 3.0))            # every element moved by 3
    3.0
    >>> float(update_hinge(torch.tensor(3.0), 2.0))    # (3 / 2 - 1)^2
    0.25
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ..attention_pairs import find_pairs
from ..estimators import no_autocast
from .protocol import HostFn, Packer
from .sampling import check_index
from .thermostat import ceiling_update

Tensor = torch.Tensor

BLOCK_MARGIN = 1.5
"""How far above its first reading a block may write when that reading is above 1."""


def update_scale(x: Tensor, y: Tensor) -> Tensor:
    """``RMS(y - x)`` in float32 (a 0-dim tensor on their device; differentiable)."""
    diff = (y - x).flatten()
    return torch.linalg.vector_norm(diff, dtype=torch.float32) / math.sqrt(max(diff.numel(), 1))


def update_hinge(scale: Tensor, target: float) -> Tensor:
    """``relu(u / t - 1)^2``, zero at or under the target and for a non-finite ``u``."""
    term = torch.relu(scale / target - 1.0).square()
    return torch.where(torch.isfinite(term), term, torch.zeros_like(term))


@dataclass
class BlockState:
    """Host state of one block: target, thermostat lambda, latest reading, counters."""

    target: float = math.nan
    lam: float = 0.0
    scale: float = math.nan
    baseline: float = math.nan
    checks: int = 0
    interventions: int = 0


def _first_tensor(value: Any) -> Tensor | None:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], Tensor):
        return value[0]
    return None


def find_blocks(model: nn.Module, pairs: list[Any]) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of the blocks holding the attention pairs ``pairs``, in model order:
    for each pair, its nearest ancestor that is an element of an ``nn.ModuleList`` or
    ``nn.Sequential``."""
    modules = dict(model.named_modules())
    names: set[str] = set()
    for pair in pairs:
        parts = pair.name.split(".")
        for cut in range(len(parts), 0, -1):
            parent = ".".join(parts[:cut - 1])   # "" is the model itself
            if parts[cut - 1] and isinstance(modules.get(parent),
                                             (nn.ModuleList, nn.Sequential)):
                names.add(".".join(parts[:cut]))
                break
    return [(n, m) for n, m in model.named_modules() if n in names]


class BlockGuard:
    """Block-update component of the guard (interface: ``launch``, ``apply``, ``penalty``,
    ``metrics``, ``stats``, ``state_dict``, ``load_state_dict``, ``remove``).

    Args:
        model: the model.
        config: the :class:`~spectral_guard.guard.config.GuardConfig` (``block_*`` fields,
            ``every`` for the check schedule, ``gain``, ``decay``, ``lambda_floor``).
        pairs: the attention pairs (found with the config's ``attention_pairs`` when ``None``).
    """

    name = "blocks"

    def __init__(self, model: nn.Module, config: Any, pairs: list[Any] | None = None) -> None:
        self.config = config
        if pairs is None:
            pairs, _ = find_pairs(model, getattr(config, "attention_pairs", None))
        self.names: list[str] = []
        self.states: list[BlockState] = []
        self._latest: list[Tensor | None] = []
        self._graph: list[Tensor | None] = []   # u_b with its graph (treated blocks only)
        self._handles: list[Any] = []
        self._blocks: list[weakref.ref] = []
        self.lambda_base = float(config.block_lambda)
        fixed = config.block_max_update
        for i, (name, block) in enumerate(find_blocks(model, pairs)):
            self.names.append(name)
            self.states.append(BlockState(target=float(fixed) if fixed is not None
                                          else math.nan))
            self._latest.append(None)
            self._graph.append(None)
            self._blocks.append(weakref.ref(block))
            self._handles.append(block.register_forward_hook(self._hook(i), with_kwargs=True))
        self._building = False   # some block is treated: the hooks keep u_b's graph
        self._launched: list[int] | None = None
        self._in_forward = False  # inside the model's own forward (not a backward's recompute)
        if self.names:
            self._handles += [model.register_forward_pre_hook(self._root(True)),
                              model.register_forward_hook(self._root(False))]

    # -- training thread -----------------------------------------------------------------------

    def _root(self, begin: bool) -> Any:
        """The model's pre-hook (``begin``: a forward starts, the previous one's terms are
        dropped) or post-hook (it ended)."""
        def hook(module: nn.Module, *_: Any) -> None:
            if begin:
                self._graph = [None] * len(self._graph)
            self._in_forward = begin
        return hook

    def _hook(self, i: int) -> Any:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if not module.training or not torch.is_grad_enabled() \
                    or self._blocks[i]() is not module:   # NB a deep copy's hook: not ours
                return
            x = args[0] if args else kwargs.get("hidden_states")
            y = _first_tensor(output)
            if not isinstance(x, Tensor) or y is None or x.shape != y.shape:
                return
            # NB the only host state read here is one flag (some block treated or none), so a
            # compiled forward has at most two variants; lambdas and targets stay eager
            with no_autocast(y.device.type), torch.set_grad_enabled(self._building):
                u = update_scale(x, y)
            # NB a block re-run by activation checkpointing in backward computes the same (the
            # recomputation must save what the forward saved) but is not a forward of the
            # model: its reading and term, of a graph being consumed, are dropped
            if not self._in_forward:
                return
            self._graph[i] = u if self._building else None
            self._latest[i] = u.detach()
        return hook

    def penalty(self, device: torch.device | str | None = None) -> Tensor | None:
        """``sum_b lambda_b relu(u_b / t_b - 1)^2`` over the treated blocks, from the latest
        training forward's readings (each taken once), on ``device``; ``None`` when there is
        none."""
        total: Tensor | None = None
        for i, u in enumerate(self._graph):
            if u is None:
                continue
            self._graph[i] = None
            st = self.states[i]
            if st.lam <= 0 or not math.isfinite(st.target):
                continue
            term = st.lam * update_hinge(u, st.target)
            term = term.to(device) if device is not None else term
            total = term if total is None else total + term.to(total.device)
        return total

    def launch(self, step: int, packer: Packer) -> HostFn | None:
        """At a check (every ``every`` steps): the readings taken since the last launch into
        ``packer`` (each reading is shipped once)."""
        if check_index(step, self.config.every) is None:
            return None
        order = [i for i, u in enumerate(self._latest) if u is not None]
        if not order:
            return None
        slot = packer.put(torch.stack([self._latest[i].float().reshape(()) for i in order]))
        self._latest = [None] * len(self._latest)
        self._launched = order
        return lambda shipment: shipment.read(slot).tolist()

    def apply(self, values: list[float] | None, step: int = -1) -> None:
        """The host half of the last launch: targets of first readings, thermostat updates."""
        order, self._launched = self._launched, None
        if order is None or values is None:
            return
        for i, u in zip(order, values, strict=True):
            st = self.states[i]
            if not math.isfinite(u):
                continue
            if math.isnan(st.baseline):
                st.baseline = u
                if math.isnan(st.target):
                    st.target = max(1.0, BLOCK_MARGIN * u)
            st.scale = u
            st.checks += 1
            st.lam, fired = ceiling_update(st.lam, u, st.target, self.lambda_base,
                                           self.config.gain, self.config.decay,
                                           self.config.lambda_floor)
            st.interventions += int(fired)
        self._building = any(st.lam > 0 for st in self.states)

    # -- reports and state ---------------------------------------------------------------------

    def metrics(self) -> dict[str, float]:
        """``block_update_ratio`` (max over blocks of reading / target), ``block_treated``,
        ``block_interventions``, ``blocks``."""
        ratios = [st.scale / st.target for st in self.states
                  if math.isfinite(st.scale) and math.isfinite(st.target)]
        return {"block_update_ratio": max(ratios) if ratios else math.nan,
                "block_treated": float(sum(st.lam > 0 for st in self.states)),
                "block_interventions": float(sum(st.interventions for st in self.states)),
                "blocks": float(len(self.states))}

    def stats(self) -> dict[str, dict[str, float]]:
        """Per block: target, first and latest reading, lambda, counters."""
        return {n: {"target": st.target, "baseline": st.baseline, "scale": st.scale,
                    "lambda": st.lam, "checks": st.checks, "interventions": st.interventions}
                for n, st in zip(self.names, self.states, strict=True)}

    def state_dict(self, checks: Any = None) -> dict[str, Any]:
        """Host state per block and the readings in flight (``checks``: the guard's
        :class:`~.protocol.AsyncChecks`)."""
        pending = None
        inflight = checks.pending(self.name) if checks is not None else None
        if inflight is not None and self._launched is not None:
            pending = {"step": inflight[0], "blocks": [self.names[i] for i in self._launched],
                       "values": [float(x) for x in inflight[1]]}
        return {"version": 1, "pending": pending,
                "blocks": {n: dict(vars(st)) for n, st in zip(self.names, self.states,
                                                             strict=True)}}

    def load_state_dict(self, state: dict[str, Any], checks: Any = None) -> None:
        """Restore :meth:`state_dict` output (the same blocks required)."""
        if state.get("version") != 1:
            raise ValueError(f"unsupported block guard state {state.get('version')!r}")
        if sorted(state["blocks"]) != sorted(self.names):
            raise ValueError("block guard state is for other blocks")
        self.states = [BlockState(**state["blocks"][n]) for n in self.names]
        self._graph = [None] * len(self.names)
        self._building = any(st.lam > 0 for st in self.states)
        self._launched = None
        pending = state.get("pending")
        if pending is not None and checks is not None:
            self._launched = [self.names.index(n) for n in pending["blocks"]]
            checks.restore(int(pending["step"]), self.name, list(pending["values"]))

    def remove(self) -> None:
        """Take the forward hooks off."""
        for handle in self._handles:
            handle.remove()
        self._handles, self._graph, self._latest = [], [None] * len(self.names), []
