"""Installing the guard on a model and taking it off: identity parametrizations with their
probes, per-layer state_dict hooks, the root forward hook and the optimizer step hooks.

Instrumentation never changes what the model computes nor its ``state_dict`` keys, and
:func:`uninstall` puts every module back as it was (parameter order included).
"""

from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch.nn.utils import parametrize
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

from ..estimators import biopsy_indices, name_seed
from ..thresholds import Rule
from . import hooks, sharded
from .config import GuardConfig
from .select import Skipped, select_layers
from .state import GuardProbe, LayerState

Tensor = torch.Tensor


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

    @property
    def penalized(self) -> bool:
        """Has active sensors and a trainable weight (a penalty can act on it)."""
        return bool(self.sensors) and self.weight.requires_grad


def install_layers(model: nn.Module, config: GuardConfig,
                   guard_ref: weakref.ref) -> tuple[list[GuardedLayer], list[Skipped]]:
    """Parametrize every selected ``nn.Linear`` (appending to the returned list as it goes, so
    that a failure part-way can be undone by :func:`uninstall`)."""
    chosen, skipped = select_layers(model, config, config.resolved_thresholds())
    for c in chosen:
        sharded.check_order(c.name, c.module.weight)  # FSDP2: instrument, then shard
    layers: list[GuardedLayer] = []
    try:
        for c in chosen:
            W = c.module.weight
            shape = (int(W.shape[0]), int(W.shape[1]))
            seed = name_seed(config.seed, c.name)
            rows, cols = biopsy_indices(shape, config.biopsy_limit, seed)
            probe = GuardProbe(shape, seed, rows, cols).to(W.device)
            layer = GuardedLayer(len(layers), c.name, c.module, probe, c.rule, c.sensors,
                                 param_order=list(c.module._parameters))
            layers.append(layer)
            parametrize.register_parametrization(c.module, "weight", probe)
            layer.handles += [
                c.module.register_state_dict_post_hook(hooks.state_dict_post_hook),
                c.module.register_load_state_dict_pre_hook(hooks.load_pre_hook),
                c.module.register_load_state_dict_post_hook(
                    hooks.load_post_hook(guard_ref, layer.index)),
            ]
    except BaseException:
        uninstall_layers(layers)
        raise
    return layers, skipped


def root_hooks(model: nn.Module, guard_ref: weakref.ref) -> list[Any]:
    """The model's forward hook and the global optimizer step hooks."""
    return [model.register_forward_hook(hooks.RootForwardHook(guard_ref)),
            *optimizer_hooks(guard_ref)]


def optimizer_hooks(guard_ref: weakref.ref) -> list[Any]:
    """The global optimizer hooks of the guard behind ``guard_ref``: the step post-hook (its
    clock) and the pre-hook (the learning-rate back-off)."""
    return [register_optimizer_step_post_hook(hooks.optimizer_hook(guard_ref, pre=False)),
            register_optimizer_step_pre_hook(hooks.optimizer_hook(guard_ref, pre=True))]


def uninstall_layers(layers: list[GuardedLayer]) -> None:
    """Take the parametrizations and per-layer hooks off, restoring parameter order."""
    for layer in layers:
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


def uninstall(model: nn.Module, guard: Any, layers: list[GuardedLayer],
              root_handles: list[Any]) -> None:
    """Everything :func:`install_layers` and :func:`root_hooks` put on ``model``, off."""
    uninstall_layers(layers)
    for handle in root_handles:
        handle.remove()
    if getattr(model, "_spectral_guard", None) is guard:
        del model._spectral_guard


def rewire_copy(root_handles: list[Any], layers: list[GuardedLayer], memo: dict,
                guard_ref: weakref.ref) -> list[Any]:
    """Point a deep-copied model's hooks at the copied guard; returns its root handles.

    The copied model is still being assembled (its ``__dict__`` is set after the copy
    returns), but its hook dicts are copied already: reach them through the copied handles.
    """
    forward = copy.deepcopy(root_handles[0], memo)
    forward.hooks_dict_ref()[forward.id] = hooks.RootForwardHook(guard_ref)
    for layer in layers:
        post = layer.handles[2]
        post.hooks_dict_ref()[post.id] = hooks.load_post_hook(guard_ref, layer.index)
    return [forward, *optimizer_hooks(guard_ref)]
