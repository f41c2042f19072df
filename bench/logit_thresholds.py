"""Measurements behind the audit's ``logit_typical_max`` default (docs/audit.md, "Attention logit
scale"): per-head q-k logit scales of healthy and stressed models.

Per head (:mod:`spectral_guard.audit.logit`): the typical scale ``tau_h = ||W_q,h^T W_k,h||_F /
sqrt(d_h)`` (the RMS logit of isotropic unit-RMS inputs; what the verdict reads) and the
worst-case bound ``s_h n = sigma_max(W_q,h^T W_k,h) / sqrt(d_h) * n``.

Two parts:

* ``python bench/logit_thresholds.py train [steps] [--save DIR]``: 3-layer byte-level GPT-2 and
  Llama (n = 96, 4 heads, Llama with 2 key heads), AdamW (beta2 0.95, no weight decay), batches
  of 16 x 64 bytes of the Python standard library's sources, 300 steps, at healthy (1e-3, 3e-3)
  and stressed (3e-2, 1e-1) learning rates, seeds 0 and 1 (about 6 minutes on one free core);
  ``--save`` keeps each trained model (``save_pretrained``) for ``measure``.
* ``python bench/logit_thresholds.py measure FOLDER...``: the same statistics of checkpoints
  (a folder with ``config.json``), through the audit, e.g. the real-model corpus of
  bench/real_models.py.

Each line: max and median over all heads of the model of ``tau_h``, and of ``s_h n``.
"""

from __future__ import annotations

import statistics
import sys
import sysconfig
import time
from pathlib import Path

import torch

from spectral_guard.audit import audit
from spectral_guard.audit.logit import PairScale, measure_model


def corpus(limit: int = 200) -> torch.Tensor:
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:limit]
    return torch.tensor(list(b"".join(f.read_bytes() for f in files)), dtype=torch.long)


def build(kind: str, seed: int) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(
            vocab_size=256, hidden_size=96, intermediate_size=256, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128))
    return GPT2LMHeadModel(GPT2Config(vocab_size=256, n_embd=96, n_layer=3, n_head=4,
                                      n_positions=128))


def summary(typical: list[float], bounds: list[float]) -> str:
    return (f"typical max {max(typical):.3g} median {statistics.median(typical):.3g} | "
            f"bound max {max(bounds):.4g} median {statistics.median(bounds):.4g} "
            f"({len(typical)} heads)")


def of_pairs(pairs: list[PairScale]) -> str:
    return summary([t for p in pairs for t in p.typical], [b for p in pairs for b in p.bounds])


def train(steps: int = 300, save: Path | None = None) -> None:
    torch.set_num_threads(1)
    data = corpus()
    for kind in ("gpt2", "llama"):
        for lr, label in ((1e-3, "healthy"), (3e-3, "healthy"), (3e-2, "stressed"),
                          (1e-1, "stressed")):
            for seed in (0, 1):
                t0 = time.time()
                model = build(kind, seed)
                init = of_pairs(measure_model(model)[0])
                opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95),
                                        weight_decay=0.0)
                g = torch.Generator().manual_seed(seed)
                for _ in range(steps):
                    idx = torch.randint(0, len(data) - 65, (16,), generator=g)
                    x = torch.stack([data[i:i + 64] for i in idx])
                    loss = model(input_ids=x, labels=x).loss
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                if save is not None:
                    model.save_pretrained(save / f"{kind}_lr{lr:g}_s{seed}")
                print(f"{kind} lr={lr:g} {label} seed={seed} loss={loss.item():.3f} "
                      f"({time.time() - t0:.0f}s)\n  init:  {init}\n  final: "
                      f"{of_pairs(measure_model(model)[0])}", flush=True)


def measure(folders: list[str]) -> None:
    for folder in folders:
        rep = audit(folder, mode="biopsy")
        seen: dict[str, tuple[list[float], list[float]]] = {}
        for m in rep.matrices:
            if m.logit_pair is not None:
                seen[m.logit_pair] = (m.logit_head_typical, m.logit_head_scales)
        if not seen:
            print(f"{folder}: no pair measured {rep.logit_notes}")
            continue
        typical = [t for ts, _ in seen.values() for t in ts]
        bounds = [b for _, bs in seen.values() for b in bs]
        print(f"{folder}: {len(seen)} pairs, {summary(typical, bounds)}", flush=True)


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["measure"]:
        measure(args[1:])
    else:
        args = args[1:] if args[:1] == ["train"] else args
        save = None
        if "--save" in args:
            i = args.index("--save")
            save = Path(args[i + 1])
            del args[i:i + 2]
        train(int(args[0]) if args else 300, save)
