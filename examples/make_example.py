"""Write the bundled example checkpoints (run from anywhere; takes ~10-30 s on a laptop CPU).

* ``examples/tiny_model.safetensors``: a 2-block character-level transformer (d=64, ffn 256,
  LLaMA-style names) trained on a made-up Markov language to well below the uniform loss,
  stored in float16 (about 200 KB). Healthy: ``spectral-guard audit`` exits 0 on it.
* ``examples/tiny_model_damaged.safetensors``: the same weights with
  ``model.layers.1.mlp.up_proj.weight`` replaced by its rank-1 approximation (same Frobenius
  norm) and one NaN in ``model.layers.0.self_attn.v_proj.weight``. The audit flags exactly
  those two (``collapsed`` and ``nonfinite``) and exits 1.

    python examples/make_example.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import tiny_models  # noqa: E402

DAMAGE = {"model.layers.1.mlp.up_proj.weight": "rank1",
          "model.layers.0.self_attn.v_proj.weight": "nan"}


def main() -> None:
    torch.set_num_threads(1)
    state, loss, uniform = tiny_models.train_char_lm(seed=0, d=64, heads=4, ffn=256, layers=2,
                                                     ctx=32, steps=300, batch=16, lr=1e-2,
                                                     n_words=30)
    print(f"trained: held-out loss {loss:.3f} nats/char (uniform {uniform:.3f})")
    state16 = {k: v.to(torch.float16) for k, v in state.items()}
    meta = {"description": "spectral_guard example: tiny char LM trained by "
            "examples/make_example.py", "heldout_loss": f"{loss:.4f}"}
    save_file(state16, str(HERE / "tiny_model.safetensors"), metadata=meta)
    damaged = dict(state16)
    for name, kind in DAMAGE.items():
        damaged[name] = tiny_models.inject(state16[name], kind, seed=0)
    save_file(damaged, str(HERE / "tiny_model_damaged.safetensors"),
              metadata={**meta, "damage": ", ".join(f"{k}: {v}" for k, v in DAMAGE.items())})
    for f in ("tiny_model.safetensors", "tiny_model_damaged.safetensors"):
        print(f"wrote examples/{f} ({(HERE / f).stat().st_size / 1000:.0f} KB)")


if __name__ == "__main__":
    main()
