"""Step-time overhead of ``spectral_guard.instrument`` on a GPT-style decoder, on CPU.

Three copies of one model (same init) train on the same batches with AdamW:
``plain``, ``guarded`` (default GuardConfig) and ``worst`` (every layer checked at every step,
``ratio=1.0``). Steps are interleaved (the arm order rotates every step) so that load changes
on a shared machine hit all arms alike. Reported:

* the median over paired steps of ``t_guarded / t_plain`` (and ``t_worst / t_plain``);
* the guard's own time (inside its hooks and parametrizations, ``time.perf_counter_ns``) as a
  fraction of the guarded arm's step time: the robust number on a noisy machine;
* last line: ``overhead_ratio=<median guarded/plain>``.

    python bench/overhead.py                 # 6 layers, d=384, seq 256, batch 8, 100 steps
    python bench/overhead.py --quick         # 4 layers, d=256, seq 128, 40 steps
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from guard_models import byte_batches, seeded_model, synthetic_text  # noqa: E402

import spectral_guard  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=None, help="paired (timed) steps (100)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--d", type=int, default=384)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--no-worst", action="store_true", help="skip the ratio=1.0 arm")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (1: on a shared CPU, OpenMP teams wait for "
                         "cores and make 2-thread steps both slower and noisier)")
    ap.add_argument("--worst-every", type=int, default=2,
                    help="run the ratio=1.0 arm on every k-th step only (it is slow)")
    ap.add_argument("--quick", action="store_true", help="4 layers, d=256, seq 128, 40 steps")
    args = ap.parse_args()
    if args.quick:
        args.layers, args.d, args.heads, args.seq = 4, 256, 4, 128
    if args.steps is None:
        args.steps = 40 if args.quick else 100
    torch.set_num_threads(args.threads)

    base = seeded_model(0, n_layers=args.layers, d=args.d, heads=args.heads, seq=args.seq)
    arms: dict[str, dict] = {}
    configs = {"plain": None, "guarded": {}}
    if not args.no_worst:
        configs["worst"] = {"ratio": 1.0}
    for name, cfg in configs.items():
        model = copy.deepcopy(base)
        guard = spectral_guard.instrument(model, **cfg) if cfg is not None else None
        opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
        arms[name] = {"model": model, "guard": guard, "opt": opt, "times": [], "guard_ns": [],
                      "steps": []}
    n_guarded = len(arms["guarded"]["guard"].layer_names)
    print(f"# model: {args.layers} layers, d={args.d}, seq={args.seq}, batch={args.batch}, "
          f"{sum(p.numel() for p in base.parameters()) / 1e6:.1f}M params, "
          f"{n_guarded} guarded Linear layers; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"# guard defaults: {arms['guarded']['guard'].config}")
    data = synthetic_text(400_000, seed=0)
    batches = byte_batches(data, args.batch, args.seq, args.warmup + args.steps, seed=0)
    for step, (x, y) in enumerate(batches):
        names = [n for n in arms if n != "worst" or step % args.worst_every == 0]
        order = names[step % len(names):] + names[:step % len(names)]
        for name in order:
            arm = arms[name]
            g0 = arm["guard"].guard_time_s if arm["guard"] else 0.0
            t0 = time.perf_counter()
            loss = arm["model"](x, y)["loss"]
            loss.backward()
            arm["opt"].step()
            arm["opt"].zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            if step >= args.warmup:
                arm["times"].append(dt)
                arm["steps"].append(step)
                g1 = arm["guard"].guard_time_s if arm["guard"] else 0.0
                arm["guard_ns"].append(g1 - g0)
        if step % 10 == 0:
            print(f"step {step}: " + ", ".join(f"{n} {arms[n]['times'][-1]:.2f}s"
                                               for n in names if arms[n]["times"]),
                  file=sys.stderr, flush=True)
    plain_at = dict(zip(arms["plain"]["steps"], arms["plain"]["times"], strict=True))
    print(f"# paired steps: {len(plain_at)} (after {args.warmup} warm-up steps); worst-case arm "
          f"on every {args.worst_every}th step")
    print(f"{'arm':8s} {'median step s':>14s} {'median ratio':>13s} {'guard time frac':>16s} "
          f"{'checks':>7s} {'interventions':>14s}")
    results = {}
    for name, arm in arms.items():
        ratios = [t / plain_at[s] for t, s in zip(arm["times"], arm["steps"], strict=True)]
        med = statistics.median(ratios)
        frac = sum(arm["guard_ns"]) / sum(arm["times"])
        results[name] = med
        g = arm["guard"]
        checks = g.stats()["totals"]["checks"] if g else 0
        interv = g.stats()["totals"]["interventions"] if g else 0
        print(f"{name:8s} {statistics.median(arm['times']):14.4f} {med:13.4f} {frac:16.5f} "
              f"{checks:7d} {interv:14d}  ({len(ratios)} pairs)")
    if "worst" in results:
        print(f"worst_case_ratio={results['worst']:.4f}")
    guarded = arms["guarded"]
    print(f"guard_time_fraction={sum(guarded['guard_ns']) / sum(guarded['times']):.5f}")
    print(f"overhead_ratio={results['guarded']:.4f}")


if __name__ == "__main__":
    main()
