"""The guard's hooks and its clock.

* **Root forward hook** (one, on the model): counts training forwards and, with ``auto_loss``,
  adds the penalty to ``output.loss`` / ``output["loss"]``. It is wrapped in
  ``torch.compiler.disable``: under ``torch.compile`` it is the one graph break, at the end of
  the model's forward, and nothing that changes per step is traced, so the compiled forward
  never recompiles because of the guard.
* **Optimizer step post-hook** (global): the clock. Each step of an optimizer holding a guarded
  weight (or only the attached one) advances the guard, which applies the last check and
  launches the next one: per-step decisions happen here, outside any traced region. With the
  **pre-hook** (the learning-rate back-off) it is wrapped in ``torch.compiler.disable``: a
  compiled ``optimizer.step`` runs both eagerly, at the two ends of its graph, instead of
  tracing the guard's host logic (which would recompile at every step).
* **state_dict hooks** per layer: keep the keys ``<path>.weight`` both ways.
* **load_state_dict post-hook** per layer: weights loaded after ``instrument()`` (pretrained
  weights) make the guard take that layer's baseline again.

There are no per-layer forward hooks: all per-layer work runs at the optimizer step.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, MutableMapping
from typing import Any

import torch
import torch.nn as nn

ORIGINAL = "parametrizations.weight.original"


def in_backward() -> bool:
    """True inside a backward pass (e.g. a non-reentrant checkpoint's recompute)."""
    return torch._C._current_graph_task_id() != -1


def get_loss(output: Any) -> torch.Tensor | None:
    """The tensor ``loss`` of a dict-like or attribute-style model output, if any."""
    loss = output.get("loss") if isinstance(output, MutableMapping) else \
        getattr(output, "loss", None)
    return loss if isinstance(loss, torch.Tensor) else None


def set_loss(output: Any, loss: torch.Tensor) -> bool:
    """Replace the output's loss in place; False when the output does not allow it."""
    if isinstance(output, MutableMapping):
        output["loss"] = loss
        return True
    try:
        output.loss = loss
    except (AttributeError, TypeError):
        return False
    return True


class RootForwardHook:
    """The model's forward hook; calls ``guard.after_forward`` (see module docstring).

    A small class rather than a closure so that pickling an instrumented model fails with a
    message that says what to do instead.
    """

    def __init__(self, guard_ref: weakref.ref) -> None:
        self.guard_ref = guard_ref

    def __call__(self, module: nn.Module, args: Any, output: Any) -> Any:
        return _after_forward(self.guard_ref, module, output)

    def __reduce__(self) -> Any:
        raise TypeError("an instrumented model cannot be pickled: save model.state_dict() "
                        "(and guard.state_dict()), or call spectral_guard.remove(model) first")

    def __deepcopy__(self, memo: dict) -> RootForwardHook:
        return RootForwardHook(self.guard_ref)  # re-pointed by Guard.__deepcopy__


@torch.compiler.disable
def _after_forward(guard_ref: weakref.ref, module: nn.Module, output: Any) -> Any:
    guard = guard_ref()
    if guard is None or not module.training or not torch.is_grad_enabled() or in_backward():
        return None
    return guard.after_forward(output)


def optimizer_hook(guard_ref: weakref.ref, pre: bool) -> Callable[..., None]:
    """A global optimizer step hook holding the guard weakly: the pre-hook calls
    ``guard.before_optimizer_step(optimizer)`` (the learning-rate back-off), the post-hook
    ``guard.after_optimizer_step(optimizer)`` (the clock)."""

    @torch.compiler.disable
    def hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        guard = guard_ref()
        if guard is not None:
            (guard.before_optimizer_step if pre else guard.after_optimizer_step)(optimizer)

    return hook


def state_dict_post_hook(module: nn.Module, state_dict: dict, prefix: str,
                         local_metadata: Any) -> None:
    """Rename ``<prefix>parametrizations.weight.original`` back to ``<prefix>weight``, in the
    position the plain module puts it (first)."""
    key = prefix + ORIGINAL
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


def load_pre_hook(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any,
                  strict: bool, missing_keys: list, unexpected_keys: list,
                  error_msgs: list) -> None:
    """Accept plain checkpoints: ``<prefix>weight`` loads into the parametrization's original."""
    if prefix + "weight" in state_dict:
        state_dict[prefix + ORIGINAL] = state_dict.pop(prefix + "weight")


def load_post_hook(guard_ref: weakref.ref, index: int) -> Callable[[nn.Module, Any], None]:
    """After ``load_state_dict`` reached layer ``index``: take its baseline again."""

    def hook(module: nn.Module, incompatible_keys: Any) -> None:
        guard = guard_ref()
        if guard is not None:
            guard.rebaseline(index)

    return hook
