"""Measure the guard's sensors on healthy vs stressed training of a small byte-level GPT.

Two runs from the same init and the same batches: ``healthy`` (AdamW, lr ``--lr``) and
``stressed`` (the same, with the learning rate multiplied by ``--shock`` from step
``--shock-at`` on). A monitor-only guard (``lambda_base=0``, ratio 1, every sensor) records each
layer's readings at every step; a second pair of runs uses the default guard configuration and
counts interventions. Prints per-run minima/maxima of each sensor by layer role and the
intervention counts. Data are generated (a tiny grammar), nothing is downloaded.

    python bench/thermostat_probe.py            # ~15 minutes on a busy 2-core machine
    python bench/thermostat_probe.py --quick
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from guard_models import byte_batches, seeded_model, synthetic_text  # noqa: E402

import spectral_guard  # noqa: E402

ROLES = ("q_proj", "k_proj", "v_proj", "o_proj", "fc", "proj")


def train(lr: float, shock: float, shock_at: int, steps: int, monitor: bool, seed: int = 0,
          n_layers: int = 3, d: int = 96, batch: int = 16, seq: int = 64,
          config: dict | None = None) -> tuple[dict, list[float], dict]:
    """One run; returns (per-layer min/max readings, losses, final guard stats)."""
    model = seeded_model(seed, n_layers=n_layers, d=d, seq=seq)
    overrides = dict(config or {})
    if monitor:
        overrides.update(ratio=1.0, lambda_base=0.0,
                         sensors=("effective_rank", "stable_rank", "condition_number", "fiedler"),
                         thresholds=_monitor_thresholds())
    guard = spectral_guard.instrument(model, **overrides)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    data = synthetic_text(200_000, seed=seed)
    track: dict[str, dict[str, list[float]]] = {}
    losses = []
    for step, (x, y) in enumerate(byte_batches(data, batch, seq, steps, seed=seed)):
        if step == shock_at:
            for g in opt.param_groups:
                g["lr"] = lr * shock
        loss = model(x, y)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if monitor and step >= 10:
            for name, row in guard.stats()["layers"].items():
                t = track.setdefault(name, {})
                for key in ("effective_rank_retention", "stable_rank_retention",
                            "condition_growth", "fiedler", "stable_rank"):
                    t.setdefault(key, []).append(row["sensors"][key])
    return track, losses, guard.stats()


def _monitor_thresholds():
    from spectral_guard.thresholds import Rule, Thresholds

    return Thresholds(Rule(effective_rank_retention_min=0.0, stable_rank_retention_min=0.0,
                           condition_number_growth_max=math.inf, fiedler_max=math.inf))


def summarize(track: dict, key: str, reduce) -> dict[str, float]:
    out: dict[str, list[float]] = {}
    for name, t in track.items():
        role = name.rsplit(".", 1)[-1]
        vals = [v for v in t[key] if math.isfinite(v)]
        if vals:
            out.setdefault(role, []).append(reduce(vals))
    return {role: reduce(v) for role, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--shock", type=float, default=30.0)
    ap.add_argument("--shock-at", type=int, default=100)
    ap.add_argument("--quick", action="store_true", help="150 steps, shock at 50")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.shock_at = 150, 50
    torch.set_num_threads(args.threads)
    print(f"# TinyGPT 3 layers d=96 seq=64 batch=16, AdamW lr={args.lr}, steps={args.steps}, "
          f"stress: lr x{args.shock} from step {args.shock_at}")
    runs = {}
    for label, shock in (("healthy", 1.0), ("stressed", args.shock)):
        track, losses, _ = train(args.lr, shock, args.shock_at, args.steps, monitor=True)
        runs[label] = track
        print(f"{label}: loss {losses[0]:.3f} -> {losses[-1]:.3f} (min {min(losses):.3f})")
    rows = [("effective_rank_retention", min, "min"), ("stable_rank_retention", min, "min"),
            ("stable_rank", min, "min"), ("condition_growth", max, "max"),
            ("fiedler", max, "max")]
    for key, reduce, what in rows:
        print(f"\n{what} {key} over steps >= 10, by role (min/max over layers of that role)")
        print(f"{'role':8s} {'healthy':>10s} {'stressed':>10s}")
        h, s = summarize(runs["healthy"], key, reduce), summarize(runs["stressed"], key, reduce)
        for role in ROLES:
            print(f"{role:8s} {h.get(role, math.nan):10.3f} {s.get(role, math.nan):10.3f}")
    print("\n# default guard configuration (penalty on): interventions per run")
    for label, shock in (("healthy", 1.0), ("stressed", args.shock)):
        _, losses, stats = train(args.lr, shock, args.shock_at, args.steps, monitor=False)
        t = stats["totals"]
        print(f"{label}: checks={t['checks']} interventions={t['interventions']} "
              f"treated_at_end={t['treated_layers']} final_loss={losses[-1]:.3f}")


if __name__ == "__main__":
    main()
