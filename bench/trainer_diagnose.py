"""What damages the Trainer-driven Llama at 4x its tuned learning rate (issue 18, item 1).

Trains ``bench/trainer_sweep.py``'s GQA ``LlamaForCausalLM`` through the unchanged ``Trainer``
(warmup, cosine, weight decay 0.1, clipping 1.0; batch 32 x 128) and, every 10 steps, probes a
copy of the model on 8 fixed validation windows: attention entropy per layer (nats, mean over
heads and over queries 16..127; ``ln 128 = 4.85`` is uniform), the mean largest attention
probability, the residual stream's RMS after each block (``hrms``), each weight's movement over
the last 10 steps ``||dW|| / ||W||`` (mean per kind), and per layer: the input norm's gain RMS,
the weight-only logit scale ``s_w = max_h sigma_max(W_q,h^T W_k,h) / sqrt(d_h)`` (the attention
guard's reading), the same with the norm's gain folded in, the largest pre-RoPE logit and the
mean over queries of (largest - mean) logit (``spread``).

Counterfactuals (not the guard; they say what a remedy *could* do):

* ``--backoff-at K --backoff-scale S``: from step ``K`` the schedule's base LR times ``S`` (an
  oracle learning-rate back-off: ``S = 0.25`` at 4x is the tuned LR from then on);
* ``--act-pen LAMBDA``: ``LAMBDA * sum relu(RMS(branch output) - 1)^2`` over every attention
  and MLP branch, added to the Trainer's loss (a hand-made bound on what the blocks write);
* ``--guard [--gcfg JSON]``: ``SpectralGuardCallback(**JSON)``.

    python bench/trainer_diagnose.py --lr 1.5e-3 --tag tuned --out /tmp/diag.jsonl
    python bench/trainer_diagnose.py --lr 6e-3 --tag 4x --out /tmp/diag.jsonl
    python bench/trainer_diagnose.py --lr 6e-3 --backoff-at 30 --tag 4x_b30 --out /tmp/diag.jsonl
    python bench/trainer_diagnose.py --lr 6e-3 --act-pen 0.1 --tag 4x_act --out /tmp/diag.jsonl
    python bench/trainer_diagnose.py --lr 6e-3 --guard --gcfg '{"attention_max_scale": 0.25}' \\
        --tag 4x_pen25 --out /tmp/diag.jsonl
    python bench/trainer_diagnose.py --summary /tmp/diag.jsonl

Measured: docs/efficacy-client.md ("What damages the 4x run").
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import efficacy as E  # noqa: E402
import trainer_sweep as TS  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from spectral_guard.integrations.hf import SpectralGuardCallback  # noqa: E402

HEADS, KV_HEADS = 4, 2


@torch.no_grad()
def layer_probe(m: torch.nn.Module, x: torch.Tensor) -> list[dict]:
    """Per decoder layer: gains, ``s_w``, gain-folded scale, largest logit, spread, bound."""
    cap: dict = {}
    hooks = []
    for li, L in enumerate(m.model.layers):
        hooks.append(L.self_attn.q_proj.register_forward_hook(
            lambda mod, i, o, li=li: cap.__setitem__(("q", li), (i[0].detach(), o.detach()))))
        hooks.append(L.self_attn.k_proj.register_forward_hook(
            lambda mod, i, o, li=li: cap.__setitem__(("k", li), o.detach())))
    m(input_ids=x)
    for h in hooks:
        h.remove()
    out = []
    for li, L in enumerate(m.model.layers):
        g1 = L.input_layernorm.weight.detach()
        xin, q = cap[("q", li)]
        k = cap[("k", li)]
        n = xin.shape[-1]
        B, T, _ = q.shape
        d = q.shape[-1] // HEADS
        qh = q.view(B, T, HEADS, d)
        kh = k.view(B, T, KV_HEADS, d).repeat_interleave(HEADS // KV_HEADS, dim=2)
        logits = torch.einsum("bthd,bshd->bhts", qh, kh) / d ** 0.5   # pre-RoPE
        mask = torch.ones(T, T, dtype=torch.bool).tril()
        lg = logits.masked_fill(~mask, float("-inf"))
        spread = (lg.amax(-1) - logits.masked_fill(~mask, 0).sum(-1) / mask.sum(-1)).mean()
        Wq = L.self_attn.q_proj.weight.detach().view(HEADS, d, n)
        Wk = L.self_attn.k_proj.weight.detach().view(KV_HEADS, d, n)
        Wk = Wk.repeat_interleave(HEADS // KV_HEADS, dim=0)
        G = torch.diag(g1)
        s_w = max(torch.linalg.matrix_norm(Wq[h].T @ Wk[h], ord=2) for h in range(HEADS))
        s_g = max(torch.linalg.matrix_norm(G @ Wq[h].T @ Wk[h] @ G, ord=2) for h in range(HEADS))
        out.append({"g1": float(g1.pow(2).mean().sqrt()),
                    "g2": float(L.post_attention_layernorm.weight.pow(2).mean().sqrt()),
                    "s_w": float(s_w) / d ** 0.5, "s_g": float(s_g) / d ** 0.5,
                    "maxl": float(lg.amax()), "spread": float(spread),
                    "bound": float(qh.norm(dim=-1).amax() * kh.norm(dim=-1).amax() / d ** 0.5)})
    return out


class Probe(TrainerCallback):
    """The probes every ``every`` steps; the oracle back-off at ``backoff_at``."""

    def __init__(self, x: torch.Tensor, every: int, backoff_at: int | None,
                 backoff_scale: float) -> None:
        self.x, self.every = x, every
        self.backoff_at, self.backoff_scale = backoff_at, backoff_scale
        self.prev: dict | None = None
        self.rows: list[dict] = []

    def on_step_end(self, args, state, control, model=None, optimizer=None, lr_scheduler=None,
                    **kwargs) -> None:
        k = state.global_step
        if self.backoff_at is not None and k == self.backoff_at:
            lr_scheduler.base_lrs = [b * self.backoff_scale for b in lr_scheduler.base_lrs]
        if k % self.every:
            return
        with torch.no_grad():
            W = {n: p.detach().clone() for n, p in model.named_parameters() if p.dim() == 2}
            row: dict = {"step": k, "lr": optimizer.param_groups[0]["lr"]}
            if self.prev is not None:
                moves: dict[str, list[float]] = {}
                for n, w in W.items():
                    d = (w - self.prev[n]).norm() / w.norm().clamp_min(1e-12)
                    moves.setdefault(n.split(".")[-2], []).append(float(d))
                row["upd"] = {kind: sum(v) / len(v) for kind, v in moves.items()}
            self.prev = W
            m = copy.deepcopy(model)
            m.eval()
            for mod in m.modules():
                if hasattr(mod, "config"):
                    mod.config._attn_implementation = "eager"
            out = m(input_ids=self.x, labels=self.x, output_attentions=True,
                    output_hidden_states=True)
            ents, pmax = [], []
            for a in out.attentions:   # batch, heads, queries, keys
                ent = -(a * a.clamp_min(1e-12).log()).sum(-1)
                ents.append(float(ent[:, :, 16:].mean()))
                pmax.append(float(a.max(-1).values[:, :, 16:].mean()))
            branch: list[float] = []
            hooks = [mod.register_forward_hook(lambda mod, i, o: branch.append(float(
                (o[0] if isinstance(o, tuple) else o).pow(2).mean().sqrt())))
                for L in m.model.layers for mod in (L.self_attn, L.mlp)]
            m(input_ids=self.x)
            for h in hooks:
                h.remove()
            row.update(ent=ents, pmax=pmax, probe_loss=float(out.loss), branch=branch,
                       hrms=[float(h.pow(2).mean().sqrt()) for h in out.hidden_states],
                       layers=layer_probe(m, self.x))
        self.rows.append(row)


def branch_penalty_trainer(model: torch.nn.Module, lam: float) -> type[Trainer]:
    """A ``Trainer`` whose loss adds ``lam * sum relu(RMS(branch) - 1)^2`` (``--act-pen``)."""
    rms: list[torch.Tensor] = []
    for L in model.model.layers:
        for branch in (L.mlp, L.self_attn):
            branch.register_forward_hook(lambda m, i, o: rms.append(
                (o[0] if isinstance(o, tuple) else o).pow(2).mean().sqrt()))

    class PenaltyTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
            rms.clear()
            out = super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
            pen = lam * sum(torch.relu(r - 1).square() for r in rms)
            return (out[0] + pen, out[1]) if return_outputs else out + pen

    return PenaltyTrainer


def run(a: argparse.Namespace) -> dict:
    torch.set_num_threads(1)
    train, val = E.corpus_split()
    model = TS.build_llama(a.seed)
    ds = TS.Windows(val, 8, seed=-5)
    x = torch.stack([ds[i]["input_ids"] for i in range(8)])
    probe = Probe(x, 10, a.backoff_at, a.backoff_scale)
    callbacks = [probe] + ([SpectralGuardCallback(**json.loads(a.gcfg))] if a.guard else [])
    cls = branch_penalty_trainer(model, a.act_pen) if a.act_pen > 0 else Trainer
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            tmp, max_steps=a.steps, per_device_train_batch_size=32, learning_rate=a.lr,
            warmup_steps=a.warmup, lr_scheduler_type="cosine", weight_decay=0.1,
            max_grad_norm=1.0, logging_steps=5, report_to=[], save_strategy="no", use_cpu=True,
            disable_tqdm=True, seed=a.seed, dataloader_num_workers=0)
        trainer = cls(model=model, args=args, callbacks=callbacks,
                      train_dataset=TS.Windows(train, a.steps * 32, a.seed))
        t0 = time.time()
        trainer.train()
    train_log = [[h["step"], h["loss"], h.get("grad_norm")]
                 for h in trainer.state.log_history if "loss" in h]
    return {"tag": a.tag, "lr": a.lr, "warmup": a.warmup, "seed": a.seed,
            "backoff_at": a.backoff_at, "backoff_scale": a.backoff_scale, "guard": a.guard,
            "gcfg": a.gcfg, "act_pen": a.act_pen, "final": TS.val_loss(model, val),
            "train": train_log, "probe": probe.rows, "wall": time.time() - t0}


def summary(path: Path, steps: tuple[int, ...] = (20, 30, 40, 50, 60, 100, 200, 400)) -> None:
    for r in map(json.loads, path.read_text().splitlines()):
        print(f"== {r['tag']} (lr {r['lr']:g}, warmup {r['warmup']}, seed {r['seed']}): "
              f"final {r['final']:.4f}")
        train = {s: loss for s, loss, _ in r["train"]}
        for p in r["probe"]:
            if p["step"] not in steps:
                continue
            lay = p.get("layers", [])   # runs made before the layer probe had none

            def col(key: str, fmt: str = "{:.2f}", lay: list = lay) -> str:
                return "/".join(fmt.format(x[key]) for x in lay) or "-"

            print(f"  {p['step']:4d} train {train.get(p['step'], float('nan')):.3f} "
                  f"entropy {'/'.join(f'{e:.2f}' for e in p['ent'])} "
                  f"hrms {'/'.join(f'{h:.2f}' for h in p['hrms'])} s_w {col('s_w')} "
                  f"maxlogit {col('maxl', '{:.0f}')} spread {col('spread', '{:.1f}')} "
                  f"gain {col('g1')}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lr", type=float, default=TS.TUNED_LR)
    ap.add_argument("--warmup", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--backoff-at", type=int, default=None)
    ap.add_argument("--backoff-scale", type=float, default=0.25)
    ap.add_argument("--guard", action="store_true")
    ap.add_argument("--gcfg", default="{}", help="SpectralGuardCallback keywords, JSON")
    ap.add_argument("--act-pen", type=float, default=0.0)
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--summary", type=Path, default=None)
    a = ap.parse_args(argv)
    if a.summary is not None:
        summary(a.summary)
        return
    r = run(a)
    print(f"{a.tag}: final {r['final']:.4f}", flush=True)
    if a.out is not None:
        with a.out.open("a") as fh:
            fh.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
