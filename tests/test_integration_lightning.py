"""Lightning integration on CPU: metrics through ``pl_module.log``, the penalty in
``training_step``, gradient accumulation, and a checkpoint round trip."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from test_integration_extras import always_firing, assert_same_state, doc_example, require

require("lightning")
import lightning.pytorch as pl  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from spectral_guard.integrations.lightning import CHECKPOINT_KEY, SpectralGuard, penalty  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("interventions", "treated_layers", "min_effective_rank_retention",
        "mean_stable_rank_ratio", "nonfinite_layers", "penalty")




FIRING = {"ratio": 1.0, "thresholds": always_firing()}


class Classifier(pl.LightningModule):
    """A small MLP; ``training_step`` adds the guard's penalty when ``guarded``."""

    def __init__(self, guarded: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(),
                                 nn.Linear(32, 4))
        self.guarded = guarded

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        return loss + penalty(self) if self.guarded else loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def loader(batch: int) -> DataLoader:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 16, generator=g)
    y = torch.randint(0, 4, (8,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=False)


def make_trainer(root: Path, accumulation: int = 2, callbacks=(), **kw) -> pl.Trainer:
    base = dict(accelerator="cpu", devices=1, max_epochs=1, accumulate_grad_batches=accumulation,
                enable_progress_bar=False, enable_model_summary=False, logger=False,
                enable_checkpointing=False, default_root_dir=str(root), log_every_n_steps=1)
    base.update(kw)
    return pl.Trainer(callbacks=list(callbacks), **base)


class GradRecorder(pl.Callback):
    """Gradients before optimizer step ``at`` (0-based), by plain parameter name."""

    def __init__(self, at: int) -> None:
        self.at = at
        self.grads: dict[str, torch.Tensor] | None = None
        self.names: dict[int, str] = {}

    def setup(self, trainer, pl_module, stage):
        self.names = {id(p): n for n, p in pl_module.named_parameters()}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == self.at:
            self.grads = {self.names[id(p)]: p.grad.detach().clone()
                          for p in pl_module.parameters() if p.grad is not None}


def second_step_grads(root: Path, guarded: bool, batch: int, accumulation: int
                      ) -> dict[str, torch.Tensor]:
    """Gradients at the second optimizer step (the guard's first check applies at the first
    step: until then guarded and plain runs have the same weights)."""
    recorder = GradRecorder(at=1)
    callbacks = [recorder] + ([SpectralGuard(**FIRING)] if guarded else [])
    make_trainer(root, accumulation, callbacks, max_steps=2).fit(Classifier(guarded),
                                                                 loader(batch))
    return recorder.grads


def test_penalty_reaches_gradients_once_per_optimizer_step(tmp_path, single_thread):
    def penalty_grads(root: Path, batch: int, accumulation: int) -> dict[str, torch.Tensor]:
        guarded = second_step_grads(root / "guarded", True, batch, accumulation)
        plain = second_step_grads(root / "plain", False, batch, accumulation)
        assert guarded.keys() == plain.keys()
        return {k: guarded[k] - plain[k] for k in plain}

    # same samples per optimizer step: 2 micro-batches of 2, or 1 batch of 4
    diff2 = penalty_grads(tmp_path / "ga2", 2, 2)
    diff1 = penalty_grads(tmp_path / "ga1", 4, 1)
    for name in ("net.0.weight", "net.2.weight"):  # guarded hidden layers
        assert diff1[name].norm() > 1e-4, name
        torch.testing.assert_close(diff2[name], diff1[name], rtol=1e-3, atol=1e-6)
    assert diff1["net.0.bias"].abs().max() < 1e-6  # the penalty acts on weights only


def test_metrics_are_logged_through_pl_module_log(tmp_path, single_thread):
    cb = SpectralGuard(keep=True, **FIRING)
    trainer = make_trainer(tmp_path, 2, [cb], max_epochs=2,
                           logger=CSVLogger(str(tmp_path), name="csv"))
    trainer.fit(Classifier(), loader(2))
    assert cb.guard.global_step == trainer.global_step == 4
    for key in KEYS:
        assert f"spectral_guard/{key}" in trainer.logged_metrics, key
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("spectral_guard/interventions")]
    assert [int(r["step"]) for r in rows] == [0, 1, 2, 3]  # one row per optimizer step
    assert float(rows[-1]["spectral_guard/treated_layers"]) > 0
    assert float(rows[-1]["spectral_guard/penalty"]) > 0


def test_clock_follows_the_trainer_when_the_guard_steps_manually(tmp_path, single_thread):
    cb = SpectralGuard(keep=True, step_on="manual", **FIRING)
    trainer = make_trainer(tmp_path, 2, [cb], max_epochs=1)
    trainer.fit(Classifier(), loader(2))
    assert cb.guard.global_step == trainer.global_step == 2


def test_checkpoint_round_trip_restores_the_guard(tmp_path, single_thread):
    whole_cb = SpectralGuard(keep=True, **FIRING)
    whole = Classifier()
    make_trainer(tmp_path / "whole", 2, [whole_cb], max_epochs=2).fit(whole, loader(2))

    saver = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), filename="epoch1",
                            save_on_train_epoch_end=True)
    first = Classifier()
    make_trainer(tmp_path / "first", 2, [SpectralGuard(**FIRING), saver], max_epochs=1,
                 enable_checkpointing=True).fit(first, loader(2))
    path = tmp_path / "ckpt" / "epoch1.ckpt"
    saved = torch.load(path, map_location="cpu", weights_only=False)
    assert saved[CHECKPOINT_KEY]["step"] == 2
    assert "net.0.weight" in saved["state_dict"]  # plain keys while instrumented
    assert not hasattr(first, "_spectral_guard")  # removed at teardown

    cb = SpectralGuard(keep=True, **FIRING)
    resumed = Classifier()
    trainer = make_trainer(tmp_path / "second", 2, [cb], max_epochs=2)
    trainer.fit(resumed, loader(2), ckpt_path=str(path))
    assert cb.guard.global_step == trainer.global_step == 4
    assert_same_state(whole_cb.guard.state_dict(), cb.guard.state_dict())
    for (n1, p1), (n2, p2) in zip(whole.state_dict().items(), resumed.state_dict().items(),
                                  strict=True):
        assert n1 == n2 and torch.equal(p1, p2), n1


def test_penalty_without_the_callback_is_an_error(tmp_path, single_thread):
    with pytest.raises(RuntimeError, match="no SpectralGuard callback"):
        penalty(Classifier())  # not attached to a Trainer
    with pytest.raises(Exception, match="no SpectralGuard callback"):
        make_trainer(tmp_path, 1, [], max_steps=1).fit(Classifier(), loader(4))


def test_docs_lightning_example_runs_as_written(tmp_path, monkeypatch, single_thread):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"train_loader": loader(2)}
    exec(compile(doc_example("lightning"), "docs/integrations.md", "exec"), namespace)
    trainer = namespace["trainer"]
    assert trainer.global_step > 0
    assert "spectral_guard/interventions" in trainer.logged_metrics
