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

from ..checkpoint import DTYPES, Checkpoint, CheckpointError, TensorInfo
from ..thresholds import role_group

CONFIG_EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts",
                      "num_routed_experts", "n_experts")
"""``config.json`` keys that give a mixture-of-experts model's expert count (also looked up in
nested configs such as ``text_config``)."""

EMBEDDING_ROLES = ("embeddings", "position_embeddings")
"""Role groups (:data:`~spectral_guard.thresholds.ROLE_GROUPS`) whose 2-D weights read as
``"embedding"``."""

EXPERT_NAME = re.compile(r"(?i)(^|[._])experts?([._\[]|$)")
"""A tensor name that says it holds experts (a component ``expert``/``experts``)."""


@dataclass(frozen=True)
class TensorPlan:
    """How one tensor is audited: ``leads[i]`` selects matrix ``names[i]`` (``rows x cols``),
    read as ``read_as[i]``."""

    info: TensorInfo
    names: tuple[str, ...]
    leads: tuple[tuple[int, ...], ...]
    rows: int
    cols: int
    read_as: tuple[str, ...]


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


def plan_tensor(info: TensorInfo, n_experts: int | None = None) -> TensorPlan | str:
    """The matrices a tensor is audited as, or the reason it is skipped (module docstring).
    ``n_experts``: the model's expert count from its config, if any."""
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
                    exclude: Sequence[re.Pattern] = (), n_experts: int | None = None
                    ) -> CheckpointPlan:
    """Filter (``include``: any must match, ``exclude``: none may; searched in tensor names) and
    plan every tensor. Raises :class:`~spectral_guard.checkpoint.CheckpointError` when nothing
    is left to audit."""
    tensors = ckpt.tensors
    selected = [t for t in tensors
                if (not include or any(p.search(t.name) for p in include))
                and not any(p.search(t.name) for p in exclude)]
    out = CheckpointPlan([], [], len(tensors) - len(selected))
    for t in selected:
        plan = plan_tensor(t, n_experts)
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
