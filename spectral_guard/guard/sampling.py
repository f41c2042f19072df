"""Which layers a check visits: seeded, deterministic, with a coverage guarantee.

With ``L`` layers and a sampling ratio ``r``, each check visits a chunk of ``b = ceil(r L)``
layers. A seeded permutation of the layers is cut into ``E = ceil(L / b)`` chunks which are
visited cyclically: check ``c`` visits chunk ``c mod E``. Hence every layer is visited exactly
once in every window of ``E`` consecutive checks, and ``E <= ceil(1 / r)``: the coverage
guarantee. The choice depends only on ``(seed, L, r, c)``: every DDP rank computes the same
chunk without communicating, and a resumed run continues the same schedule. The permutation
is drawn from a private ``torch.Generator``; the global RNG is never touched.
"""

from __future__ import annotations

import math

import torch


def chunk_size(n_layers: int, ratio: float) -> int:
    """``b = ceil(ratio * L)``, at least 1 and at most ``L``."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    return max(1, min(n_layers, math.ceil(ratio * n_layers - 1e-9)))


def cycle_length(n_layers: int, ratio: float) -> int:
    """``E = ceil(L / b)``: the number of checks in which every layer is visited once."""
    return math.ceil(n_layers / chunk_size(n_layers, ratio)) if n_layers else 1


class LayerSchedule:
    """Seeded cyclic schedule of layer indices (see module docstring)."""

    def __init__(self, n_layers: int, ratio: float, seed: int = 0) -> None:
        self.n_layers = int(n_layers)
        self.ratio = float(ratio)
        self.seed = int(seed)
        self.size = chunk_size(self.n_layers, self.ratio) if self.n_layers else 0
        self.cycle = cycle_length(self.n_layers, self.ratio)
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        self._perm = torch.randperm(self.n_layers, generator=gen).tolist()

    def layers_for_check(self, check: int) -> list[int]:
        """Layer indices visited by check number ``check`` (0-based), sorted."""
        if self.n_layers == 0 or check < 0:
            return []
        j = check % self.cycle
        return sorted(self._perm[j * self.size:(j + 1) * self.size])


def check_index(step: int, every: int) -> int | None:
    """The check number run at optimizer step ``step``, or ``None`` when that step has none.

    Checks happen at steps ``0, every, 2 every, ...``; step ``k * every`` runs check ``k``.
    """
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    return step // every if step % every == 0 else None
