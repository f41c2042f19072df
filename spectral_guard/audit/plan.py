"""How each tensor of a checkpoint is read: which matrices it is audited as, or why it is skipped.

* 2-D ``(m, n)``: one matrix, read as ``"linear"`` (``"embedding"`` when its name is a token or
  position embedding's, :func:`~spectral_guard.thresholds.role_group`).
* 3-D or more ``(out, in, k, ...)``: a convolution kernel whatever its kernel size, one matrix
  ``out x (in * k * ...)`` (rows are output channels), read as ``"conv"``.
* 3-D ``(E, m, n)`` is a stack of ``E`` expert matrices ``name[e]``, read as ``"experts[e]"``,
  only when something says so: a component of the name is ``expert``/``experts`` (``mlp.experts.
  gate_up_proj``, ``experts_w1``), or the model's config gives an expert count
  (:data:`CONFIG_EXPERT_KEYS`) equal to ``E``. A shape alone never makes experts: a conv1d
  STFT basis ``[258, 1, 256]`` is one ``258 x 256`` matrix, not 258 one-row matrices.
* 2-D fused q/k/v projections (:func:`plan_fused`): three matrices ``name[q]``, ``name[k]``,
  ``name[v]`` read as ``"fused_qkv[q]"`` etc., each the rows (a Linear, ``out x in``) or the
  columns (GPT-2's ``Conv1D``, ``in x out``) of its block, so a damaged block is judged on its
  own instead of diluted in the fused matrix; when the split is not certain the weight is one
  ``"linear"`` matrix with a note saying why.
* 0-D, 1-D, empty, integer, bool, complex and packed sub-byte (F4, F6, F8_E8M0) tensors are
  skipped with the reason.

:func:`plan_checkpoint` applies the ``include``/``exclude`` filters and plans every tensor.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..attention_pairs import (
    FUSED_PATTERNS,
    MHA_WEIGHT,
    FusedModule,
    fused_head_dim,
    fused_modules,
    fused_qkv_indices,
    stored_transposed,
)
from ..checkpoint import DTYPES, Checkpoint, CheckpointError, TensorInfo
from ..checkpoint.inmemory import original_name, unwrap_module
from ..thresholds import role_group

CONFIG_EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts",
                      "num_routed_experts", "n_experts")
"""``config.json`` keys that give a mixture-of-experts model's expert count (also looked up in
nested configs such as ``text_config``)."""

CONFIG_HEAD_KEYS = ("num_attention_heads", "n_head", "num_heads")
CONFIG_KV_KEYS = ("num_key_value_heads",)
"""``config.json`` keys of the attention head counts (query heads; key/value heads)."""

QKV = ("q", "k", "v")
FUSED_READ_AS = tuple(f"fused_qkv[{b}]" for b in QKV)
"""``read_as`` of the query, key and value blocks of a fused projection."""
FUSED_QK = FUSED_READ_AS[:2]

EMBEDDING_ROLES = ("embeddings", "position_embeddings")
"""Role groups (:data:`~spectral_guard.thresholds.ROLE_GROUPS`) whose 2-D weights read as
``"embedding"``."""

EXPERT_NAME = re.compile(r"(?i)(^|[._])experts?([._\[]|$)")
"""A tensor name that says it holds experts (a component ``expert``/``experts``)."""


@dataclass(frozen=True)
class TensorPlan:
    """How one tensor is audited: ``leads[i]`` selects a ``rows x cols`` matrix (the tensor's
    trailing dimensions flattened) and, when given, ``row_index[i]`` / ``col_index[i]`` (sorted
    indices) select matrix ``names[i]`` from it, read as ``read_as[i]``. Empty ``row_index``/
    ``col_index`` tuples select everything."""

    info: TensorInfo
    names: tuple[str, ...]
    leads: tuple[tuple[int, ...], ...]
    rows: int
    cols: int
    read_as: tuple[str, ...]
    row_index: tuple[torch.Tensor | None, ...] = field(default=(), compare=False)
    col_index: tuple[torch.Tensor | None, ...] = field(default=(), compare=False)
    note: str | None = None
    """Why a tensor that looks fused is audited whole (for the report's notes)."""

    def rows_of(self, i: int) -> torch.Tensor | None:
        """Row indices of matrix ``i`` (``None``: all rows)."""
        return self.row_index[i] if self.row_index else None

    def cols_of(self, i: int) -> torch.Tensor | None:
        """Column indices of matrix ``i`` (``None``: all columns)."""
        return self.col_index[i] if self.col_index else None

    def shape_of(self, i: int) -> tuple[int, int]:
        """``(rows, cols)`` of matrix ``i``."""
        r, c = self.rows_of(i), self.cols_of(i)
        return (self.rows if r is None else len(r), self.cols if c is None else len(c))

    def matrix(self, tensor: torch.Tensor, i: int) -> torch.Tensor:
        """Matrix ``i`` of the whole ``tensor`` (a copy where indices select it)."""
        M = tensor[self.leads[i]].reshape(self.rows, self.cols)
        r, c = self.rows_of(i), self.cols_of(i)
        if r is not None:
            M = M.index_select(0, r.to(M.device))
        if c is not None:
            M = M.index_select(1, c.to(M.device))
        return M


@dataclass(frozen=True)
class Heads:
    """What the planner knows of attention heads: counts from the caller or the model's config
    (``n_heads``, ``n_kv_heads``), and a live model's fused projections by weight name (their
    orientation and their modules' head counts, :func:`live_fused`)."""

    n_heads: int | None = None
    n_kv_heads: int | None = None
    modules: Mapping[str, FusedModule] = field(default_factory=dict)


def config_value(config: Mapping[str, Any] | None, keys: Sequence[str]) -> int | None:
    """The first positive integer under one of ``keys`` in ``config`` or in a config nested in
    it (one level: ``text_config``, ``decoder``, ...); ``None`` when there is none."""
    if not config:
        return None
    for scope in (config, *(v for v in config.values() if isinstance(v, Mapping))):
        for key in keys:
            value = scope.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def config_heads(config: Mapping | None) -> tuple[int | None, int | None]:
    """``(heads, kv_heads)`` from a model config; ``None`` where it does not say."""
    return config_value(config, CONFIG_HEAD_KEYS), config_value(config, CONFIG_KV_KEYS)


def read_config(source_paths: Sequence[Path]) -> tuple[dict | None, Path | None]:
    """The first readable ``config.json`` (a JSON object) next to a source: in the folder
    itself, or beside a file or an index; ``(None, None)`` when there is none."""
    for p in source_paths:
        cfg = (p if p.is_dir() else p.parent) / "config.json"
        if not cfg.is_file():
            continue
        try:
            data = json.loads(cfg.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict):
            return data, cfg
    return None, None


def source_config(ckpt: Checkpoint, source: object) -> tuple[dict | None, str | None]:
    """``(config, where it came from)`` of what is audited: a live model's ``config``
    (``to_dict()``, as Hugging Face models have), else the first ``config.json`` next to the
    checkpoint's files (:func:`read_config`); ``(None, None)`` when there is none."""
    cfg = getattr(source, "config", None)
    if isinstance(source, torch.nn.Module) and hasattr(cfg, "to_dict"):
        try:
            data = cfg.to_dict()
        except Exception:  # a foreign config object: no config, not an error
            data = None
        if isinstance(data, dict):
            return data, "the model's config"
    data, path = read_config([s.path for s in ckpt.sources if not s.in_memory])
    return data, None if path is None else str(path)


def reads_as_experts(name: str, shape: Sequence[int], n_experts: int | None = None) -> bool:
    """True when a tensor of 3+ dims is a stack of expert matrices (module docstring): 3-D, and
    its name says experts or its leading dimension equals the config's expert count."""
    if len(shape) != 3:
        return False
    return bool(EXPERT_NAME.search(name)) or (n_experts is not None and shape[0] == n_experts)


def fused_layout(name: str) -> str | None:
    """The layout (``"contiguous"``/``"interleaved"``) of a fused q/k/v projection's weight
    named ``name`` (``...c_attn.weight``, ``...qkv_proj.weight``, ``...in_proj_weight``; the
    child names of :data:`~spectral_guard.attention_pairs.FUSED_PATTERNS`), else ``None``."""
    prefix, _, last = name.rpartition(".")
    if last == MHA_WEIGHT:
        return "contiguous"
    if last != "weight":
        return None
    return dict(FUSED_PATTERNS).get(prefix.rpartition(".")[2])


def plan_fused(info: TensorInfo, layout: str, heads: Heads) -> TensorPlan:
    """A fused q/k/v projection's weight as its three blocks, or whole with a note.

    The rule, for a 2-D weight named as fused (:func:`fused_layout`):

    1. orientation: a live model's module says it (``Conv1D`` stores ``in x out``); otherwise
       the shape does (:func:`~spectral_guard.attention_pairs.stored_transposed`: more rows than
       columns is a Linear ``out x in``, fewer is ``in x out``); a square weight, or
       ``in_proj_weight`` stored ``in x out``, is not split.
    2. sizes: with a head count (the module's, else the caller's ``heads``, else config.json's
       ``num_attention_heads``/``n_head``/``num_heads``) and key/value heads
       (``num_key_value_heads``; as many as query heads when not given, always for the
       interleaved layout), the ``out`` outputs must be ``(heads + 2 kv_heads) d_h``: the blocks
       are ``heads d_h``, ``kv d_h`` and ``kv d_h`` outputs, contiguous or per head interleaved
       (:func:`~spectral_guard.attention_pairs.fused_qkv_indices`). Without a head count only a
       contiguous weight with exactly 3x as many outputs as inputs is split, in equal thirds;
       an interleaved one is not split (its blocks depend on the head count).
    3. anything else (sizes that do not fit the head counts) is one ``"linear"`` matrix with a
       note.
    """
    name, shape = info.name, info.shape
    whole = TensorPlan(info, (name,), ((),), shape[0], shape[1], ("linear",))

    def keep_whole(why: str) -> TensorPlan:
        return TensorPlan(info, (name,), ((),), shape[0], shape[1], ("linear",), note=why)

    module = heads.modules.get(name)
    if module is not None:
        transposed: bool | None = module.transposed
        n_heads = module.n_heads or heads.n_heads
        n_kv = module.n_kv_heads if module.n_heads else heads.n_kv_heads
        layout = module.layout
    else:
        transposed = stored_transposed(shape)
        n_heads, n_kv = heads.n_heads, heads.n_kv_heads
        if transposed and name.endswith(MHA_WEIGHT):
            return whole  # not a MultiheadAttention weight (it stores 3d x d)
    if transposed is None:
        return keep_whole(f"{name}: square {shape[0]} x {shape[1]}, so whether q/k/v are its "
                          "rows or its columns cannot be told; audited whole")
    out, n = (shape[1], shape[0]) if transposed else (shape[0], shape[1])
    if n_heads is not None:
        n_kv = n_kv if layout == "contiguous" and n_kv else n_heads
        try:
            d_h = fused_head_dim(out, n_heads, n_kv)
            blocks = fused_qkv_indices(n_heads, n_kv, d_h, layout)
        except ValueError as exc:
            return keep_whole(f"{name}: {exc}; audited whole")
    elif layout == "contiguous" and out == 3 * n:
        blocks = fused_qkv_indices(1, 1, n, "contiguous")
    else:
        why = ("an interleaved layout needs the head count" if layout != "contiguous" else
               f"{out} outputs are not 3 x {n} inputs and no head count says how they split")
        return keep_whole(f"{name}: {why} (config.json's num_attention_heads, or heads=); "
                          "audited whole")
    none = (None,) * 3
    return TensorPlan(info, tuple(f"{name}[{b}]" for b in QKV), ((),) * 3, shape[0], shape[1],
                      FUSED_READ_AS, none if transposed else blocks,
                      blocks if transposed else none)


def live_fused(model: torch.nn.Module) -> dict[str, FusedModule]:
    """A live model's fused q/k/v projections by the name its weight has in the audit."""
    found = fused_modules(unwrap_module(model))
    return {original_name(m.param): m for m in found}


def plan_tensor(info: TensorInfo, n_experts: int | None = None,
                heads: Heads | None = None) -> TensorPlan | str:
    """The matrices a tensor is audited as, or the reason it is skipped (module docstring).
    ``n_experts``: the model's expert count from its config, if any; ``heads``: what is known
    of the attention heads, for splitting fused q/k/v projections (:func:`plan_fused`)."""
    if info.skip is not None:
        return info.skip
    dt = DTYPES.get(info.dtype)
    if dt is None:
        return f"dtype {info.dtype}: only real floating-point tensors are audited"
    if dt.kind != "float":
        what = {"int": "integer", "bool": "boolean", "complex": "complex",
                "packed": "packed low-bit"}[dt.kind]
        return f"{what} dtype {info.dtype}: only real floating-point tensors are audited"
    if dt.torch_dtype is None:
        return f"dtype {info.dtype} is not supported by this torch version"
    shape = info.shape
    if len(shape) < 2:
        return "scalar (0-D)" if not shape else "1-D vector (bias, norm or scale): not a matrix"
    if info.numel == 0:
        return "empty tensor"
    if len(shape) == 2 and (layout := fused_layout(info.name)) is not None:
        return plan_fused(info, layout, heads or Heads())
    if len(shape) == 2:
        kind = "embedding" if role_group(info.name) in EMBEDDING_ROLES else "linear"
        return TensorPlan(info, (info.name,), ((),), shape[0], shape[1], (kind,))
    if reads_as_experts(info.name, shape, n_experts):
        e = range(shape[0])
        return TensorPlan(info, tuple(f"{info.name}[{i}]" for i in e), tuple((i,) for i in e),
                          shape[1], shape[2], tuple(f"experts[{i}]" for i in e))
    return TensorPlan(info, (info.name,), ((),), shape[0], math.prod(shape[1:]), ("conv",))


@dataclass
class CheckpointPlan:
    """Every tensor of a checkpoint, planned: ``plans`` to measure, ``skipped`` as
    ``(info, reason)``, ``filtered_out`` tensors left out by the filters."""

    plans: list[TensorPlan]
    skipped: list[tuple[TensorInfo, str]] = field(default_factory=list)
    filtered_out: int = 0

    @property
    def notes(self) -> list[str]:
        """One sentence for the report when fused-looking weights were audited whole."""
        whole = [p.note for p in self.plans if p.note]
        if not whole:
            return []
        return [f"{len(whole)} fused q/k/v projection(s) not split into q, k, v (e.g. "
                f"{whole[0]})."]

    @property
    def nbytes(self) -> int:
        return sum(p.info.nbytes for p in self.plans)


def compile_patterns(patterns: Sequence[str], what: str) -> list[re.Pattern]:
    """Compiled regexes; ``ValueError`` naming ``what`` (e.g. ``include``) for a bad one."""
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except re.error as exc:
            raise ValueError(f"{what} pattern {p!r}: bad regular expression ({exc})") from None
    return out


def plan_checkpoint(ckpt: Checkpoint, include: Sequence[re.Pattern] = (),
                    exclude: Sequence[re.Pattern] = (), n_experts: int | None = None,
                    heads: Heads | None = None) -> CheckpointPlan:
    """Filter (``include``: any must match, ``exclude``: none may; searched in tensor names) and
    plan every tensor (``n_experts``, ``heads``: as for :func:`plan_tensor`). Raises
    :class:`~spectral_guard.checkpoint.CheckpointError` when nothing is left to audit."""
    tensors = ckpt.tensors
    selected = [t for t in tensors
                if (not include or any(p.search(t.name) for p in include))
                and not any(p.search(t.name) for p in exclude)]
    out = CheckpointPlan([], [], len(tensors) - len(selected))
    for t in selected:
        plan = plan_tensor(t, n_experts, heads)
        if isinstance(plan, str):
            out.skipped.append((t, plan))
        else:
            out.plans.append(plan)
    if not out.plans:
        where = ", ".join(str(s.path) for s in ckpt.sources)
        if not selected:
            raise CheckpointError(f"{where}: no tensor matches the include/exclude filters"
                                  if tensors else f"{where}: checkpoint holds no tensors")
        info, reason = out.skipped[0]
        raise CheckpointError(f"{where}: no matrices to audit ({len(out.skipped)} tensor(s), "
                              f"all skipped, e.g. {info.name}: {reason})")
    return out


def source_heads(source: object, config: Mapping[str, Any] | None,
                 heads: int | None = None) -> Heads:
    """What :func:`plan_fused` knows of the heads of what is audited: the caller's ``heads``
    (else the config's), the config's key/value heads, and a live model's fused modules."""
    n_heads, n_kv = config_heads(config)
    modules = live_fused(source) if isinstance(source, torch.nn.Module) else {}
    return Heads(heads or n_heads, n_kv, modules)
