"""Does the alarm's fall rule depend on the run's length, the check period or the schedule?
(issue 18, item 2)

Two halves, so that the rules are cheap to compare:

1. ``record``: train ``bench/efficacy.py``'s byte-level GPT (its data and recipe: AdamW betas
   (0.9, 0.95), weight decay 0.1 on matrices, clipping at 1.0, linear warmup, then cosine decay
   to 10% of the peak or a constant LR) with the guard as a **pure observer**: every layer
   checked every step (``ratio=1.0, every=1``), no sign (``msign_every=0``), no back-off
   (``lr_backoff=1.0``), no penalty (``lambda_base=0``) and no attention guard, so the weights
   follow the recipe exactly and the trajectory does not depend on the check period replayed
   later. Per step and layer it stores the guard's own effective-rank retention (the reading the
   thermostat reads, ``layer.state.readings`` after the guard applied the check), the verdict's
   collapse trigger and severity (``check.judge`` on those readings, as the cycle calls it), and
   the layer's relative movement ``||W_s - W_{s-p}||_F / ||W_{s-p}||_F`` for ``p`` in ``--lags``
   on the whole weight and on the guard's biopsy of it; plus the applied LR and training loss.
   One ``.npz`` per run in ``--cache`` (outside the repository).
2. ``replay``: for each recorded run, each check period ``P`` and every phase ``0..P-1``, keep
   only the readings a layer checked every ``P`` steps would get, run the thermostat
   (``thermostat.update_lambda``: treated for collapse while ``lambda_collapse > 0``) and a
   rule of the alarm's quorum on them (:func:`counts`: ``depth``, the depth count of
   ``guard/alarm.py``; ``fall``, its fall in steps; ``either``, the two together, the guard's
   law; ``fallP``, a fall window of at least one check period), and print per run and rule in
   how many phases the quorum half of the alarm fired and its first steps; ``--falls`` also
   measures each treated layer's fall in steps, in relative movement and in learning rate.

    python bench/alarm_scale.py record --steps 300 --lr-x 1,4,16 --warmup 0,0.1,0.3
    python bench/alarm_scale.py replay --periods 1,10,50 --rules depth:0.15,either:0.15,fall:60
    python bench/alarm_scale.py replay --markdown        # one table row per run

Measured (docs/efficacy.md, "Issue 18, item 2"): 31 runs, 300 to 5000 steps.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import efficacy as E  # noqa: E402

import spectral_guard  # noqa: E402
from spectral_guard.guard import alarm as A  # noqa: E402
from spectral_guard.guard.check import Readings, judge  # noqa: E402
from spectral_guard.guard.config import GuardConfig  # noqa: E402
from spectral_guard.guard.thermostat import update_lambda  # noqa: E402

CACHE = Path("/work/alarm_traces")
TUNED_LR = 4e-3
OBSERVER = {"ratio": 1.0, "every": 1, "msign_every": 0, "lr_backoff": 1.0,
            "lambda_base": 0.0, "attention": False}


@dataclass(frozen=True)
class Spec:
    steps: int
    lr_x: float            # multiple of the tuned LR
    warmup: float          # fraction of the run
    schedule: str          # "cosine" (to 10% of the peak) or "constant"
    seed: int
    model: tuple[int, int, int, int] = (3, 96, 4, 64)
    batch: int = 16

    @property
    def name(self) -> str:
        m = "x".join(str(v) for v in self.model)
        return (f"n{self.steps}_{self.schedule}_w{round(self.warmup * 100)}_x{self.lr_x:g}"
                f"_s{self.seed}_m{m}")


def lr_at(step: int, spec: Spec, peak: float) -> float:
    warm = int(spec.warmup * spec.steps)
    if step < warm:
        return peak * (step + 1) / warm
    if spec.schedule == "constant":
        return peak
    frac = (step - warm) / max(1, spec.steps - warm)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def record(spec: Spec, lags: tuple[int, ...], cache: Path) -> Path:
    """Train one run with the guard observing (module docstring); write its trace."""
    out = cache / f"{spec.name}.npz"
    if out.exists():
        return out
    torch.set_num_threads(1)
    torch.manual_seed(spec.seed)
    cfg = E.ModelConfig(*spec.model)
    model = E.GPT(cfg)
    train, val = E.corpus_split()
    gen = torch.Generator().manual_seed(10_000 + spec.seed)
    guard = spectral_guard.instrument(model, **OBSERVER)
    layers = guard.layers
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    peak = TUNED_LR * spec.lr_x
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": other, "weight_decay": 0.0}], lr=peak, betas=(0.9, 0.95))
    T, L = spec.steps, len(layers)
    ret = np.full((T + 1, L), np.nan)
    trig = np.zeros((T + 1, L), dtype=bool)
    sev = np.zeros((T + 1, L))
    move = {p: np.full((T + 1, L), np.nan) for p in lags}
    move_b = {p: np.full((T + 1, L), np.nan) for p in lags}
    lrs, losses = np.zeros(T + 1), np.full(T + 1, np.nan)
    past: deque[list[torch.Tensor]] = deque(maxlen=max(lags) + 1)
    past.append([layer.weight.detach().clone() for layer in layers])
    t0 = time.perf_counter()
    for step in range(T):
        lr = lr_at(step, spec, peak)
        for g in opt.param_groups:
            g["lr"] = lr
        starts = torch.randint(0, len(train) - cfg.seq - 1, (spec.batch,), generator=gen)
        x, y = E.windows(train, starts, cfg.seq)
        out_ = model(x, y)
        loss = out_["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()                  # the guard's clock: step + 1; applies the check of step
        opt.zero_grad(set_to_none=True)
        k = step + 1                # W after k updates
        lrs[k], losses[k] = lr, float(out_["ce"])
        for i, layer in enumerate(layers):
            st = layer.state
            s = st.last_checked_step
            if 0 <= s <= T and math.isfinite(st.readings.effective_rank_retention):
                ret[s, i] = st.readings.effective_rank_retention
                v = judge(st.readings, layer.sensors, layer.rule, layer.min_dim,
                          guard.config.collapse_rule)
                trig[s, i], sev[s, i] = v.triggered["collapse"], v.severity["collapse"]
        now = [layer.weight.detach().clone() for layer in layers]
        past.append(now)
        with torch.no_grad():
            for p in lags:
                if len(past) <= p:
                    continue
                then = past[-1 - p]
                for i, layer in enumerate(layers):
                    move[p][k, i] = float((now[i] - then[i]).norm() / then[i].norm())
                    bn, bt = layer.probe.biopsy(now[i]), layer.probe.biopsy(then[i])
                    move_b[p][k, i] = float((bn - bt).norm() / bt.norm())
        if not math.isfinite(losses[k]):
            break
    guard.step()   # apply the last check (measured after the last update)
    for i, layer in enumerate(layers):
        st = layer.state
        if st.last_checked_step == T:
            ret[T, i] = st.readings.effective_rank_retention
    wall = time.perf_counter() - t0
    spec_e = E.RunSpec("recipe", peak, spec.seed, spec.steps, spec.batch, cfg)
    final = E.evaluate(model, val, spec_e) if math.isfinite(losses[T]) else math.nan
    penalized = np.array([layer.penalized for layer in layers])
    names = np.array([layer.name for layer in layers])
    guard.remove()
    cache.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, ret=ret, trig=trig, sev=sev, lrs=lrs, losses=losses,
                        penalized=penalized, names=names,
                        meta=json.dumps({**spec.__dict__, "final": final, "wall": wall,
                                         "lags": list(lags)}),
                        **{f"move{p}": move[p] for p in lags},
                        **{f"moveb{p}": move_b[p] for p in lags})
    print(f"{spec.name}: final val {final:.4f}, {wall:.0f} s", flush=True)
    return out


# ----------------------------------------------------------------------------------------------
# Replay

FALL_DEPTH, FALL_STEPS = 0.3, 60
"""The fall of the former rule (0.3 of retention within ``alarm_fall_steps=60`` steps), replayed
here for the comparison."""


def load(path: Path) -> dict:
    z = np.load(path, allow_pickle=False)
    d = {k: z[k] for k in z.files}
    d["meta"] = json.loads(str(d["meta"]))
    return d


def layer_sensors(meta: dict) -> list[dict[str, float]]:
    """The guard's ``{sensor: floor}`` of each layer of the run's model (instrumented, not
    trained: the thresholds do not depend on the weights)."""
    torch.manual_seed(0)
    model = E.GPT(E.ModelConfig(*meta["model"]))
    guard = spectral_guard.instrument(model, **OBSERVER)
    sensors = [dict(layer.sensors) for layer in guard.layers]
    guard.remove()
    return sensors


def treated_series(trig: np.ndarray, sev: np.ndarray, checks: list[int],
                   config: GuardConfig) -> list[bool]:
    """``lambda_collapse > 0`` after each check of ``checks`` (the thermostat's law, base 1)."""
    lam, out = 0.0, []
    for s in checks:
        lam = update_lambda(lam, bool(trig[s]), float(sev[s]), 1.0, config.gain, config.decay,
                            config.lambda_floor)
        out.append(lam > 0)
    return out


def counts(run: dict, rule: str, const: float, period: int, phase: int,
           config: GuardConfig) -> np.ndarray:
    """Per step, how many penalized layers count toward the quorum under ``rule`` when each
    layer is checked every ``period`` steps from ``phase`` (the baseline reading of step 0
    always; a layer's count holds until its next check):

    * ``depth``: treated for collapse and ``alarm.collapsed_deep(alarm.collapse_depth(...),
      const)`` on the latest reading (the law);
    * ``fall``: treated, and at some check of this treatment it had lost ``FALL_DEPTH`` of
      retention within ``const`` steps (the former rule, ``alarm_fall_steps=const``);
    * ``fallP``: the same within ``max(const, period)`` steps (a fall between two checks
      always counts);
    * ``either``: ``fall`` within :data:`FALL_STEPS` steps or ``depth`` at ``const``."""
    ret, trig, sev = run["ret"], run["trig"], run["sev"]
    T, L = ret.shape[0] - 1, ret.shape[1]
    checks = sorted({0, *range(phase, T + 1, period)})
    out = np.zeros(T + 1, dtype=int)
    for i in range(L):
        if not run["penalized"][i]:
            continue
        treated = treated_series(trig[:, i], sev[:, i], checks, config)
        window = {"fall": const, "fallP": max(const, period)}.get(rule, FALL_STEPS)
        seen: list[tuple[int, float]] = []
        fell, counting = False, np.zeros(T + 1, dtype=bool)
        for k, s in enumerate(checks):
            r = float(ret[s, i])
            deep = A.collapsed_deep(
                A.collapse_depth(Readings(effective_rank_retention=r), run["sensors"][i]), const)
            if not treated[k]:
                fell = False
            elif not fell and math.isfinite(r):
                above = [a for a, x in seen if x >= r + FALL_DEPTH]
                fell = bool(above) and s - max(above) <= window
            now = treated[k] and {"depth": deep, "either": deep or fell}.get(rule, fell)
            if math.isfinite(r):
                seen.append((s, r))
            end = checks[k + 1] if k + 1 < len(checks) else T + 1
            counting[s + 1:end + 1] = now      # applied one step later, held to the next
        out += counting
    return out


def first_alarm(run: dict, rule: str, const: float, period: int, phase: int,
                config: GuardConfig) -> int:
    """First step at which the quorum half of the alarm is raised (``-1``: never)."""
    penalized = int(run["penalized"].sum())
    hits = np.nonzero(counts(run, rule, const, period, phase, config)
                      >= max(1e-9, config.alarm_quorum * penalized))[0]
    return int(hits[0]) if len(hits) else -1


def quorum_low(run: dict, config: GuardConfig) -> float:
    """The lowest retention, over the run, that a quorum of penalized layers read at once (every
    step checked): the quorum-th lowest layer's, minimized over the steps."""
    ret = run["ret"][:, run["penalized"]]
    q = math.ceil(config.alarm_quorum * ret.shape[1] - 1e-9)
    return float(np.sort(np.where(np.isnan(ret), np.inf, ret), axis=1)[:, q - 1].min())


def fall_table(run: dict, config: GuardConfig) -> list[str]:
    """Each penalized layer's first treatment at a check every step: its fall of
    ``FALL_DEPTH`` measured in steps, in the layer's relative movement (the sum of the
    per-step ``||W_s - W_{s-1}|| / ||W_{s-1}||`` over the fall) and in the learning rate applied
    (``sum lr / tuned LR``)."""
    ret, T = run["ret"], run["ret"].shape[0] - 1
    rows = []
    for i in range(ret.shape[1]):
        treated = treated_series(run["trig"][:, i], run["sev"][:, i], list(range(T + 1)),
                                 config)
        if not run["penalized"][i] or not any(treated):
            continue
        s = treated.index(True)
        above = [a for a in range(s) if ret[a, i] >= ret[s, i] + FALL_DEPTH]
        if not above:
            rows.append(f"{i}@{s}: no fall")
            continue
        a = max(above)
        move = float(np.nansum(run["move1"][a + 1:s + 1, i]))
        lr = float(run["lrs"][a + 1:s + 1].sum() / TUNED_LR)
        rows.append(f"{i}@{s}: {s - a} st, {move:.1f} mv, {lr:.0f} lr")
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    rec = sub.add_parser("record")
    rec.add_argument("--steps", default="300")
    rec.add_argument("--lr-x", default="1,4,16")
    rec.add_argument("--warmup", default="0,0.1,0.3")
    rec.add_argument("--schedule", default="cosine")
    rec.add_argument("--seeds", default="0")
    rec.add_argument("--model", default="3,96,4,64")
    rec.add_argument("--batch", type=int, default=16)
    rec.add_argument("--lags", default="1,10,50")
    rec.add_argument("--cache", type=Path, default=CACHE)
    rep = sub.add_parser("replay")
    rep.add_argument("--periods", default="1,10,50")
    rep.add_argument("--rules", default="depth:0.15,fall:60",
                     help="rule:constant,... (depth, fall, fallP: see counts())")
    rep.add_argument("--max-phases", type=int, default=50,
                     help="phases per period (evenly spaced when the period has more)")
    rep.add_argument("--cache", type=Path, default=CACHE)
    rep.add_argument("--only", default="", help="substring of the run names to replay")
    rep.add_argument("--falls", action="store_true",
                     help="also each treated layer's fall in steps, movement and LR")
    rep.add_argument("--markdown", action="store_true", help="one table row per run")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.cmd == "record":
        model = tuple(int(v) for v in args.model.split(","))
        lags = tuple(int(v) for v in args.lags.split(","))
        for steps in args.steps.split(","):
            for sched in args.schedule.split(","):
                for w in args.warmup.split(","):
                    for x in args.lr_x.split(","):
                        for seed in args.seeds.split(","):
                            record(Spec(int(steps), float(x), float(w), sched, int(seed), model,
                                        args.batch), lags, args.cache)
        return
    config = GuardConfig()
    periods = [int(p) for p in args.periods.split(",")]
    rules = [(r.split(":")[0], float(r.split(":")[1])) for r in args.rules.split(",")]
    sensors: dict[tuple, list] = {}
    printed = False
    for path in sorted(args.cache.glob("*.npz")):
        if args.only not in path.name:
            continue
        run = load(path)
        key = tuple(run["meta"]["model"])
        run["sensors"] = sensors.setdefault(key, layer_sensors(run["meta"]))
        cells = []
        for rule, const in rules:
            for P in periods:
                step = max(1, P // args.max_phases)
                firsts = [first_alarm(run, rule, const, P, ph, config)
                          for ph in range(0, P, step)]
                hit = [f for f in firsts if f >= 0]
                cells.append((f"{rule} {const:g} @{P}", f"{len(hit)}/{len(firsts)}"
                              + (f" at {min(hit)}-{max(hit)}" if hit else "")))
        m = run["meta"]
        if args.markdown:
            if not printed:
                print("| run | final val | quorum's lowest retention | "
                      + " | ".join(c[0] for c in cells) + " |")
                print("|---" * (len(cells) + 3) + "|")
                printed = True
            print(f"| {m['steps']} {m['schedule']}, warmup {m['warmup']:.0%}, {m['lr_x']:g}x, "
                  f"seed {m['seed']}, model {','.join(map(str, m['model']))} "
                  f"| {m['final']:.3f} | {quorum_low(run, config):.3f} | "
                  + " | ".join(c[1] for c in cells) + " |", flush=True)
        else:
            print(f"{path.stem:34s} {m['final']:.3f} | "
                  + " | ".join(f"{a}: {b}" for a, b in cells), flush=True)
        if args.falls:
            print("    " + "; ".join(fall_table(run, config)), flush=True)


if __name__ == "__main__":
    main()
