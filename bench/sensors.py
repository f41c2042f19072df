"""Side-by-side cost and accuracy of the sensor paths: exact SVD, biopsy, warm/cold power
iteration, shifted power iteration for sigma_min, and batched biopsies.

    python bench/sensors.py            # 1024x1024, 4096x1024, 4096x4096 (about 1-3 minutes)
    python bench/sensors.py --quick    # 256x256, 1024x256, 1024x1024 (seconds)

Every time is the median of a few repeats *in this run*, and every speed figure is a ratio to the
exact SVD of the same matrix in the same run: absolute times depend on the machine and its load
and must not be compared across runs. Errors are measured against the exact float32 path
(whose own error against float64 is ~1e-6 relative, see docs/metrics.md).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import torch

from spectral_guard import estimators as E
from spectral_guard import sensors as S


def timed(fn: Callable[[], object], repeats: int, warmup: int = 1) -> tuple[float, object]:
    """Median wall time in seconds of ``fn()`` over ``repeats`` calls, and its last result."""
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def haar_columns(m: int, k: int, g: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(m, k, generator=g))
    return q * torch.sign(torch.diagonal(r))


def trained_like(m: int, n: int, g: torch.Generator, alpha: float = 3.0) -> torch.Tensor:
    """Heavy-tailed spectrum: squared singular values Pareto(alpha), Haar singular vectors,
    scaled so entries have variance ~1/n like an initialised-then-trained layer."""
    k = min(m, n)
    x = (1.0 - torch.rand(k, generator=g, dtype=torch.float64)) ** (-1.0 / (alpha - 1.0))
    s = torch.sort(x.sqrt(), descending=True).values.float()
    W = (haar_columns(m, k, g) * s) @ haar_columns(n, k, g).T
    return W / W.norm() * math.sqrt(m)


def rel(a: float, b: float) -> float:
    if math.isinf(a) and math.isinf(b):
        return 0.0
    return abs(a - b) / abs(b) if b else math.nan


def fmt_err(x: float | None) -> str:
    if x is None:
        return "-"
    if math.isnan(x):
        return "nan"
    return f"{x:.1e}"


def fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"x{x:.3g}"


def bench_matrix(label: str, W: torch.Tensor, limit: int, repeats: int, rows: list) -> None:
    m, n = W.shape
    g = torch.Generator().manual_seed(1)
    # exact: one full SVD (float32); every metric comes from its singular values
    t_exact, s = timed(lambda: torch.linalg.svdvals(W), repeats, warmup=0 if m * n > 4e6 else 1)
    ex = S.metrics_from_singular_values(s, (m, n), S.rank_rtol((m, n), W.dtype))
    fro2 = S.frobenius_norm(W) ** 2  # float64 accumulation, O(mn)

    def row(path, t, sigma_err=None, sr_err=None, er_err=None, kappa_ratio=None):
        rows.append((label, path, t * 1e3, t / t_exact, sigma_err, sr_err, er_err, kappa_ratio))

    row("exact svdvals", t_exact)

    # biopsy: the exact path on a seeded <= limit x limit submatrix (gather included)
    t_b, b = timed(lambda: E.spectral_metrics(W, mode="biopsy", limit=limit, seed=0,
                                              alpha=False), repeats)
    row(f"biopsy {limit}", t_b, None, rel(b.stable_rank_ratio, ex.stable_rank_ratio),
        rel(b.effective_rank_ratio, ex.effective_rank_ratio),
        b.condition_number / ex.condition_number)

    if m != n:  # the aspect-preserving biopsy differs from the default only when m != n
        t_a, a = timed(lambda: E.spectral_metrics(W, mode="biopsy", limit=limit, seed=0,
                                                  alpha=False, keep_aspect=True), repeats)
        row(f"biopsy {limit} keep_aspect", t_a, None,
            rel(a.stable_rank_ratio, ex.stable_rank_ratio),
            rel(a.effective_rank_ratio, ex.effective_rank_ratio),
            a.condition_number / ex.condition_number)

    # warm power iteration: a state that has tracked the previous W (W minus an update of 1e-3
    # of the entries' scale) for 300 steps, then one step on the current W, as the
    # training-time guard runs it
    prev = W - 1e-3 * W.std() * torch.randn(m, n, generator=g)
    _, state = E.power_iteration(prev, None, n_iter=300, seed=0)
    t_w, (sig_w, _) = timed(lambda: E.power_iteration(W, state, n_iter=1), repeats)
    sig_w = float(sig_w)
    row("power warm 1 step", t_w, rel(sig_w, ex.sigma_max),
        rel(fro2 / sig_w**2 / min(m, n), ex.stable_rank_ratio))
    t_c, (sig_c, _) = timed(lambda: E.power_iteration(W, None, n_iter=8, seed=0), repeats)
    sig_c = float(sig_c)
    row("power cold 8 steps", t_c, rel(sig_c, ex.sigma_max),
        rel(fro2 / sig_c**2 / min(m, n), ex.stable_rank_ratio))

    # sigma_min by shifted power iteration (50 steps, cold), kappa = sigma_max / estimate
    t_m, (smin, _) = timed(lambda: E.sigma_min_power(W, sig_w, n_iter=50, seed=0), repeats)
    row("sigma_min power 50 steps", t_m, None, None, None,
        (sig_w / smin) / ex.condition_number if smin > 0 else math.inf)


def bench_batched(label: str, W: torch.Tensor, limit: int, count: int, repeats: int,
                  rows: list) -> None:
    """``count`` biopsies (seeds 0..count-1) of one shape: a loop of SVDs vs one batched SVD."""
    stack = torch.stack([E.biopsy(W, limit, seed) for seed in range(count)])
    t_loop, s_loop = timed(lambda: [torch.linalg.svdvals(x) for x in stack], repeats)
    t_batch, s_batch = timed(lambda: torch.linalg.svdvals(stack), repeats)
    diff = max(rel(float(a[0]), float(b[0])) for a, b in zip(s_loop, s_batch, strict=True))
    rows.append((label, f"{count} biopsies: loop", t_loop * 1e3, None, None, None, None, None))
    rows.append((label, f"{count} biopsies: batched", t_batch * 1e3, t_batch / t_loop, diff,
                 None, None, None))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes (seconds, for a smoke run)")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1: on a small shared box a 2-thread "
                         "OpenMP pool can make one SVD 100x slower; 0 keeps torch's default)")
    ap.add_argument("--limit", type=int, default=512, help="biopsy limit")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)

    if args.quick:
        shapes = [(256, 256), (1024, 256), (1024, 1024)]
        limit = min(args.limit, 128)
    else:
        shapes = [(1024, 1024), (4096, 1024), (4096, 4096)]
        limit = args.limit
    trained_shape = shapes[1]

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, "
          f"biopsy limit {limit}, median of {args.repeats} repeats "
          f"(2 for matrices >= 4096x4096)")
    t_start = time.perf_counter()
    rows: list = []
    for m, n in shapes:
        reps = args.repeats if m * n < 16e6 else min(args.repeats, 2)
        bench_matrix(f"gauss {m}x{n}", torch.randn(m, n, generator=g), limit, reps, rows)
    W_tl = trained_like(*trained_shape, g)
    tl_label = f"trained-like {trained_shape[0]}x{trained_shape[1]}"
    bench_matrix(tl_label, W_tl, limit, args.repeats, rows)
    bench_batched(tl_label, W_tl, limit, 8, args.repeats, rows)

    head = ("matrix", "path", "time ms", "vs exact", "sigma_max err", "SR ratio err",
            "erank ratio err", "kappa fast/exact")
    widths = (26, 26, 10, 9, 13, 12, 15, 16)
    print("  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)))
    last = None
    for label, path, ms, ratio, s_err, sr_err, er_err, kap in rows:
        cells = (label if label != last else "", path, f"{ms:.2f}", fmt_ratio(ratio),
                 fmt_err(s_err), fmt_err(sr_err), fmt_err(er_err), fmt_ratio(kap))
        last = label
        print("  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)))
    print(f"total wall time {time.perf_counter() - t_start:.1f} s")
    print("errors are relative to the exact float32 path of the same matrix; 'vs exact' is the "
          "time ratio to its exact SVD (batched: to the loop); power-iteration SR ratio uses the "
          "exact ||W||_F with the estimated sigma_max; kappa from sigma_min power is a lower bound")


if __name__ == "__main__":
    main()
