"""Measurements behind the audit's ``logit_scale_max`` default (docs/audit.md, "Attention logit
scale"): ``max_h s_h n`` over the layers of tiny transformers models trained on CPU.

``s_h = sigma_max(W_q,h^T W_k,h) / sqrt(d_h)`` (exact, :func:`spectral_guard.audit.logit.
exact_head_scales`), ``n`` the input width. 3-layer byte-level GPT-2 and Llama (n = 96, 4 heads,
Llama with 2 key heads), AdamW (beta2 0.95, no weight decay), batches of 16 x 64 bytes of the
Python standard library's sources, 300 steps, at healthy (1e-3, 3e-3) and stressed (3e-2, 1e-1)
learning rates, seeds 0 and 1. Run: ``python bench/logit_thresholds.py [steps]`` (about 6
minutes on one core).
"""

from __future__ import annotations

import sys
import sysconfig
import time
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from spectral_guard.audit.logit import measure_model


def corpus(limit: int = 200) -> torch.Tensor:
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:limit]
    return torch.tensor(list(b"".join(f.read_bytes() for f in files)), dtype=torch.long)


def build(kind: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(
            vocab_size=256, hidden_size=96, intermediate_size=256, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128))
    return GPT2LMHeadModel(GPT2Config(vocab_size=256, n_embd=96, n_layer=3, n_head=4,
                                      n_positions=128))


def bound(model: torch.nn.Module) -> float:
    """``max`` over pairs and heads of ``s_h n``."""
    return max(p.max_bound for p in measure_model(model)[0])


def main(steps: int = 300) -> None:
    torch.set_num_threads(1)
    data = corpus()
    for kind in ("gpt2", "llama"):
        for lr, label in ((1e-3, "healthy"), (3e-3, "healthy"), (3e-2, "stressed"),
                          (1e-1, "stressed")):
            for seed in (0, 1):
                t0 = time.time()
                model = build(kind, seed)
                b0 = bound(model)
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
                print(f"{kind} lr={lr:g} {label} seed={seed} init={b0:.1f} "
                      f"final={bound(model):.1f} loss={loss.item():.3f} "
                      f"({time.time() - t0:.0f}s)", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 300)
