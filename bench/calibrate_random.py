"""The measurement behind the random-weights bound of ``spectral-guard calibrate``.

For each population it prints, over the audited matrices (biopsy mode, limit 128), the range of
the Marchenko-Pastur statistics of :mod:`spectral_guard.calibration` (top edge ``e``, effective
rank relative to MP ``r``) and how many matrices are MP-like (``e <= 1.08`` and ``r >= 0.96``):

* random initializations of the example's char transformer (PyTorch defaults, N(0, 0.02^2),
  orthogonal) and of the teacher-task MLP;
* trained models: the bundled example, char transformers of other seeds and sizes, the MLP.

    python bench/calibrate_random.py [--steps 100]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

import spectral_guard
from spectral_guard.calibration import mp_statistics, random_check
from spectral_guard.random_init import MP_EDGE_MAX, MP_ERANK_MIN
from spectral_guard.thresholds import role_group

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import tiny_models  # noqa: E402


def _init(model: nn.Module, how: str) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2 and how == "normal":
                p.normal_(0.0, 0.02)
            elif p.ndim >= 2 and how == "orthogonal":
                nn.init.orthogonal_(p)
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()}


def populations(steps: int) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {}
    for how in ("default", "normal", "orthogonal"):
        torch.manual_seed(0)
        out[f"random charlm d96 ({how} init)"] = _init(tiny_models.CharLM(30, 96, 4, 384, 2,
                                                                          32), how)
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                        nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    out["random mlp (default init)"] = _init(mlp, "default")
    for seed, d, ffn in ((1, 64, 256), (2, 96, 384), (3, 64, 192), (4, 80, 320)):
        state, _loss, _u = tiny_models.train_char_lm(seed=seed, d=d, heads=4, ffn=ffn,
                                                     layers=2, ctx=32, steps=steps, batch=16,
                                                     lr=1e-2, n_words=30)
        out[f"trained charlm seed {seed} d{d} ({steps} steps)"] = state
    state, _acc = tiny_models.train_mlp(seed=0, steps=600)
    out["trained mlp (600 steps)"] = state
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"# MP-like: e <= {MP_EDGE_MAX} and r >= {MP_ERANK_MIN}; biopsy mode, limit 128")
    print(f"{'population':44} {'n':>3} {'e range':>13} {'r range':>13} {'MP-like':>8} "
          f"{'hidden e min':>12} {'hidden r max':>12}  verdict")
    with tempfile.TemporaryDirectory() as tmp:
        files = {"trained example (examples/tiny_model.safetensors)":
                 ROOT / "examples" / "tiny_model.safetensors"}
        for i, (label, state) in enumerate(populations(args.steps).items()):
            files[label] = Path(tmp) / f"{i}.safetensors"
            save_file(state, str(files[label]))
        for label, path in files.items():
            mats = spectral_guard.audit(path).matrices
            stats = [(m.name, *mp_statistics(m)) for m in mats if mp_statistics(m)]
            e = [s[1] for s in stats]
            r = [s[2] for s in stats]
            hidden = [s for s in stats if role_group(s[0]) in ("attention", "mlp")]
            check = random_check(mats)
            he = min(s[1] for s in hidden) if hidden else float("nan")
            hr = max(s[2] for s in hidden) if hidden else float("nan")
            verdict = "RANDOM" if check.looks_random else "trained"
            print(f"{label:44} {len(stats):>3} {min(e):>6.3f}..{max(e):<5.3f} "
                  f"{min(r):>6.3f}..{max(r):<5.3f} {check.mp_like:>4}/{check.judged:<3} "
                  f"{he:>12.3f} {hr:>12.3f}  {verdict}")


if __name__ == "__main__":
    main()
