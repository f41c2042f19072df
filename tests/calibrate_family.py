"""A family of small healthy models trained on CPU, for the calibration tests.

One architecture (the example's char-level transformer, LLaMA-style names) trained with
different seeds and sizes; a held-out member; damaged copies of the held-out member. Trained
once per test session (about 10 s on a 2-core CPU) and written as safetensors files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from audit_fixtures import tiny_models
from safetensors.torch import save_file

MEMBERS = (  # (seed, d, ffn): one family, different seeds and sizes
    (1, 64, 256),
    (2, 96, 384),
    (3, 64, 192),
)
HELD_OUT = (4, 80, 320)
RUN_SNAPSHOTS = (60, 90, 120)
DAMAGE = {"model.layers.1.mlp.up_proj.weight": "rank1",
          "model.layers.0.mlp.down_proj.weight": "dead_rows",
          "model.layers.0.self_attn.v_proj.weight": "nan"}


@dataclass
class Family:
    references: list[Path]
    held_out: Path
    damaged: dict[str, Path]  # damage kind -> file with that one damaged matrix
    random_init: Path
    run: list[Path]  # successive checkpoints of one run


STEPS = 100


def train(seed: int, d: int, ffn: int) -> dict[str, torch.Tensor]:
    state, loss, uniform = tiny_models.train_char_lm(seed=seed, d=d, heads=4, ffn=ffn, layers=2,
                                                     ctx=32, steps=STEPS, batch=16, lr=1e-2,
                                                     n_words=30)
    assert loss < 0.5 * uniform, (seed, loss, uniform)  # it learned: a healthy reference
    return state


def train_run(seed: int, d: int, ffn: int, snapshots: tuple[int, ...]
              ) -> list[dict[str, torch.Tensor]]:
    """One training run (AdamW, constant lr) with state_dict snapshots at the given steps."""
    text = tiny_models.markov_text(seed, n_chars=20_000, n_words=30)
    chars = sorted(set(text))
    data = torch.tensor([chars.index(c) for c in text])
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = tiny_models.CharLM(len(chars), d, 4, ffn, 2, 32)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    out = []
    for step in range(1, max(snapshots) + 1):
        starts = torch.randint(0, len(data) - 33, (16,), generator=gen)
        x = torch.stack([data[s:s + 32] for s in starts.tolist()])
        y = torch.stack([data[s + 1:s + 33] for s in starts.tolist()])
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step in snapshots:
            out.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return out


def build(folder: Path) -> Family:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        refs = []
        for seed, d, ffn in MEMBERS:
            path = folder / f"member_s{seed}_d{d}.safetensors"
            save_file(train(seed, d, ffn), str(path))
            refs.append(path)
        held = train(*HELD_OUT)
        held_path = folder / "held_out.safetensors"
        save_file(held, str(held_path))
        damaged = {}
        for name, kind in DAMAGE.items():
            bad = dict(held)
            bad[name] = tiny_models.inject(held[name], kind, seed=0)
            damaged[kind] = folder / f"held_out_{kind}.safetensors"
            save_file(bad, str(damaged[kind]))
        torch.manual_seed(0)
        init = tiny_models.CharLM(30, 96, 4, 384, 2, 32)
        random_path = folder / "random_init.safetensors"
        save_file({k: v.detach().contiguous() for k, v in init.state_dict().items()},
                  str(random_path))
        run = []
        for steps, state in zip(RUN_SNAPSHOTS, train_run(5, 64, 256, RUN_SNAPSHOTS),
                                strict=True):
            path = folder / f"run_step{steps}.safetensors"
            save_file(state, str(path))
            run.append(path)
    finally:
        torch.set_num_threads(before)
    return Family(refs, held_path, damaged, random_path, run)


@pytest.fixture(scope="session")
def family(tmp_path_factory) -> Family:
    return build(tmp_path_factory.mktemp("family"))
