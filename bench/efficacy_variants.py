"""Exploratory variants behind docs/efficacy.md's "what was tried": the same model, data, seeds
and recipe as ``bench/efficacy.py`` (its ``run``), with other ``instrument()`` arguments or an
extra post-step operation, under the LR shock and at one LR of the sweep.

    python bench/efficacy_variants.py                       # every variant, shock + lr 0.004
    python bench/efficacy_variants.py --variants t32,snclip2 --where shock
    python bench/efficacy_variants.py --steps 600 --variants floor50,no_backoff --where 0.064,shock
    python bench/efficacy_variants.py --model 4,128,4,64 --variants recipe,default --where shock

Variants (all start from ``guard_attn``: ``instrument(model, msign_every=0)``, unless noted):

* ``t32``, ``t24``, ``t16``: attention target ``32 / d`` (24, 16) instead of ``64 / d``;
* ``lam1``: ``attention_lambda=1.0``; ``ratio1``: ``ratio=1.0``; ``l2_attn``: ``actuator="l2"``;
* ``sign_attn``, ``sign_mlp``: the matrix sign every 10 steps of the attention projections
  only / the MLP layers only (``guard/msign.py``'s ``msign_``);
* ``snclip2``: after each step, every block Linear rescaled to ``sigma_max <= 2 sigma_max(W_0)``
  (a spectral-norm ceiling relative to initialization);
* ``quorum15``, ``quorum10``: ``instrument(model, lr_backoff=1.0)`` with ``alarm_quorum`` 0.15
  / 0.10 (the matrix sign's gate alone, as measured before the back-off existed);
* from ``instrument(model)`` (the defaults): ``no_backoff`` (``lr_backoff=1.0``), ``floor50``,
  ``floor12`` (``lr_floor`` 0.5 / 0.125), ``gentle`` (``lr_backoff=0.8``), ``sticky`` (after the
  first sign, every penalized layer every 10 steps), ``every5`` (``msign_every=5``),
  ``snclip2_default`` (the defaults plus ``snclip2``);
* ``count_sudden``: the defaults with ``lr_count="sudden"`` (the graded back-off counts only
  the layers the alarm's quorum counts: fallen suddenly or collapsed deep);
* ``backoff_only``: ``guard_attn`` plus a learning-rate back-off (0.5 per alarmed window of 10
  steps, floor 0.25) without the matrix sign.
* ``recipe``, ``default``, ``sigma_reparam``, ``qk_layernorm``: the benchmark's methods
  unchanged (references for ``--model``, another model than the benchmark's);
* ``per_quorum``: the defaults with the back-off set by how many quorums of layers are
  treated for collapse at an alarmed sign: ``s <- max(floor, min(s, 0.5 ** k))``,
  ``k = max(1, floor(f / alarm_quorum))``, instead of halving at every alarmed sign;
* ``fall0``: the defaults with ``alarm_fall_steps=0`` (the alarm's quorum counts every layer treated
  for collapse, however slowly it fell: the rule before ``guard/alarm.py``);
* ``fresh``, ``fresh25``: the defaults with the alarm's quorum counted on fresh readings
  (layers whose check in the last 10 steps, after the last sign, read collapsed) instead of
  layers still treated (``lambda > 0``, which decays over several healthy checks); ``fresh25``
  also backs off to 1/4 at once (``lr_backoff=0.25``).

Results are printed and appended to ``--out`` (JSON lines); nothing is cached.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

sys.path.insert(0, str(Path(__file__).resolve().parent))
import efficacy as E  # noqa: E402

from spectral_guard.guard.backoff import LRBackoff  # noqa: E402
from spectral_guard.guard.config import GuardConfig  # noqa: E402
from spectral_guard.guard.msign import msign_  # noqa: E402
from spectral_guard.guard.signs import collapse_treated  # noqa: E402

VARIANTS: dict[str, dict] = {
    "t32": {"kw": {"attention_max_scale": 32 / 96}},
    "t24": {"kw": {"attention_max_scale": 24 / 96}},
    "t16": {"kw": {"attention_max_scale": 16 / 96}},
    "lam1": {"kw": {"attention_lambda": 1.0}},
    "ratio1": {"kw": {"ratio": 1.0}},
    "l2_attn": {"kw": {"actuator": "l2"}},
    "sign_attn": {"post": ("sign", 10, r"\.attn\.")},
    "sign_mlp": {"post": ("sign", 10, r"\.(fc|proj)$")},
    "snclip2": {"post": ("snclip", 2.0, "")},
    "quorum15": {"method": "guard_default", "kw": {"alarm_quorum": 0.15, "lr_backoff": 1.0}},
    "quorum10": {"method": "guard_default", "kw": {"alarm_quorum": 0.10, "lr_backoff": 1.0}},
    "no_backoff": {"method": "guard_default", "kw": {"lr_backoff": 1.0}},
    "count_sudden": {"method": "guard_default", "kw": {"lr_count": "sudden"}},
    "floor50": {"method": "guard_default", "kw": {"lr_floor": 0.5}},
    "floor12": {"method": "guard_default", "kw": {"lr_floor": 0.125}},
    "gentle": {"method": "guard_default", "kw": {"lr_backoff": 0.8}},
    "backoff_only": {"lr_hook": (0.5, 0.25)},
    "sticky": {"method": "guard_default", "sticky": True},
    "every5": {"method": "guard_default", "kw": {"msign_every": 5}},
    "snclip2_default": {"method": "guard_default", "post": ("snclip", 2.0, "")},
    "recipe": {"method": "recipe"},
    "default": {"method": "guard_default"},
    "sigma_reparam": {"method": "sigma_reparam"},
    "qk_layernorm": {"method": "qk_layernorm"},
    "per_quorum": {"method": "guard_default", "per_quorum": True},
    "fall0": {"method": "guard_default", "kw": {"alarm_fall_steps": 0}},
    "fresh": {"method": "guard_default", "fresh_alarm": True},
    "fresh25": {"method": "guard_default", "fresh_alarm": True, "kw": {"lr_backoff": 0.25}},
}

_HANDLES: list = []


def _patch(variant: dict):
    """Wrap ``instrument`` in efficacy's namespace: extra arguments, and a post-step hook.
    Returns the unwrapped function, which the caller puts back after the run."""
    original = E.spectral_guard.instrument
    extra, post = variant.get("kw", {}), variant.get("post")

    def instrument(model, **kw):
        policies: dict = {}
        if variant.get("per_quorum"):
            policies["backoff"] = PerQuorumBackoff()
        if variant.get("fresh_alarm"):
            policies["alarm"] = FreshAlarm()
        guard = original(model, **{**kw, **extra}, **policies)
        if variant.get("per_quorum"):
            policies["backoff"].guard = guard
        if variant.get("sticky"):
            def stick(optimizer, args, kwargs):
                if any(layer.state.msigns for layer in guard.layers):
                    guard.config = replace(guard.config, msign_gate="always")
            _HANDLES.append(register_optimizer_step_post_hook(stick))
        if "lr_hook" in variant:
            _lr_hook(guard, *variant["lr_hook"])
        if post is None:
            return guard
        kind, value, pattern = post
        linears = E.block_linears(model)
        sigma0 = {n: float(torch.linalg.matrix_norm(E.weight_of(m).detach(), 2))
                  for n, m in linears.items()}
        clock = {"t": 0}

        @torch.no_grad()
        def hook(optimizer, args, kwargs):
            clock["t"] += 1
            for name, m in linears.items():
                W = E.weight_of(m)   # the stored Parameter (behind the guard's parametrization)
                if kind == "sign" and clock["t"] % value == 0 and re.search(pattern, name):
                    msign_(W)
                elif kind == "snclip":
                    s = torch.linalg.matrix_norm(W, 2)
                    W.mul_(torch.clamp(value * sigma0[name] / s, max=1.0))

        _HANDLES.append(register_optimizer_step_post_hook(hook))
        return guard

    E.spectral_guard.instrument = instrument
    return original


class PerQuorumBackoff(LRBackoff):
    """The guard's back-off (default factor and floor) with ``s <- max(floor, min(s,
    factor ** k))``, ``k = max(1, floor(f / quorum))``, ``f`` the fraction of penalized layers
    treated for collapse at this alarmed sign (``guard`` is set once instrumented)."""

    def __init__(self) -> None:
        config = GuardConfig()
        super().__init__(config.lr_backoff, config.lr_floor)
        self.guard = None

    def on_alarm(self) -> None:
        import math

        guard = self.guard
        treated, penalized = collapse_treated(guard.layers, guard.config, sudden=False)
        f = len(treated) / max(1, penalized)
        k = max(1, math.floor(f / guard.config.alarm_quorum + 1e-9))
        scaled = max(self.floor, min(self.scale, self.factor ** k))
        if scaled < self.scale:
            self.scale, self.backoffs = scaled, self.backoffs + 1


def fresh_collapses(guard, since: int) -> tuple[int, int]:
    """How many penalized layers were checked after step ``since`` and read collapsed
    (``judge``'s collapse trigger on their latest readings), and how many are penalized."""
    from spectral_guard.guard.check import judge

    penalized = [layer for layer in guard.layers if layer.sensors]
    fresh = sum(layer.state.last_checked_step > since
                and judge(layer.state.readings, layer.sensors, layer.rule, layer.min_dim,
                          guard.config.collapse_rule).triggered["collapse"]
                for layer in penalized)
    return fresh, len(penalized)


class FreshAlarm:
    """An alarm policy: the default alarm with the quorum counted on the readings taken in
    the last window and after the last sign (it remembers when the sign count last
    changed)."""

    def __init__(self) -> None:
        self.signs, self.at = 0, -1

    def __call__(self, guard) -> bool:
        factor = guard.config.alarm_attention_factor
        if guard.attention is not None and guard.attention.alarm(factor):
            return True
        signs = sum(layer.state.msigns for layer in guard.layers)
        if signs != self.signs:
            self.signs, self.at = signs, guard.global_step
        fresh, penalized = fresh_collapses(
            guard, max(self.at, guard.global_step - guard.config.msign_every))
        return penalized > 0 and fresh >= guard.config.alarm_quorum * penalized


def _lr_hook(guard, factor: float, floor: float) -> None:
    """The back-off without the matrix sign (``msign_every=0``, so the guard's own back-off
    never fires): the guard's ``LRBackoff`` around every step, backed off every 10 steps while
    the guard's alarm is raised."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    backoff = LRBackoff(factor, floor)

    def post(optimizer, args, kwargs):
        backoff.after_step()
        if guard.global_step % 10 == 0 and guard.signs.alarm(guard):
            backoff.on_alarm()

    _HANDLES.append(register_optimizer_step_pre_hook(
        lambda optimizer, args, kwargs: backoff.before_step(optimizer)))
    _HANDLES.append(register_optimizer_step_post_hook(post))


def _work(job: tuple[str, E.RunSpec]) -> dict:
    name, spec = job
    torch.set_num_threads(1)
    original = _patch(VARIANTS[name])
    try:
        r = E.run(spec)
    finally:
        E.spectral_guard.instrument = original   # pool workers run many jobs: never stack
        while _HANDLES:
            _HANDLES.pop().remove()
    return {"variant": name, "tag": spec.tag, "lr": spec.lr, "seed": spec.seed,
            "steps": spec.steps, "final": r["final"]}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--where", default="shock,0.004", help="'shock' and/or sweep LRs")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--shock-seeds", type=int, default=3)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--model", default="3,96,4,64",
                    help="layers,d,heads,context (another model than the benchmark's)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/efficacy_variants.jsonl"))
    args = ap.parse_args(argv)
    names = [v for v in args.variants.split(",") if v]
    bad = [v for v in names if v not in VARIANTS]
    if bad:
        raise SystemExit(f"unknown variant(s) {bad}; choose from {list(VARIANTS)}")
    model = E.ModelConfig(*(int(v) for v in args.model.split(",")))
    base = E.RunSpec("guard_attn", 0.016, 0, args.steps, 16, model)
    jobs = []
    for where in args.where.split(","):
        for name in names:
            spec = replace(base, method=VARIANTS[name].get("method", "guard_attn"))
            if where == "shock":
                jobs += [(name, replace(spec, seed=s, tag="shock", warmup=0.0))
                         for s in range(args.shock_seeds)]
            else:
                jobs += [(name, replace(spec, seed=s, lr=float(where), tag="sweep"))
                         for s in range(args.seeds)]
    import multiprocessing as mp
    args.out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results = []
    with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("fork")) as pool, \
            args.out.open("a") as fh:
        for r in pool.map(_work, jobs):
            fh.write(json.dumps(r) + "\n")
            results.append(r)
            print(f"[{time.perf_counter() - t0:5.0f}s] {r['variant']:>10} {r['tag']:>5} "
                  f"lr={r['lr']:g} seed={r['seed']} final={r['final']:.3f}", flush=True)
    print("\nvariant     where   mean final (seeds)")
    for name in names:
        for where in args.where.split(","):
            xs = [r["final"] for r in results if r["variant"] == name
                  and (r["tag"] == "shock" if where == "shock" else
                       r["tag"] == "sweep" and r["lr"] == float(where))]
            if xs:
                print(f"{name:>10} {where:>7}   {statistics.fmean(xs):.3f} ({len(xs)})")


if __name__ == "__main__":
    main()
