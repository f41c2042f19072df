"""Measurements behind the audit's default thresholds (docs/audit.md, "How the defaults were set").

Trains small models on CPU (see examples/tiny_models.py), adds random-init layers of
TinyLlama shapes, injects damage into copies, audits everything in exact and biopsy mode with
the thresholds switched off, and prints the metric ranges per population, then audits again
with the shipped defaults and counts false alarms and misses.

    python bench/calibrate_defaults.py [--cache DIR] [--quick] [--limit 128] [--modes biopsy,exact]

Trained checkpoints are cached in --cache (default: a temp dir) so a rerun skips training.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import tiny_models as tm  # noqa: E402

from spectral_guard.audit import audit  # noqa: E402

METRICS = ("stable_rank", "stable_rank_ratio", "effective_rank_ratio", "condition_number",
           "alpha")


def trained(cache: Path, quick: bool) -> dict[str, dict[str, torch.Tensor]]:
    out = {}
    specs = {
        "mlp": lambda: tm.train_mlp(seed=1, steps=300 if quick else 1500),
        "charlm": lambda: tm.train_char_lm(seed=1, d=192, heads=6, ffn=768, layers=3,
                                           steps=150 if quick else 600),
    }
    for name, fn in specs.items():
        path = cache / f"{name}{'-quick' if quick else ''}.safetensors"
        if not path.exists():
            state, *score = fn()
            print(f"trained {name}: " + ("accuracy {:.3f}" if name == "mlp" else
                                         "held-out loss {:.3f} (uniform {:.3f})").format(*score))
            save_file(state, str(path))
        out[name] = load_file(str(path))
    return out


def random_init(seed: int = 0) -> dict[str, torch.Tensor]:
    """Kaiming-uniform (nn.Linear default) and Gaussian layers of TinyLlama's shapes, in bf16."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {"q_proj": (2048, 2048), "k_proj": (256, 2048), "up_proj": (5632, 2048),
              "down_proj": (2048, 5632)}
    out = {}
    for name, (m, n) in shapes.items():
        bound = 1 / math.sqrt(n)
        out[f"init.uniform.{name}.weight"] = ((torch.rand(m, n, generator=gen) * 2 - 1)
                                              * bound).to(torch.bfloat16)
        out[f"init.gauss.{name}.weight"] = (torch.randn(m, n, generator=gen)
                                            * 0.02).to(torch.bfloat16)
    return out


def rows_of(report, population: str) -> list[dict]:
    return [{"population": population, **m.to_json_dict()} for m in report.matrices]


def summarize(rows: list[dict], key: str) -> str:
    vals = [r[key] for r in rows if r[key] is not None]
    inf = sum(1 for r in rows if key == "condition_number" and r["singular"])
    if not vals:
        return "-" if not inf else "inf"
    lo, hi = min(vals), max(vals)
    text = f"{lo:.3g} .. {hi:.3g}"
    return text + (f" (+{inf} inf)" if inf else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=None)
    ap.add_argument("--quick", action="store_true", help="short training (smoke run)")
    ap.add_argument("--limit", type=int, default=128, help="biopsy limit (default 128)")
    ap.add_argument("--modes", default="biopsy,exact", help="comma-separated modes")
    args = ap.parse_args()
    torch.manual_seed(0)
    cache = args.cache or Path(tempfile.mkdtemp(prefix="sg-calib-"))
    cache.mkdir(parents=True, exist_ok=True)
    models = trained(cache, args.quick)
    models["init"] = random_init()
    healthy_paths = {}
    for name, state in models.items():
        p = cache / f"healthy-{name}.safetensors"
        save_file(state, str(p))
        healthy_paths[name] = p
    # damaged copies: every 2-D matrix of the trained models and the init layers, each kind
    damaged: dict[str, dict[str, torch.Tensor]] = {k: {} for k in tm.INJECTIONS}
    for mname, state in models.items():
        for tname, W in state.items():
            big = mname == "init" and "uniform.q_proj" not in tname and "gauss.up" not in tname
            if W.dim() == 2 and min(W.shape) >= 8 and not big:
                for kind in tm.INJECTIONS:
                    damaged[kind][f"{mname}.{tname}"] = tm.inject(W, kind, seed=1)
    damaged_paths = {}
    for kind, state in damaged.items():
        p = cache / f"damaged-{kind}.safetensors"
        save_file(state, str(p))
        damaged_paths[kind] = p

    for mode in args.modes.split(","):
        kw = {"mode": mode, "limit": args.limit}
        reports = {f"healthy {n}": audit(p, **kw) for n, p in healthy_paths.items()}
        reports.update({f"injected {k}": audit(p, **kw) for k, p in damaged_paths.items()})
        print(f"\n## metric ranges, mode={mode}" + (f", limit {args.limit}" if mode == "biopsy"
                                                      else "") + "\n", flush=True)
        print("| population | matrices | " + " | ".join(METRICS) + " |")
        print("|---|---|" + "---|" * len(METRICS))
        groups: dict[str, list[dict]] = {}
        for label, rep in reports.items():
            for r in rows_of(rep, label):
                if label.startswith("healthy"):
                    role = "emb/head" if r["group"] else "hidden"
                    groups.setdefault(f"{label} {role}", []).append(r)
                else:
                    groups.setdefault(label, []).append(r)
        for pop, rows in groups.items():
            print(f"| {pop} | {len(rows)} | " + " | ".join(summarize(rows, k) for k in METRICS)
                  + " |")

        print(f"\n## shipped defaults, mode={mode}: status counts\n")
        for name in healthy_paths:
            rep = reports[f"healthy {name}"]
            flagged = [f"{m.name}: {m.status} ({'; '.join(m.reasons)})"
                       for m in rep.matrices if m.status != "ok"]
            print(f"healthy {name}: {len(rep.matrices)} matrices, {len(flagged)} flagged"
                  + "".join(f"\n    {f}" for f in flagged))
        for kind in damaged_paths:
            rep = reports[f"injected {kind}"]
            missed = [m.name for m in rep.matrices if m.status == "ok"]
            counts = {s: c for s, c in rep.status_counts().items() if c}
            print(f"injected {kind}: {len(rep.matrices)} matrices, statuses {counts}"
                  + (f"\n    missed: {', '.join(missed)}" if missed else ""))
    print(f"\ncache: {cache}")


if __name__ == "__main__":
    main()
