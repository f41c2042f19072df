"""Which calibration group a reference matrix belongs to, and each group's fallback rule.

Groups are **role x shape family**:

* ``conv``: every matrix read from a tensor of 3 or more dimensions that is not a stack of
  experts (a conv kernel ``[out, in, k...]``, whichever way the audit read it). Conv kernels
  have their own spectra (a fixed STFT basis is perfectly conditioned), so they never enter
  another group's statistics. Written to the file as the exact tensor names of the references.
* the role groups of :data:`spectral_guard.thresholds.ROLE_GROUPS`, by name: ``heads``,
  ``position_embeddings``, ``embeddings`` (token and type), ``attention``, ``mlp``, ``other``.
  Experts (slices ``name[e]`` of a 3-D tensor whose name says ``experts``/``moe``/...) are
  matrices of their role (``mlp``).

A group learns only from its own members. Where it has too few (see
:mod:`spectral_guard.calibration.rule`) it falls back to the **shipped rule of its own role**
(``spectral_guard/data/default_thresholds.json``: the relaxed embeddings-and-heads rule for
heads and embeddings of both kinds, the shipped default for the others), widened by the same
law so its references pass; never to a rule learned on other groups.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from ..thresholds import ROLE_GROUPS, Rule, Thresholds, role_group

if TYPE_CHECKING:
    from ..audit import MatrixResult

CONV = "conv"
HIDDEN_ROLES = ("attention", "mlp", "other")
"""The roles whose pooled matrices make the file's ``default`` (the ``global`` row)."""

UNGUARDED_GROUPS = ("heads", "position_embeddings", "embeddings")
"""Groups the guard never penalizes (their guard fields stay null), as in the shipped
defaults: one direction dominates an embedding or an output head by nature."""

_SHIPPED_EXAMPLE = {"heads": "lm_head.weight", "position_embeddings": "transformer.wpe.weight",
                    "embeddings": "model.embed_tokens.weight",
                    "attention": "model.layers.0.self_attn.q_proj.weight",
                    "mlp": "model.layers.0.mlp.up_proj.weight", "other": "model.other.weight",
                    CONV: "model.conv.weight"}
"""A parameter name per group, to read that group's rule from the shipped defaults (whose
groups are name patterns of their own)."""


def is_conv(m: MatrixResult) -> bool:
    """A matrix read from a tensor of >= 3 dimensions that is not an expert of a stack (the
    audit's ``read_as``; a slice ``name[i]`` of a tensor whose name does not say experts is
    taken for a conv too, whoever read it that way)."""
    if len(m.tensor_shape) < 3:
        return False
    if m.read_as.startswith("experts"):
        return role_group(m.tensor) != "mlp"
    return True


def group_of(m: MatrixResult) -> str:
    """The calibration group of one audited matrix (module docstring)."""
    return CONV if is_conv(m) else role_group(m.name)


def group_names(results: Iterable[MatrixResult]) -> list[str]:
    """Every group written to a file, in matching order: ``conv`` first when the references
    have conv kernels, then every role group (first match wins, so a role group left out would
    let its matrices fall into ``other``)."""
    roles = [name for name, _pattern in ROLE_GROUPS]
    return ([CONV] if any(is_conv(m) for m in results) else []) + roles


def conv_pattern(results: Iterable[MatrixResult]) -> str:
    """A pattern matching exactly the conv tensors among ``results`` (and their slices)."""
    names = sorted({m.tensor for m in results if is_conv(m)})
    return r"^(?:" + "|".join(re.escape(n) for n in names) + r")(?:\[\d+\])?$"


def pattern_of(group: str, results: Sequence[MatrixResult]) -> str:
    if group == CONV:
        return conv_pattern(results)
    return dict(ROLE_GROUPS)[group]


def shipped_rule(group: str, shipped: Thresholds) -> Rule:
    """The shipped rule of a group's role (its fallback)."""
    return shipped.rule_for(_SHIPPED_EXAMPLE[group])


def shipped_source(group: str, shipped: Thresholds) -> str:
    """How a fallback to :func:`shipped_rule` is described in notes and provenance."""
    name = shipped.group_for(_SHIPPED_EXAMPLE[group])
    return f"shipped rule of its role ({name or 'default'})"
