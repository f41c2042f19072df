"""GuardConfig: every knob of :func:`spectral_guard.instrument`, with documented defaults."""

from __future__ import annotations

import math
import numbers
import re
import warnings
from dataclasses import InitVar, dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal

from ..thresholds import Thresholds, load_thresholds
from .sensors import SENSOR_NAMES

SENSORS = SENSOR_NAMES
"""Relative sensors that can drive the thermostat (see :mod:`.sensors`)."""

Actuator = Literal["spectral", "l2", "msign"]

DEFAULT_LAMBDA_BASE = {"spectral": 0.05, "l2": 1e-4, "msign": 0.05}


RENAMED = {"msign_quorum": "alarm_quorum", "msign_alarm": "alarm_attention_factor",
           "msign_fall": "alarm_fall_steps", "msign_depth": "alarm_depth"}
"""Former names of the alarm's fields (issue 18): accepted by :class:`GuardConfig`,
``instrument(model, ...)`` and saved guard states, with a ``DeprecationWarning``."""

_UNSET: Any = object()


@dataclass(frozen=True)
class GuardConfig:
    """Configuration of the training-time guard, one group per concern (docs/guard.md says why
    each default is what it is, with its measurements: docs/efficacy.md, docs/calibration.md).

    Sampling: each check visits ``ceil(ratio * L)`` of the ``L`` guarded layers, one check
    every ``every`` optimizer steps, so a layer is read every ``every * ceil(1 / ratio)`` steps
    (:attr:`check_period`; 20 at the defaults, the smallest tier of ``auto_calibrate``)
      ratio           fraction of guarded layers visited by one check
      every           optimizer steps between checks
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
      lambda_base     ``None``: the actuator's default (:data:`DEFAULT_LAMBDA_BASE`)
      gain, decay, lambda_floor   the thermostat's law above
    Matrix sign (``guard/msign.py``, ``guard/signs.py``)
      msign_every     ``0`` (off) or ``N``: every ``N`` optimizer steps, the matrix sign of the
                      layers chosen by ``msign_gate`` (MSign's periodic schedule, arXiv
                      2602.01734)
      msign_gate      ``"alarm"``: only while the alarm is raised, and only layers that looked
                      randomly initialized when instrumented (a pretrained layer is never
                      signed); ``"always"``: every penalized layer at every multiple of
                      ``msign_every``
    Alarm (``guard/alarm.py``): raised when at least ``alarm_quorum`` of the penalized layers
      are treated for collapse at once, each fallen suddenly or collapsed deep, or when an
      attention pair's scale is over ``alarm_attention_factor`` times its target
      alarm_quorum            the fraction of penalized layers
      alarm_fall_steps        a layer fell suddenly if it lost 0.3 of effective-rank retention
                              within this many optimizer steps (``0``: any treated layer counts)
      alarm_depth             a layer is collapsed deep if its latest relative collapse reading
                              ``x`` is this far below its floor ``t``: ``1 - x / t >= depth``
                              (no time in it: counts at any check period; ``None``: off,
                              ``0``: any treated layer counts)
      alarm_attention_factor  the attention half's factor over the pair's target
    Learning-rate back-off (``guard/backoff.py``: every param group's ``lr`` scaled during
      ``optimizer.step()`` only)
      lr_policy       ``"graded"``: the scale follows the fraction ``f`` of penalized layers
                      collapsing (``lr_count``) beyond ``lr_grace``, ``max(lr_floor, lr_backoff **
                      (f / alarm_quorum))``, down at once, doubling back at most once per
                      ``lr_recovery`` check periods; ``"alarm"``: scaled by ``lr_backoff`` more
                      at each step where the alarm signs layers, never rising again
      lr_backoff      the scale at the quorum (``"graded"``) or per alarm (``"alarm"``);
                      ``1.0``: the back-off is off
      lr_floor        the smallest scale the back-off reaches
      lr_recovery     ``"graded"``: check periods of a layer per doubling back (``0``: never)
      lr_grace        ``"graded"``: this many treated layers are not counted in ``f``
      lr_count        ``"graded"``: which layers ``f`` counts: ``"sudden"`` (those the alarm's
                      quorum counts: fallen suddenly or collapsed deep) or ``"treated"`` (every
                      layer treated for collapse, slow healthy drift included)
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
      attention           enable the attention-logit guard
      attention_actuator  ``"penalty"`` (thermostat-driven hinge ``lambda sum_h
                          relu(s_h / t - 1)^2``) or ``"rescale"`` (post-step scaling of the
                          offending heads' W_q and W_k rows to ``s_h = t``, like QK-Clip)
      attention_max_scale target ``t`` on ``s_h``; ``None``: ``max(64 / n, 1.5 s_0)`` (``n``
                          the input width: a bound of 64 on the logit of unit-RMS inputs;
                          ``s_0`` the pair's scale when instrumented, for pretrained weights)
      attention_lambda    ``lambda_base`` of the attention thermostat
      attention_pairs     ``None`` (find pairs by name patterns) or explicit
                          ``(q_module, k_module[, n_heads])`` tuples (the same name twice: a
                          fused ``[q; k; v]`` projection)

    Block updates (``guard/blocks.py``): per transformer block (a list element holding an
      attention pair) ``u = RMS(block output - block input)`` on the training forward, checked
      every ``every`` steps
      block_guard         enable the block-update guard
      block_max_update    target ``t`` on ``u``; ``None``: ``max(1, 1.5 u_0)`` (1: the scale of
                          a unit-gain normalized input; ``u_0`` the block's first reading)
      block_lambda        ``lambda_base`` of its thermostat (hinge ``lambda relu(u / t - 1)^2``)

    The alarm's former names (:data:`RENAMED`: ``msign_quorum``, ``msign_alarm``,
    ``msign_fall``, ``msign_depth``) are accepted as keywords, with a ``DeprecationWarning``.
    """

    # sampling
    ratio: float = 0.05
    every: int = 1
    seed: int = 0
    # sensors
    sensors: tuple[str, ...] = ("effective_rank",)
    biopsy_limit: int = 192
    power_iters: int = 1
    fiedler_rows: int = 64
    thresholds: Thresholds | str | Path | None = None
    collapse_rule: bool = True
    # thermostat
    actuator: Actuator = "spectral"
    lambda_base: float | None = None
    gain: float = 4.0
    decay: float = 0.5
    lambda_floor: float = 0.01
    # matrix sign
    msign_every: int = 10
    msign_gate: Literal["alarm", "always"] = "alarm"
    # alarm
    alarm_quorum: float = 0.15
    alarm_fall_steps: int = 60
    alarm_depth: float | None = 0.15
    alarm_attention_factor: float = 2.0
    # learning-rate back-off
    lr_policy: Literal["graded", "alarm"] = "graded"
    lr_backoff: float = 0.5
    lr_floor: float = 0.25
    lr_recovery: float = 25.0
    lr_grace: int = 2
    lr_count: Literal["treated", "sudden"] = "sudden"
    # selection
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    watch_unguarded: bool = False
    # integration
    auto_loss: bool = True
    history: int = 10_000
    step_on: Literal["optimizer", "manual"] = "optimizer"
    # attention logits
    attention: bool = True
    attention_actuator: Literal["penalty", "rescale"] = "penalty"
    attention_max_scale: float | None = None
    attention_lambda: float = 0.1
    attention_pairs: tuple[tuple[Any, ...], ...] | None = None
    # block updates
    block_guard: bool = True
    block_max_update: float | None = None
    block_lambda: float = 0.1
    # former names (RENAMED): init-only, mapped in __post_init__
    msign_quorum: InitVar[Any] = _UNSET
    msign_alarm: InitVar[Any] = _UNSET
    msign_fall: InitVar[Any] = _UNSET
    msign_depth: InitVar[Any] = _UNSET

    def __post_init__(self, msign_quorum: Any = _UNSET, msign_alarm: Any = _UNSET,
                      msign_fall: Any = _UNSET, msign_depth: Any = _UNSET) -> None:
        self._take_former_names({"msign_quorum": msign_quorum, "msign_alarm": msign_alarm,
                                 "msign_fall": msign_fall, "msign_depth": msign_depth})
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
        if not 0.0 < self.alarm_quorum <= 1.0:
            raise ValueError(f"alarm_quorum must be in (0, 1], got {self.alarm_quorum}")
        if not self.alarm_attention_factor >= 1.0:
            raise ValueError("alarm_attention_factor must be >= 1, got "
                             f"{self.alarm_attention_factor}")
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
        if self.alarm_fall_steps < 0:
            raise ValueError("alarm_fall_steps must be >= 0 (0: any fall), got "
                             f"{self.alarm_fall_steps}")
        depth = self.alarm_depth
        if depth is not None and (isinstance(depth, bool) or not isinstance(depth, numbers.Real)
                                  or not 0.0 <= depth < 1.0):
            raise ValueError(f"alarm_depth must be in [0, 1) or None (off), got {depth!r}")
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
        if self.block_max_update is not None and not self.block_max_update > 0:
            raise ValueError(f"block_max_update must be > 0, got {self.block_max_update}")
        if not self.block_lambda >= 0:
            raise ValueError(f"block_lambda must be >= 0, got {self.block_lambda}")
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

    def _take_former_names(self, given: dict[str, Any]) -> None:
        """Map the alarm's former field names onto the new ones (a DeprecationWarning each)."""
        for old, value in given.items():
            if value is _UNSET:
                continue
            new = RENAMED[old]
            warnings.warn(f"GuardConfig: {old} is now {new}", DeprecationWarning, stacklevel=4)
            object.__setattr__(self, new, value)

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
                     "alarm_fall_steps", "lr_grace"):
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
        """Can the alarm see a layer fall within ``alarm_fall_steps`` steps (guard/alarm.py)? Not
        when a layer is checked less often than that (the depth count still sees it)."""
        return not (self.msign_every and self.msign_gate == "alarm"
                    and 0 < self.alarm_fall_steps < self.check_period)

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
        # NB: the former names are init-only fields: replace() hands them to __post_init__
        known = {f.name for f in fields(self)} | set(RENAMED)
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
