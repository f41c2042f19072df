"""Hygiene scan of row chunks: NaN/Inf and all-zero rows and columns, on IEEE bit patterns.

Works on ``|x|``'s bits: zero iff the bits are 0, non-finite iff they are at least the exponent
mask; one integer max per row (and per surviving column candidate) answers both questions.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch

_BITS: dict[torch.dtype, tuple[torch.dtype, int, int]] = {
    torch.float16: (torch.int16, 0x7FFF, 0x7C00),
    torch.bfloat16: (torch.int16, 0x7FFF, 0x7F80),
    torch.float32: (torch.int32, 0x7FFFFFFF, 0x7F800000),
    torch.float64: (torch.int64, 0x7FFFFFFFFFFFFFFF, 0x7FF0000000000000),
}
"""``dtype -> (integer view, |x| mask, exponent mask)``."""

_LOCAL = threading.local()


def _scratch(dtype: torch.dtype, shape: torch.Size,
             device: torch.device | None = None) -> torch.Tensor:
    """A reusable per-thread buffer (per device) for the bit patterns of one chunk: allocating
    (and page-faulting) a fresh 16 MiB tensor per chunk cost about as much as the scan itself."""
    pool = getattr(_LOCAL, "pool", None)
    if pool is None:
        pool = _LOCAL.pool = {}
    n = math.prod(shape)
    key = (dtype, device or torch.device("cpu"))
    buf = pool.get(key)
    if buf is None or buf.numel() < n:
        buf = pool[key] = torch.empty(n, dtype=dtype, device=key[1])
    return buf[:n].view(shape)


@dataclass
class Scan:
    """Running NaN/Inf and all-zero counts over the row chunks of one ``rows x cols`` matrix
    (:meth:`update` once per chunk, in any row order)."""

    cols: int
    nan: int = 0
    inf: int = 0
    dead_rows: int = 0
    dead_col_candidates: torch.Tensor | None = None

    def update(self, block: torch.Tensor) -> None:
        if block.dtype not in _BITS:  # float8: small, upcasting is exact
            block = block.to(torch.float32)
        int_dtype, mask, inf_bits = _BITS[block.dtype]
        # a same-size dtype view works on any strides: a column slice (a fused projection's
        # block stored in x out) is read in place, not copied first
        bits = torch.bitwise_and(block.view(int_dtype), mask,
                                 out=_scratch(int_dtype, block.shape, block.device))
        row_max = bits.amax(1)
        self.dead_rows += int((row_max == 0).sum())
        # all-zero columns: candidates are the zero entries of the matrix's first row (an
        # all-zero column is zero there too); every chunk then looks at the surviving
        # candidates only (usually none), not at every column: a full column reduction of
        # each tensor's first chunk cost about as much as the row reduction
        cand = self.dead_col_candidates
        if cand is None:
            cand = torch.nonzero(bits[0] == 0).flatten()
        if cand.numel():
            cand = cand[bits.index_select(1, cand).amax(0) == 0]
        self.dead_col_candidates = cand
        if bool((row_max >= inf_bits).any()):
            self.nan += int(torch.isnan(block).sum())
            self.inf += int(torch.isinf(block).sum())

    @property
    def nonfinite(self) -> int:
        return self.nan + self.inf

    @property
    def dead_cols(self) -> int:
        cand = self.dead_col_candidates
        return 0 if cand is None else int(cand.numel())
