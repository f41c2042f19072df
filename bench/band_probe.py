"""What the guard does between the tuned LR and sudden collapse (issue 18, the bare harness).

The issue's bare harness: a 4-layer byte-level GPT (d=128, 4 heads, LayerNorm, GELU, context
128; ``bench/efficacy.py``'s model and data), batch 32, AdamW betas (0.9, 0.95), **no weight
decay, no clipping**, linear warmup over 100 steps then a **constant** learning rate, and the
loop a user writes by hand: the model returns logits, ``loss = ce + guard.penalty()``.

Every ``--log-every`` steps one line per run records what the guard sees and does:

* ``ce`` (mean training loss since the last line), per-layer mean attention entropy (probe batch
  of 8 validation windows, per head mean over batch and query positions >= 1, mean over heads)
  and the largest pre-softmax logit on that batch;
* per attention pair: the guard's reading ``s`` (max head ``sigma_max(W_q,h^T W_k,h)/sqrt(d_h)``,
  ``AttentionGuard.stats()``), its target ``t``, its ``lambda``; the exact scale by SVD, and the
  **gain-aware** exact scale ``max_h sigma_max(diag(g) W_q,h^T W_k,h diag(g)) / sqrt(d_h)`` with
  ``g`` the block's ``ln1`` gain (what the logit actually sees; the guard does not read ``g``);
* at that step, on W_q and W_k of each layer: ``||grad penalty|| / ||grad ce||`` and the
  first-order change of the pair's top-head scale that one Adam step would make from each
  gradient alone, ``-lr <grad s, g / (sqrt(v_hat) + eps)>`` (``v_hat`` the optimizer's second
  moment: Adam divides both gradients by the same ``sqrt(v)``, which the loss's gradient sets);
* the penalty relative to ``ce``; the rank thermostat (treated layers, largest lambda); the
  alarm (its attention half, its quorum half: layers treated for collapse and fallen suddenly,
  over the quorum), signs so far, ``lr_scale``.

Variants (``--variant``): ``plain`` (no guard), ``default`` (``instrument(model)``: since
issue 18 the graded back-off of guard/backoff.py), ``old`` (``lr_policy="alarm"``: the binary
back-off before it), ``grace0``, ``grace1`` (``lr_grace=0``, ``1``), ``sudden``
(``lr_count="sudden"``: the graded back-off counting only layers fallen within
``alarm_fall_steps``), ``recovery5`` (``lr_recovery=5``: the back-off doubles back 5x faster),
``penalty`` (``msign_every=0``:
the attention hinge and rank penalties only, no alarm-driven sign or back-off), ``rescale``
(``attention_actuator="rescale"``), ``alarm125`` (``alarm_attention_factor=1.25``), and three
bench-side prototypes of a graded response instead of the binary alarm (not in the package;
both with ``msign_every=0``, so no sign and no binary back-off): ``graded`` (the learning rate
multiplied at every step by ``clip((t / s)^2, 0.1, 1)`` with ``s / t`` the worst pair's latest
reading over its target, from the guard's host readings, rising again when ``s`` falls back),
``graded_q`` (the learning rate multiplied by ``max(0.25, 0.5 ** (f / alarm_quorum))`` with
``f`` the fraction of penalized layers treated for collapse now: the alarm's quorum as a
continuous, reversible back-off), ``graded_qm`` (the same target scale, reached at once when
lower, but rising back by at most 2x per 25 check periods of a layer: hysteresis).

    python bench/band_probe.py --variant plain --lr 1.6e-2 --out /tmp/band.jsonl
    python bench/band_probe.py --summary /tmp/band.jsonl        # the table
    python bench/band_probe.py --variant default --lr 1.6e-2 --window 100:150   # a transient
    python bench/band_probe.py --variant default --lr 4e-3 --corrupt 150:155    # bad batches

The table below is the research before issue 18's implementation (``default`` was then the
binary back-off, now ``old``); the package's graded back-off is measured in docs/efficacy.md.

Measured (``--steps 300``, not the issue's 600: about 1 s per step on 2 CPU cores shared with
other jobs, 1 thread; the guard at commit 1a8c741; final validation loss, 16 batches):

    variant     4e-3 (tuned)      1.6e-2 (4x), seed 0 / 1    share of the 4x gap rescued
    plain       2.031 / 2.033     2.157 / 2.541              0
    default     2.040 (+0.41%)    2.069 / 2.031              70% / 100% (alarm by quorum, signs)
    penalty     (= default)       2.147                      8% (hinge holds s/t <= 1.4)
    rescale     2.047 (+0.78%)    2.093                      50% (alarm by quorum, signs)
    alarm125    2.040 (= default)
    graded      2.032 (+0.07%)    2.131                      20%
    graded_q                      2.149                      6% (released at step ~290)
    graded_qm   2.040 (= default) 2.032 / 2.331              99% / 41% (no sign)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import efficacy as E  # noqa: E402

import spectral_guard  # noqa: E402
from spectral_guard.guard import backoff  # noqa: E402
from spectral_guard.guard.signs import collapse_treated  # noqa: E402

VARIANTS: dict[str, dict | None] = {
    "plain": None,
    "default": {},
    "old": {"lr_policy": "alarm"},
    "grace0": {"lr_grace": 0},
    "grace1": {"lr_grace": 1},
    "sudden": {"lr_count": "sudden"},
    "recovery5": {"lr_recovery": 5.0},
    "penalty": {"msign_every": 0},
    "rescale": {"attention_actuator": "rescale"},
    "alarm125": {"alarm_attention_factor": 1.25},
    "graded": {"msign_every": 0},
    "graded_q": {"msign_every": 0},
    "graded_qm": {"msign_every": 0},
}
TUNED_LR = 4e-3


def pair_weights(att: E.Attention) -> tuple[torch.Tensor, torch.Tensor]:
    h = att.n_heads
    Wq, Wk = att.q_proj.weight.detach(), att.k_proj.weight.detach()
    return Wq.view(h, -1, Wq.shape[1]), Wk.view(h, -1, Wk.shape[1])


def head_scales(att: E.Attention, gain: torch.Tensor | None = None) -> torch.Tensor:
    """Exact per-head ``sigma_max(diag(g) W_q,h^T W_k,h diag(g)) / sqrt(d_h)`` (``g = 1``: the
    guard's reading)."""
    Wq, Wk = pair_weights(att)
    if gain is not None:
        Wq, Wk = Wq * gain, Wk * gain
    M = Wq.double().mT @ Wk.double()
    return torch.linalg.matrix_norm(M, 2) / math.sqrt(Wq.shape[1])


def top_scale_grad(att: E.Attention) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient of the top head's exact ``s_h`` with respect to ``(W_q, W_k)`` (full matrices)."""
    h = att.n_heads
    Wq = att.q_proj.weight.detach().double().requires_grad_(True)
    Wk = att.k_proj.weight.detach().double().requires_grad_(True)
    d_h = Wq.shape[0] // h
    M = Wq.view(h, d_h, -1).mT @ Wk.view(h, d_h, -1)
    s = torch.linalg.matrix_norm(M, 2) / math.sqrt(d_h)
    gq, gk = torch.autograd.grad(s.max(), (Wq, Wk))
    return gq.float(), gk.float()


@torch.no_grad()
def attention_probe(model: E.GPT, x: torch.Tensor) -> tuple[list[float], float, float]:
    """Per-layer mean head entropy, the least entropic head, the largest logit."""
    model.eval()
    for att in model.attentions():
        att.probe = {}
    model(x)
    ents = [att.probe["entropy"] for att in model.attentions()]
    logit = max(float(att.probe["max_logit"].max()) for att in model.attentions())
    for att in model.attentions():
        att.probe = None
    model.train()
    return [float(e.mean()) for e in ents], min(float(e.min()) for e in ents), logit


def run(variant: str, lr: float, seed: int, steps: int, warmup: int, log_every: int,
        lr_window: tuple[int, int] | None = None,
        corrupt: tuple[int, int] | None = None) -> dict:
    torch.manual_seed(seed)
    cfg = E.ModelConfig(n_layers=4, d=128, heads=4, seq=128)
    model = E.GPT(cfg)
    train, val = E.corpus_split()
    gen = torch.Generator().manual_seed(10_000 + seed)
    noise = torch.Generator().manual_seed(20_000 + seed)  # corrupted batches (--corrupt)
    probe_x, _ = E.windows(val, torch.randint(0, len(val) - cfg.seq - 1, (8,),
                                              generator=torch.Generator().manual_seed(99)),
                           cfg.seq)
    spec = E.RunSpec(method="recipe", lr=lr, seed=seed, steps=steps, batch=32, model=cfg)
    kw = VARIANTS[variant]
    guard = spectral_guard.instrument(model, **kw) if kw is not None else None
    attn = E._find_attention_guard(guard) if guard is not None else None
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    beta2, eps = 0.95, 1e-8
    atts = model.attentions()
    qk = [w for a in atts for w in (a.q_proj.weight, a.k_proj.weight)]
    pair_names = [p.name for p in attn.pairs] if attn is not None else []
    targets = [st.target for st in attn.states] if attn is not None else [0.5] * len(atts)
    log: list[dict] = []
    window: list[float] = []
    graded_scale = 1.0
    t0 = time.perf_counter()
    for step in range(steps):
        peak = lr if lr_window is None or lr_window[0] <= step < lr_window[1] else TUNED_LR
        base_lr = peak * min(1.0, (step + 1) / warmup) if warmup else peak
        if variant == "graded" and attn is not None:
            over = max((st.scale / st.target for st in attn.states
                        if math.isfinite(st.scale)), default=0.0)
            graded_scale = min(1.0, max(0.1, (1.0 / over) ** 2)) if over > 1.0 else 1.0
        if variant in ("graded_q", "graded_qm") and guard is not None:
            treated, penalized = collapse_treated(guard.layers, guard.config, sudden=False)
            frac = len(treated) / max(penalized, 1)
            quorum = guard.config.alarm_quorum
            if variant == "graded_qm":   # down at once, up by 2x per 25 check periods at most
                graded_scale = backoff.graded_scale(frac, quorum, 0.25, graded_scale,
                                                    periods=1 / guard.config.check_period)
            else:
                graded_scale = backoff.graded_target(frac, quorum, 0.25)
        for g in opt.param_groups:
            g["lr"] = base_lr * graded_scale
        starts = torch.randint(0, len(train) - cfg.seq - 1, (32,), generator=gen)
        x, y = E.windows(train, starts, cfg.seq)
        if corrupt is not None and corrupt[0] <= step < corrupt[1]:
            # a corrupted batch: uniformly random bytes in and out (the data stream is the
            # same as without corruption: the clean batch was drawn and is dropped)
            x = torch.randint(0, 256, x.shape, generator=noise)
            y = torch.randint(0, 256, y.shape, generator=noise)
        logits = model(x)["logits"]
        ce = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        pen = guard.penalty() if guard is not None else torch.zeros(())
        loss = ce + pen
        logging = (step + 1) % log_every == 0 or step + 1 == steps
        g_pen = None
        if logging and pen.requires_grad:
            g_pen = torch.autograd.grad(pen, qk, retain_graph=True, allow_unused=True)
            g_pen = [torch.zeros_like(w) if g is None else g for g, w in zip(g_pen, qk,
                                                                                 strict=True)]
        loss.backward()
        rec: dict = {}
        if logging:
            scale = guard.metrics()["lr_scale"] if guard is not None else 1.0
            step_lr = base_lr * graded_scale * scale
            layers = []
            for i, att in enumerate(atts):
                ws = (att.q_proj.weight, att.k_proj.weight)
                gt = [w.grad.detach() for w in ws]
                gp = g_pen[2 * i:2 * i + 2] if g_pen is not None else [torch.zeros_like(w)
                                                                        for w in ws]
                gc = [a - b for a, b in zip(gt, gp, strict=True)]
                norm = lambda gs: math.sqrt(sum(float(g.square().sum()) for g in gs))  # noqa: E731
                row = {"pen_grad_ratio": norm(gp) / max(norm(gc), 1e-30)}
                states = [opt.state.get(w, {}) for w in ws]
                if all("exp_avg_sq" in s for s in states):
                    k = int(float(states[0]["step"])) + 1   # v after this step's gradient
                    denoms = [((beta2 * s["exp_avg_sq"] + (1 - beta2) * g.square())
                               / (1 - beta2 ** k)).sqrt() + eps
                              for s, g in zip(states, gt, strict=True)]
                    ds = top_scale_grad(att)
                    for name, gs in (("ds_ce", gc), ("ds_pen", gp)):
                        row[name] = -step_lr * sum(float((d * g / den).sum()) for d, g, den
                                                   in zip(ds, gs, denoms, strict=True))
                layers.append(row)
            rec["layers"] = layers
        opt.step()
        opt.zero_grad(set_to_none=True)
        window.append(float(ce.detach()))
        if not math.isfinite(window[-1]):
            break
        if logging:
            ent, ent_min, max_logit = attention_probe(model, probe_x)
            rec.update(step=step + 1, ce=sum(window) / len(window), entropy=ent,
                       entropy_min=ent_min, max_logit=max_logit,
                       penalty_rel=float(pen.detach()) / float(ce.detach()),
                       lr=base_lr * graded_scale)
            window = []
            for i, (att, block) in enumerate(zip(atts, model.blocks, strict=True)):
                gain = block.ln1.weight.detach()
                rec["layers"][i].update(
                    svd=float(head_scales(att).max()),
                    svd_gain=float(head_scales(att, gain).max()),
                    gain_rms=float(gain.square().mean().sqrt()), target=targets[i])
                if attn is not None:
                    st = attn.stats()["pairs"][pair_names[i]]
                    rec["layers"][i].update(s=st["scale"], lam=st["lambda"],
                                            hits=st["interventions"])
            if guard is not None:
                m, stats = guard.metrics(), guard.stats()
                lams = [v["lambda_collapse"] for v in stats["layers"].values()]
                sudden, penalized = collapse_treated(guard.layers, guard.config, sudden=True)
                treated, _ = collapse_treated(guard.layers, guard.config, sudden=False)
                rec.update(treated=len(treated), sudden=len(sudden), penalized=penalized,
                           quorum=guard.config.alarm_quorum * penalized,
                           max_lambda=max(lams, default=0.0),
                           alarm_attn=bool(attn is not None
                                           and attn.alarm(guard.config.alarm_attention_factor)),
                           alarm=bool(guard.signs.alarm(guard)), msigns=m["msigns"],
                           lr_scale=m["lr_scale"], attn_hits=m.get("attention_interventions",
                                                                   0.0),
                           rescales=m.get("attention_rescales", 0.0),
                           graded=graded_scale)
            log.append(rec)
            print(line(variant, lr, rec), flush=True)
    wall = time.perf_counter() - t0
    final = E.evaluate(model, val, spec) if math.isfinite(window[-1] if window else 0.0) \
        else math.nan
    if guard is not None:
        guard.remove()
    return {"variant": variant, "lr": lr, "seed": seed, "steps": steps, "warmup": warmup,
            "window": list(lr_window) if lr_window else None,
            "corrupt": list(corrupt) if corrupt else None, "final": final, "wall": wall,
            "log": log}


def line(variant: str, lr: float, r: dict) -> str:
    L = r["layers"]
    ent = "/".join(f"{e:.2f}" for e in r["entropy"])
    over = "/".join(f"{(x.get('s', x['svd'])) / x['target']:.1f}" for x in L)
    eff = "/".join(f"{x['svd_gain'] / x['target']:.1f}" for x in L)
    lam = "/".join(f"{x.get('lam', 0.0):.2f}" for x in L)
    gains = "/".join(f"{x['gain_rms']:.2f}" for x in L)
    pg = "/".join(f"{x['pen_grad_ratio']:.2g}" for x in L)
    ds = "/".join(f"{x.get('ds_ce', 0):+.1e}|{x.get('ds_pen', 0):+.1e}" for x in L)
    s = (f"{variant:8s} {lr:.1e} {r['step']:4d} ce {r['ce']:.3f} H {ent} "
         f"logit {r['max_logit']:.0f} s/t {over} eff {eff} gain "
         f"{gains} lam {lam} pen/ce "
         f"{r['penalty_rel']:.1e} |gp|/|gc| {pg} ds(ce|pen) {ds}")
    if "alarm" in r:
        s += (f" treated {r['treated']} sudden {r['sudden']}/{r['quorum']:.1f} "
              f"lam_max {r['max_lambda']:.2f} alarm {int(r['alarm_attn'])}{int(r['alarm'])} "
              f"signs {r['msigns']:.0f} lr_scale {r['lr_scale']:.2f} graded {r['graded']:.2f}"
              f" rescales {r['rescales']:.0f}")
    return s


def summary(path: Path) -> None:
    """The table of a ``--out`` file: final loss, rescued fraction of the 4x gap (plain 4x minus
    plain tuned, same seed and steps), attention state after warmup, the hinge's strength where
    it is active (layers with ``lambda > 0`` at a logged step: median ``||grad pen|| / ||grad
    ce||`` on W_q, W_k, mean one-step change of the top head's scale from each gradient), the
    alarm condition's first logged step (``guard.signs.alarm(guard)``, also computed with
    ``msign_every=0`` where nothing acts on it), signs and the learning-rate scale at the end."""
    runs = [json.loads(s) for s in path.read_text().splitlines() if s.strip()]
    def key_of(r: dict) -> tuple:
        return (r["lr"], r["seed"], r["steps"], tuple(r.get("window") or ()),
                tuple(r.get("corrupt") or ()))

    plain = {key_of(r): r["final"] for r in runs if r["variant"] == "plain"}
    print("| variant | lr | seed | final val | rescued / vs plain | min entropy after warmup "
          "| max s/t after warmup | hinge: grad ratio, ds ce, ds pen | alarm condition at | signs "
          "| lr scale at end |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        key = key_of(r)
        tuned = plain.get((TUNED_LR, r["seed"], r["steps"], (), ()))
        rescued = ""
        if r["variant"] != "plain" and key in plain:
            if r["lr"] == TUNED_LR or r.get("window") or r.get("corrupt"):
                rescued = f"{(r['final'] - plain[key]) / plain[key]:+.2%}"
            elif tuned is not None:
                rescued = f"{(plain[key] - r['final']) / (plain[key] - tuned):+.0%}"
        late = [x for x in r["log"] if x["step"] > r["warmup"]]
        ent = min(x["entropy_min"] for x in late)
        over = max(L.get("s", L["svd"]) / L["target"] for x in late for L in x["layers"])
        act = [L for x in r["log"] for L in x["layers"] if L.get("lam", 0) > 0 and "ds_ce" in L]
        hinge = "-"
        if act:
            ratio = sorted(L["pen_grad_ratio"] for L in act)[len(act) // 2]
            hinge = (f"{ratio:.2g}, {sum(L['ds_ce'] for L in act) / len(act):+.1e}, "
                     f"{sum(L['ds_pen'] for L in act) / len(act):+.1e} (n={len(act)})")
        last = r["log"][-1]
        alarms = [x["step"] for x in r["log"] if x.get("alarm")]
        lr_end = last.get("lr_scale", 1.0) * last.get("graded", 1.0)
        lr_txt = f"{r['lr']:g}" + (" in {}:{}".format(*r["window"]) if r.get("window") else "")
        lr_txt += " corrupt {}:{}".format(*r["corrupt"]) if r.get("corrupt") else ""
        print(f"| {r['variant']} | {lr_txt} | {r['seed']} | {r['final']:.3f} | {rescued} "
              f"| {ent:.3f} | {over:.1f} | {hinge} | {alarms[0] if alarms else '-'} "
              f"| {last.get('msigns', 0):.0f} | {lr_end:.2f} |")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", choices=sorted(VARIANTS), default="default")
    ap.add_argument("--lr", type=float, default=4 * TUNED_LR)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--window", default=None, help="A:B: --lr only for steps A..B-1, the "
                    "tuned LR outside (a transient)")
    ap.add_argument("--corrupt", default=None, help="A:B: the batches of steps A..B-1 are "
                    "uniformly random bytes (inputs and targets)")
    ap.add_argument("--out", type=Path, default=None, help="append the run (JSON line)")
    ap.add_argument("--summary", type=Path, default=None, help="print the table of a --out file")
    args = ap.parse_args(argv)
    if args.summary is not None:
        summary(args.summary)
        return
    torch.set_num_threads(1)
    window = tuple(int(v) for v in args.window.split(":")) if args.window else None
    corrupt = tuple(int(v) for v in args.corrupt.split(":")) if args.corrupt else None
    r = run(args.variant, args.lr, args.seed, args.steps, args.warmup, args.log_every, window,
            corrupt)
    print(f"final val {r['final']:.4f} wall {r['wall']:.0f}s", flush=True)
    if args.out is not None:
        with args.out.open("a") as fh:
            fh.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
