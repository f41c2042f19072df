"""GuardConfig: every knob of :func:`spectral_guard.instrument`, with documented defaults."""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal

from ..thresholds import Thresholds, load_thresholds
from .sensors import SENSOR_NAMES

SENSORS = SENSOR_NAMES
"""Relative sensors that can drive the thermostat (see :mod:`.sensors`)."""

Actuator = Literal["spectral", "l2", "msign"]

DEFAULT_LAMBDA_BASE = {"spectral": 0.05, "l2": 1e-4, "msign": 0.05}


@dataclass(frozen=True)
class GuardConfig:
    """Configuration of the training-time guard (see ``docs/guard.md``).

    Sampling
      ratio           fraction of guarded layers visited by one check (``ceil(ratio * L)``)
      every           run a check every ``every`` optimizer steps
      seed            seeds the schedule, biopsies and power-iteration starts (no global RNG)
    Sensors
      sensors         which sensors drive the thermostat (subset of :data:`SENSORS`)
      biopsy_limit    sensors run on a seeded ``<= limit x limit`` submatrix (one SVD per check)
      power_iters     warm power-iteration steps per check for ``sigma_max`` and its vectors
      fiedler_rows    rows of the biopsy used by the Fiedler sensor (one extra eigvalsh)
      thresholds      a :class:`Thresholds`, the path of a thresholds file, or ``None`` (defaults)
      collapse_rule   also apply the thresholds' absolute collapse rule (the audit's stable-rank,
                      stable-rank-ratio and effective-rank-ratio floors, gated by
                      ``collapse_min_dim``) on the biopsy: flags layers that are collapsed
                      already when instrumented, which no retention ratio can see
    Thermostat: ``lambda = lambda_base * (1 + gain * severity)`` when triggered, else
      ``lambda <- decay * lambda`` (0 once below ``lambda_floor * lambda_base``)
      actuator        ``"spectral"`` (failure-specific terms), ``"l2"`` (``lambda ||W||_F^2``),
                      or ``"msign"`` (a layer flagged for collapse has its weight replaced after
                      the optimizer step by its Frobenius-norm-preserving matrix sign,
                      ``guard/msign.py``; conditioning keeps the spectral term)
      msign_every     ``0`` (off) or ``N``: every ``N`` optimizer steps, the matrix sign of the
                      layers chosen by ``msign_gate`` (MSign's periodic schedule, arXiv
                      2602.01734; with any actuator; chosen by bench/efficacy.py)
      msign_gate      ``"alarm"``: only at steps when the guard's alarm is raised (below), and
                      only layers that looked randomly initialized when instrumented (a
                      pretrained layer is never signed); ``"always"``: every penalized layer at
                      every multiple of ``msign_every``
      msign_quorum    the alarm, first half (``guard/alarm.py``): at least this fraction of
                      the penalized layers treated for collapse at once, each fallen suddenly
                      or collapsed deep
                      (the signature of a too-high learning rate in bench/efficacy.py; 0.10
                      signed a healthy run, 0.25 helped less at the highest LR)
      msign_fall      a layer counts toward the quorum only if, at some check of its
                      treatment for collapse, it had lost 0.3 of effective-rank retention
                      within this many optimizer steps (7-36 at too-high LRs, 120-290 in
                      healthy runs, in bench/efficacy.py's 600-step schedule; ``0``: any layer
                      treated for collapse counts, which signed healthy 1200-step runs)
      msign_depth     ... or if its latest relative collapse reading is at least this far
                      below its floor, as the thermostat's severity ``1 - x / t`` (0.15:
                      effective-rank retention <= 0.425 at the default floor 0.5); no time in
                      it, so it counts at any check period; ``None``: off, ``0``: any layer
      msign_alarm     the alarm, second half: an attention pair's latest scale over this
                      factor times its target
    Learning-rate back-off (``guard/backoff.py``: every param group's ``lr`` scaled during
      ``optimizer.step()`` only)
      lr_policy       ``"graded"``: the scale follows the fraction ``f`` of penalized layers
                      treated for collapse, ``max(lr_floor, lr_backoff ** (f / msign_quorum))``,
                      down at once, doubling back at most once per ``lr_recovery`` check periods;
                      ``"alarm"``: scaled by ``lr_backoff`` more at each step where the alarm
                      signs layers, never rising again (the policy before issue 18)
      lr_backoff      the scale at the quorum (``"graded"``) or per alarm (``"alarm"``);
                      ``1.0``: the back-off is off
      lr_floor        the smallest scale the back-off reaches
      lr_recovery     ``"graded"``: check periods of a layer per doubling back (``0``: never)
      lr_grace        ``"graded"``: this many treated layers are not counted in ``f`` (healthy
                      300-step runs of bench/band_probe.py had up to 2 of 24 layers treated,
                      4x the LR 3 to 13: docs/efficacy.md)
      lr_count        ``"graded"``: which layers ``f`` counts: ``"treated"`` (every layer
                      treated for collapse) or ``"sudden"`` (only those fallen within
                      ``msign_fall`` steps, the alarm's quorum rule)
    Selection (``guard/select.py``): an ``nn.Linear`` with a 2-D weight, both sides >= 2
      include         ``None`` (every candidate) or regexes: a module path must match one
      exclude         regexes: a module path matching one is skipped (``guard.skipped``)
      watch_unguarded also instrument layers whose thresholds switch every sensor off (checked
                      and reported, never penalized)
    Integration
      auto_loss       add the pending penalty to ``output.loss`` / ``output["loss"]``
      history         how many per-layer check records ``guard.history`` keeps (newest)
      step_on         ``"optimizer"``: advance on the step of any optimizer holding a guarded
                      weight (or only the one given to :meth:`Guard.attach`); ``"manual"``:
                      only :meth:`Guard.step` advances
    Attention logits (``guard/attention.py``): per head ``s_h = sigma_max(W_q,h^T W_k,h) /
      sqrt(d_h)`` of each query-key pair, checked on the same schedule
      attention           enable the attention-logit guard (on by default: docs/efficacy.md)
      attention_actuator  ``"penalty"`` (thermostat-driven hinge ``lambda sum_h
                          relu(s_h / t - 1)^2``; the default, chosen by ``bench/efficacy.py``,
                          see docs/efficacy.md) or ``"rescale"`` (post-step scaling of the
                          offending heads' W_q and W_k rows to ``s_h = t``, like QK-Clip)
      attention_max_scale target ``t`` on ``s_h``; ``None``: ``max(64 / n, 1.5 s_0)`` (``n``
                          the input width: a bound of 64 on the logit of unit-RMS inputs;
                          ``s_0`` the pair's scale when instrumented, for pretrained weights)
      attention_lambda    ``lambda_base`` of the attention thermostat
      attention_pairs     ``None`` (find pairs by name patterns) or explicit
                          ``(q_module, k_module[, n_heads])`` tuples (the same name twice: a
                          fused ``[q; k; v]`` projection)
    """

    ratio: float = 0.05
    every: int = 1
    seed: int = 0
    sensors: tuple[str, ...] = ("effective_rank",)
    biopsy_limit: int = 192
    power_iters: int = 1
    fiedler_rows: int = 64
    thresholds: Thresholds | str | Path | None = None
    collapse_rule: bool = True
    actuator: Actuator = "spectral"
    msign_every: int = 10
    msign_gate: Literal["alarm", "always"] = "alarm"
    msign_quorum: float = 0.15
    msign_alarm: float = 2.0
    msign_fall: int = 60
    msign_depth: float | None = 0.15
    lr_backoff: float = 0.5
    lr_floor: float = 0.25
    lr_policy: Literal["graded", "alarm"] = "graded"
    lr_recovery: float = 25.0
    lr_grace: int = 2
    lr_count: Literal["treated", "sudden"] = "treated"
    lambda_base: float | None = None
    gain: float = 4.0
    decay: float = 0.5
    lambda_floor: float = 0.01
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    watch_unguarded: bool = False
    auto_loss: bool = True
    history: int = 10_000
    step_on: Literal["optimizer", "manual"] = "optimizer"
    attention: bool = True
    attention_actuator: Literal["penalty", "rescale"] = "penalty"
    attention_max_scale: float | None = None
    attention_lambda: float = 0.1
    attention_pairs: tuple[tuple[Any, ...], ...] | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.ratio <= 1.0:
            raise ValueError(f"ratio must be in (0, 1], got {self.ratio}")
        if self.every < 1:
            raise ValueError(f"every must be >= 1, got {self.every}")
        bad = [s for s in self.sensors if s not in SENSORS]
        if bad:
            raise ValueError(f"unknown sensor(s) {bad}: choose from {list(SENSORS)}")
        if self.actuator not in ("spectral", "l2", "msign"):
            raise ValueError("actuator must be 'spectral', 'l2' or 'msign', got "
                             f"{self.actuator!r}")
        if self.msign_gate not in ("alarm", "always"):
            raise ValueError(f"msign_gate must be 'alarm' or 'always', got {self.msign_gate!r}")
        if not 0.0 < self.msign_quorum <= 1.0:
            raise ValueError(f"msign_quorum must be in (0, 1], got {self.msign_quorum}")
        if not self.msign_alarm >= 1.0:
            raise ValueError(f"msign_alarm must be >= 1, got {self.msign_alarm}")
        if not 0.0 < self.lr_backoff <= 1.0:
            raise ValueError(f"lr_backoff must be in (0, 1] (1: off), got {self.lr_backoff}")
        if not 0.0 < self.lr_floor <= 1.0:
            raise ValueError(f"lr_floor must be in (0, 1], got {self.lr_floor}")
        if self.lr_policy not in ("graded", "alarm"):
            raise ValueError(f"lr_policy must be 'graded' or 'alarm', got {self.lr_policy!r}")
        if not self.lr_recovery >= 0:
            raise ValueError(f"lr_recovery must be >= 0 (0: never rises), got {self.lr_recovery}")
        if self.lr_count not in ("treated", "sudden"):
            raise ValueError(f"lr_count must be 'treated' or 'sudden', got {self.lr_count!r}")
        if self.lr_grace < 0:
            raise ValueError(f"lr_grace must be >= 0, got {self.lr_grace}")
        if self.msign_fall < 0:
            raise ValueError(f"msign_fall must be >= 0 (0: any fall), got {self.msign_fall}")
        depth = self.msign_depth
        if depth is not None and (isinstance(depth, bool) or not isinstance(depth, numbers.Real)
                                  or not 0.0 <= depth < 1.0):
            raise ValueError(f"msign_depth must be in [0, 1) or None (off), got {depth!r}")
        if self.msign_every < 0:
            raise ValueError(f"msign_every must be >= 0 (0: off), got {self.msign_every}")
        if self.step_on not in ("optimizer", "manual"):
            raise ValueError(f"step_on must be 'optimizer' or 'manual', got {self.step_on!r}")
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {self.decay}")
        if self.history < 0:
            raise ValueError(f"history must be >= 0, got {self.history}")
        if self.biopsy_limit < 2 or self.power_iters < 1:
            raise ValueError("biopsy_limit must be >= 2 and power_iters >= 1")
        if self.attention_actuator not in ("penalty", "rescale"):
            raise ValueError("attention_actuator must be 'penalty' or 'rescale', got "
                             f"{self.attention_actuator!r}")
        if self.attention_max_scale is not None and not self.attention_max_scale > 0:
            raise ValueError(f"attention_max_scale must be > 0, got {self.attention_max_scale}")
        if self.attention_lambda < 0:
            raise ValueError(f"attention_lambda must be >= 0, got {self.attention_lambda}")
        if self.attention_pairs is not None:
            pairs = tuple(tuple(p) for p in self.attention_pairs)
            if any(len(p) not in (2, 3) for p in pairs):
                raise ValueError("attention_pairs entries are (q_module, k_module[, n_heads])")
            object.__setattr__(self, "attention_pairs", pairs)
        for name in ("sensors", "exclude"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.include is not None:
            object.__setattr__(self, "include", tuple(self.include))
        self._validate_rest()

    def _validate_rest(self) -> None:
        """The fields the checks above leave out: one-line errors."""
        def number(name: str, ok: bool, want: str) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not ok:
                raise ValueError(f"{name} must be {want}, got {value!r}")

        def flag(name: str) -> None:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")

        number("seed", isinstance(self.seed, numbers.Integral), "an int")
        rows = self.fiedler_rows
        number("fiedler_rows", isinstance(rows, numbers.Integral) and rows >= 2, "an int >= 2")
        number("gain", self.gain >= 0, ">= 0")
        number("lambda_floor", 0.0 <= self.lambda_floor < 1.0, "in [0, 1)")
        if self.lambda_base is not None:
            number("lambda_base", self.lambda_base >= 0, ">= 0 or None (the actuator's default)")
        for name in ("every", "history", "biopsy_limit", "power_iters", "msign_every",
                     "msign_fall", "lr_grace"):
            number(name, isinstance(getattr(self, name), numbers.Integral), "an int")
        for name in ("collapse_rule", "watch_unguarded", "auto_loss", "attention"):
            flag(name)
        for name in ("include", "exclude"):
            for pattern in getattr(self, name) or ():
                try:
                    re.compile(pattern)
                except (TypeError, re.error) as err:
                    raise ValueError(f"{name} holds {pattern!r}, not a regex: {err}") from None

    @property
    def check_period(self) -> int:
        """Optimizer steps between two checks of one layer: ``every * ceil(1 / ratio)``."""
        return self.every * math.ceil(1.0 / self.ratio)

    @property
    def sees_falls(self) -> bool:
        """Can the alarm see a layer fall within ``msign_fall`` steps (guard/alarm.py)? Not
        when a layer is checked less often than that (the depth count still sees it)."""
        return not (self.msign_every and self.msign_gate == "alarm"
                    and 0 < self.msign_fall < self.check_period)

    @property
    def base(self) -> float:
        """The effective ``lambda_base`` (actuator default when not set)."""
        if self.lambda_base is not None:
            return float(self.lambda_base)
        return DEFAULT_LAMBDA_BASE[self.actuator]

    def resolved_thresholds(self) -> Thresholds:
        if isinstance(self.thresholds, Thresholds):
            return self.thresholds
        return load_thresholds(self.thresholds)

    def with_overrides(self, **overrides: Any) -> GuardConfig:
        known = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"unknown GuardConfig field(s): {', '.join(unknown)}")
        return replace(self, **overrides)

    def __rich__(self) -> object:
        """``rich.print(config)`` draws it as a table
        (:func:`render_config`)."""
        return render_config(self)

    @classmethod
    def coerce(cls, config: GuardConfig | Thresholds | str | Path | None,
               **overrides: Any) -> GuardConfig:
        """``GuardConfig`` from a config, a Thresholds, a thresholds-file path or ``None``."""
        if config is None:
            base = cls()
        elif isinstance(config, GuardConfig):
            base = config
        elif isinstance(config, (Thresholds, str, Path)):
            base = cls(thresholds=config)
        else:
            raise TypeError(f"config must be a GuardConfig or a thresholds path, got {config!r}")
        return base.with_overrides(**overrides) if overrides else base


def render_config(config: GuardConfig):  # -> rich.table.Table
    """A GuardConfig as a two-column rich table (field, value), thresholds summarized."""
    from rich.table import Table

    table = Table(title="GuardConfig", header_style="bold", show_header=True)
    table.add_column("field")
    table.add_column("value")
    for f in fields(config):
        value = getattr(config, f.name)
        if f.name == "thresholds":
            table.add_row(f.name, _describe_thresholds(value))
        elif f.name == "lambda_base" and value is None:
            table.add_row(f.name, f"None ({config.base:g}, the {config.actuator} default)")
        else:
            table.add_row(f.name, repr(value) if isinstance(value, str) else str(value))
    return table


def _describe_thresholds(value: Thresholds | str | Path | None) -> str:
    if value is None:
        return "shipped defaults"
    if not isinstance(value, Thresholds):
        return str(value)
    auto = value.provenance.get("auto_calibrate", {})
    parts = [str(auto.get("thresholds") or value.provenance.get("source", "object"))]
    if auto:
        parts.append(f"tier {auto.get('tier')} ({auto.get('parameters'):,} parameters)")
    return "; ".join(parts)
