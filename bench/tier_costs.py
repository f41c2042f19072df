"""Cost of one guard check against the biopsy size: the measurement behind the biopsy limits of
:func:`spectral_guard.auto_calibrate`'s tier table (docs/calibration.md).

A guard check of one layer is one warm power-iteration step on the full weight, the gather of
the seeded biopsy and one decomposition of it (``eigvalsh`` of the smaller Gram matrix for the
default sensors; ``svd`` when the conditioning sensor is on). This script times those pieces
with the library's own functions on one intra-op thread (the guard's setting), median of
``--repeats`` runs, for a ``--rows x --cols`` float32 layer.

    python bench/tier_costs.py [--rows 4096 --cols 4096 --repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from spectral_guard.estimators import (
    PowerState,
    biopsy_indices,
    gram_singular_values,
    init_power_state,
    intra_op_threads,
    power_iteration,
    take_biopsy,
)

LIMITS = (128, 192, 256, 384, 512, 768, 1024)


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000.0 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(args.rows, args.cols, generator=gen) / args.cols ** 0.5
    state: PowerState = init_power_state(tuple(W.shape), seed=0)
    print(f"# layer {args.rows} x {args.cols} float32, torch {torch.__version__}, 1 thread, "
          f"median of {args.repeats}")
    print(f"{'limit':>6} {'power ms':>9} {'gather ms':>10} {'eigvalsh ms':>12} "
          f"{'svd ms':>8} {'check ms':>9} {'x192':>6}")
    rows = []
    with intra_op_threads(1):
        power = _median_ms(lambda: power_iteration(W, state, 1), args.repeats)
        for limit in LIMITS:
            r, c = biopsy_indices(tuple(W.shape), limit, seed=0)
            gather = _median_ms(lambda r=r, c=c: take_biopsy(W, r, c), args.repeats)
            B = take_biopsy(W, r, c)
            eig = _median_ms(lambda B=B: gram_singular_values(B), args.repeats)
            svd = _median_ms(lambda B=B: torch.linalg.svd(B, full_matrices=False),
                             max(3, args.repeats // 2))
            rows.append((limit, power, gather, eig, svd, power + gather + eig))
    base = next(r[5] for r in rows if r[0] == 192)
    for limit, p, g, e, s, check in rows:
        print(f"{limit:>6} {p:>9.2f} {g:>10.2f} {e:>12.2f} {s:>8.1f} {check:>9.2f} "
              f"{check / base:>6.1f}")


if __name__ == "__main__":
    main()
