"""The guard through a real client: ``transformers.Trainer`` on a Llama (issue 18, item 3).

A ``LlamaForCausalLM`` built from a ``LlamaConfig`` (RMSNorm, SwiGLU, RoPE, grouped-query
attention: 4 layers, hidden 128, 4 heads, 2 key/value heads, intermediate 344, vocabulary 256
bytes, context 128, untied embeddings) trained by the **unchanged** ``Trainer`` with its standard
schedule: ``TrainingArguments`` with linear warmup then ``lr_scheduler_type="cosine"`` (to 0),
``weight_decay=0.1`` (the Trainer's rule: not on biases and norms), ``max_grad_norm=1.0``, the
default ``adamw_torch`` (betas 0.9/0.999), batch 32 (or ``--batch``). Variants: ``plain`` and
``guard`` (``callbacks=[SpectralGuardCallback()]``, defaults, nothing else). A second callback of
this script only *reads* the guard (``lr_scale`` at every step, ``metrics()`` at every logging
step) and the log lines of logger ``"spectral_guard"``.

Data: ``bench/efficacy.py``'s byte-level text (the standard library's ``.py`` sources sorted by
path, concatenated, the last 5% of the bytes held out for validation); each run trains on
``steps * batch`` windows of 128 bytes drawn with the run's seed, in the Trainer's (seeded)
order. Final validation loss: mean cross-entropy (nats/byte) on 16 fixed batches of 32
validation windows, the same for every run.

Fine-tuning (``--finetune DIR``): start from a trained checkpoint (``/work/corpus/llama-stdlib``,
built by ``bench/train_corpus_decoders.py`` on the stdlib's top-level modules) and fine-tune it
on text it has not seen, ``bench/train_corpus_decoders.py``'s fine-tune slice (the ``asyncio``
and ``email`` packages, every 10th file held out for validation), same Trainer recipe.

    # one run (appends a JSON line); the LR search: --variant plain --lr 7.5e-4 .. 6e-3
    python bench/trainer_sweep.py --variant plain --lr 1.5e-3 --seed 0 --out /tmp/ts.jsonl
    # the sweep: tuned, 4x, 16x, shock (4x, no warmup) x plain, guard x seeds 0 1 (resumes)
    python bench/trainer_sweep.py --sweep --tuned-lr 1.5e-3 --seeds 0,1 --out /tmp/ts.jsonl
    # the fine-tune: sane LR, 10x and 30x, plain and guard
    python bench/trainer_sweep.py --sweep --finetune /work/corpus/llama-stdlib --tuned-lr 5e-4 \\
        --settings sane,10x,30x --steps 150 --batch 16 --seeds 0,1 --out /tmp/ft.jsonl
    python bench/trainer_sweep.py --summary /tmp/ts.jsonl --tuned-lr 1.5e-3     # the tables
    python bench/trainer_sweep.py --summary /tmp/ft.jsonl --tuned-lr 5e-4

Measured: docs/efficacy-client.md. Run every training process niced, one at a time (the script
sets one thread).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import efficacy as E  # noqa: E402
import train_corpus_decoders as TCD  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from transformers import (  # noqa: E402
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from spectral_guard.integrations.hf import SpectralGuardCallback  # noqa: E402

CONTEXT = 128
TUNED_LR = 1.5e-3   # best plain final loss of 7.5e-4, 1.5e-3, 3e-3, 6e-3 (seed 0, 400 steps)
# setting -> (LR multiple of the tuned LR, warmup as a fraction of the steps); the last three
# are fine-tunes (``--finetune``: multiples of the sane fine-tuning LR)
SETTINGS = {"tuned": (1.0, 0.1), "4x": (4.0, 0.1), "16x": (16.0, 0.1), "shock": (4.0, 0.0),
            "sane": (1.0, 0.1), "10x": (10.0, 0.1), "30x": (30.0, 0.1)}
FINETUNES = ("sane", "10x", "30x")
VAL_BATCHES, VAL_SIZE = 16, 32


def build_llama(seed: int) -> LlamaForCausalLM:
    """The issue's Llama: 4 layers, d=128, 4 heads, 2 key/value heads, SwiGLU 344, RoPE."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=344, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CONTEXT,
        hidden_act="silu", tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
        pad_token_id=None))


class Windows(torch.utils.data.Dataset):
    """``n`` windows of ``CONTEXT`` bytes at seeded random offsets (``labels = input_ids``:
    the model shifts them)."""

    def __init__(self, data: torch.Tensor, n: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(10_000 + seed)
        self.data = data
        self.starts = torch.randint(0, len(data) - CONTEXT, (n,), generator=gen)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        s = int(self.starts[i])
        x = self.data[s:s + CONTEXT].long()
        return {"input_ids": x, "labels": x}


@torch.no_grad()
def val_loss(model: torch.nn.Module, val: torch.Tensor) -> float:
    """Mean loss on ``VAL_BATCHES`` fixed batches of ``VAL_SIZE`` validation windows."""
    was = model.training
    model.eval()
    ds = Windows(val, VAL_BATCHES * VAL_SIZE, seed=-9_999)   # generator seed 1
    total = 0.0
    for b in range(VAL_BATCHES):
        x = torch.stack([ds[i]["input_ids"] for i in range(b * VAL_SIZE, (b + 1) * VAL_SIZE)])
        total += float(model(input_ids=x, labels=x).loss)
    model.train(was)
    return total / VAL_BATCHES


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of every parameter's bytes, in order: equal digests are bit-identical runs."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class GuardLog(logging.Handler):
    """The ``"spectral_guard"`` logger's records, with the guard's step."""

    def __init__(self, step: callable) -> None:
        super().__init__(logging.INFO)
        self.step = step
        self.lines: list[list] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append([self.step(), record.levelname, record.getMessage()[:400]])


class Reader(TrainerCallback):
    """Reads (never changes) the guard of ``cb``: ``lr_scale`` at every step, ``metrics()`` at
    every logging step and at the last one, alarm and treated layers at every step."""

    def __init__(self, cb: SpectralGuardCallback | None) -> None:
        self.cb = cb
        self.scales: list[list] = []     # [step, lr_scale] where it changed
        self.logged: list[dict] = []
        self.alarm_steps: list[int] = []
        self.max_treated = 0.0
        self.max_logit_scale = 0.0
        self.final: dict = {}

    def on_step_end(self, args, state, control, **kwargs) -> None:
        g = self.cb.guard if self.cb is not None else None
        if g is None:
            return
        s = g.backoff.scale
        if not self.scales or self.scales[-1][1] != s:
            self.scales.append([state.global_step, s])
        m = g.metrics()
        if m["alarm"]:
            self.alarm_steps.append(state.global_step)
        self.max_treated = max(self.max_treated, m["treated_layers"])
        scale = m.get("attention_logit_scale", 0.0)
        if math.isfinite(scale):
            self.max_logit_scale = max(self.max_logit_scale, scale)
        if state.global_step % args.logging_steps == 0 or state.global_step == state.max_steps:
            self.logged.append({"step": state.global_step, **m})
        if state.global_step == state.max_steps:
            st = g.stats()
            self.final = {**m, "layers": st["totals"]["layers"],
                          "alarm_latched": st["totals"]["alarm_latched"],
                          "alarm_reason": st["totals"]["alarm_reason"],
                          "attention": g.attention.stats()["pairs"]
                          if g.attention is not None else {}}


def run(variant: str, lr: float, warmup: int, seed: int, steps: int, batch: int,
        finetune: Path | None, log_every: int) -> dict:
    if finetune is None:
        train, val = E.corpus_split()
        model = build_llama(seed)
    else:
        train, val, _ = TCD.load_text("finetune")
        torch.manual_seed(seed)
        model = LlamaForCausalLM.from_pretrained(finetune)
    cb = SpectralGuardCallback() if variant == "guard" else None
    reader = Reader(cb)
    start = val_loss(model, val)
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            tmp, max_steps=steps, per_device_train_batch_size=batch, learning_rate=lr,
            warmup_steps=warmup, lr_scheduler_type="cosine", weight_decay=0.1,
            max_grad_norm=1.0, logging_steps=log_every, report_to=[], save_strategy="no",
            use_cpu=True, disable_tqdm=True, seed=seed, dataloader_num_workers=0)
        trainer = Trainer(model=model, args=args,
                          train_dataset=Windows(train, steps * batch, seed),
                          callbacks=[c for c in (cb, reader) if c is not None])
        handler = GuardLog(lambda: trainer.state.global_step)
        log = logging.getLogger("spectral_guard")
        log.addHandler(handler)
        old_level = log.level
        log.setLevel(logging.INFO)
        t0 = time.perf_counter()
        try:
            trainer.train()
        finally:
            log.removeHandler(handler)
            log.setLevel(old_level)
        wall = time.perf_counter() - t0
    history = trainer.state.log_history
    losses = [[h["step"], h["loss"]] for h in history if "loss" in h]
    final = val_loss(model, val)
    guard = None
    if cb is not None:
        f = reader.final
        guard = {"lr_scale": reader.scales, "lr_scale_min": min(s for _, s in reader.scales),
                 "lr_scale_end": f.get("lr_scale"), "lr_backoffs": f.get("lr_backoffs"),
                 "alarm_steps": reader.alarm_steps[:50], "alarm_steps_n": len(reader.alarm_steps),
                 "alarm_signs": f.get("alarm_signs"), "msigns": f.get("msigns"),
                 "interventions": f.get("interventions"), "treated_end": f.get("treated_layers"),
                 "treated_max": reader.max_treated,
                 "attention_interventions": f.get("attention_interventions"),
                 "attention_treated_end": f.get("attention_treated_pairs"),
                 "attention_pairs": f.get("attention_pairs"),
                 "attention_logit_scale_max": reader.max_logit_scale,
                 "layers": f.get("layers"), "alarm_reason": f.get("alarm_reason"),
                 "attention": f.get("attention"), "logged": reader.logged,
                 "log_lines": handler.lines[:40], "log_lines_n": len(handler.lines)}
    import transformers
    return {"variant": variant, "lr": lr, "warmup": warmup, "seed": seed, "steps": steps,
            "batch": batch, "finetune": str(finetune) if finetune else None,
            "val_start": start, "final": final, "wall": wall, "losses": losses,
            "digest": weights_digest(model), "guard": guard,
            "env": {"torch": torch.__version__, "transformers": transformers.__version__,
                    "python": platform.python_version(), "machine": platform.machine(),
                    "threads": torch.get_num_threads()}}


def describe(r: dict) -> str:
    g = r["guard"]
    s = f"{r['variant']:5s} lr {r['lr']:.2e} warmup {r['warmup']} seed {r['seed']}: " \
        f"final val {r['final']:.4f} ({r['wall']:.0f}s)"
    if g:
        s += (f"; lr_scale min {g['lr_scale_min']:.3f} end {g['lr_scale_end']:.3f}, "
              f"alarm steps {g['alarm_steps_n']}, signs {g['alarm_signs']:.0f} "
              f"(msigns {g['msigns']:.0f}), treated max {g['treated_max']:.0f} "
              f"end {g['treated_end']:.0f}, attention hits {g['attention_interventions']:.0f}, "
              f"log lines {g['log_lines_n']}")
    return s


def setting_of(r: dict, tuned: float) -> str:
    ratio = r["lr"] / tuned
    for name, (mult, warm) in SETTINGS.items():
        if (name in FINETUNES) == bool(r.get("finetune")) and \
                math.isclose(ratio, mult, rel_tol=1e-6) and (r["warmup"] > 0) == (warm > 0):
            return name
    return f"{r['lr']:g}" + ("" if r["warmup"] else " no warmup")


def scale_story(g: dict) -> str:
    """``lr_scale`` over time, compressed: every drop (``0.85 @89``), the first step of each
    rise after a drop (``rising @181``) and the value at the end (``0.97 @400``)."""
    pts = g["lr_scale"]
    if len(pts) <= 1:
        return f"{pts[0][1]:.2f} throughout" if pts else "-"
    out, rising = [], False
    for (_, prev), (k, s) in zip(pts, pts[1:], strict=False):
        if s < prev:
            out.append(f"{s:.2f} @{k}")
            rising = False
        elif not rising:
            out.append(f"rising @{k}")
            rising = True
    return "1 → " + " → ".join(out) + f" → {pts[-1][1]:.2f} at the end"


def summary(path: Path, tuned: float) -> None:
    """Markdown table: plain vs guard per setting and seed, share of the gap rescued."""
    runs = [json.loads(s) for s in path.read_text().splitlines() if s.strip()]
    key = {}
    for r in runs:    # the latest run of a key wins
        key[(setting_of(r, tuned), r["seed"], r["steps"], r["batch"], r["variant"])] = r
    plain_tuned = {(k[1], k[2], k[3]): r["final"] for k, r in key.items()
                   if k[0] in ("tuned", "sane") and k[4] == "plain"}
    print("| setting | seed | plain | guard | rescued | guard: lr_scale (@step) | alarm steps, "
          "signs | treated max / end | attention hits | bit-identical |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    order = list(SETTINGS)
    rows = sorted({k[:4] for k in key}, key=lambda k: (order.index(k[0]) if k[0] in order
                                                       else 99, k[0], k[1], k[2], k[3]))
    for k in rows:
        p, g = key.get((*k, "plain")), key.get((*k, "guard"))
        base = plain_tuned.get(k[1:])
        rescued = ""
        if p and g:
            if k[0] in ("tuned", "sane"):
                rescued = f"{(g['final'] - p['final']) / p['final']:+.2%} vs plain"
            elif base is not None and p["final"] != base:
                rescued = f"{(p['final'] - g['final']) / (p['final'] - base):.0%}"
        cells = ["-"] * 4
        if g:
            gg = g["guard"]
            cells = [scale_story(gg), f"{gg['alarm_steps_n']}, {gg['alarm_signs']:.0f}",
                     f"{gg['treated_max']:.0f} / {gg['treated_end']:.0f}",
                     f"{gg['attention_interventions']:.0f}"]
        same = "yes" if p and g and p["digest"] == g["digest"] else ("no" if p and g else "")
        fmt = lambda r: f"{r['final']:.4f}" if r else "-"  # noqa: E731
        print(f"| {k[0]} ({(p or g)['lr']:g}) | {k[1]} | {fmt(p)} | {fmt(g)} | {rescued} | "
              + " | ".join(cells) + f" | {same} |")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", choices=("plain", "guard"), default="guard")
    ap.add_argument("--lr", type=float, default=TUNED_LR)
    ap.add_argument("--warmup", type=int, default=None, help="warmup steps (default 10%%)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--finetune", type=Path, default=None,
                    help="a trained checkpoint folder to fine-tune (from_pretrained)")
    ap.add_argument("--sweep", action="store_true", help="run --settings x plain, guard x "
                    "--seeds, skipping the runs already in --out")
    ap.add_argument("--tuned-lr", type=float, default=TUNED_LR)
    ap.add_argument("--settings", default="tuned,4x,16x,shock", help=f"of {sorted(SETTINGS)}")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--out", type=Path, default=None, help="append each run (JSON line)")
    ap.add_argument("--summary", type=Path, default=None, help="print the table of a --out file")
    args = ap.parse_args(argv)
    if args.summary is not None:
        summary(args.summary, args.tuned_lr)
        return
    torch.set_num_threads(1)
    if args.sweep:
        done = set()
        if args.out is not None and args.out.exists():
            done = {(r["variant"], r["lr"], r["warmup"], r["seed"], r["steps"], r["batch"],
                     r["finetune"])
                    for r in map(json.loads, args.out.read_text().splitlines())}
        jobs = []
        for seed in (int(s) for s in args.seeds.split(",")):
            for name in args.settings.split(","):
                mult, warm = SETTINGS[name]
                for variant in ("plain", "guard"):
                    jobs.append((variant, args.tuned_lr * mult, round(warm * args.steps), seed))
    else:
        done = set()
        warmup = args.warmup if args.warmup is not None else round(0.1 * args.steps)
        jobs = [(args.variant, args.lr, warmup, args.seed)]
    ft = str(args.finetune) if args.finetune else None
    for variant, lr, warmup, seed in jobs:
        if (variant, lr, warmup, seed, args.steps, args.batch, ft) in done:
            continue
        r = run(variant, lr, warmup, seed, args.steps, args.batch, args.finetune,
                args.log_every)
        print(describe(r), flush=True)
        if args.out is not None:
            with args.out.open("a") as fh:
                fh.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
