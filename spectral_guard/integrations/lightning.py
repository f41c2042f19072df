"""Lightning integration: ``Trainer(callbacks=[SpectralGuard()])``.

* ``setup`` (stage ``fit``): instruments the LightningModule, or its submodule ``module``
  (a dotted attribute path, e.g. ``"model"``): the module whose forward ``training_step`` calls.
* The penalty joins the loss in ``training_step`` (Lightning ignores callbacks' return values):
  ``return loss + penalty(self)``; or automatically when the instrumented module returns a
  dict or an object with a ``loss`` (e.g. a transformers model given labels): ``penalty(self)``
  is then zero. Lightning divides the loss by ``accumulate_grad_batches``, so the penalty,
  queued at every micro-batch, counts once per optimizer step.
* ``on_train_batch_end``: the guard's clock follows ``trainer.global_step`` (also when an AMP
  step was skipped or the guard steps manually); after each optimizer step that Lightning logs,
  the guard's metrics
  go to ``pl_module.log_dict`` under ``spectral_guard/`` (``sync_dist`` with several processes).
* ``on_save_checkpoint`` / ``on_load_checkpoint``: ``guard.state_dict()`` under the checkpoint
  key ``"spectral_guard"``.
* ``teardown``: removes the instrumentation (unless ``keep=True``).
"""

from __future__ import annotations

from typing import Any

from . import guard_metrics, require

require("lightning", "SpectralGuard (Lightning)")
import torch  # noqa: E402
from lightning.pytorch import Callback  # noqa: E402

CHECKPOINT_KEY = "spectral_guard"
"""Key of the guard state in a Lightning checkpoint dict."""


class SpectralGuard(Callback):
    """Guard a LightningModule during ``trainer.fit``; see ``docs/integrations.md``.

    ``module``: dotted path of the submodule to instrument (default: the LightningModule
    itself). ``keep``: leave the instrumentation in place after ``fit``. ``log``: log the
    metrics. ``config`` and ``**overrides``: those of :func:`spectral_guard.instrument`.
    """

    def __init__(self, module: str | None = None, *, keep: bool = False, log: bool = True,
                 config: Any = None, **overrides: Any) -> None:
        self.module = module
        self.keep = keep
        self.log = log
        self.config = config
        self.overrides = overrides
        self.guard: Any = None
        self._pending_state: dict | None = None
        self._logged_step = -1

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        import spectral_guard

        if stage != "fit" or self.guard is not None:
            return
        target = pl_module if self.module is None else pl_module.get_submodule(self.module)
        self.guard = spectral_guard.instrument(target, self.config, **self.overrides)
        if self._pending_state is not None:
            self.guard.load_state_dict(self._pending_state)
            self._pending_state = None

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.guard is None:
            return
        while self.guard.global_step < trainer.global_step:
            self.guard.step()  # a skipped optimizer step (AMP) or a guard stepped manually
        if not self.log or self.guard.global_step == self._logged_step:
            return  # no optimizer step since the last log
        connector = getattr(trainer, "_logger_connector", None)
        if not getattr(connector, "should_update_logs", True):
            return
        self._logged_step = self.guard.global_step
        pl_module.log_dict(guard_metrics(self.guard), on_step=True, on_epoch=False,
                           sync_dist=trainer.world_size > 1, batch_size=1)

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict) -> None:
        if self.guard is not None:
            checkpoint[CHECKPOINT_KEY] = self.guard.state_dict()

    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict) -> None:
        state = checkpoint.get(CHECKPOINT_KEY)
        if state is None:
            return
        if self.guard is None:
            self._pending_state = state  # restored when setup instruments the module
        else:
            self.guard.load_state_dict(state)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit" and self.guard is not None and not self.keep:
            self.guard.remove()
            self.guard = None


def penalty(pl_module: Any) -> torch.Tensor:
    """The pending penalty of the :class:`SpectralGuard` callback of ``pl_module``'s trainer.

    Use it in ``training_step``: ``return loss + penalty(self)``. A zero scalar when nothing
    is pending (e.g. auto-loss already added it, or the module is in eval mode).
    """
    try:
        trainer = pl_module.trainer
    except RuntimeError:  # not attached to a Trainer
        trainer = None
    for callback in getattr(trainer, "callbacks", None) or []:
        if isinstance(callback, SpectralGuard) and callback.guard is not None:
            return callback.guard.penalty()
    raise RuntimeError("penalty(pl_module): no SpectralGuard callback with an instrumented "
                       "module in this module's Trainer(callbacks=[...])")


__all__ = ["CHECKPOINT_KEY", "SpectralGuard", "penalty"]
