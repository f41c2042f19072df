"""Regenerate the figures of docs/integrations.md (needs spectral-guard[plot]).

    python docs/img/make_images.py

audit.png: ``spectral-guard audit examples/tiny_model_damaged.safetensors --plot``;
esd.png: ``spectral-guard esd examples/tiny_model.safetensors model.layers.0.mlp.up_proj.weight
--plot``; guard_history.png: ``guard.plot`` after 120 steps of a small MLP trained with a learning
rate high enough to collapse some layers (CPU, about 10 seconds).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
import torch.nn as nn

import spectral_guard

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "spectral_guard.cli.main", *args], cwd=ROOT,
                   check=False)


def guard_history(path: Path, steps: int = 120) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(),
                          nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 8))
    guard = spectral_guard.instrument(model, ratio=0.5)
    opt = torch.optim.Adam(model.parameters(), lr=0.2)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(512, 32, generator=g)
    y = torch.tanh(x[:, :8] * 3)
    for _ in range(steps):
        idx = torch.randint(0, 512, (64,), generator=g)
        loss = nn.functional.mse_loss(model(x[idx]), y[idx]) + guard.penalty()
        loss.backward()
        opt.step()
        opt.zero_grad()
    guard.plot(path)
    print(f"{path}: {guard.metrics()}")


if __name__ == "__main__":
    cli("audit", "examples/tiny_model_damaged.safetensors", "--quiet", "--plot",
        str(HERE / "audit.png"))
    cli("esd", "examples/tiny_model.safetensors", "model.layers.0.mlp.up_proj.weight", "--plot",
        str(HERE / "esd.png"))
    guard_history(HERE / "guard_history.png")
