"""Figures (the ``plot`` extra, matplotlib): checkpoint health by depth, one matrix's ESD, and
the guard's readings over training.

* :func:`plot_audit` (``spectral-guard audit CKPT --plot out.png``): per-matrix stable-rank
  ratio, effective-rank ratio and condition number in depth order, markers by role
  (attention, MLP, embeddings, heads, other), flagged matrices ringed in red;
* :func:`plot_esd` (``spectral-guard esd CKPT NAME --plot out.png``): the empirical spectral
  density on log-log axes with the power-law fit and its ``xmin`` (:func:`fit_esd`);
* :func:`plot_guard_history` (``guard.plot(path)``): each guarded layer's effective- and
  stable-rank retention and lambda over the optimizer steps, interventions marked.

matplotlib is imported when a figure is drawn, through its object API (no pyplot, no global
backend change); the image format follows the path's suffix (``.png``, ``.svg``, ``.pdf``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import require

ROLE_STYLE = {
    "attention": ("tab:blue", "o", "attention"),
    "mlp": ("tab:orange", "s", "MLP"),
    "embeddings": ("tab:green", "^", "embeddings"),
    "heads": ("tab:purple", "v", "output heads"),
    "other": ("tab:gray", "D", "other"),
}
"""Role group (:func:`spectral_guard.thresholds.role_group`) -> (colour, marker, legend label)."""

_DEPTH = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def _figure(rows: int, height: float) -> tuple[Any, Any]:
    require("matplotlib", "plots")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, height), layout="constrained")
    axes = fig.subplots(rows, 1, sharex=True, squeeze=False)[:, 0]
    return fig, axes


def _save(fig: Any, path: str | Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path = Path(path)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110)
    return path


def _role(name: str) -> str:
    from spectral_guard.thresholds import role_group

    role = role_group(name)
    return role if role in ROLE_STYLE else "other"


def _depth_key(name: str) -> tuple[int, float, str]:
    """Order by depth: embeddings first, numbered blocks by number, heads and the rest last."""
    from spectral_guard.checkpoint import natural_key

    match = _DEPTH.search(name)
    role = _role(name)
    if match is not None:
        return (1, float(match.group(1)), natural_key(name))
    return (0 if role == "embeddings" else 2, 0.0, natural_key(name))


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


# ----------------------------------------------------------------------------------------------
# Audit


def plot_audit(report: Any, path: str | Path, title: str | None = None) -> Path:
    """Draw an audit :class:`~spectral_guard.audit.Report` by depth; returns ``path``.

    Panels: stable-rank ratio ``SR / min(m, n)``, effective-rank ratio ``erank / min(m, n)``,
    condition number (log scale). One point per matrix, in depth order (the first number in
    the name is the block); marker and colour give the role. A matrix whose status is not
    ``ok`` is ringed in red and named in the legend; a non-finite one (no spectrum) gets a red
    dotted line across the panels.
    """
    matrices = sorted(report.matrices, key=lambda m: _depth_key(m.name))
    if not matrices:
        raise ValueError("the report holds no matrices to draw")
    fig, axes = _figure(3, 8.5)
    panels = (("stable_rank_ratio", "stable-rank ratio\nSR / min(m, n)", False),
              ("effective_rank_ratio", "effective-rank ratio\nerank / min(m, n)", False),
              ("condition_number", "condition number κ", True))
    x_of = {id(m): i for i, m in enumerate(matrices)}
    for ax, (field, label, log) in zip(axes, panels, strict=True):
        for role, (color, marker, legend) in ROLE_STYLE.items():
            pts = [(x_of[id(m)], getattr(m, field)) for m in matrices
                   if _role(m.name) == role and _finite(getattr(m, field))]
            if pts:
                ax.scatter(*zip(*pts, strict=True), c=color, marker=marker, s=22, label=legend,
                           zorder=3)
        bad = [(x_of[id(m)], getattr(m, field)) for m in matrices
               if m.status != "ok" and _finite(getattr(m, field))]
        if bad:
            ax.scatter(*zip(*bad, strict=True), s=130, facecolors="none", edgecolors="red",
                       linewidths=1.6, label="flagged (status != ok)", zorder=4)
        for m in matrices:
            if m.status == "nonfinite":
                ax.axvline(x_of[id(m)], color="red", linestyle=":", linewidth=1.2)
        if log:
            ax.set_yscale("log")
            singular = [x_of[id(m)] for m in matrices if m.status != "nonfinite" and (
                m.singular or (m.condition_number is not None
                               and not math.isfinite(m.condition_number)))]
            if singular:  # kappa = inf: a red triangle at the top edge
                from matplotlib.transforms import blended_transform_factory

                where = blended_transform_factory(ax.transData, ax.transAxes)
                ax.scatter(singular, [0.97] * len(singular), marker="^", color="red", s=45,
                           transform=where, clip_on=False, zorder=4, label="singular (κ = ∞)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    _depth_ticks(axes[-1], [m.name for m in matrices])
    flagged = [m for m in matrices if m.status != "ok"]
    handles, labels = axes[0].get_legend_handles_labels()
    more_h, more_l = axes[-1].get_legend_handles_labels()
    handles += [h for h, lab in zip(more_h, more_l, strict=True) if lab.startswith("singular")]
    labels += [lab for lab in more_l if lab.startswith("singular")]
    if any(m.status == "nonfinite" for m in matrices):
        from matplotlib.lines import Line2D

        handles.append(Line2D([], [], color="red", linestyle=":"))
        labels.append("non-finite (no spectrum)")
    axes[0].legend(handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                   fontsize=8, frameon=False)
    if flagged:
        text = "\n".join(f"{m.name}: {m.status}" for m in flagged[:12])
        if len(flagged) > 12:
            text += f"\n... {len(flagged) - 12} more"
        axes[1].text(1.01, 1.0, "flagged:\n" + text, transform=axes[1].transAxes, fontsize=7,
                     va="top", color="darkred")
    sources = ", ".join(Path(s["path"]).name for s in report.sources)
    counts = ", ".join(f"{c} {s}" for s, c in report.status_counts().items() if c)
    fig.suptitle(title or f"{sources}: {len(matrices)} matrices ({counts}), {report.mode} mode",
                 fontsize=10)
    return _save(fig, path)


def _depth_ticks(ax: Any, names: Sequence[str]) -> None:
    """Ticks at the first matrix of each block, labelled with the block number."""
    ticks, labels, last = [], [], None
    for i, name in enumerate(names):
        match = _DEPTH.search(name)
        block = match.group(1) if match else ("emb" if _role(name) == "embeddings" else "head")
        if block != last:
            ticks.append(i)
            labels.append(block)
            last = block
    step = max(1, len(ticks) // 40)
    ax.set_xticks(ticks[::step], labels[::step], fontsize=7)
    ax.set_xlabel("matrices in depth order (tick: first matrix of a block, labelled by block)")
    ax.set_xlim(-1, len(names))


# ----------------------------------------------------------------------------------------------
# Empirical spectral density


@dataclass(frozen=True)
class EsdFit:
    """One matrix's ESD and its power-law tail fit (:func:`fit_esd`)."""

    eigenvalues: torch.Tensor
    """Non-zero eigenvalues ``s_i^2`` of ``W^T W``, ascending (float64)."""
    alpha: float
    xmin: float
    n_tail: int
    shape: tuple[int, int]

    def as_dict(self) -> dict[str, Any]:
        ev = self.eigenvalues
        return {"shape": list(self.shape), "eigenvalues": int(ev.numel()),
                "alpha": self.alpha if math.isfinite(self.alpha) else None,
                "xmin": self.xmin if math.isfinite(self.xmin) else None,
                "n_tail": self.n_tail,
                "lambda_min": float(ev[0]) if ev.numel() else None,
                "lambda_max": float(ev[-1]) if ev.numel() else None}


def fit_esd(W: torch.Tensor) -> EsdFit:
    """ESD of ``W`` (:func:`spectral_guard.sensors.esd`) and its power-law fit
    (:func:`spectral_guard.sensors.powerlaw_fit`: ``xmin`` by minimum KS distance, the fit the
    audit's alpha and WeightWatcher report). Numerically zero eigenvalues
    (``s_i <= rank_rtol * s_1``) are left out. Raises ``ValueError`` when ``W`` is not a finite
    matrix.
    """
    from spectral_guard.sensors import esd, powerlaw_fit, rank_rtol

    if W.dim() != 2:
        raise ValueError(f"expected a matrix, got shape {tuple(W.shape)}")
    if not bool(torch.isfinite(W).all()):
        raise ValueError("the matrix has non-finite values: it has no spectrum")
    eigs = esd(W)
    if eigs.numel() and float(eigs[-1]) > 0:
        cut = (rank_rtol(tuple(W.shape), W.dtype) ** 2) * float(eigs[-1])
        eigs = eigs[eigs > cut]
    else:
        eigs = eigs[:0]
    if eigs.numel() >= 2:
        fit = powerlaw_fit(eigs)
        xmin, alpha, n_tail = fit.xmin, fit.alpha, fit.n_tail
    else:
        xmin, alpha, n_tail = math.nan, math.nan, 0
    return EsdFit(eigs, alpha, xmin, n_tail, (int(W.shape[0]), int(W.shape[1])))


def esd_density(fit: EsdFit) -> tuple[torch.Tensor, torch.Tensor]:
    """``(edges, density)`` of the ESD over log-spaced bins from the smallest to the largest
    eigenvalue (10 to 60 bins): ``sum(density * widths) == 1``."""
    ev = fit.eigenvalues.cpu()
    if ev.numel() < 2:
        raise ValueError("fewer than 2 non-zero eigenvalues: nothing to draw")
    lo, hi = float(ev[0]), float(ev[-1])
    if hi <= lo:
        hi = lo * 1.01
    n_bins = min(60, max(10, ev.numel() // 4))
    edges = torch.logspace(math.log10(lo), math.log10(hi), n_bins + 1, dtype=torch.float64)
    edges[0], edges[-1] = lo, hi  # exact ends: logspace rounding must not drop an eigenvalue
    counts = torch.histogram(ev, bins=edges).hist
    return edges, counts / (ev.numel() * (edges[1:] - edges[:-1]))


def plot_esd(fit: EsdFit, path: str | Path, name: str = "") -> Path:
    """Log-log ESD (density over log-spaced bins, :func:`esd_density`), the fitted tail
    ``p(x) ~ x^-alpha`` from ``xmin`` and a line at ``xmin``; returns ``path``."""
    ev = fit.eigenvalues
    edges, density = esd_density(fit)
    hi = float(edges[-1])
    fig, axes = _figure(1, 5.0)
    ax = axes[0]
    ax.stairs(density.numpy(), edges.numpy(), fill=True, alpha=0.45, color="tab:blue",
              label=f"ESD ({ev.numel()} eigenvalues)")
    if math.isfinite(fit.alpha):
        x = torch.logspace(math.log10(fit.xmin), math.log10(hi), 100, dtype=torch.float64)
        tail = fit.n_tail / ev.numel()
        p = tail * (fit.alpha - 1) / fit.xmin * (x / fit.xmin) ** (-fit.alpha)
        ax.plot(x.numpy(), p.numpy(), color="tab:red", linewidth=2,
                label=f"power-law fit, alpha = {fit.alpha:.2f} ({fit.n_tail} eigenvalues)")
        ax.axvline(fit.xmin, color="black", linestyle="--", linewidth=1.2,
                   label=f"xmin = {fit.xmin:.3g} (minimum KS distance)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("eigenvalue λ of WᵀW (squared singular value)")
    ax.set_ylabel("density")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8)
    m, n = fit.shape
    ax.set_title(f"{name} ({m} x {n}): empirical spectral density" if name else
                 f"{m} x {n}: empirical spectral density", fontsize=10)
    return _save(fig, path)


# ----------------------------------------------------------------------------------------------
# Guard history


def plot_guard_history(guard: Any, path: str | Path) -> Path:
    """Draw ``guard.history`` (one record per applied layer check); returns ``path``.

    Panels over the optimizer steps: effective-rank retention (with each distinct floor of the
    guarded layers as a dashed line), stable-rank retention, and lambda. One line per layer,
    coloured per layer (up to 10 layers, named in the legend) or by role; a check that fired
    (an intervention, for any of the layer's rules) is a red cross.
    """
    records = list(guard.history)
    if not records:
        raise ValueError("guard.history is empty: no check has been applied yet")
    by_layer: dict[str, list[dict]] = {}
    for rec in records:
        by_layer.setdefault(rec["layer"], []).append(rec)
    fig, axes = _figure(3, 8.5)
    panels = (("effective_rank_retention", "effective-rank\nretention"),
              ("stable_rank_retention", "stable-rank\nretention"),
              ("lambda", "lambda"))
    # up to 10 layers: one colour and legend entry per layer; more: one colour per role
    per_layer = len(by_layer) <= 10
    labelled: set[str] = set()
    for ax, (field, label) in zip(axes, panels, strict=True):
        for i, (name, recs) in enumerate(by_layer.items()):
            role = _role(f"{name}.weight")
            color = f"C{i}" if per_layer else ROLE_STYLE[role][0]
            key = name if per_layer else role
            pts = [(r["step"], r[field]) for r in recs if _finite(r.get(field))]
            if not pts:
                continue
            legend = None
            if key not in labelled and field == panels[0][0]:
                labelled.add(key)
                legend = name if per_layer else ROLE_STYLE[role][2]
            ax.plot(*zip(*pts, strict=True), color=color, alpha=0.75, linewidth=1.1,
                    marker=".", markersize=3, label=legend)
            fired = [(r["step"], r[field]) for r in recs if r.get("triggered")
                     and _finite(r.get(field))]
            if fired:
                ax.scatter(*zip(*fired, strict=True), marker="x", color="red", s=30, zorder=4)
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    floors = sorted({v["thresholds"]["effective_rank"] for v in guard.stats()["layers"].values()
                     if "effective_rank" in v.get("thresholds", {})})
    for floor in floors:
        axes[0].axhline(floor, color="black", linestyle="--", linewidth=1)
    from matplotlib.lines import Line2D

    handles, labels = axes[0].get_legend_handles_labels()
    handles.append(Line2D([], [], marker="x", color="red", linestyle=""))
    labels.append("intervention (check fired)")
    if floors:
        handles.append(Line2D([], [], color="black", linestyle="--"))
        labels.append("retention floor")
    axes[0].legend(handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8,
                   frameon=False)
    axes[-1].set_xlabel("optimizer step")
    fired = sum(1 for r in records if r.get("triggered"))
    fig.suptitle(f"guard history: {len(by_layer)} layers, {len(records)} checks, "
                 f"{fired} interventions", fontsize=10)
    return _save(fig, path)


__all__ = ["EsdFit", "ROLE_STYLE", "esd_density", "fit_esd", "plot_audit", "plot_esd",
           "plot_guard_history"]
