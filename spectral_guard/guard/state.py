"""Per-layer guard state: what the device needs (a parametrization's buffers) and what the host
decides on (a dataclass of named fields).

Device side, :class:`GuardProbe`, the identity parametrization ``W -> W`` on the layer's
``weight``. Its non-persistent buffers follow ``model.to(device)`` and never enter the model's
``state_dict``:

* ``u`` (m), ``v`` (n): the warm power-iteration vectors (the collapse term reads them);
* ``rows``, ``cols``: the biopsy's seeded indices (empty: the whole axis);
* ``cond_u`` (r x q), ``cond_v`` (c x q): the conditioning term's singular pairs.

They keep their dtype under ``model.half()`` / ``.to(torch.bfloat16)``: a power-iteration
vector rounded to bf16 would point elsewhere.

Host side, :class:`LayerState`: baseline, latest readings, lambdas per failure kind, counters.
The host never reads the device to decide: readings arrive from the check worker.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn

from .check import Baseline, Readings
from .sensors import KINDS

Tensor = torch.Tensor


class GuardProbe(nn.Module):
    """Identity parametrization carrying a layer's device-side guard state in buffers."""

    def __init__(self, shape: tuple[int, int], seed: int, rows: Tensor | None,
                 cols: Tensor | None) -> None:
        super().__init__()
        m, n = shape
        gen = torch.Generator(device="cpu").manual_seed(seed)
        u, v = torch.randn(m, generator=gen), torch.randn(n, generator=gen)
        empty = torch.zeros(0, dtype=torch.long)
        self.register_buffer("u", u / u.norm(), persistent=False)
        self.register_buffer("v", v / v.norm(), persistent=False)
        self.register_buffer("rows", empty if rows is None else rows, persistent=False)
        self.register_buffer("cols", empty if cols is None else cols, persistent=False)
        self.register_buffer("cond_u", torch.zeros(0, 0), persistent=False)
        self.register_buffer("cond_v", torch.zeros(0, 0), persistent=False)

    def forward(self, W: Tensor) -> Tensor:
        """Identity: the weight is returned as is (the penalty is a separate loss term)."""
        return W

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> GuardProbe:
        """Follow device moves, keep dtypes (``model.half()`` must not round the vectors)."""
        for name, buf in self._buffers.items():
            if buf is not None:
                moved = fn(buf)
                self._buffers[name] = moved if moved.dtype == buf.dtype else \
                    buf.to(device=moved.device)
        return self

    def biopsy(self, W: Tensor) -> Tensor:
        """``W[rows][:, cols]`` (no host read: the indices live on W's device)."""
        if self.rows.numel():
            W = W.index_select(-2, self.rows)
        if self.cols.numel():
            W = W.index_select(-1, self.cols)
        return W

    def biopsy_shape(self, shape: tuple[int, int]) -> tuple[int, int]:
        return (self.rows.numel() or shape[0], self.cols.numel() or shape[1])


@dataclass
class LayerState:
    """Host-side state of one guarded layer (plain Python values, named fields)."""

    baseline: Baseline | None = None
    readings: Readings = field(default_factory=Readings)
    lambdas: dict[str, float] = field(default_factory=lambda: dict.fromkeys(KINDS, 0.0))
    log_kappa_max: float = math.nan
    cond_eps: float = math.nan
    cond_pairs: int = 0
    checks: int = 0
    interventions: int = 0
    msigns: int = 0
    random_init: bool = False
    msigns_skipped: int = 0
    last_checked_step: int = -1
    recent_retention: list[tuple[int, float]] = field(default_factory=list)
    collapse_fall: int = -1
    nonfinite: bool = False
    nonfinite_entries: int = 0
    failed_checks: int = 0
    last_error: str = ""
    generation: int = 0

    @property
    def lam(self) -> float:
        return sum(self.lambdas.values())

    @property
    def treated(self) -> bool:
        return self.lam > 0 and not self.nonfinite

    def term_lambdas(self, actuator: str) -> tuple[float, float]:
        """``(lambda_collapse, lambda_conditioning)`` of the layer's penalty term: with the
        ``"msign"`` actuator collapse is answered by the matrix sign, not by a term."""
        collapse = 0.0 if actuator == "msign" else self.lambdas["collapse"]
        return collapse, self.lambdas["conditioning"]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["baseline"] = None if self.baseline is None else self.baseline.as_dict()
        data["readings"] = self.readings.as_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LayerState:
        data = dict(data)
        base = data.pop("baseline")
        readings = data.pop("readings")
        known = set(cls.__dataclass_fields__)
        state = cls(**{k: v for k, v in data.items() if k in known})
        state.baseline = None if base is None else Baseline(**base)
        state.readings = Readings(**readings)
        state.lambdas = {k: float(state.lambdas.get(k, 0.0)) for k in KINDS}
        state.recent_retention = [(int(s), float(r)) for s, r in state.recent_retention]
        return state
