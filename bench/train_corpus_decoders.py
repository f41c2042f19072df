"""Train the small causal LMs of the real-model corpus on CPU (byte-level, Python stdlib text).

The audit's corpus (bench/real_models.py) needs decoders, and none small enough ships inside a
registry package, so this script trains them: a GPT-2 (`GPT2LMHeadModel`) and a Llama
(`LlamaForCausalLM`: RoPE, RMSNorm, SwiGLU, grouped-query attention), vocabulary 256 (bytes),
context 128, on the concatenated sources of this interpreter's standard library.

    # the corpus: 4 layers, d=128, 4 heads (Llama: 2 key/value heads), then a fine-tune of each
    python bench/train_corpus_decoders.py --cache /work/corpus
    # the committed test fixtures: 2 layers, d=64 -> tests/data/trained/{gpt2,llama}_tiny/
    python bench/train_corpus_decoders.py --tiny

Text: the top-level ``*.py`` files of the stdlib, sorted by name; every 10th file is held out
for validation. Fine-tunes continue from the trained model on a different text, the ``asyncio``
and ``email`` packages (same held-out rule), at a lower learning rate. AdamW (betas 0.9/0.95,
weight decay 0.1), linear warm-up then cosine decay to 10%, gradient clipping at 1.0, a fixed
seed. Each output folder gets ``model.safetensors`` + ``config.json`` (``save_pretrained``) and
``training.json`` (command, settings, wall time, final validation loss in nats per byte).

Cache folder: ``--cache``, else ``$SPECTRAL_GUARD_CORPUS``, else ``~/.cache/spectral_guard/corpus``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import sysconfig
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
TINY_OUT = REPO / "tests" / "data" / "trained"
CONTEXT = 128

# name -> architecture; "full" is the corpus size, "tiny" the committed fixture size
SIZES = {
    "full": {"layers": 4, "d": 128, "heads": 4, "kv_heads": 2, "mlp": 344},
    "tiny": {"layers": 2, "d": 64, "heads": 4, "kv_heads": 2, "mlp": 176},
}


def default_cache() -> Path:
    env = os.environ.get("SPECTRAL_GUARD_CORPUS")
    return Path(env) if env else Path.home() / ".cache" / "spectral_guard" / "corpus"


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _files(kind: str) -> list[Path]:
    root = stdlib_dir()
    if kind == "pretrain":
        return sorted(root.glob("*.py"))
    if kind == "finetune":
        return sorted((root / "asyncio").glob("*.py")) + sorted((root / "email").glob("*.py"))
    raise ValueError(kind)


def load_text(kind: str) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Byte tensors (train, validation) of a text: every 10th file is held out."""
    files = _files(kind)
    if not files:
        raise SystemExit(f"error: no Python sources found under {stdlib_dir()}")
    train, val = bytearray(), bytearray()
    for i, f in enumerate(files):
        (val if i % 10 == 9 else train).extend(f.read_bytes())
    info = {
        "text": kind,
        "root": str(stdlib_dir()),
        "files": len(files),
        "train_bytes": len(train),
        "val_bytes": len(val),
    }
    return (
        torch.frombuffer(train, dtype=torch.uint8).long(),
        torch.frombuffer(val, dtype=torch.uint8).long(),
        info,
    )


def batch(data: torch.Tensor, size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    starts = torch.randint(0, len(data) - CONTEXT - 1, (size,), generator=gen)
    chunk = torch.stack([data[s : s + CONTEXT + 1] for s in starts.tolist()])
    return chunk[:, :-1], chunk[:, 1:]


def build(family: str, size: str):
    s = SIZES[size]
    if family == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        cfg = GPT2Config(
            vocab_size=256,
            n_positions=CONTEXT,
            n_embd=s["d"],
            n_layer=s["layers"],
            n_head=s["heads"],
            n_inner=4 * s["d"],
            bos_token_id=0,
            eos_token_id=0,
        )
        return GPT2LMHeadModel(cfg)
    if family == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(
            vocab_size=256,
            hidden_size=s["d"],
            intermediate_size=s["mlp"],
            num_hidden_layers=s["layers"],
            num_attention_heads=s["heads"],
            num_key_value_heads=s["kv_heads"],
            max_position_embeddings=CONTEXT,
            hidden_act="silu",
            tie_word_embeddings=False,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=None,
        )
        return LlamaForCausalLM(cfg)
    raise ValueError(family)


@torch.no_grad()
def val_loss(model, data: torch.Tensor, batches: int = 40, size: int = 32) -> float:
    model.eval()
    gen = torch.Generator().manual_seed(1234)
    total = 0.0
    for _ in range(batches):
        x, y = batch(data, size, gen)
        total += _loss(model, x, y)
    model.train()
    return total / batches


def _loss(model, x: torch.Tensor, y: torch.Tensor) -> float:
    logits = model(input_ids=x).logits
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)), y.reshape(-1)
    ).item()


def train(
    model,
    text: str,
    *,
    steps: int,
    lr: float,
    warmup: int,
    batch_size: int,
    seed: int,
    log_every: int = 250,
) -> dict:
    train_data, val_data, info = load_text(text)
    gen = torch.Generator().manual_seed(seed)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.95),
    )

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    start_val = val_loss(model, val_data)
    t0 = time.perf_counter()
    model.train()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        x, y = batch(train_data, batch_size, gen)
        logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % log_every == 0 or step == 0:
            print(
                f"  step {step + 1:5d}/{steps}  loss {loss.item():.4f}  lr {lr_at(step):.2e}  "
                f"{time.perf_counter() - t0:6.1f}s",
                flush=True,
            )
    wall = time.perf_counter() - t0
    final = val_loss(model, val_data)
    return {
        **info,
        "steps": steps,
        "lr": lr,
        "warmup": warmup,
        "batch": batch_size,
        "context": CONTEXT,
        "seed": seed,
        "train_seconds": round(wall, 1),
        "val_loss_start": round(start_val, 4),
        "val_loss": round(final, 4),
    }


def save(model, out: Path, record: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(
        f"  saved {out} ({size / 1024:.0f} KiB), val loss {record['val_loss']:.4f} nats/byte",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="corpus folder (default: $SPECTRAL_GUARD_CORPUS or ~/.cache/spectral_guard/corpus)",
    )
    ap.add_argument(
        "--tiny",
        action="store_true",
        help="train the test fixtures (2 layers, d=64) into tests/data/trained/ instead",
    )
    ap.add_argument(
        "--out", type=Path, default=None, help="with --tiny: folder instead of tests/data/trained"
    )
    ap.add_argument("--models", default="gpt2,llama", help="comma-separated: gpt2, llama")
    ap.add_argument(
        "--steps", type=int, default=None, help="pre-training steps (default 2500; --tiny 1500)"
    )
    ap.add_argument(
        "--ft-steps",
        type=int,
        default=300,
        help="fine-tune steps (0: no fine-tune; never with --tiny)",
    )
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--ft-lr", type=float, default=5e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    size = "tiny" if args.tiny else "full"
    steps = args.steps or (1500 if args.tiny else 2500)
    root = (args.out or TINY_OUT) if args.tiny else (args.cache or default_cache())
    import transformers

    env = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "threads": args.threads,
        "command": " ".join(
            [Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]
        ),
    }
    for family in [m.strip() for m in args.models.split(",") if m.strip()]:
        torch.manual_seed(args.seed)
        model = build(family, size)
        name = f"{family}_tiny" if args.tiny else f"{family}-stdlib"
        n = sum(p.numel() for p in model.parameters())
        arch = dict(SIZES[size]) if family == "llama" else {
            "layers": SIZES[size]["layers"], "d": SIZES[size]["d"], "heads": SIZES[size]["heads"],
            "mlp": 4 * SIZES[size]["d"]}  # fmt: skip
        print(f"{name}: {arch}, {n} parameters, {steps} steps", flush=True)
        rec = train(
            model,
            "pretrain",
            steps=steps,
            lr=args.lr,
            warmup=min(200, steps // 10),
            batch_size=args.batch,
            seed=args.seed,
        )
        save(
            model,
            root / name,
            {"model": name, "family": family, "size": arch, "parameters": n, **rec, **env},
        )
        if args.tiny or args.ft_steps <= 0:
            continue
        ft = f"{name}-ft"
        print(f"{ft}: fine-tune of {name}, {args.ft_steps} steps on asyncio + email", flush=True)
        rec = train(
            model,
            "finetune",
            steps=args.ft_steps,
            lr=args.ft_lr,
            warmup=min(30, args.ft_steps // 10),
            batch_size=args.batch,
            seed=args.seed + 1,
        )
        save(
            model,
            root / ft,
            {
                "model": ft,
                "family": family,
                "base": name,
                "size": arch,
                "parameters": n,
                **rec,
                **env,
            },
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
