""":func:`auto_calibrate`: a :class:`~spectral_guard.guard.config.GuardConfig` for a live model.

Sampling settings come from the model's parameter count (:data:`TIERS`); thresholds from a
file, or learned from the model's own weights by calibration's law
(:func:`spectral_guard.calibration.calibrate` on the model: the audit's own reader and
measurements, every group's floors and ceilings passing the model's own matrices).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..calibration import CalibrationRule, CalibrationWarning, RandomWeightsWarning, calibrate
from ..thresholds import Thresholds, default_thresholds, load_thresholds
from .config import DEFAULT_LAMBDA_BASE, GuardConfig

if TYPE_CHECKING:
    from torch import nn


@dataclass(frozen=True)
class Tier:
    """Guard sampling settings for models up to ``max_params`` parameters."""

    name: str
    max_params: float
    ratio: float
    every: int
    biopsy_limit: int
    lambda_l2: float
    paper_biopsy_limit: int


TIERS: tuple[Tier, ...] = (
    Tier("< 100M", 100e6, 0.05, 1, 192, 1e-4, 1024),
    Tier("100M-500M", 500e6, 0.05, 2, 256, 5e-5, 768),
    Tier("500M-2B", 2e9, 0.02, 5, 256, 2e-5, 512),
    Tier("> 2B", math.inf, 0.01, 10, 256, 1e-5, 384),
)
"""The seed paper's tier table with our biopsy limits (the paper's in ``paper_biopsy_limit``)
and, for models under 100M parameters, the guard's own defaults (:class:`GuardConfig`: ratio
0.05 where the paper has 0.10; a test keeps the two equal; docs/calibration.md says why).

Departure, measured with ``bench/tier_costs.py`` (docs/calibration.md): on this 2-core CPU one
biopsy decomposition costs 0.9 ms at 192, 1.7 ms at 256, 8.9 ms at 512, 24 ms at 768 and 60 ms
at 1024 (66x the default's; ``svd`` for the conditioning sensor 2.8 ms vs 269 ms). Biopsy
limits are capped at 256, and models under 100M parameters (short steps, where the fixed cost
per check weighs most) keep the guard's default 192. ``lambda_l2`` is the paper's base lambda
for its L2 actuator; for the spectral actuator the same ladder is applied to its own default
base (``0.05 * lambda_l2 / 1e-4``)."""


def tier_for(n_params: int) -> Tier:
    """The tier of a model with ``n_params`` parameters (boundaries belong to the upper tier:
    exactly 100M is ``100M-500M``)."""
    return next(t for t in TIERS if n_params < t.max_params)


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters' element count (tied weights once; meta tensors count too)."""
    return sum(p.numel() for p in model.parameters())


def auto_calibrate(model: nn.Module, thresholds: Thresholds | str | Path | None = None, *,
                   actuator: str = "spectral", seed: int = 0, limit: int = 128,
                   rule: CalibrationRule | None = None, allow_random: bool = False,
                   **overrides: Any) -> GuardConfig:
    """A :class:`~spectral_guard.guard.config.GuardConfig` for ``model``: sampling settings
    from its parameter count (:data:`TIERS`), thresholds from ``thresholds`` (a file or a
    :class:`Thresholds`) or, when ``None``, learned from the model's own weights (biopsy mode,
    ``limit`` and ``seed``) with calibration's law; guard fields: shipped defaults.

    A model whose weights look randomly initialized (Marchenko-Pastur spectra) gets a
    :class:`~spectral_guard.calibration.RandomWeightsWarning`, and the shipped default
    thresholds instead of thresholds learned from noise unless ``allow_random=True``. A model
    on the meta device cannot be measured: shipped defaults, with a warning. ``overrides``
    replace any GuardConfig field (e.g. ``ratio=0.2``). Render it with
    :func:`spectral_guard.guard.config.render_config`.
    """
    if actuator not in DEFAULT_LAMBDA_BASE:
        raise ValueError(f"actuator must be one of {', '.join(DEFAULT_LAMBDA_BASE)}, "
                         f"got {actuator!r}")
    unknown = sorted(set(overrides) - {f.name for f in fields(GuardConfig)})
    if unknown:
        raise TypeError(f"unknown GuardConfig field(s): {', '.join(unknown)}")
    n_params = count_parameters(model)
    tier = tier_for(n_params)
    scale = DEFAULT_LAMBDA_BASE[actuator] / DEFAULT_LAMBDA_BASE["l2"]
    info: dict[str, Any] = {"parameters": n_params, "tier": tier.name, "ratio": tier.ratio,
                            "every": tier.every, "biopsy_limit": tier.biopsy_limit,
                            "lambda_base": tier.lambda_l2 * scale, "actuator": actuator}
    if thresholds is not None:
        th = thresholds if isinstance(thresholds, Thresholds) else load_thresholds(thresholds)
        source = "object" if isinstance(thresholds, Thresholds) else str(thresholds)
        info["thresholds"] = f"given ({source})"
    else:
        th = _thresholds_from_model(model, seed=seed, limit=limit,
                                    rule=rule or CalibrationRule(), allow_random=allow_random,
                                    info=info)
    th = replace(th, provenance={**th.provenance, "auto_calibrate": info})
    settings = {"ratio": tier.ratio, "every": tier.every, "biopsy_limit": tier.biopsy_limit,
                "lambda_base": tier.lambda_l2 * scale, "actuator": actuator, "seed": seed,
                "thresholds": th}
    return GuardConfig(**{**settings, **overrides})


def _thresholds_from_model(model: nn.Module, *, seed: int, limit: int, rule: CalibrationRule,
                           allow_random: bool, info: dict[str, Any]) -> Thresholds:
    from ..checkpoint import CheckpointError

    shipped = default_thresholds()
    if any(p.is_meta for p in model.parameters() if p.ndim >= 2):
        warnings.warn("model has meta tensors: its weights cannot be measured; using the "
                      "shipped default thresholds", CalibrationWarning, stacklevel=3)
        info["thresholds"] = "shipped defaults (meta tensors: not measured)"
        return shipped
    try:
        cal = calibrate(model, mode="biopsy", limit=limit, seed=seed, rule=rule)
    except CheckpointError:  # nothing to measure (no matrix)
        info["thresholds"] = "shipped defaults (no matrix to measure)"
        return shipped
    subject = "the model's weights"
    info["random_weights"] = cal.random.to_json_dict()
    if cal.looks_random:
        if not allow_random:
            warnings.warn(cal.random.message(subject) + "; using the shipped default "
                          "thresholds (allow_random=True learns from them anyway)",
                          RandomWeightsWarning, stacklevel=3)
            info["thresholds"] = "shipped defaults (weights look random)"
            return shipped
        warnings.warn(cal.random.message(subject) + "; learning from them anyway "
                      "(allow_random=True)", RandomWeightsWarning, stacklevel=3)
    info["thresholds"] = f"learned from the model's {len(cal.matrices)} matrices"
    keep = ("tool", "mode", "limit", "seed", "rule", "q_k_logit_scale", "groups")
    provenance = {"source": "spectral_guard.auto_calibrate", "guard_fields": "shipped defaults",
                  **{k: cal.thresholds.provenance[k] for k in keep}}
    return replace(cal.thresholds, provenance=provenance)
