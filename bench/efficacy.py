"""Does the guard help? Learning-rate sensitivity of a small byte-level GPT, method by method.

Methodology of Wortsman et al. 2023, "Small-scale proxies for large-scale Transformer training
instabilities" (arXiv 2309.14322): sweep the peak learning rate ``eta`` and report

    LR sensitivity = E_eta[ min(loss(eta), loss_0) - loss* ]

with ``loss_0`` the validation loss at initialization and ``loss*`` the method's best final
validation loss over the sweep, next to the loss-vs-LR curves (the single number hides the loss
scale).

Model and data: a pre-LN GPT-style byte-level language model (bench-local, explicit attention so
the benchmark can read entropies and logits) trained on CPU on the Python standard library's own
``.py`` sources (sorted by path, concatenated; the last 5% of the bytes are the validation
split; nothing is downloaded). Recipe: AdamW (beta2 0.95), linear warmup then cosine decay to
10% of the peak, weight decay 0.1 on matrices, gradient clipping at 1.0. Every method uses the
same seeds, the same initialization (up to its architecture change) and the same batches.

Methods: ``recipe``; ``adamw`` (no weight decay, no clipping); ``assr_l2`` (spectral_guard with
``actuator="l2"``, the public ASSR behaviour); ``guard`` (the rank guard alone:
``instrument(model, attention=False, msign_every=0)``); ``guard_default`` (``instrument(model)``);
``guard_attn`` / ``guard_attn_rescale`` (the guard plus the attention-logit guard, penalty or
rescale actuator); ``guard_msign`` / ``guard_msign10`` (with the attention guard: the matrix-sign
actuator on layers flagged for collapse / the matrix sign of every layer every 10 steps, MSign's
schedule, arXiv 2602.01734); and the known fixes, implemented here only: ``zloss``
(``1e-4 log^2 Z``),
``qkclip`` (Kimi K2, arXiv 2507.20534: after each step, heads whose max logit in that step's
forward exceeded ``tau`` get ``W_q,h, W_k,h *= sqrt(tau / max)``), ``sigma_reparam`` (Zhai et
al. 2023, arXiv 2303.06296: every block Linear ``W -> gamma W / sigma(W)``, one power iteration
per training forward, ``gamma`` learned, init 1) and ``qk_layernorm`` (LayerNorm on each head's
queries and keys: the architecture change a plug-in must approach).

    python bench/efficacy.py --quick                 # smoke test, about a minute
    python bench/efficacy.py                          # the full sweep (writes docs/efficacy.md)
    python bench/efficacy.py --steps 300 --lrs 1e-3,4e-3,1.6e-2,6.4e-2 --jobs 2

Runs are cached in ``--cache`` (JSON lines): an interrupted sweep resumes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import sysconfig
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import spectral_guard  # noqa: E402
from spectral_guard.guard.attention import DEFAULT_MAX_LOGIT, AttentionGuard  # noqa: E402
from spectral_guard.sensors import effective_rank  # noqa: E402

METHODS = ("recipe", "adamw", "assr_l2", "guard", "guard_attn", "guard_attn_rescale",
           "guard_msign", "guard_msign10", "guard_default", "zloss", "qkclip", "sigma_reparam",
           "qk_layernorm")
GUARDED = ("assr_l2", "guard", "guard_attn", "guard_attn_rescale", "guard_msign",
           "guard_msign10", "guard_default")
WITH_ATTENTION = ("guard_attn", "guard_attn_rescale", "guard_msign", "guard_msign10",
                  "guard_default")
BASELINES = ("recipe", "guard", "guard_attn", "guard_default")
Z_LOSS = 1e-4


# ----------------------------------------------------------------------------------------------
# Data


def stdlib_corpus() -> bytes:
    """The standard library's ``.py`` sources (no site-packages), sorted by path, concatenated."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(f for f in root.rglob("*.py") if "site-packages" not in f.parts)
    return b"".join(f.read_bytes() for f in files)


_DATA: dict[str, torch.Tensor] = {}


def corpus_split(val_fraction: float = 0.05, limit: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train, val)`` uint8 tensors: the last ``val_fraction`` of the bytes is validation."""
    key = f"{val_fraction}:{limit}"
    if key not in _DATA:
        raw = stdlib_corpus()
        if limit is not None:
            raw = raw[:limit]
        t = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        cut = int(len(t) * (1 - val_fraction))
        _DATA[key] = t
        _DATA[key + ":cut"] = torch.tensor(cut)
    t, cut = _DATA[key], int(_DATA[key + ":cut"])
    return t[:cut], t[cut:]


def windows(data: torch.Tensor, starts: torch.Tensor, seq: int) -> tuple[torch.Tensor, ...]:
    idx = starts[:, None] + torch.arange(seq + 1)[None, :]
    chunk = data[idx].long()
    return chunk[:, :-1], chunk[:, 1:]


def unigram_entropy(data: torch.Tensor) -> float:
    """Entropy (nats) of the byte frequencies: the loss of a model that ignores context."""
    p = torch.bincount(data.long(), minlength=256).double()
    p = p[p > 0] / p.sum()
    return float(-(p * p.log()).sum())


# ----------------------------------------------------------------------------------------------
# Model


class SigmaReparamLinear(nn.Linear):
    """``W_hat = gamma W / sigma(W)`` (Zhai et al. 2023): one power iteration per training
    forward on buffers ``u, v``; ``sigma = u^T W v`` with ``u, v`` constant in the gradient."""

    def __init__(self, n_in: int, n_out: int, bias: bool = True) -> None:
        super().__init__(n_in, n_out, bias)
        self.gamma = nn.Parameter(torch.ones(()))
        g = torch.Generator().manual_seed(n_in * 7919 + n_out)
        u, v = torch.randn(n_out, generator=g), torch.randn(n_in, generator=g)
        self.register_buffer("u", u / u.norm())
        self.register_buffer("v", v / v.norm())

    @torch.no_grad()
    def init_vectors(self, iters: int = 50) -> None:
        """Converge ``u, v`` on the current weight (call after initializing it), so that
        ``sigma = u^T W v`` is ``sigma_max(W)`` from the first forward on."""
        u, v = self.u, self.v
        for _ in range(iters):
            v = F.normalize(self.weight.mT @ u, dim=0)
            u = F.normalize(self.weight @ v, dim=0)
        self.u.copy_(u)
        self.v.copy_(v)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                v = F.normalize(self.weight.mT @ self.u, dim=0)
                u = F.normalize(self.weight @ v, dim=0)
                self.u.copy_(u)
                self.v.copy_(v)
        sigma = self.u @ self.weight @ self.v
        return F.linear(x, self.weight * (self.gamma / sigma), self.bias)

    def effective_weight(self) -> torch.Tensor:
        return self.weight * (self.gamma / (self.u @ self.weight @ self.v))


@dataclass(frozen=True)
class ModelConfig:
    n_layers: int = 2
    d: int = 64
    heads: int = 4
    seq: int = 64
    qk_norm: bool = False
    sigma_reparam: bool = False


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        lin = SigmaReparamLinear if cfg.sigma_reparam else nn.Linear
        self.n_heads = cfg.heads
        self.q_proj, self.k_proj = lin(cfg.d, cfg.d), lin(cfg.d, cfg.d)
        self.v_proj, self.o_proj = lin(cfg.d, cfg.d), lin(cfg.d, cfg.d)
        d_h = cfg.d // cfg.heads
        self.q_norm = nn.LayerNorm(d_h) if cfg.qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(d_h) if cfg.qk_norm else nn.Identity()
        self.max_logit: torch.Tensor | None = None   # per head, last training forward
        self.probe: dict[str, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.n_heads

        def split(z: torch.Tensor) -> torch.Tensor:
            return z.view(b, t, h, d // h).transpose(1, 2)

        q = self.q_norm(split(self.q_proj(x)))
        k = self.k_norm(split(self.k_proj(x)))
        v = split(self.v_proj(x))
        logits = q @ k.transpose(-1, -2) / math.sqrt(d // h)
        mask = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
        logits = logits.masked_fill(mask, float("-inf"))
        att = logits.softmax(-1)
        with torch.no_grad():
            self.max_logit = logits.detach().amax(dim=(0, 2, 3))
            if self.probe is not None:
                ent = -(att * att.clamp_min(1e-30).log()).sum(-1)  # b, h, t
                self.probe = {"entropy": ent[:, :, 1:].mean(dim=(0, 2)),
                              "max_logit": self.max_logit}
        y = (att @ v).transpose(1, 2).reshape(b, t, d)
        return self.o_proj(y)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        lin = SigmaReparamLinear if cfg.sigma_reparam else nn.Linear
        self.ln1, self.ln2 = nn.LayerNorm(cfg.d), nn.LayerNorm(cfg.d)
        self.attn = Attention(cfg)
        self.fc, self.proj = lin(cfg.d, 4 * cfg.d), lin(4 * cfg.d, cfg.d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.proj(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """Pre-LN byte-level GPT: ``forward(idx, targets) -> {"logits", "loss", "ce"}``."""

    def __init__(self, cfg: ModelConfig, z_loss: float = 0.0) -> None:
        super().__init__()
        self.cfg, self.z_loss = cfg, z_loss
        self.wte = nn.Embedding(256, cfg.d)
        self.wpe = nn.Embedding(cfg.seq, cfg.d)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d)
        self.lm_head = nn.Linear(cfg.d, 256, bias=False)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * cfg.n_layers) if name.endswith(("o_proj.weight",
                                                                         "proj.weight")) else 0.02
                nn.init.normal_(p, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
        for m in self.modules():
            if isinstance(m, SigmaReparamLinear):
                m.init_vectors()

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> dict:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        out = {"logits": logits}
        if targets is not None:
            flat = logits.flatten(0, 1).float()
            ce = F.cross_entropy(flat, targets.flatten())
            out["ce"] = ce.detach()
            loss = ce
            if self.z_loss:
                loss = loss + self.z_loss * torch.logsumexp(flat, -1).square().mean()
            out["loss"] = loss
        return out

    def attentions(self) -> list[Attention]:
        return [b.attn for b in self.blocks]


def block_linears(model: GPT) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n.startswith("blocks.")}


def weight_of(m: nn.Linear) -> torch.Tensor:
    if isinstance(m, SigmaReparamLinear):
        return m.effective_weight()
    if hasattr(m, "parametrizations"):
        return m.parametrizations.weight.original
    return m.weight


def qk_spectral_scale(model: GPT) -> float:
    """``max_h sigma_max(W_q,h^T W_k,h) / sqrt(d_h)`` by explicit SVD (the guard's reading);
    for qk-layernorm the normalized q, k make it meaningless: ``nan``."""
    if model.cfg.qk_norm:
        return math.nan
    best = 0.0
    for att in model.attentions():
        h = att.n_heads
        Wq = weight_of(att.q_proj).detach().double()
        Wk = weight_of(att.k_proj).detach().double()
        d_h = Wq.shape[0] // h
        M = Wq.view(h, d_h, -1).mT @ Wk.view(h, d_h, -1)
        best = max(best, float(torch.linalg.matrix_norm(M, 2).max()) / math.sqrt(d_h))
    return best


# ----------------------------------------------------------------------------------------------
# One run


@dataclass(frozen=True)
class RunSpec:
    method: str
    lr: float
    seed: int
    steps: int
    batch: int
    model: ModelConfig
    warmup: float = 0.1
    probe_every: int = 25
    qkclip_tau: float = 30.0
    val_batches: int = 16
    limit: int | None = None
    tag: str = ""
    attn_logit: float = DEFAULT_MAX_LOGIT

    def key(self) -> str:
        d = asdict(self)
        if d["attn_logit"] == DEFAULT_MAX_LOGIT:
            del d["attn_logit"]   # keys of runs at the default stay what they were
        return json.dumps(d, sort_keys=True)


def _lr_at(step: int, spec: RunSpec) -> float:
    warm = int(spec.warmup * spec.steps)
    if step < warm:
        return spec.lr * (step + 1) / warm
    frac = (step - warm) / max(1, spec.steps - warm)
    return spec.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


@torch.no_grad()
def evaluate(model: GPT, val: torch.Tensor, spec: RunSpec) -> float:
    model.eval()
    g = torch.Generator().manual_seed(1234)
    total = 0.0
    for _ in range(spec.val_batches):
        starts = torch.randint(0, len(val) - spec.model.seq - 1, (spec.batch,), generator=g)
        x, y = windows(val, starts, spec.model.seq)
        total += float(model(x, y)["ce"])
    model.train()
    return total / spec.val_batches


@torch.no_grad()
def probe(model: GPT, x: torch.Tensor, rank0: dict[str, float]) -> dict[str, float]:
    model.eval()
    for att in model.attentions():
        att.probe = {}
    model(x)
    ent = min(float(att.probe["entropy"].min()) for att in model.attentions())
    logit = max(float(att.probe["max_logit"].max()) for att in model.attentions())
    for att in model.attentions():
        att.probe = None
    model.train()
    retention = min(effective_rank(weight_of(m).detach()) / rank0[n]
                    for n, m in block_linears(model).items())
    return {"min_entropy": ent, "max_logit": logit, "qk_scale": qk_spectral_scale(model),
            "min_erank_retention": retention}


def _spikes(losses: list[float], start: int, window: int = 20, jump: float = 0.5) -> int:
    """Spikes: maximal runs of steps whose train loss exceeds the median of the previous
    ``window`` steps by more than ``jump`` nats (after step ``start``)."""
    count, inside = 0, False
    for t in range(max(start, window), len(losses)):
        ref = statistics.median(losses[t - window:t])
        hit = not math.isfinite(losses[t]) or losses[t] > ref + jump
        count += int(hit and not inside)
        inside = hit
    return count


def guard_kwargs(method: str) -> dict:
    """The ``instrument()`` arguments of a guarded method (``{}`` for ``guard_default``)."""
    if method == "guard_default":
        return {}
    kw: dict = {"attention": method in WITH_ATTENTION, "msign_every": 0}
    if method == "assr_l2":
        kw["actuator"] = "l2"
    if method == "guard_attn_rescale":
        kw["attention_actuator"] = "rescale"
    if method == "guard_msign":
        kw["actuator"] = "msign"
    if method == "guard_msign10":
        kw.update(msign_every=10, msign_gate="always")
    return kw


def _find_attention_guard(guard: object) -> AttentionGuard | None:
    return getattr(guard, "attention", None)


def run(spec: RunSpec) -> dict:
    """Train one (method, lr, seed) and return its numbers and curves."""
    torch.manual_seed(spec.seed)
    cfg = replace(spec.model, qk_norm=spec.method == "qk_layernorm",
                  sigma_reparam=spec.method == "sigma_reparam")
    model = GPT(cfg, z_loss=Z_LOSS if spec.method == "zloss" else 0.0)
    train, val = corpus_split(limit=spec.limit)
    gen = torch.Generator().manual_seed(10_000 + spec.seed)
    probe_x, _ = windows(val, torch.randint(0, len(val) - cfg.seq - 1, (8,),
                                            generator=torch.Generator().manual_seed(99)), cfg.seq)
    rank0 = {n: effective_rank(weight_of(m).detach()) for n, m in block_linears(model).items()}
    loss0 = evaluate(model, val, spec)

    guard = attn = None
    wired = False
    if spec.method in GUARDED:
        kw = guard_kwargs(spec.method)
        if spec.method in WITH_ATTENTION and spec.attn_logit != DEFAULT_MAX_LOGIT:
            kw["attention_max_scale"] = spec.attn_logit / cfg.d
        guard = spectral_guard.instrument(model, **kw)
        attn = _find_attention_guard(guard)   # the Guard drives it (on_step, penalty)
        wired = attn is not None

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    other = [p for n, p in model.named_parameters() if p.dim() < 2]
    wd = 0.0 if spec.method == "adamw" else 0.1
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": wd},
                             {"params": other, "weight_decay": 0.0}],
                            lr=spec.lr, betas=(0.9, 0.95))
    clip = spec.method != "adamw"
    losses: list[float] = []
    probes: list[dict] = [{"step": 0, **probe(model, probe_x, rank0)}]
    clips = 0
    t0 = time.perf_counter()
    probe_s = 0.0
    diverged = False
    for step in range(spec.steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, spec)
        starts = torch.randint(0, len(train) - cfg.seq - 1, (spec.batch,), generator=gen)
        x, y = windows(train, starts, cfg.seq)
        out = model(x, y)
        loss = out["loss"]   # the guard's penalty is in it already (auto_loss)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if spec.method == "qkclip":
            clips += _qk_clip(model, spec.qkclip_tau)
        ce = float(out["ce"])
        losses.append(ce)
        if not math.isfinite(ce):
            diverged = True
            break
        if (step + 1) % spec.probe_every == 0 or step + 1 == spec.steps:
            tp = time.perf_counter()
            p = probe(model, probe_x, rank0)
            if attn is not None:
                p["guard_scale"] = attn.metrics()["attention_logit_scale"]
            probes.append({"step": step + 1, **p})
            probe_s += time.perf_counter() - tp
    wall = time.perf_counter() - t0 - probe_s
    final = evaluate(model, val, spec) if not diverged else math.nan
    interventions = 0.0
    if guard is not None:
        m = guard.metrics()
        interventions = m.get("interventions", 0.0) + m.get("msigns", 0.0)
        if attn is not None:
            am = attn.metrics()
            interventions += am["attention_interventions"] + am["attention_rescales"]
        guard.remove()
    if spec.method == "qkclip":
        interventions = float(clips)
    if not math.isfinite(final):
        final = math.nan
    return {
        "key": spec.key(), "method": spec.method, "lr": spec.lr, "seed": spec.seed,
        "tag": spec.tag, "loss0": loss0, "final": final, "wall": wall, "diverged": diverged,
        "spikes": _spikes(losses, int(spec.warmup * spec.steps)),
        "interventions": interventions, "attention_wired": wired,
        "losses": losses, "probes": probes,
    }


@torch.no_grad()
def _qk_clip(model: GPT, tau: float) -> int:
    """QK-Clip: heads whose max logit in the last training forward exceeded ``tau`` get
    ``W_q,h`` and ``W_k,h`` (and their biases) scaled by ``sqrt(tau / max_logit)``."""
    hits = 0
    for att in model.attentions():
        m = att.max_logit
        if m is None:
            continue
        h = att.n_heads
        factor = torch.where(m > tau, (tau / m.clamp_min(1e-12)).sqrt(), torch.ones_like(m))
        hits += int((m > tau).sum())
        for lin in (att.q_proj, att.k_proj):
            rows = factor.repeat_interleave(lin.weight.shape[0] // h)
            lin.weight.mul_(rows[:, None])
            if lin.bias is not None:
                lin.bias.mul_(rows)
    return hits


# ----------------------------------------------------------------------------------------------
# Sweep, summary, report


def _init_worker() -> None:
    torch.set_num_threads(1)


def sweep(specs: list[RunSpec], cache: Path, jobs: int) -> list[dict]:
    done: dict[str, dict] = {}
    if cache.exists():
        for line in cache.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                done[r["key"]] = r
    todo = [s for s in specs if s.key() not in done]
    print(f"{len(specs)} runs, {len(specs) - len(todo)} cached, {len(todo)} to do", flush=True)
    cache.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with cache.open("a") as fh:
        if jobs <= 1:
            results = (run(s) for s in todo)
        else:
            import multiprocessing as mp
            pool = ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"),
                                       initializer=_init_worker)
            results = pool.map(run, todo)
        for i, r in enumerate(results):
            fh.write(json.dumps(r) + "\n")
            fh.flush()
            done[r["key"]] = r
            print(f"[{i + 1}/{len(todo)} {time.perf_counter() - t0:6.0f}s] {r['method']:>18} "
                  f"lr={r['lr']:.2e} seed={r['seed']} final={r['final']:.3f} "
                  f"wall={r['wall']:.1f}s", flush=True)
    return [done[s.key()] for s in specs]


def _mean_std(xs: list[float]) -> tuple[float, float]:
    xs = [x for x in xs if x == x]
    if not xs:
        return math.nan, math.nan
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def summarize(results: list[dict], lrs: list[float], stress_lr: float, unigram: float) -> dict:
    """Per method: losses per LR, LR sensitivity, stability, spikes, probes, interventions."""
    out: dict[str, dict] = {}
    recipe_wall = None
    for method in dict.fromkeys(r["method"] for r in results):
        rs = [r for r in results if r["method"] == method and r["tag"] == "sweep"]
        loss0 = statistics.fmean(r["loss0"] for r in rs)
        seeds = sorted({r["seed"] for r in rs})

        def final(r: dict) -> float:
            return r["final"] if math.isfinite(r["final"]) else math.inf

        per_lr = {lr: [final(r) for r in rs if r["lr"] == lr] for lr in lrs}
        mean_lr = {lr: statistics.fmean(min(x, loss0) for x in v) if v else math.nan
                   for lr, v in per_lr.items()}
        best = min(min(v) for v in per_lr.values() if v)
        sens_seeds = []
        for s in seeds:
            vals = [min(final(r), loss0) for r in rs if r["seed"] == s]
            if len(vals) == len(lrs):
                sens_seeds.append(statistics.fmean(vals) - best)
        halfway = best + 0.5 * (unigram - best)
        stable = [lr for lr in lrs if per_lr[lr] and all(x <= halfway for x in per_lr[lr])]
        stress = [r for r in results if r["method"] == method and r["lr"] == stress_lr
                  and r["tag"] in ("sweep", "stress")]

        def probe_stat(key: str, fn, stress: list[dict] = stress) -> list[float]:
            vals = []
            for r in stress:
                xs = [p[key] for p in r["probes"] if key in p and p[key] == p[key]]
                vals.append(fn(xs) if xs else math.nan)
            return vals

        wall = statistics.fmean(r["wall"] / max(1, len(r["losses"])) for r in rs)
        if method == "recipe":
            recipe_wall = wall
        out[method] = {
            "loss0": loss0, "best": best,
            "per_lr": {lr: _mean_std([x for x in v if math.isfinite(x)] +
                                     [math.nan] * 0) for lr, v in per_lr.items()},
            "per_lr_capped": mean_lr,
            "diverged": {lr: sum(not math.isfinite(x) for x in v) for lr, v in per_lr.items()},
            "sensitivity": _mean_std(sens_seeds),
            "max_stable_lr": max(stable) if stable else math.nan,
            "stress_final": _mean_std([r["final"] for r in stress]),
            "stress_n": len(stress),
            "spikes": _mean_std([float(r["spikes"]) for r in stress]),
            "min_entropy": _mean_std(probe_stat("min_entropy", min)),
            "max_logit": _mean_std(probe_stat("max_logit", max)),
            "qk_scale": _mean_std(probe_stat("qk_scale", max)),
            "min_erank_retention": _mean_std(probe_stat("min_erank_retention", min)),
            "interventions": _mean_std([r["interventions"] for r in stress]),
            "step_wall": wall,
            "wired": any(r.get("attention_wired") for r in rs),
        }
    for v in out.values():
        v["wall_ratio"] = v["step_wall"] / recipe_wall if recipe_wall else math.nan
    return out


def summarize_shock(results: list[dict], stress_lr: float) -> dict:
    """Per method at the LR shock (tag ``shock``): final loss and the rescued fraction of the
    gap between the shocked recipe and the recipe at the standard LR (``stress_lr / 4``)."""
    shock = [r for r in results if r["tag"] == "shock"]
    seeds = sorted({r["seed"] for r in shock})
    std_lr = stress_lr / 4

    def mean_final(method: str, tag: str, lr: float) -> float:
        xs = [r["final"] for r in results if r["method"] == method and r["tag"] in tag
              and math.isclose(r["lr"], lr) and r["seed"] in seeds]
        return statistics.fmean(xs) if xs else math.nan

    base = mean_final("recipe", ("shock",), stress_lr)
    tuned = mean_final("recipe", ("sweep", "tuned"), std_lr)
    out = {}
    for method in dict.fromkeys(r["method"] for r in shock):
        rs = [r for r in shock if r["method"] == method]
        m = mean_final(method, ("shock",), stress_lr)
        out[method] = {
            "n": len(rs), "final": _mean_std([r["final"] for r in rs]),
            "rescued": (base - m) / (base - tuned) if base - tuned else math.nan,
            "min_entropy": _mean_std([min(p["min_entropy"] for p in r["probes"]) for r in rs]),
            "qk_scale": _mean_std([max(p["qk_scale"] for p in r["probes"]) for r in rs]),
        }
    return out


def step_times(methods: list[str], base: RunSpec, rounds: int = 3,
               steps: int = 40) -> dict[str, float]:
    """Seconds per training step (probes excluded), median over ``rounds`` round-robin passes
    over the methods in this process: a controlled comparison on a shared machine, where the
    sweep's own wall times depend on what else ran at the time."""
    times: dict[str, list[float]] = {m: [] for m in methods}
    spec = replace(base, steps=steps, probe_every=10 ** 9, val_batches=1, lr=base.lr or 4e-3)
    for _ in range(rounds):
        for m in methods:
            r = run(replace(spec, method=m))
            times[m].append(r["wall"] / max(1, len(r["losses"])))
    return {m: statistics.median(v) for m, v in times.items()}


def _fmt(ms: tuple[float, float], digits: int = 3) -> str:
    m, s = ms
    if m != m:
        return "n/a"
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def _save(fig, ax, path: Path, xlabel: str, ylabel: str, title: str) -> str:
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def plots(results: list[dict], summary: dict, lrs: list[float], stress_lr: float,
          img: Path, prefix: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img.mkdir(parents=True, exist_ok=True)
    names = []
    fig, ax = plt.subplots(figsize=(8, 5))
    for method, s in summary.items():
        xs = [lr for lr in lrs if s["per_lr"][lr][0] == s["per_lr"][lr][0]]
        ys = [s["per_lr"][lr][0] for lr in xs]
        es = [s["per_lr"][lr][1] for lr in xs]
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=method,
                    linestyle="--" if method in ("qk_layernorm", "sigma_reparam", "qkclip",
                                                 "zloss") else "-")
    ax.set_xscale("log")
    names.append(_save(fig, ax, img / f"{prefix}_loss_vs_lr.png", "peak learning rate",
                       "final validation loss (nats/byte)",
                       "Final validation loss vs peak LR (mean ± std over seeds; diverged runs "
                       "left out)"))

    for tags, name, title in ((("sweep", "stress"), "stress_curves",
                               f"Training loss at the stress LR {stress_lr:g}"),
                              (("shock",), "shock_curves",
                               f"Training loss under the LR shock ({stress_lr:g}, no warmup)")):
        fig, ax = plt.subplots(figsize=(8, 5))
        drawn = 0
        for method in summary:
            rs = [r for r in results if r["method"] == method and r["lr"] == stress_lr
                  and r["tag"] in tags]
            if not rs:
                continue
            n = min(len(r["losses"]) for r in rs)
            mean = [statistics.fmean(r["losses"][t] for r in rs) for t in range(n)]
            k = max(1, n // 60)
            smooth = [statistics.fmean(mean[max(0, t - k):t + 1]) for t in range(n)]
            ax.plot(range(1, n + 1), smooth, label=method)
            drawn += 1
        if drawn:
            ax.set_ylim(top=min(ax.get_ylim()[1], 4.0))
            names.append(_save(fig, ax, img / f"{prefix}_{name}.png", "step",
                               "train loss (seed mean, smoothed)", title))
        else:
            plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    for method in ("recipe", "guard", "guard_attn", "guard_default", "guard_msign10",
                   "qkclip", "qk_layernorm"):
        rs = [r for r in results if r["method"] == method and r["lr"] == stress_lr
              and r["tag"] in ("sweep", "stress")]
        if not rs:
            continue
        steps = [p["step"] for p in rs[0]["probes"]]
        for ax, key, label in zip(axes, ("min_entropy", "qk_scale", "max_logit"),
                                  ("min head attention entropy (nats)",
                                   "q-k spectral scale max_h sigma(W_q,h^T W_k,h)/sqrt(d_h)",
                                   "max attention logit on a probe batch"), strict=True):
            n = min(len(r["probes"]) for r in rs)
            ys = [statistics.fmean(r["probes"][i][key] for r in rs) for i in range(n)]
            if all(y != y for y in ys):
                continue
            ax.plot(steps[:n], ys, marker=".", label=method)
            ax.set_title(label, fontsize=9)
            ax.set_xlabel("step")
    target = DEFAULT_MAX_LOGIT / json.loads(results[0]["key"])["model"]["d"]
    if any(m.startswith("guard_attn") for m in summary):
        axes[1].axhline(target, color="gray", linestyle=":", label="attention guard target")
    axes[1].set_yscale("log")
    axes[2].set_yscale("log")
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(f"Attention at the stress LR {stress_lr:g} (seed mean)")
    fig.tight_layout()
    names.append(f"{prefix}_attention.png")
    fig.savefig(img / names[-1], dpi=110)
    plt.close(fig)
    return names


def write_doc(path: Path, summary: dict, args: argparse.Namespace, lrs: list[float],
              stress_lr: float, unigram: float, images: list[str],
              elapsed: tuple[float, int], command: str, shock: dict | None = None) -> None:
    recipe = summary.get("recipe")
    lines = [
        "# Efficacy: does the guard make training less sensitive to the learning rate?",
        "",
        "*Written by `bench/efficacy.py`; the numbers below are from the command shown. "
        "Interpretation follows the generated part.*",
        "",
        "## Setup",
        "",
        f"- Command: `{command}`",
        f"- Hardware: {platform.machine()}, {os.cpu_count()} CPU cores shared with other jobs "
        f"(load average at the end {os.getloadavg()[0]:.1f}), torch {torch.__version__}, "
        f"{args.jobs} run(s) in parallel with 1 thread each; {elapsed[1]} runs took "
        f"{elapsed[0] / 60:.0f} min of training time in all (sum over runs).",
        f"- Model: pre-LN GPT, {args.layers} layers, d={args.d}, {args.heads} heads, "
        f"context {args.seq} bytes, batch {args.batch}, {args.steps} steps "
        f"({args.batch * args.seq * args.steps / 1e6:.2f} M training bytes).",
        "- Data: the Python standard library's `.py` files (sorted by path, concatenated); the "
        "last 5% of the bytes are the validation split; validation loss on "
        f"{args.val_batches} fixed batches. Byte-frequency (unigram) entropy of the validation "
        f"split: {unigram:.3f} nats; loss at initialization ~ln 256 = 5.545.",
        "- Recipe: AdamW (beta1 0.9, beta2 0.95), linear warmup over 10% of the steps, cosine "
        "decay to 10% of the peak, weight decay 0.1 on matrices (not on gains and biases), "
        "gradient-norm clipping 1.0. `adamw` drops the weight decay and the clipping.",
        f"- Peak LRs: {', '.join(f'{lr:g}' for lr in lrs)}; {args.seeds} seeds along the sweep; "
        f"stress point {stress_lr:g} (4x the standard {stress_lr / 4:g}) with "
        f"{args.stress_seeds} seeds; LR shock with {args.shock_seeds} seeds. Same seeds, same "
        "initial weights (up to the architecture change "
        "of qk_layernorm and sigma_reparam) and the same batches for every method.",
        "",
        "## Definitions",
        "",
        "- **LR sensitivity** (Wortsman et al. 2023, arXiv 2309.14322): "
        "`E_eta[min(loss(eta), loss_0) - loss*]` over the swept LRs, with `loss_0` the "
        "validation loss at initialization and `loss*` the method's best final validation loss "
        "over the sweep; computed per seed, mean ± std over seeds. Lower is better. A diverged "
        "run (non-finite loss) counts as `loss_0`.",
        "- **Largest stable LR**: the largest swept LR at which every seed ends with a finite "
        "validation loss no worse than halfway between the method's `loss*` and the unigram "
        "entropy (a model that stopped using context).",
        "- **Spike**: a maximal run of steps after warmup whose training loss exceeds the median "
        "of the previous 20 steps by more than 0.5 nats (or is non-finite).",
        "- **Attention entropy**: per head, the softmax entropy averaged over a fixed probe "
        "batch and query positions >= 1; the table gives the minimum over heads and over the "
        f"probes taken every {args.probe_every} steps. **Max logit**: the largest pre-softmax "
        "attention logit on the probe batch. **q-k scale**: "
        "`max_h sigma_max(W_q,h^T W_k,h) / sqrt(d_h)` by explicit SVD (n/a for qk-layernorm).",
        "- **Effective-rank retention**: min over block Linear layers and probes of "
        "`erank(W) / erank(W_init)` (full SVD).",
        "- **Interventions**: spectral_guard's thermostat triggers (plus attention-guard triggers "
        "and rescaled (pair, step)s); QK-Clip's clipped (head, step)s.",
        "- **Wall ratio**: seconds per training step relative to the recipe, measured after the "
        f"sweep in one process with one thread, {args.timing_rounds} round-robin passes of 40 "
        "steps over the methods, median (probes and evaluation excluded); the machine is "
        "shared, so differences under ~10% are noise.",
        "",
        "## Results",
        "",
        "Final validation loss (mean ± std over seeds; `k div` = k diverged runs):",
        "",
        "| method | " + " | ".join(f"lr {lr:g}" for lr in lrs) +
        " | LR sensitivity | loss* | largest stable LR |",
        "|---|" + "---|" * (len(lrs) + 3),
    ]
    for method, s in summary.items():
        cells = []
        for lr in lrs:
            c = _fmt(s["per_lr"][lr])
            if s["diverged"][lr]:
                c += f" ({s['diverged'][lr]} div)"
            cells.append(c)
        stable = "none" if s["max_stable_lr"] != s["max_stable_lr"] else f"{s['max_stable_lr']:g}"
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {_fmt(s['sensitivity'])} | "
                     f"{s['best']:.3f} | {stable} |")
    lines += [
        "",
        f"At the stress LR {stress_lr:g} (n = runs):",
        "",
        "| method | n | final val loss | spikes | min attn entropy | "
        "max attn logit | max q-k scale | min erank retention | interventions | wall ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method, s in summary.items():
        lines.append(
            f"| {method} | {s['stress_n']} | {_fmt(s['stress_final'])} | "
            f"{_fmt(s['spikes'], 1)} | {_fmt(s['min_entropy'])} | "
            f"{_fmt(s['max_logit'], 1)} | {_fmt(s['qk_scale'], 3)} | "
            f"{_fmt(s['min_erank_retention'])} | {_fmt(s['interventions'], 0)} | "
            f"{s['wall_ratio']:.2f} |")
    if recipe is not None:
        lines += ["", "Against the goals of issue 9 (computed from the table):", ""]
        rs = recipe["sensitivity"][0]
        best_lr = min(lrs, key=lambda lr: recipe["per_lr"][lr][0]
                      if recipe["per_lr"][lr][0] == recipe["per_lr"][lr][0] else math.inf)
        for method in ("guard_default", "guard", "guard_attn", "guard_attn_rescale",
                       "guard_msign", "guard_msign10"):
            if method not in summary:
                continue
            s = summary[method]
            change = s["sensitivity"][0] / rs - 1 if rs else math.nan
            harm = round(s["per_lr"][best_lr][0] / recipe["per_lr"][best_lr][0] - 1, 6) + 0.0
            lines.append(f"- `{method}`: LR sensitivity {change:+.0%} relative to the recipe's "
                         f"(goal: -30% or lower); at the recipe's best LR {best_lr:g} the final "
                         f"loss is {harm:+.2%} relative to the recipe's (goal: +0.5% or lower).")
        if shock:
            lines += ["", f"LR shock: peak LR {stress_lr:g} with **no warmup** (cosine decay "
                      "from step 0), against the recipe at the standard LR "
                      f"{stress_lr / 4:g} with warmup (the issue's rescue test). Rescued "
                      "fraction = (recipe shocked - method shocked) / (recipe shocked - recipe "
                      "tuned), seed-matched means.", "",
                      "| method | n | final val loss (shock) | rescued fraction of the gap | "
                      "min attn entropy | max q-k scale |", "|---|---|---|---|---|---|"]
            for method, v in shock.items():
                lines.append(f"| {method} | {v['n']} | {_fmt(v['final'])} | "
                             f"{v['rescued']:+.0%} | {_fmt(v['min_entropy'])} | "
                             f"{_fmt(v['qk_scale'])} |")
    lines += [""]
    if any(s["wired"] for s in summary.values()):
        lines.append("The attention guard ran inside `instrument(model, attention=True)`; the "
                     "`guard` and `assr_l2` rows are `instrument(model, attention=False)` (with "
                     "`actuator=\"l2\"` for `assr_l2`). `guard_default` is `instrument(model)` "
                     "with nothing else: the attention guard, the alarm-gated matrix sign "
                     "every 10 steps and the learning-rate back-off that the same alarm drives. "
                     "The other guard rows turn the periodic sign (and so the back-off) off "
                     "(`msign_every=0`) except `guard_msign10` (`msign_every=10, "
                     "msign_gate=\"always\"`: MSign's unconditional schedule); `guard_msign` is "
                     "`actuator=\"msign\"`. Interventions include the matrix signs applied.")
    lines += ["", "## Plots", ""]
    for name in images:
        lines.append(f"![{name}](img/{name})")
        lines.append("")
    marker = "<!-- interpretation (kept when the script rewrites this file) -->"
    old = path.read_text() if path.exists() else ""
    keep = old.split(marker, 1)[1] if marker in old else "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines).rstrip() + "\n\n" + marker + keep)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke test: tiny model, few runs")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--lrs", default="1e-3,4e-3,1.6e-2,6.4e-2")
    ap.add_argument("--stress-lr", type=float, default=1.6e-2)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--stress-seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--d", type=int, default=96)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--probe-every", type=int, default=25)
    ap.add_argument("--val-batches", type=int, default=16)
    ap.add_argument("--qkclip-tau", type=float, default=30.0)
    ap.add_argument("--shock-methods",
                    default="recipe,guard,guard_attn,guard_attn_rescale,guard_msign,"
                            "guard_msign10,guard_default,qkclip,qk_layernorm")
    ap.add_argument("--shock-seeds", type=int, default=3)
    ap.add_argument("--timing-rounds", type=int, default=3,
                    help="round-robin passes of the controlled step-time measurement (0: skip)")
    ap.add_argument("--attention-max-logit", type=float, default=DEFAULT_MAX_LOGIT,
                    help="attention guard target t = this / d (default: the guard's default)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--cache", type=Path, default=ROOT / "bench" / "results" / "efficacy.jsonl")
    ap.add_argument("--doc", type=Path, default=ROOT / "docs" / "efficacy.md")
    ap.add_argument("--img", type=Path, default=ROOT / "docs" / "img")
    args = ap.parse_args(argv)
    limit = None
    if args.quick:
        args.lrs, args.stress_lr, args.seeds, args.stress_seeds = "3e-3,3e-2", 3e-2, 1, 1
        args.steps, args.layers, args.d, args.heads, args.seq, args.batch = 30, 1, 32, 2, 32, 8
        args.probe_every, args.val_batches, args.shock_seeds = 10, 2, 1
        args.timing_rounds = min(args.timing_rounds, 1)
        limit = 400_000
    lrs = sorted(float(x) for x in args.lrs.split(","))
    if args.stress_lr not in lrs:
        raise SystemExit("--stress-lr must be one of --lrs")
    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise SystemExit(f"unknown method(s) {bad}; choose from {METHODS}")
    mcfg = ModelConfig(args.layers, args.d, args.heads, args.seq)
    base = RunSpec("recipe", 0.0, 0, args.steps, args.batch, mcfg, probe_every=args.probe_every,
                   qkclip_tau=args.qkclip_tau, val_batches=args.val_batches, limit=limit,
                   attn_logit=args.attention_max_logit)
    specs = []
    for seed in range(args.seeds):  # seed-major: a partial sweep has every method
        for lr in lrs:
            for m in methods:
                specs.append(replace(base, method=m, lr=lr, seed=seed, tag="sweep"))
    for seed in range(args.seeds, args.stress_seeds):
        for m in methods:
            specs.append(replace(base, method=m, lr=args.stress_lr, seed=seed, tag="stress"))
    shock_methods = [m for m in args.shock_methods.split(",") if m in methods]
    for seed in range(args.shock_seeds):
        for m in shock_methods:
            specs.append(replace(base, method=m, lr=args.stress_lr, seed=seed, tag="shock",
                                 warmup=0.0))
        if seed >= args.seeds and "recipe" in shock_methods:  # the tuned reference, same seed
            specs.append(replace(base, method="recipe", lr=args.stress_lr / 4, seed=seed,
                                 tag="tuned"))
    t0 = time.perf_counter()
    results = sweep(specs, args.cache, args.jobs)
    elapsed = (sum(r["wall"] for r in results), len(results))
    print(f"sweep: {time.perf_counter() - t0:.0f} s", flush=True)
    _, val = corpus_split(limit=limit)
    unigram = unigram_entropy(val)
    summary = summarize([r for r in results if r["tag"] not in ("shock", "tuned")], lrs,
                        args.stress_lr, unigram)
    shock = summarize_shock(results, args.stress_lr)
    if args.timing_rounds:
        torch.set_num_threads(1)
        timing = step_times(methods, replace(base, lr=args.stress_lr / 4),
                            args.timing_rounds, 10 if args.quick else 40)
        for m, t in timing.items():
            summary[m]["step_s"] = t
            summary[m]["wall_ratio"] = t / timing["recipe"] if "recipe" in timing else math.nan
    prefix = "efficacy_quick" if args.quick else "efficacy"
    images = plots(results, summary, lrs, args.stress_lr, args.img, prefix)
    command = "python bench/efficacy.py " + " ".join(argv if argv is not None else sys.argv[1:])
    write_doc(args.doc, summary, args, lrs, args.stress_lr, unigram, images, elapsed,
              command.strip(), shock)
    for method, s in summary.items():
        print(f"{method:>18}  sensitivity {_fmt(s['sensitivity'])}  loss* {s['best']:.3f}  "
              f"stress {_fmt(s['stress_final'])}")
    return summary


if __name__ == "__main__":
    main()
