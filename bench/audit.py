"""Speed and memory of ``spectral-guard audit`` on a TinyLlama-1.1B-shaped bf16 checkpoint.

Writes a sharded checkpoint with random weights (22 blocks, d=2048, ffn 5632, GQA k/v
256 x 2048, vocab 32000, untied lm_head: 156 matrices, ~2.2 GB) to a temp dir, then times in
one process:

1. ``plain``     reading every tensor once: ``safe_open(...).get_tensor(name).clone()`` (the
   floor: ``get_tensor`` alone returns a lazy view of the file mapping and reads nothing);
2. ``biopsy``    ``audit(mode="biopsy")`` on the whole checkpoint;
3. ``exact``     ``audit(mode="exact")``;
4. ``reference`` a naive loop: load each matrix, ``torch.linalg.svdvals`` in float32,
   ``SR = sum s^2 / s_1^2``, ``kappa = s_1 / s_k``.

``plain`` and ``biopsy`` are repeated ``--repeat`` times, interleaved (the machine may be
shared); the ratio uses the median of each (the best of each is printed too). ``exact`` and
``reference`` run on ``--layers K`` blocks plus the embedding and the head, alternating tensor
by tensor so both see the same load; per-tensor times are measured and the 22-block totals are
extrapolated as ``t(embed) + t(head) + 22 / K * t(K blocks)`` (exact when K = 22).
The peak RSS of a biopsy audit is measured in a fresh child process (its own ``VmHWM``).
``--fresh N`` also times N plain/biopsy pairs, each in its own fresh process (the plain read's
cost depends on the allocator state the process is in).
The last line prints the ratios against the goals.

``--pytorch`` (on by default; ``--no-pytorch`` skips it) also writes the same tensors as a
sharded PyTorch checkpoint (``torch.save`` shards ``pytorch_model-0000i-of-0000n.bin`` plus
``pytorch_model.bin.index.json``, what Hugging Face wrote before safetensors) and times, in the
same run and interleaved: a plain read of each format (``.bin``: ``torch.load(weights_only=True,
mmap=True)`` then ``clone()`` of every tensor), the biopsy audit of each format, and the peak
RSS of a biopsy audit of each in a fresh child; then prints the ``.bin`` / safetensors ratios.
A full ``torch.load`` without ``mmap`` (what most scripts do) is timed once with its peak RSS,
for scale.

    python bench/audit.py [--layers 4] [--repeat 2] [--dir DIR [--keep]] [--no-pytorch]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

BLOCKS, D, FFN, KV, VOCAB = 22, 2048, 5632, 256, 32000


def tinyllama_shapes() -> list[tuple[str, tuple[int, ...]]]:
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (VOCAB, D))]
    for i in range(BLOCKS):
        p = f"model.layers.{i}."
        out += [(p + "self_attn.q_proj.weight", (D, D)), (p + "self_attn.k_proj.weight", (KV, D)),
                (p + "self_attn.v_proj.weight", (KV, D)), (p + "self_attn.o_proj.weight", (D, D)),
                (p + "mlp.gate_proj.weight", (FFN, D)), (p + "mlp.up_proj.weight", (FFN, D)),
                (p + "mlp.down_proj.weight", (D, FFN)), (p + "input_layernorm.weight", (D,)),
                (p + "post_attention_layernorm.weight", (D,))]
    out += [("model.norm.weight", (D,)), ("lm_head.weight", (VOCAB, D))]
    return out


def write_checkpoint(folder: Path, shard_bytes: int, seed: int = 0) -> int:
    """Random bf16 weights (N(0, 0.02^2); norms ones) in HF shards + index; returns bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, shape in tinyllama_shapes():
        t = (torch.ones(shape) if len(shape) == 1
             else torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
        if size + t.numel() * 2 > shard_bytes and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += t.numel() * 2
    n = len(shards)
    weight_map, total = {}, 0
    for i, part in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file(part, str(folder / fname))
        weight_map.update(dict.fromkeys(part, fname))
        total += sum(t.numel() * 2 for t in part.values())
        part.clear()
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total


def shard_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("model-*.safetensors"))


def bin_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("pytorch_model-*.bin"))


def write_bin_copy(folder: Path, out: Path) -> int:
    """The safetensors shards' tensors re-saved with ``torch.save`` (one shard at a time) plus
    a ``pytorch_model.bin.index.json``; returns the bytes written."""
    out.mkdir(parents=True, exist_ok=True)
    shards = shard_files(folder)
    weight_map = {}
    for i, path in enumerate(shards):
        fname = f"pytorch_model-{i + 1:05d}-of-{len(shards):05d}.bin"
        part = load_file(str(path))
        torch.save(part, out / fname)
        weight_map.update(dict.fromkeys(part, fname))
        del part
    (out / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return sum(p.stat().st_size for p in bin_files(out))


def plain_read_bin(folder: Path, mmap: bool = True) -> float:
    """Every tensor of the ``.bin`` shards read once (``clone()`` of the mapped tensors)."""
    t0 = time.perf_counter()
    for path in bin_files(folder):
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        for t in state.values():
            c = t.clone() if mmap else t
            del c
        del state
    return time.perf_counter() - t0


def plain_read(folder: Path) -> float:
    t0 = time.perf_counter()
    for path in shard_files(folder):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                # get_tensor returns a lazy view of the mapping: clone() reads every byte
                t = f.get_tensor(name).clone()
                del t
    return time.perf_counter() - t0


def reference(folder: Path, names: set[str]) -> tuple[dict[str, tuple[float, float]],
                                                      dict[str, float]]:
    """Naive full-SVD loop; returns ({name: (SR, kappa)}, {name: seconds})."""
    out, secs = {}, {}
    for path in shard_files(folder):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                if name not in names:
                    continue
                t0 = time.perf_counter()
                s = torch.linalg.svdvals(f.get_tensor(name).to(torch.float32)).to(torch.float64)
                out[name] = (float((s**2).sum() / s[0] ** 2), float(s[0] / s[-1]))
                secs[name] = time.perf_counter() - t0
    return out, secs


def timed_audit(folder: Path, mode: str, include: list[str]) -> tuple[object, dict[str, float]]:
    """Run the audit; per-tensor seconds from the progress callback's timestamps."""
    from spectral_guard.audit import audit

    secs: dict[str, float] = {}
    last = [time.perf_counter()]

    def progress(done: int, total: int, name: str) -> None:
        now = time.perf_counter()
        secs[name] = now - last[0]
        last[0] = now

    report = audit(folder, mode=mode, include=include, progress=progress)
    return report, secs


def extrapolate(secs: dict[str, float], layers: int) -> float:
    block = sum(v for k, v in secs.items() if k.startswith("model.layers."))
    other = sum(v for k, v in secs.items() if not k.startswith("model.layers."))
    return other + block * BLOCKS / layers


def peak_rss_biopsy(folder: Path, statement: str = "") -> tuple[float, float]:
    """(seconds, peak RSS in bytes) of a biopsy audit (or ``statement``, with ``folder`` in
    ``sys.argv[1]``) in a fresh child process."""
    # The child reports its own VmHWM (the high-water mark of its address space since exec).
    # ru_maxrss is not used: it also counts the parent's pages the child shared between fork
    # and exec, so a parent that just generated the checkpoint reported ~3.4 GB.
    code = ("import sys; from spectral_guard.audit import audit; "
            + (statement or "audit(sys.argv[1], mode='biopsy')") + "; "
            "print([ln.split()[1] for ln in open('/proc/self/status') "
            "if ln.startswith('VmHWM:')][0])")
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code, str(folder)], check=True,
                         capture_output=True, text=True).stdout
    dt = time.perf_counter() - t0
    return dt, float(out.split()[-1]) * 1024.0


def fresh_process_times(folder: Path, pairs: int) -> tuple[list[float], list[float]]:
    """Plain read and biopsy audit, each timed in its own fresh process, alternating.

    Each child times its second call (the first pays one-off costs: torch start-up and the
    allocator's first large allocations), so neither arm inherits the other's allocator state.
    """
    code = ("import sys, time; from pathlib import Path; sys.path.insert(0, sys.argv[3]); "
            "import audit as b; arm, folder = sys.argv[1], Path(sys.argv[2]); "
            "run = (lambda: b.plain_read(folder)) if arm == 'plain' else "
            "(lambda: b.timed_audit(folder, 'biopsy', [])); run(); "
            "t0 = time.perf_counter(); run(); print(time.perf_counter() - t0)")
    times: dict[str, list[float]] = {"plain": [], "biopsy": []}
    for _ in range(pairs):
        for arm in ("plain", "biopsy"):
            out = subprocess.run([sys.executable, "-c", code, arm, str(folder),
                                  str(Path(__file__).parent)],
                                 check=True, capture_output=True, text=True).stdout
            times[arm].append(float(out.split()[-1]))
    return times["plain"], times["biopsy"]


def pytorch_section(folder: Path, root: Path, keep: bool, repeat: int) -> None:
    """The ``.bin`` path against the safetensors path, measured side by side."""
    bin_dir = root / "tinyllama-shaped-bin"
    t0 = time.perf_counter()
    if keep and (bin_dir / "pytorch_model.bin.index.json").exists():
        size = sum(p.stat().st_size for p in bin_files(bin_dir))
        print(f"reusing {bin_dir} ({size / 1e9:.2f} GB)")
    else:
        size = write_bin_copy(folder, bin_dir)
        print(f"wrote {len(bin_files(bin_dir))} torch.save shards, {size / 1e9:.2f} GB in "
              f"{time.perf_counter() - t0:.1f} s: {bin_dir}")
    rss = {}
    for label, where in (("safetensors", folder), ("bin", bin_dir)):
        secs, rss[label] = peak_rss_biopsy(where)
        print(f"biopsy audit of {label:11s} in a child process: {secs:.2f} s (incl. start-up), "
              f"peak RSS {rss[label] / 1e9:.3f} GB")
    secs, rss_full = peak_rss_biopsy(
        bin_dir, "import torch, glob; [torch.load(p, weights_only=True) for p in "
        "sorted(glob.glob(sys.argv[1] + '/pytorch_model-*.bin'))]")
    print(f"plain torch.load without mmap, in a child process: {secs:.2f} s (incl. start-up), "
          f"peak RSS {rss_full / 1e9:.3f} GB")
    times: dict[str, list[float]] = {"plain st": [], "plain bin": [], "audit st": [],
                                      "audit bin": []}
    report = None
    for _ in range(max(1, repeat)):
        times["plain st"].append(plain_read(folder))
        times["plain bin"].append(plain_read_bin(bin_dir))
        t0 = time.perf_counter()
        timed_audit(folder, "biopsy", [])
        times["audit st"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        report, _ = timed_audit(bin_dir, "biopsy", [])
        times["audit bin"].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    for k, v in times.items():
        print(f"{k:10s}: {', '.join(f'{t:.2f}' for t in v)} s -> median {med[k]:.2f} s, "
              f"best {best[k]:.2f} s")
    print(f".bin audit: {len(report.matrices)} matrices, status "
          f"{dict((k, v) for k, v in report.status_counts().items() if v)}")
    print(f"ratios (.bin / safetensors, medians, one run): biopsy audit "
          f"{med['audit bin'] / med['audit st']:.2f} | plain read "
          f"{med['plain bin'] / med['plain st']:.2f} | audit/plain: safetensors "
          f"{med['audit st'] / med['plain st']:.2f}, .bin {med['audit bin'] / med['plain bin']:.2f}"
          f" | peak RSS {rss['bin'] / 1e9:.2f} vs {rss['safetensors'] / 1e9:.2f} GB "
          f"(torch.load without mmap: {rss_full / 1e9:.2f} GB)")
    print("load average at the end: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    print(f"ratios of the best times: biopsy audit {best['audit bin'] / best['audit st']:.2f} | "
          f"plain read {best['plain bin'] / best['plain st']:.2f} | audit/plain: safetensors "
          f"{best['audit st'] / best['plain st']:.2f}, .bin "
          f"{best['audit bin'] / best['plain bin']:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4,
                    help="blocks timed for exact and reference (1..22, default 4)")
    ap.add_argument("--repeat", type=int, default=2,
                    help="plain/biopsy repetitions, interleaved (median used)")
    ap.add_argument("--fresh", type=int, default=3,
                    help="plain/biopsy pairs timed in fresh processes (0: skip)")
    ap.add_argument("--shard-mb", type=int, default=1000, help="shard size in MB (default 1000)")
    ap.add_argument("--dir", type=Path, default=None, help="where to write (default: temp)")
    ap.add_argument("--keep", action="store_true",
                    help="keep the checkpoint (and reuse one already in --dir)")
    ap.add_argument("--pytorch", action=argparse.BooleanOptionalAction, default=True,
                    help="also time the PyTorch .bin path side by side (default on)")
    ap.add_argument("--only-pytorch", action="store_true",
                    help="run only the .bin vs safetensors comparison")
    args = ap.parse_args()
    layers = max(1, min(BLOCKS, args.layers))
    root = args.dir or Path(tempfile.mkdtemp(prefix="sg-bench-audit-"))
    folder = root / "tinyllama-shaped"
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, load average "
          + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    try:
        t0 = time.perf_counter()
        if args.keep and (folder / "model.safetensors.index.json").exists():
            total = sum(p.stat().st_size for p in shard_files(folder))
            print(f"reusing {folder} ({total / 1e9:.2f} GB)")
        else:
            total = write_checkpoint(folder, args.shard_mb * 1_000_000)
            print(f"wrote {len(shard_files(folder))} shards, {total / 1e9:.2f} GB of bf16 "
                  f"in {time.perf_counter() - t0:.1f} s: {folder}")

        if args.pytorch or args.only_pytorch:
            pytorch_section(folder, root, args.keep, args.repeat)
            if args.only_pytorch:
                return

        rss_secs, rss = peak_rss_biopsy(folder)
        print(f"biopsy audit in a child process: {rss_secs:.2f} s (incl. start-up), "
              f"peak RSS {rss / 1e9:.3f} GB")

        plain_t, biopsy_t, report = [], [], None
        for _ in range(max(1, args.repeat)):
            plain_t.append(plain_read(folder))
            t0 = time.perf_counter()
            report, _ = timed_audit(folder, "biopsy", [])
            biopsy_t.append(time.perf_counter() - t0)
        plain, biopsy = statistics.median(plain_t), statistics.median(biopsy_t)
        print(f"plain read   : {', '.join(f'{t:.2f}' for t in plain_t)} s -> median {plain:.2f} s "
              f"({total / plain / 1e9:.2f} GB/s), best {min(plain_t):.2f} s")
        print(f"biopsy audit : {', '.join(f'{t:.2f}' for t in biopsy_t)} s -> median {biopsy:.2f} "
              f"s, best {min(biopsy_t):.2f} s (best/best {min(biopsy_t) / min(plain_t):.2f})"
              f", {len(report.matrices)} matrices, {len(report.skipped)} skipped, "
              f"status {dict((k, v) for k, v in report.status_counts().items() if v)}")

        if args.fresh > 0:
            fp, fb = fresh_process_times(folder, args.fresh)
            print(f"fresh processes: plain {', '.join(f'{t:.2f}' for t in fp)} s, biopsy "
                  f"{', '.join(f'{t:.2f}' for t in fb)} s -> ratio of medians "
                  f"{statistics.median(fb) / statistics.median(fp):.2f}")

        # exact audit and reference alternate tensor by tensor, so that both see the same
        # machine load (a shared machine can slow a multi-threaded SVD by 10x for minutes)
        names = [n for n, shape in tinyllama_shapes() if len(shape) == 2 and (
            not n.startswith("model.layers.") or int(n.split(".")[2]) < layers)]
        exact_matrices, exact_secs, ref, ref_secs = [], {}, {}, {}
        for name in names:
            rep, secs = timed_audit(folder, "exact", ["^" + re.escape(name) + "$"])
            exact_matrices += rep.matrices
            exact_secs.update(secs)
            r, rs = reference(folder, {name})
            ref.update(r)
            ref_secs.update(rs)
        exact_total = extrapolate(exact_secs, layers)
        ref_total = extrapolate(ref_secs, layers)
        scope = "all 22 blocks" if layers == BLOCKS else \
            f"{layers} blocks + embed + head, extrapolated to 22 blocks"
        print(f"exact audit  : {sum(exact_secs.values()):.1f} s on {len(exact_matrices)} matrices; "
              f"{exact_total:.1f} s for the model ({scope})")
        print(f"reference    : {sum(ref_secs.values()):.1f} s on {len(ref)} matrices; "
              f"{ref_total:.1f} s for the model ({scope})")
        for label, secs in (("exact", exact_secs), ("reference", ref_secs)):
            by_shape: dict[str, list[float]] = {}
            shapes = dict(tinyllama_shapes())
            for name, sec in secs.items():
                by_shape.setdefault("x".join(map(str, shapes[name])), []).append(sec)
            print(f"  {label:9s} seconds per matrix: " + ", ".join(
                f"{k}: {min(v):.2f}-{max(v):.2f}" for k, v in sorted(by_shape.items())))
        err_sr = err_k = 0.0
        for m in exact_matrices:
            sr, kappa = ref[m.tensor]
            err_sr = max(err_sr, abs(m.stable_rank - sr) / sr)
            k = m.condition_number if m.condition_number is not None else math.inf
            err_k = max(err_k, abs(k - kappa) / kappa)
        print(f"exact vs reference: max relative error SR {err_sr:.2e}, kappa {err_k:.2e} "
              f"over {len(exact_matrices)} matrices")
        ok = (biopsy / plain <= 1.5, ref_total / biopsy >= 50, rss <= 1.5e9,
              max(err_sr, err_k) <= 1e-4)
        print(f"ratios: biopsy/plain {biopsy / plain:.2f} (medians; goal <= 1.5) | "
              f"reference/biopsy {ref_total / biopsy:.0f}x (goal >= 50) | biopsy peak RSS "
              f"{rss / 1e9:.2f} GB "
              f"(goal <= 1.5) | exact vs reference rel err {max(err_sr, err_k):.1e} "
              f"(goal <= 1e-4) | goals met: {sum(ok)}/4")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
