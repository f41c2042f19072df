"""Hugging Face Trainer integration, with real tiny Llama and BERT models built from configs.

Every run uses gradient accumulation 2 and gradient checkpointing, CPU, no hub access.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_integration_extras import always_firing, assert_same_state, doc_example, require

transformers = require("transformers")
require("accelerate")

from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

import spectral_guard  # noqa: E402
from spectral_guard.integrations.hf import STATE_FILE, SpectralGuardCallback  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("interventions", "treated_layers", "min_effective_rank_retention",
        "mean_stable_rank_ratio", "nonfinite_layers", "penalty")




FIRING = {"ratio": 1.0, "thresholds": always_firing()}


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))


def tiny_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=32, num_labels=3,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def lm_data(n: int = 8, seq: int = 16) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (n, seq), generator=g)
    return [{"input_ids": x, "labels": x} for x in ids]


def cls_data(n: int = 8, seq: int = 16) -> list[dict]:
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 64, (n, seq), generator=g)
    labels = torch.randint(0, 3, (n,), generator=g)
    return [{"input_ids": x, "labels": y} for x, y in zip(ids, labels, strict=True)]


MODELS = {"llama": (tiny_llama, lm_data), "bert": (tiny_bert, cls_data)}


def training_args(out: Path, batch: int = 2, accumulation: int = 2, steps: int = 2,
                  **kw) -> TrainingArguments:
    ckpt = ("activation_checkpointing"
            if "activation_checkpointing" in TrainingArguments.__dataclass_fields__
            else "gradient_checkpointing")
    base = dict(per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
                max_steps=steps, logging_steps=1, report_to=[], save_strategy="no",
                learning_rate=1e-2, lr_scheduler_type="constant", max_grad_norm=0.0, optim="sgd",
                use_cpu=True, disable_tqdm=True, seed=0, dataloader_num_workers=0)
    base[ckpt] = True
    base.update(kw)
    return TrainingArguments(str(out), **base)


class GradRecorder(TrainerCallback):
    """Copies every parameter's gradient just before optimizer step ``at`` (0-based), by the
    parameter's plain name (recorded before any instrumentation)."""

    def __init__(self, model: torch.nn.Module, at: int) -> None:
        self.names = {id(p): n for n, p in model.named_parameters()}
        self.at = at
        self.grads: dict[str, torch.Tensor] | None = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.at:
            self.grads = {self.names[id(p)]: p.grad.detach().clone()
                          for p in model.parameters() if p.grad is not None}


def second_step_grads(kind: str, out: Path, guard: str, batch: int, accumulation: int,
                      trainer_cls: type = Trainer, samples: int = 8
                      ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Gradients at the second optimizer step; ``guard``: none | callback | manual.

    The guard's first check is applied at the first optimizer step, so the penalty starts at
    the second; the difference of a guarded and a plain run's gradients is the penalty's."""
    build, data = MODELS[kind]
    model = build()
    recorder = GradRecorder(model, at=1)
    callbacks: list = [recorder]
    guarded: list[str] = []
    if guard == "callback":
        callbacks.append(SpectralGuardCallback(**FIRING))
    elif guard == "manual":
        g = spectral_guard.instrument(model, **FIRING)
        guarded = g.layer_names
    # learning rate 0: the weights stay the same, so every run's penalty is that of the same
    # weights and the runs differ only in how the penalty is counted
    trainer = trainer_cls(model=model, args=training_args(out, batch, accumulation, steps=2,
                                                          learning_rate=0.0),
                      train_dataset=data(samples), callbacks=callbacks)
    trainer.train()
    if guard == "callback":
        guarded = spectral_guard.instrument(MODELS[kind][0](), **FIRING).layer_names
    return recorder.grads, guarded


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_penalty_reaches_gradients_once_per_optimizer_step(kind, tmp_path, single_thread):
    # same samples per optimizer step: 2 micro-batches of 2, or 1 batch of 4
    plain2, _ = second_step_grads(kind, tmp_path / "a", "none", 2, 2)
    guard2, guarded = second_step_grads(kind, tmp_path / "b", "callback", 2, 2)
    plain1, _ = second_step_grads(kind, tmp_path / "c", "none", 4, 1)
    guard1, _ = second_step_grads(kind, tmp_path / "d", "callback", 4, 1)
    assert guarded
    for name in plain2:
        diff2 = guard2[name] - plain2[name]
        diff1 = guard1[name] - plain1[name]
        module = name.rpartition(".")[0]
        if module in guarded and name.endswith(".weight"):
            assert diff1.norm() > 1e-4, name  # the penalty reached this weight's gradient
            # accumulation 2 and accumulation 1 get the same penalty gradient: once per step
            assert (diff2 - diff1).norm() < 1e-4 * diff1.norm(), name
        else:
            assert diff1.abs().max() < 1e-5, name  # unguarded parameters: task gradient only


def test_penalty_once_in_a_short_last_step_of_the_epoch(tmp_path, single_thread):
    """6 samples, micro-batches of 2, accumulation 2: the second optimizer step has a single
    micro-batch, and its penalty still counts once (scale 1/1, not 1/2)."""
    plain1, _ = second_step_grads("llama", tmp_path / "a", "none", 4, 1)
    guard1, guarded = second_step_grads("llama", tmp_path / "b", "callback", 4, 1)
    plain2, _ = second_step_grads("llama", tmp_path / "c", "none", 2, 2, samples=6)
    guard2, _ = second_step_grads("llama", tmp_path / "d", "callback", 2, 2, samples=6)
    for layer in guarded:
        name = f"{layer}.weight"
        once = guard1[name] - plain1[name]
        assert (guard2[name] - plain2[name] - once).norm() < 1e-4 * once.norm(), name


@pytest.mark.parametrize("scaled", [True, False])
def test_penalty_once_per_step_when_the_trainer_is_told_how_the_loss_is_scaled(
        scaled, tmp_path, single_thread):
    """``Trainer.loss_is_scaled_for_ga`` overrides the Trainer's own decision (divide by the
    accumulation steps or not); the callback follows it."""

    class Told(Trainer):
        loss_is_scaled_for_ga = scaled

    plain1, _ = second_step_grads("llama", tmp_path / "a", "none", 4, 1)
    guard1, guarded = second_step_grads("llama", tmp_path / "b", "callback", 4, 1)
    plain2, _ = second_step_grads("llama", tmp_path / "c", "none", 2, 2, Told)
    guard2, _ = second_step_grads("llama", tmp_path / "d", "callback", 2, 2, Told)
    for layer in guarded:
        name = f"{layer}.weight"
        once = guard1[name] - plain1[name]
        assert once.norm() > 1e-4
        assert (guard2[name] - plain2[name] - once).norm() < 1e-4 * once.norm(), name


def test_without_the_callback_llama_counts_the_penalty_per_micro_batch(tmp_path, single_thread):
    """Why the callback scales: Llama takes ``num_items_in_batch``, so the Trainer does not
    divide its loss by the accumulation steps, and a bare guard's per-micro-batch penalty
    lands twice per optimizer step with accumulation 2."""
    plain, _ = second_step_grads("llama", tmp_path / "a", "none", 2, 2)
    manual, guarded = second_step_grads("llama", tmp_path / "b", "manual", 2, 2)
    fixed, _ = second_step_grads("llama", tmp_path / "c", "callback", 2, 2)
    for layer in guarded:
        name = f"{layer}.weight"
        once = fixed[name] - plain[name]
        assert (manual[name] - plain[name] - 2 * once).norm() < 1e-4 * once.norm(), name


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_zero_penalty_run_is_identical_to_the_uninstrumented_run(kind, tmp_path,
                                                                 single_thread):
    build, data = MODELS[kind]
    plain = build()
    t_plain = Trainer(model=plain, args=training_args(tmp_path / "a", steps=3),
                      train_dataset=data())
    t_plain.train()
    guarded = build()
    cb = SpectralGuardCallback(keep=True, lambda_base=0.0, **FIRING)
    t_guard = Trainer(model=guarded, args=training_args(tmp_path / "b", steps=3),
                      train_dataset=data(), callbacks=[cb])
    t_guard.train()
    assert cb.guard.stats()["totals"]["interventions"] > 0  # the sensors fired, lambda is 0
    spectral_guard.remove(guarded)
    for (n1, p1), (n2, p2) in zip(plain.state_dict().items(), guarded.state_dict().items(),
                                  strict=True):
        assert n1 == n2
        assert torch.equal(p1, p2), n1
    losses = [[e["loss"] for e in t.state.log_history if "loss" in e] for t in (t_plain, t_guard)]
    assert losses[0] == losses[1] and len(losses[0]) == 3


def test_metrics_reach_log_history_and_report_to_integrations(tmp_path, monkeypatch,
                                                              single_thread):
    require("tensorboard")
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    seen: list[dict] = []

    class Spy(TrainerCallback):  # a user callback listed after ours sees the keys too
        def on_log(self, args, state, control, logs=None, **kwargs):
            seen.append(dict(logs))

    cb = SpectralGuardCallback(keep=True, attention=False, **FIRING)
    trainer = Trainer(model=tiny_llama(),
                      args=training_args(tmp_path / "out", steps=3, report_to=["tensorboard"]),
                      train_dataset=lm_data(), callbacks=[cb, Spy()])
    trainer.train()
    entries = [e for e in trainer.state.log_history if "loss" in e]
    assert [e["step"] for e in entries] == [1, 2, 3]
    for entry in entries:
        for key in KEYS:
            assert isinstance(entry[f"spectral_guard/{key}"], float), key
    assert entries[-1]["spectral_guard/treated_layers"] > 0
    assert "spectral_guard/attention_logit_scale" not in entries[-1]  # that sensor is off
    assert entries[-1]["spectral_guard/penalty"] > 0
    assert all(f"spectral_guard/{k}" in logs for logs in seen if "loss" in logs for k in KEYS)
    assert cb.guard.global_step == trainer.state.global_step == 3
    # the Trainer's TensorBoard integration (a callback registered before ours) wrote them
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = events.Tags()["scalars"]
    for key in KEYS:
        assert f"train/spectral_guard/{key}" in tags, (key, tags)
    steps = [e.step for e in events.Scalars("train/spectral_guard/interventions")]
    assert steps == [1, 2, 3]


def test_clock_follows_the_trainer_when_the_guard_steps_manually(tmp_path, single_thread):
    cb = SpectralGuardCallback(keep=True, step_on="manual", **FIRING)
    trainer = Trainer(model=tiny_llama(), args=training_args(tmp_path, steps=3),
                      train_dataset=lm_data(), callbacks=[cb])
    trainer.train()
    assert cb.guard.global_step == trainer.state.global_step == 3
    assert cb.guard.stats()["totals"]["checks"] > 0


def test_attention_logit_scale_is_logged_when_that_sensor_is_on(tmp_path, single_thread):
    cb = SpectralGuardCallback(attention=True)
    trainer = Trainer(model=tiny_llama(), args=training_args(tmp_path, steps=3),
                      train_dataset=lm_data(), callbacks=[cb])
    trainer.train()
    entries = [e for e in trainer.state.log_history if "loss" in e]
    assert entries[-1]["spectral_guard/attention_pairs"] == 2.0  # q/k of each Llama layer
    scale = entries[-1]["spectral_guard/attention_logit_scale"]
    assert isinstance(scale, float) and scale > 0


def test_resume_from_a_trainer_checkpoint_restores_the_guard(tmp_path, single_thread):
    # uninterrupted: 4 optimizer steps
    whole = tiny_llama()
    cb_whole = SpectralGuardCallback(keep=True, **FIRING)
    Trainer(model=whole, args=training_args(tmp_path / "whole", steps=4),
            train_dataset=lm_data(), callbacks=[cb_whole]).train()
    # interrupted: 2 steps with a checkpoint, then a fresh process-like resume to step 4
    first = tiny_llama()
    Trainer(model=first, args=training_args(tmp_path / "run", steps=2, save_strategy="steps",
                                            save_steps=2),
            train_dataset=lm_data(), callbacks=[SpectralGuardCallback(**FIRING)]).train()
    ckpt = tmp_path / "run" / "checkpoint-2"
    assert (ckpt / STATE_FILE).is_file() and (ckpt / "trainer_state.json").is_file()
    assert not hasattr(first, "_spectral_guard")  # removed at the end of training
    resumed = tiny_llama()
    cb = SpectralGuardCallback(keep=True, **FIRING)
    trainer = Trainer(model=resumed, args=training_args(tmp_path / "run", steps=4),
                      train_dataset=lm_data(), callbacks=[cb])
    trainer.train(resume_from_checkpoint=str(ckpt))
    assert cb.guard.global_step == trainer.state.global_step == 4
    a, b = cb_whole.guard.state_dict(), cb.guard.state_dict()
    assert a["step"] == b["step"] == 4
    assert_same_state(a, b)
    for (n1, p1), (n2, p2) in zip(whole.state_dict().items(), resumed.state_dict().items(),
                                  strict=True):
        assert n1 == n2 and torch.equal(p1, p2), n1
    # a checkpoint without the guard's file: a warning, and the clock still follows the Trainer
    (ckpt / STATE_FILE).unlink()
    cb = SpectralGuardCallback(keep=True, **FIRING)
    trainer = Trainer(model=tiny_llama(), args=training_args(tmp_path / "run", steps=3),
                      train_dataset=lm_data(), callbacks=[cb])
    with pytest.warns(UserWarning, match="without a saved guard state"):
        trainer.train(resume_from_checkpoint=str(ckpt))
    assert cb.guard.global_step == trainer.state.global_step == 3


def test_docs_trainer_example_runs_as_written(tmp_path, monkeypatch, single_thread):
    monkeypatch.chdir(tmp_path)
    namespace = {"model": tiny_llama(), "train_dataset": lm_data()}
    exec(compile(doc_example("hf-trainer"), "docs/integrations.md", "exec"), namespace)
    trainer = namespace["trainer"]
    assert trainer.state.global_step > 0
    assert any("spectral_guard/interventions" in e for e in trainer.state.log_history)
    assert not hasattr(namespace["model"], "_spectral_guard")  # removed after training


def test_readme_shows_the_trainer_one_liner():
    readme = (ROOT / "README.md").read_text()
    assert "callbacks=[SpectralGuardCallback()]" in readme
    assert "callbacks=[SpectralGuardCallback()]" in doc_example("hf-trainer")
