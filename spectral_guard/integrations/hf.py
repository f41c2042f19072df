"""Hugging Face ``Trainer`` integration: ``callbacks=[SpectralGuardCallback()]``.

What the callback does, event by event (checked against transformers 5.24's ``Trainer``):

* ``on_init_end`` / ``on_train_begin``: finds the Trainer's ``CallbackHandler`` and moves itself
  to the front of its list, so that the keys it adds to ``logs`` in ``on_log`` reach every
  ``report_to`` integration (they are callbacks too, registered before user callbacks, and
  ``on_log`` runs after the entry was copied into ``state.log_history``: that entry is updated
  as well). At ``on_train_begin`` it instruments the model (or adopts an existing guard),
  restores the guard state saved in the checkpoint being resumed, and sets the guard's clock to
  ``state.global_step``.
* every training forward: sets ``guard.penalty_scale`` so that the penalty, which the guard adds
  to ``outputs.loss`` at every micro-batch, counts **once per optimizer step**. The Trainer
  divides the loss by the number of micro-batches ``k`` unless it considers it already scaled
  (``Trainer.loss_is_scaled_for_ga``, or a model that accepts loss kwargs and received
  ``num_items_in_batch``, or a ``compute_loss_func``); in that case the scale is ``1 / k``
  (and ``1 / (k * processes)`` when ``average_tokens_across_devices`` multiplies the loss by
  the number of processes).
* ``on_step_end``: the guard's clock follows ``state.global_step`` even when no optimizer step
  ran (a ``GradScaler`` skipped it) or the guard steps manually.
* ``on_log``: ``spectral_guard/*`` metrics (:func:`spectral_guard.integrations.guard_metrics`)
  join every training log entry (those with a ``loss``).
* ``on_save``: ``guard.state_dict()`` is saved as ``spectral_guard.pt`` in the checkpoint folder,
  next to ``trainer_state.json``.
* ``on_train_end``: the instrumentation it installed is removed (unless ``keep=True``).
"""

from __future__ import annotations

import os
import sys
import warnings
import weakref
from pathlib import Path
from typing import Any

from . import guard_metrics, require

require("transformers", "SpectralGuardCallback")
import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

STATE_FILE = "spectral_guard.pt"
"""Name of the guard-state file written into each Trainer checkpoint folder."""


def _find_callers() -> tuple[Any, Any, Any]:
    """``(callback handler, trainer, resume path)`` found on the call stack, each or ``None``.

    Trainer callbacks receive neither the Trainer nor its handler; the handler calls every
    callback from ``CallbackHandler.call_event``, itself called by a ``Trainer`` method.
    """
    from transformers import Trainer
    from transformers.trainer_callback import CallbackHandler

    handler = trainer = resume = None
    frame = sys._getframe(1)
    try:
        for _ in range(16):
            if frame is None:
                break
            owner = frame.f_locals.get("self")
            if handler is None and isinstance(owner, CallbackHandler):
                handler = owner
            if isinstance(owner, Trainer):
                trainer = owner
                if frame.f_code.co_name == "_inner_training_loop":
                    resume = frame.f_locals.get("resume_from_checkpoint")
                break
            frame = frame.f_back
    finally:
        del frame
    return handler, trainer, resume


def _same(a: Any, b: Any) -> bool:
    """Equal, counting NaN equal to NaN (a NaN loss is logged as such)."""
    return a == b or (isinstance(a, float) and isinstance(b, float) and a != a and b != b)


class SpectralGuardCallback(TrainerCallback):
    """Guard a ``Trainer``'s model during ``trainer.train()``; see ``docs/integrations.md``.

    ``model``: ``None`` (the Trainer's model), the module to instrument, or an existing
    :class:`~spectral_guard.guard.instrument.Guard`. A model that is already instrumented is
    adopted as is. ``keep``: leave the instrumentation in place after training (by default the
    callback removes what it installed; a guard it adopted is never removed). ``config`` and
    ``**overrides`` are those of :func:`spectral_guard.instrument`.
    """

    def __init__(self, model: Any = None, *, keep: bool = False, config: Any = None,
                 **overrides: Any) -> None:
        self._target = model
        self.keep = keep
        self.config = config
        self.overrides = overrides
        self.guard: Any = None
        self._owned = False
        self._trainer: weakref.ref | None = None
        self._resume: str | None = None
        self._hook: Any = None
        self._warned: set[str] = set()
        self._ga_steps = 1

    # -- locating the Trainer -----------------------------------------------------------------

    def _attach(self) -> None:
        handler, trainer, resume = _find_callers()
        if trainer is not None:
            self._trainer = weakref.ref(trainer)
            self._resume = resume if isinstance(resume, (str, os.PathLike)) else None
        if handler is None:
            self._warn_once("handler", "SpectralGuardCallback could not find the Trainer's "
                            "callback list: report_to integrations registered before it will "
                            "not see the spectral_guard/* metrics (state.log_history will)")
            return
        callbacks = handler.callbacks
        if callbacks and callbacks[0] is not self and self in callbacks:
            # elements after us keep their index, so a running ``call_event`` loop is safe
            callbacks.remove(self)
            callbacks.insert(0, self)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=3)

    # -- events --------------------------------------------------------------------------------

    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._attach()

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None,
                       **kwargs: Any) -> None:
        import spectral_guard
        from spectral_guard.guard.instrument import Guard

        self._attach()
        self._ga_steps = int(getattr(args, "gradient_accumulation_steps", 1) or 1)
        if self.guard is None:
            target = model if self._target is None else self._target
            if isinstance(target, Guard):
                self.guard, self._owned = target, False
            elif getattr(target, "_spectral_guard", None) is not None:
                self.guard, self._owned = target._spectral_guard, False
            elif target is None:
                raise ValueError("SpectralGuardCallback: the Trainer passed no model to guard")
            else:
                self.guard = spectral_guard.instrument(target, self.config, **self.overrides)
                self._owned = True
        tr = self._trainer() if self._trainer is not None else None
        if tr is not None and not hasattr(tr, "loss_is_scaled_for_ga"):
            self._warn_once("version", "SpectralGuardCallback: this transformers version's "
                            "gradient-accumulation rule (no Trainer.loss_is_scaled_for_ga) was "
                            "not checked; the penalty may not count exactly once per step")
        if tr is not None and getattr(tr, "compute_loss_func", None) is not None:
            self._warn_once("loss_func", "SpectralGuardCallback: a compute_loss_func computes "
                            "the loss from the logits, so the penalty the guard adds to "
                            "outputs.loss does not reach it; add guard.penalty() in it")
        if state.global_step > 0:
            self._restore(args, state)
        if self.guard.global_step != state.global_step:
            self._set_clock(state.global_step)
        if self._hook is None:
            self._hook = self.guard.model.register_forward_pre_hook(
                self._scale_hook, with_kwargs=True, prepend=True)

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.guard is None:
            return
        leftover = self.guard.penalty()
        if isinstance(leftover, torch.Tensor) and leftover.requires_grad:
            self._warn_once("leftover", "SpectralGuardCallback: the guard's penalty was not added "
                            "to any loss (the model output had no `loss`, e.g. with label "
                            "smoothing or a compute_loss_func): add guard.penalty() yourself")

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # an optimizer step that did not run (a GradScaler skipping inf gradients) or a guard
        # with step_on="manual": the Trainer's step still advances the guard's clock
        while self.guard is not None and self.guard.global_step < state.global_step:
            self.guard.step()

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None,
               **kwargs: Any) -> None:
        if self.guard is None or logs is None or "loss" not in logs:
            return
        metrics = guard_metrics(self.guard)
        history = state.log_history
        if history and history[-1].get("step") == state.global_step and \
                all(_same(history[-1].get(k), v) for k, v in logs.items()):
            history[-1].update(metrics)  # the entry the Trainer just recorded from ``logs``
        logs.update(metrics)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.guard is None or not state.is_world_process_zero:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not folder.is_dir():
            self._warn_once("save", f"SpectralGuardCallback: no checkpoint folder {folder}: "
                            "guard state not saved")
            return
        torch.save(self.guard.state_dict(), folder / STATE_FILE)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self.guard is None:
            return
        self.guard.penalty_scale = 1.0
        if self._owned and not self.keep:
            self.guard.remove()
            self.guard = None

    # -- helpers -------------------------------------------------------------------------------

    def _restore(self, args: Any, state: Any) -> None:
        candidates = [self._resume, getattr(args, "resume_from_checkpoint", None),
                      Path(args.output_dir) / f"checkpoint-{state.global_step}"]
        for folder in candidates:
            if folder is None or isinstance(folder, bool):
                continue
            path = Path(folder) / STATE_FILE
            if path.is_file():
                saved = torch.load(path, map_location="cpu", weights_only=True)
                self.guard.load_state_dict(saved)
                return
        self._warn_once("restore", f"SpectralGuardCallback: resuming at step "
                        f"{state.global_step} without a saved guard state ({STATE_FILE} not "
                        "found): baselines are measured on the resumed weights")

    def _set_clock(self, step: int) -> None:
        saved = self.guard.state_dict()
        saved["step"] = int(step)
        self.guard.load_state_dict(saved)

    def _scale_hook(self, module: Any, args: Any, kwargs: dict) -> None:
        if module.training and torch.is_grad_enabled():
            got_items = kwargs.get("num_items_in_batch") is not None
            self.guard.penalty_scale = self.penalty_scale(got_items)

    def penalty_scale(self, got_num_items: bool) -> float:
        """Scale that makes the per-micro-batch penalty count once per optimizer step.

        ``got_num_items``: the model's forward received ``num_items_in_batch``.
        """
        tr = self._trainer() if self._trainer is not None else None
        if tr is None:
            return 1.0 / self._micro_batches(None) if got_num_items else 1.0
        forced = getattr(tr, "loss_is_scaled_for_ga", None)
        with_func = getattr(tr, "compute_loss_func", None) is not None
        accepts = bool(getattr(tr, "model_accepts_loss_kwargs", False))
        scaled = forced if forced is not None else (accepts and got_num_items) or with_func
        if not scaled:
            return 1.0
        scale = 1.0 / self._micro_batches(tr)
        averaged = getattr(tr.args, "average_tokens_across_devices", False)
        if averaged and (accepts or with_func) and got_num_items:
            tp = tr.get_tp_size() if hasattr(tr, "get_tp_size") else 1
            processes = tr.accelerator.num_processes // max(tp, 1)
            scale /= max(processes, 1)
        return scale

    def _micro_batches(self, trainer: Any) -> int:
        """Micro-batches in the current optimizer step (fewer at the end of an epoch)."""
        k = getattr(trainer, "current_gradient_accumulation_steps", None)
        return k if isinstance(k, int) and k >= 1 else self._ga_steps


__all__ = ["STATE_FILE", "SpectralGuardCallback"]
