"""What the defaults' alarm sees, window by window, in one run of ``bench/efficacy.py``'s model.

At the end of every ``msign_every``-step window of a ``guard_default`` run (after the guard's own
step, so after any sign of that step) it prints:

* ``treated``: the fraction of penalized layers treated for collapse (``lambda_collapse > 0``),
  the quorum half of the alarm before its fall rule (``signs.collapse_treated``); the
  thermostat lets ``lambda`` decay over several healthy checks, so this is a latched signal;
* ``fresh``: the fraction of penalized layers whose latest check fell inside the window and read
  collapsed (``judge(...).triggered["collapse"]``): collapse as it is measured now;
* ``q25``: the lower quartile over penalized layers of the latest effective-rank retention
  (``erank / erank`` at instrumenting);
* ``attn``: the largest attention pair's scale over its target (the alarm's other half fires
  over ``alarm_attention_factor``, 2.0);
* ``signs``: matrix signs applied so far; ``lr_scale``: the back-off's scale.

    python bench/alarm_timeline.py                       # 4x and 16x the standard LR, seed 0
    python bench/alarm_timeline.py --lrs 0.064 --seeds 0,1 --steps 300
    python bench/alarm_timeline.py --model 4,128,4,64 --lrs 0.004 --seeds 0,1 --until 600
"""

from __future__ import annotations

import argparse
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

sys.path.insert(0, str(Path(__file__).resolve().parent))
import efficacy as E  # noqa: E402
from efficacy_variants import fresh_collapses  # noqa: E402

from spectral_guard.guard.signs import collapse_treated  # noqa: E402


def window_row(guard) -> dict:
    """The alarm's inputs at the end of a window (host values only)."""
    treated, penalized = collapse_treated(guard.layers, guard.config, sudden=False)
    fresh, _ = fresh_collapses(guard, guard.global_step - guard.config.msign_every)
    attention = guard.attention
    attn = max([st.scale / st.target for st in attention.states] or [0.0]) if attention else 0.0
    n = max(1, penalized)
    retention = [layer.state.readings.effective_rank_retention for layer in guard.layers
                 if layer.sensors]
    retention = sorted(r for r in retention if r == r)   # latest readings, NaN before any
    low = retention[len(retention) // 4] if retention else float("nan")
    return {"step": guard.global_step, "treated": len(treated) / n, "fresh": fresh / n,
            "low": low, "attn": attn, "signs": sum(layer.state.msigns for layer in guard.layers),
            "lr_scale": guard.backoff.scale}


def timeline(job: tuple[float, int, int, tuple[int, ...]]) -> dict:
    lr, seed, steps, model = job
    torch.set_num_threads(1)
    rows: list[dict] = []
    handles = []
    original = E.spectral_guard.instrument

    def instrument(model, **kw):
        guard = original(model, **kw)

        def hook(optimizer, args, kwargs):
            if guard.global_step % guard.config.msign_every == 0:
                rows.append(window_row(guard))

        handles.append(register_optimizer_step_post_hook(hook))   # after the guard's clock
        return guard

    E.spectral_guard.instrument = instrument
    try:
        final = E.run(E.RunSpec("guard_default", lr, seed, steps, 16,
                                E.ModelConfig(*model)))["final"]
    finally:
        E.spectral_guard.instrument = original   # pool workers run several jobs
        for handle in handles:
            handle.remove()
    return {"lr": lr, "seed": seed, "final": final, "rows": rows}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lrs", default="0.016,0.064")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--until", type=int, default=300, help="print windows up to this step")
    ap.add_argument("--model", default="3,96,4,64", help="layers,d,heads,context")
    args = ap.parse_args(argv)
    model = tuple(int(v) for v in args.model.split(","))
    jobs = [(float(lr), int(s), args.steps, model) for lr in args.lrs.split(",")
            for s in args.seeds.split(",")]
    import multiprocessing as mp
    with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("fork")) as pool:
        for r in pool.map(timeline, jobs):
            print(f"\nlr {r['lr']:g}, seed {r['seed']}, {args.steps} steps: "
                  f"final validation loss {r['final']:.3f}")
            print(f"{'step':>5} {'treated':>8} {'fresh':>6} {'q25':>5} {'attn':>5} {'signs':>6} "
                  f"{'lr_scale':>8}")
            for w in r["rows"]:
                if w["step"] <= args.until:
                    print(f"{w['step']:>5} {w['treated']:>8.2f} {w['fresh']:>6.2f} "
                          f"{w['low']:>5.2f} {w['attn']:>5.2f} {w['signs']:>6} "
                          f"{w['lr_scale']:>8.2f}")


if __name__ == "__main__":
    main()
