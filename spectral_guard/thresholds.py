"""Thresholds: the one file format shared by the audit, calibration and the training-time guard.

A thresholds file is versioned JSON::

    {
      "format": "spectral_guard.thresholds",
      "schema_version": 1,
      "provenance": {"source": "...", ...},          # free-form, strings/numbers
      "default": {<rule fields>},                     # applies to every matrix
      "groups": [                                     # first matching group wins
        {"name": "embeddings_and_heads", "pattern": "<regex>", "rule": {<overrides>}}
      ]
    }

Rule fields are numbers or ``null`` (``null`` switches that check off). ``pattern`` is a Python
regular expression searched (``re.search``) in the parameter name, e.g.
``model.layers.3.mlp.down_proj.weight``; the guard matches ``<module path>.weight``.
The shipped defaults are ``spectral_guard/data/default_thresholds.json``.

``schema_version`` is the version of this layout. A reader accepts its own version and refuses
a newer one with a one-line message (a newer writer may have added fields whose meaning an old
reader would silently drop). ``provenance`` is free-form: a calibrated file
(``spectral-guard calibrate``) records there its references (path, size, sha256), the date, the
tool version, the mode, the biopsy limit and the percentile rule, see ``docs/calibration.md``.

Role groups (:data:`ROLE_GROUPS`, :func:`role_group`) classify a parameter name as attention,
MLP, token embedding, position embedding, output head or other; calibration learns one rule per
role group.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any

FORMAT = "spectral_guard.thresholds"
SCHEMA_VERSION = 1


class ThresholdsError(ValueError):
    """A thresholds file that cannot be used (message is one line, for the CLI)."""


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# ----------------------------------------------------------------------------------------------
# Role groups

_NAME_END = r"(\.|\[|$)"
ROLE_GROUPS: tuple[tuple[str, str], ...] = (
    ("heads", r"(?i)(^|\.)(lm_head|embed_out|output_layer|classifier|score|cls|head)"
              + _NAME_END + r"|^output\.weight$"),
    ("position_embeddings", r"(?i)(^|\.)(wpe|embed_positions|position_embeddings?|"
                            r"positional_embeddings?|pos_embed|pos_embeddings?)" + _NAME_END),
    ("embeddings", r"(?i)(^|\.)(embed_tokens|embed_in|tok_embeddings|token_embeddings?|wte|"
                   r"word_embeddings|token_type_embeddings|embeddings?)" + _NAME_END),
    ("attention", r"(?i)(^|\.)(\w*attn\w*|\w*attention\w*|q_proj|k_proj|v_proj|o_proj|"
                  r"qkv_proj|qkv|wqkv|query_key_value|query|key|value|c_attn|in_proj_weight|"
                  r"out_proj)" + _NAME_END),
    ("mlp", r"(?i)(^|\.)(\w*mlp\w*|\w*moe\w*|ffn|feed_forward|feedforward|intermediate|"
            r"densereludense|experts?|up_proj|gate_proj|down_proj|gate_up_proj|fc1|fc2|w1|w2|"
            r"w3|c_fc|dense_h_to_4h|dense_4h_to_h|wi|wi_0|wi_1)" + _NAME_END
            + r"|(^|\.)output\.dense\."),
    ("other", r"."),
)
"""Role groups, first match wins: ``(name, regex searched in the parameter name)``.

* ``heads``: output heads (``lm_head``, GPT-NeoX ``embed_out``, ``classifier``, ``score``, a
  top-level ``output.weight``).
* ``position_embeddings``: learned position tables (``wpe``, ``embed_positions``,
  ``position_embeddings``, ``position_embedding``, ``pos_embed``): a smooth function of the
  position, so few directions carry them (all-MiniLM-L6-v2's has stable rank 6.9 of 384).
* ``embeddings``: token and token-type embeddings (``embed_tokens``, ``wte``,
  ``word_embeddings``, ``token_type_embeddings``, ``tok_embeddings``, ``embed_in``, and anything
  else under an ``embeddings`` module).
* ``attention``: q/k/v/o projections, fused qkv (``qkv_proj``, ``query_key_value``,
  ``c_attn``, ``Wqkv``, ``in_proj_weight``) and anything under a module whose name contains
  ``attn`` or ``attention``.
* ``mlp``: up/gate/down projections, ``fc1``/``fc2``, ``w1``/``w2``/``w3``, ``c_fc``, experts, and
  anything under a module whose name contains ``mlp``, ``moe``, ``ffn``, ``feed_forward``,
  ``intermediate`` (BERT's ``layer.N.output.dense`` too).
* ``other``: norms and every other matrix.
"""

_ROLE_RE = tuple((name, re.compile(pattern)) for name, pattern in ROLE_GROUPS)


def role_group(name: str) -> str:
    """The role group of a parameter name (see :data:`ROLE_GROUPS`); ``"other"`` if none."""
    return next((group for group, rx in _ROLE_RE if rx.search(name)), "other")


@dataclass(frozen=True)
class Rule:
    """Per-matrix limits. ``None`` disables a check.

    Audit (absolute, on one checkpoint):
      stable_rank_min            with row_stable_rank_min: one direction holds the energy
                                 (``SR < value``); collapsed when the rows also span few
                                 directions (``row_SR < row_stable_rank_min``), not collapsed
                                 when they spread (a few output channels of large norm);
                                 without row_stable_rank_min, collapsed if ``SR < value``
      row_stable_rank_min        the floor of the row-normalized stable rank ``row_SR`` (SR of
                                 the rows scaled to unit norm), read only where ``SR <
                                 stable_rank_min``; a file without it takes the shipped value
      stable_rank_ratio_min      collapsed if ``SR / min(m, n) < value``
      effective_rank_ratio_min   collapsed if ``erank / min(m, n) < value``, unless ``SR <
                                 stable_rank_min`` (then the rows decide, as above)
      condition_number_max       ill_conditioned if ``kappa > value``
      dead_unit_fraction_max     dead_units if the fraction of all-zero rows or columns > value
      duplicate_row_fraction_max suspicious if the fraction of near-duplicate rows > value
      alpha_min, alpha_max       suspicious if the HT-SR alpha is outside ``[alpha_min, alpha_max]``
      collapse_min_dim           the collapse checks (the three above the condition number)
                                 apply only when ``min(m, n) >= value``: a 1 x n or 2 x n matrix
                                 has a stable rank near 1 by construction, not by collapse
      logit_typical_max          logit_risk if the typical q-k logit scale ``max_h tau_h`` of
                                 the attention pair the matrix belongs to exceeds value, with
                                 ``tau_h = ||W_q,h^T W_k,h||_F / sqrt(d_h)`` (the RMS logit of
                                 isotropic unit-RMS inputs, width-independent; see
                                 ``spectral_guard.audit.logit`` and docs/audit.md)
      logit_scale_max            logit_risk if the worst-case q-k logit bound ``max_h s_h n``
                                 exceeds value, with ``s_h = sigma_max(W_q,h^T W_k,h) /
                                 sqrt(d_h)`` and ``n`` the input width; it grows with ``n``, so
                                 the shipped defaults leave it off (a ceiling for one model
                                 family, e.g. from calibration)

    Guard (relative to the layer's own value when it was instrumented):
      effective_rank_retention_min   trigger collapse pressure if ``erank / erank_0 < value``
      stable_rank_retention_min      trigger collapse pressure if ``SR / SR_0 < value``
      condition_number_growth_max    trigger conditioning pressure if ``kappa / kappa_0 > value``
      fiedler_max                    trigger if the Fiedler value exceeds value (see sensors)
    """

    stable_rank_min: float | None = None
    row_stable_rank_min: float | None = None
    stable_rank_ratio_min: float | None = None
    effective_rank_ratio_min: float | None = None
    condition_number_max: float | None = None
    dead_unit_fraction_max: float | None = None
    duplicate_row_fraction_max: float | None = None
    alpha_min: float | None = None
    alpha_max: float | None = None
    collapse_min_dim: float | None = None
    effective_rank_retention_min: float | None = None
    stable_rank_retention_min: float | None = None
    condition_number_growth_max: float | None = None
    fiedler_max: float | None = None
    logit_scale_max: float | None = None
    logit_typical_max: float | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> Rule:
        return cls(**_checked_fields(cls, data, where))

    def merged(self, overrides: dict[str, Any]) -> Rule:
        return replace(self, **overrides)


def _checked_fields(cls, data: Any, where: str) -> dict[str, float | None]:
    if not isinstance(data, dict):
        raise ThresholdsError(f"{where}: expected an object of rule fields")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ThresholdsError(f"{where}: unknown field(s) {', '.join(unknown)}")
    out: dict[str, float | None] = {}
    for key, value in data.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ThresholdsError(f"{where}.{key}: expected a number or null, got {value!r}")
        out[key] = None if value is None else float(value)
    return out


@dataclass(frozen=True)
class Group:
    """Named role group: matrices whose name matches ``pattern`` use ``overrides``."""

    name: str
    pattern: str
    overrides: dict[str, float | None]

    def matches(self, name: str) -> bool:
        return re.search(self.pattern, name) is not None


@dataclass(frozen=True)
class Thresholds:
    """Default rule plus role groups; :meth:`rule_for` resolves one matrix's rule."""

    default: Rule = field(default_factory=Rule)
    groups: tuple[Group, ...] = ()
    provenance: dict[str, Any] = field(default_factory=dict)

    def rule_for(self, name: str) -> Rule:
        for group in self.groups:
            if group.matches(name):
                return self.default.merged(group.overrides)
        return self.default

    def rules(self) -> list[Rule]:
        """Every rule these thresholds can apply: the default, then each group's."""
        return [self.default, *(self.default.merged(g.overrides) for g in self.groups)]

    def group_for(self, name: str) -> str | None:
        return next((g.name for g in self.groups if g.matches(name)), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "schema_version": SCHEMA_VERSION,
            "provenance": dict(self.provenance),
            "default": asdict(self.default),
            "groups": [{"name": g.name, "pattern": g.pattern, "rule": dict(g.overrides)}
                       for g in self.groups],
        }

    @classmethod
    def from_dict(cls, data: Any, source: str = "thresholds") -> Thresholds:
        if not isinstance(data, dict):
            raise ThresholdsError(f"{source}: expected a JSON object")
        if data.get("format") != FORMAT:
            raise ThresholdsError(f"{source}: not a spectral_guard thresholds file "
                                  f"(format must be {FORMAT!r})")
        version = data.get("schema_version")
        if _is_int(version) and version > SCHEMA_VERSION:
            raise ThresholdsError(f"{source}: schema_version {version} is newer than this "
                                  f"spectral_guard reads ({SCHEMA_VERSION}); upgrade "
                                  "spectral_guard to use this file")
        if version != SCHEMA_VERSION:
            raise ThresholdsError(f"{source}: unsupported schema_version {version!r} "
                                  f"(this version reads {SCHEMA_VERSION})")
        default_fields = data.get("default", {})
        if isinstance(default_fields, dict) and any(k not in default_fields
                                                    for k in SHIPPED_IF_ABSENT):
            shipped = _shipped_rule()  # an older file: the fields it predates, as shipped
            default_fields = {**{k: getattr(shipped, k) for k in SHIPPED_IF_ABSENT},
                              **default_fields}
        default = Rule.from_dict(default_fields, f"{source}: default")
        groups = []
        for i, g in enumerate(data.get("groups", [])):
            where = f"{source}: groups[{i}]"
            if not isinstance(g, dict) or not isinstance(g.get("pattern"), str):
                raise ThresholdsError(f"{where}: needs a string 'pattern'")
            try:
                re.compile(g["pattern"])
            except re.error as exc:
                raise ThresholdsError(f"{where}: bad pattern: {exc}") from None
            overrides = _checked_fields(Rule, g.get("rule", {}), where)
            groups.append(Group(str(g.get("name", f"group{i}")), g["pattern"], overrides))
        provenance = data.get("provenance", {})
        if not isinstance(provenance, dict):
            raise ThresholdsError(f"{source}: provenance must be an object")
        return cls(default, tuple(groups), provenance)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


SHIPPED_IF_ABSENT = ("row_stable_rank_min",)
"""Rule fields added after files were written without them: a file whose ``default`` rule
lacks one takes the shipped default's value (so an older calibrated file keeps the shipped
collapse law instead of silently switching the check off). ``null`` in a file still means off."""


def _shipped_rule() -> Rule:
    """The shipped ``default`` rule, read straight from the packaged JSON."""
    text = resources.files("spectral_guard.data").joinpath("default_thresholds.json")
    data = json.loads(text.read_text())
    return Rule.from_dict(data["default"], "default_thresholds.json: default")


def load_thresholds(path: str | Path | None = None) -> Thresholds:
    """Read a thresholds file; ``None`` gives the shipped defaults."""
    if path is None:
        text = resources.files("spectral_guard.data").joinpath("default_thresholds.json")
        return Thresholds.from_dict(json.loads(text.read_text()), "default_thresholds.json")
    p = Path(path)
    if not p.is_file():
        raise ThresholdsError(f"{p}: thresholds file not found")
    try:
        data = json.loads(p.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ThresholdsError(f"{p}: not valid JSON ({exc})") from None
    return Thresholds.from_dict(data, str(p))


def default_thresholds() -> Thresholds:
    return load_thresholds(None)
