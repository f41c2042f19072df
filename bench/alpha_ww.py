"""The audit's alpha against WeightWatcher 0.7.7's on a corpus of real trained models, and its cost.

For every ``.safetensors`` file under ``--corpus`` (``<corpus>/<model>/*.safetensors``, folders
starting with ``_`` skipped) and in the folders given with ``--models``, and every 2-D
floating-point tensor in it:

* ``ww``        WeightWatcher 0.7.7's alpha with its defaults (``analyze()``: float64 SVD on
                CPU, ``pl_package="ww"``, ``xmax=None``, ``fix_fingers=False``), each tensor
                as the weight of an ``nn.Linear``. WeightWatcher needs its own environment
                (``--ww-python``, e.g. ``python3 -m venv /work/wwvenv && /work/wwvenv/bin/pip
                install torch==2.13.0 weightwatcher==0.7.7``); this script runs itself there as
                a worker that writes JSON, so the package is never imported next to it.
* ``exact``     the audit's alpha column, ``audit(file, mode="exact")`` (default estimator).
* ``biopsy``    the same in ``mode="biopsy"`` (default ``--limit 128``, seed 0): the fit on a
                seeded submatrix, a different sample of the spectrum.
* ``f64``       :func:`~spectral_guard.sensors.powerlaw_fit` on the float64 ESD with
                WeightWatcher's absolute floor ``lambda > 1e-5`` (``evals_thresh``): the
                algorithm alone, with WeightWatcher's inputs.
* ``hill``      the former default, the median-``xmin`` Hill estimator (``alpha="hill_median"``).

Prints per model and overall: matrices compared, fraction within ``--tol`` (0.05) of
WeightWatcher, median and maximum ``|difference|``, the worst matrices, the biopsy's distance from
the exact alpha; then the time of one fit at ESD sizes ``--sizes`` (trained-like Pareto ESDs,
one thread, median of ``--repeat``), new fit against the Hill estimator.

    python bench/alpha_ww.py [--corpus /work/corpus] [--ww-python /work/wwvenv/bin/python]
                             [--json out.json] [--timing-only]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def ww_worker(files: list[str], out: str) -> None:
    """Runs under WeightWatcher's interpreter: ``{file: {tensor: {alpha, xmin, D, num_evals}}}``."""
    import logging

    import weightwatcher as ww
    from safetensors.torch import load_file
    from torch import nn

    logging.disable(logging.WARNING)
    result: dict[str, dict] = {}
    for path in files:
        tensors = load_file(path)
        names = [k for k, v in tensors.items() if v.dim() == 2 and v.is_floating_point()]
        holder = nn.Module()
        holder.layers = nn.ModuleList()
        for k in names:
            W = tensors[k].float()
            layer = nn.Linear(W.shape[1], W.shape[0], bias=False)
            layer.weight.data = W.clone()
            holder.layers.append(layer)
        rows: dict[str, dict] = {}
        if names:
            df = ww.WeightWatcher(model=holder).analyze()
            for _, r in df.iterrows():
                k = names[int(str(r["longname"]).split(".")[-1])]
                rows[k] = {key: float(r[key]) for key in ("alpha", "xmin", "D", "num_evals")}
        result[path] = {"analyzed": rows, "tensors": names}
    Path(out).write_text(json.dumps(result))


def corpus_files(corpus: Path, extra: list[str]) -> list[Path]:
    dirs = [d for d in sorted(corpus.iterdir()) if d.is_dir() and not d.name.startswith("_")]
    dirs += [Path(d) for d in extra]
    return [p for d in dirs for p in sorted(d.glob("*.safetensors"))]


def run_ww(python: str, files: list[Path]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ww.json"
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        proc = subprocess.run([python, __file__, "--ww-worker", str(out), *map(str, files)],
                              capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise SystemExit(f"WeightWatcher worker failed:\n{proc.stderr[-3000:]}")
        return json.loads(out.read_text())


def ours(path: Path, names: list[str], limit: int) -> dict[str, dict]:
    """The audit's alpha in both modes, and the float64 fits, per 2-D tensor."""
    import torch
    from safetensors.torch import load_file

    from spectral_guard.audit import audit
    from spectral_guard.sensors import (
        WW_EVALS_THRESH,
        nonzero_eigenvalues_from_sv,
        powerlaw_alpha,
        powerlaw_fit,
        rank_rtol,
    )

    wanted = set(names)
    modes = {}
    for mode in ("exact", "biopsy"):
        rep = audit(path, mode=mode, limit=limit)
        modes[mode] = {m.tensor: m for m in rep.matrices
                       if m.tensor in wanted and len(m.tensor_shape) == 2}
    tensors = load_file(str(path))
    out = {}
    for k in names:
        W = tensors[k]
        s = torch.linalg.svdvals(W.double())
        eigs = nonzero_eigenvalues_from_sv(s, rank_rtol(tuple(W.shape), W.dtype))
        ex, bi = modes["exact"].get(k), modes["biopsy"].get(k)
        out[k] = {
            "shape": list(W.shape), "dtype": str(W.dtype).replace("torch.", ""),
            "exact": None if ex is None else ex.alpha,
            "biopsy": None if bi is None else bi.alpha,
            "biopsy_shape": None if bi is None else list(bi.measured_shape),
            "f64": powerlaw_fit(s**2, evals_thresh=WW_EVALS_THRESH).alpha,
            "f64_default": powerlaw_fit(eigs).alpha,
            "hill": powerlaw_alpha(eigs),
        }
    return out


def _num(x) -> float:
    return math.nan if x is None else float(x)


def summarize(rows: list[dict], key: str, tol: float) -> str:
    diffs = [abs(_num(r[key]) - r["ww"]) for r in rows]
    finite = [d for d in diffs if math.isfinite(d)]
    within = sum(d <= tol for d in finite)
    if not finite:
        return f"{key:>11}: no finite values"
    signed = statistics.median(_num(r[key]) - r["ww"] for r in rows
                               if math.isfinite(_num(r[key]) - r["ww"]))
    return (f"{key:>11}: within {tol} of WW {within}/{len(rows)} = {within / len(rows):6.1%}; "
            f"|diff| median {statistics.median(finite):.2e} max {max(finite):.3g}; "
            f"signed median {signed:+.3f}" + (f"; {len(rows) - len(finite)} nan" if
                                              len(finite) < len(rows) else ""))


def agreement(args) -> list[dict]:
    files = corpus_files(Path(args.corpus), args.models)
    if not files:
        raise SystemExit(f"no .safetensors under {args.corpus}/<model>/")
    t0 = time.perf_counter()
    ww = run_ww(args.ww_python, files)
    print(f"WeightWatcher 0.7.7 on {len(files)} file(s): {time.perf_counter() - t0:.1f} s")
    rows: list[dict] = []
    for f in files:
        got = ww[str(f)]
        mine = ours(f, got["tensors"], args.limit)
        model = f.parent.name
        for k in got["tensors"]:
            w = got["analyzed"].get(k)
            if w is None or w["alpha"] < 0:  # WW skipped it (fewer than 8 eigenvalues) or failed
                print(f"  not compared: {model}/{k} {mine[k]['shape']} (WeightWatcher: "
                      f"{'skipped' if w is None else 'fit failed'})")
                continue
            rows.append({"model": model, "file": f.name, "tensor": k, "ww": w["alpha"],
                         "ww_xmin": w["xmin"], "ww_num_evals": int(w["num_evals"]), **mine[k]})
    for model in sorted({r["model"] for r in rows}) + ["ALL"]:
        sub = [r for r in rows if model in ("ALL", r["model"])]
        print(f"\n{model}: {len(sub)} matrices")
        for key in ("exact", "f64", "f64_default", "hill"):
            print("  " + summarize(sub, key, args.tol))
        cut = [r for r in sub if r["biopsy_shape"] != r["shape"]]  # the rest: measured whole
        bx = [_num(r["biopsy"]) - _num(r["exact"]) for r in cut]
        bx = [d for d in bx if math.isfinite(d)]
        if bx:
            near = sum(abs(d) <= args.tol for d in bx)
            print(f"  biopsy - exact on the {len(cut)} biopsied (limit {args.limit}): |diff| "
                  f"median {statistics.median(map(abs, bx)):.3f}, max {max(map(abs, bx)):.3g}, "
                  f"signed median {statistics.median(bx):+.3f}, within {args.tol}: {near}")
    worst = sorted(rows, key=lambda r: -abs(_num(r["exact"]) - r["ww"])
                   if math.isfinite(_num(r["exact"])) else -math.inf)[:args.worst]
    print(f"\nlargest |exact - ww| (of {len(rows)}):")
    for r in worst:
        print(f"  {r['model']}/{r['tensor']} {r['shape']} {r['dtype']}: ww {r['ww']:.4f} "
              f"exact {_num(r['exact']):.4f} f64 {r['f64']:.4f} hill {r['hill']:.4f}")
    return rows


def timing(args) -> list[dict]:
    import torch

    from spectral_guard.sensors import powerlaw_alpha, powerlaw_fit

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    out = []
    print(f"\nfit time per ESD, one thread, median of {args.repeat} (interleaved):")
    for n in args.sizes:
        x = (1 - torch.rand(n, generator=g, dtype=torch.float64)) ** (-1 / 2.0)  # alpha = 3
        t_new, t_old = [], []
        powerlaw_fit(x), powerlaw_alpha(x)
        for _ in range(args.repeat):
            t = time.perf_counter()
            powerlaw_fit(x)
            t_new.append(time.perf_counter() - t)
            t = time.perf_counter()
            powerlaw_alpha(x)
            t_old.append(time.perf_counter() - t)
        new, old = statistics.median(t_new), statistics.median(t_old)
        out.append({"n": n, "powerlaw_fit_ms": new * 1e3, "hill_median_ms": old * 1e3})
        print(f"  {n:5d} eigenvalues: powerlaw_fit {new * 1e3:8.3f} ms (best "
              f"{min(t_new) * 1e3:.3f}), hill_median {old * 1e3:.3f} ms, x{new / old:.0f}")
    return out


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--ww-worker":
        ww_worker(sys.argv[3:], sys.argv[2])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", default="/work/corpus")
    ap.add_argument("--ww-python", default="/work/wwvenv/bin/python",
                    help="interpreter with weightwatcher==0.7.7")
    ap.add_argument("--models", nargs="*", default=[],
                    help="more model folders (e.g. tests/data/trained/gpt2_tiny)")
    ap.add_argument("--tol", type=float, default=0.05)
    ap.add_argument("--limit", type=int, default=128, help="the audit's biopsy limit")
    ap.add_argument("--worst", type=int, default=10, help="largest disagreements listed")
    ap.add_argument("--sizes", type=int, nargs="+", default=[96, 384, 768, 1536, 4096])
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--timing-only", action="store_true")
    ap.add_argument("--json", help="write the per-matrix rows and timings here")
    args = ap.parse_args()
    rows = [] if args.timing_only else agreement(args)
    times = timing(args)
    if args.json:
        Path(args.json).write_text(json.dumps({"matrices": rows, "timing": times}, indent=1))


if __name__ == "__main__":
    main()
