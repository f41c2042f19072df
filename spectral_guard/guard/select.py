"""Which modules the guard instruments, and why the others are not.

A module is a candidate when it is an ``nn.Linear`` (subclasses included) whose weight is 2-D
with both sides >= 2. Then, in order: ``include`` regexes (when given, one must match the
module path), ``exclude`` regexes, an existing parametrization on ``weight``, a weight shared
with another module (tied), and the thresholds rule of ``<path>.weight``: a layer whose rule
switches every configured guard sensor off is not instrumented (unless ``watch_unguarded``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch.nn as nn
from torch.nn.utils import parametrize

from ..thresholds import Rule, Thresholds
from .config import GuardConfig
from .sensors import RELATIVE


@dataclass(frozen=True)
class Chosen:
    """A module to instrument, with its rule and its active relative sensors."""

    name: str
    module: nn.Linear
    rule: Rule
    sensors: dict[str, float]


@dataclass(frozen=True)
class Skipped:
    """A Linear module that is not instrumented, and why."""

    name: str
    reason: str


def active_sensors(sensors: tuple[str, ...], rule: Rule) -> dict[str, float]:
    """Those of ``sensors`` whose threshold in ``rule`` is set: ``{sensor: threshold}``."""
    out: dict[str, float] = {}
    for name in sensors:
        value = getattr(rule, RELATIVE[name].field)
        if value is not None:
            out[name] = float(value)
    return out


def select_layers(model: nn.Module, config: GuardConfig, thresholds: Thresholds
                  ) -> tuple[list[Chosen], list[Skipped]]:
    """Walk ``model`` once; returns the layers to instrument and the skipped ones."""
    uses: dict[int, int] = {}
    for mod in model.modules():
        for p in mod.parameters(recurse=False):
            uses[id(p)] = uses.get(id(p), 0) + 1
    chosen: list[Chosen] = []
    skipped: list[Skipped] = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        if config.include is not None and not any(re.search(p, name) for p in config.include):
            continue
        reason = _reason_to_skip(name, mod, config, uses)
        rule = thresholds.rule_for(f"{name}.weight")
        sensors = active_sensors(config.sensors, rule)
        if reason is None and not sensors and not config.watch_unguarded:
            reason = f"no guard threshold (group {thresholds.group_for(f'{name}.weight')})"
        if reason is not None:
            skipped.append(Skipped(name, reason))
        else:
            chosen.append(Chosen(name, mod, rule, sensors))
    return chosen, skipped


def _reason_to_skip(name: str, mod: nn.Linear, config: GuardConfig,
                    uses: dict[int, int]) -> str | None:
    if any(re.search(p, name) for p in config.exclude):
        return "excluded by pattern"
    if parametrize.is_parametrized(mod, "weight"):
        return "weight already parametrized"
    W = mod.weight
    if W.dim() != 2 or min(W.shape) < 2:
        return "matrix too small"
    if uses.get(id(W), 0) > 1:
        return "tied weight (shared with another module)"
    return None
