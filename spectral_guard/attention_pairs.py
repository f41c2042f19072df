"""Finding the query/key projection pairs of attention blocks and their head geometry.

Used by the training guard (:mod:`spectral_guard.guard.attention`) and by the audit's logit pass;
it knows nothing of either. For a head ``h`` with query rows ``W_q,h`` and key rows ``W_k,h``
(``d_h x n`` each) the pre-softmax logit is ``x_i^T W_q,h^T W_k,h x_j / sqrt(d_h)``; a pair names
where those rows live in the model's weights.

Pairing (:func:`find_pairs`): separate q/k ``nn.Linear`` siblings by name, fused qkv projections
split by rows (``contiguous`` ``[q; k; v]`` or per-head ``interleaved``), GPT-2's transposed
``Conv1D``, ``nn.MultiheadAttention``'s ``in_proj_weight``, and pairs named by the user. Head
counts come from the attention module's attributes, its ``config``, or the model's ``config``;
grouped-query attention (fewer key heads) is recognized from the key projection's size.

The audit's planner splits fused projections into their q, k and v blocks with the same rules
(:func:`stored_transposed`, :func:`fused_head_dim`, :func:`fused_qkv_indices`; a live model's
through :func:`fused_modules`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

Tensor = torch.Tensor

SEPARATE_PATTERNS: tuple[tuple[str, str], ...] = (
    ("q_proj", "k_proj"),      # Llama, Mistral, Qwen, OPT, BART, Whisper, GPT-J, Phi
    ("query", "key"),          # BERT, RoBERTa, ViT (Hugging Face)
    ("wq", "wk"),              # Meta's Llama reference code
    ("q", "k"),                # T5 (unscaled attention: the reading keeps its 1/sqrt(d_h))
    ("to_q", "to_k"),          # diffusers
    ("q_lin", "k_lin"),        # DistilBERT
    ("query_proj", "key_proj"),  # DeBERTa-v2
)
"""Sibling child names of one attention module: ``(query, key)``."""

FUSED_PATTERNS: tuple[tuple[str, str], ...] = (
    ("c_attn", "contiguous"),          # GPT-2 (Conv1D, transposed), nanoGPT (Linear)
    ("qkv", "contiguous"),             # timm ViT
    ("qkv_proj", "contiguous"),        # Phi-3 (GQA sizes)
    ("Wqkv", "contiguous"),            # MPT, ModernBERT
    ("query_key_value", "interleaved"),  # GPT-NeoX, BLOOM: [head][q, k, v][d_h]
)
"""Fused projections: child name and row layout."""

HEAD_ATTRS = ("num_heads", "n_head", "n_heads", "num_attention_heads", "heads", "nhead",
              "n_local_heads")
KV_HEAD_ATTRS = ("num_key_value_heads", "n_kv_heads", "num_kv_heads", "n_kv_head",
                 "n_local_kv_heads", "num_key_value_groups_heads")
HEAD_DIM_ATTRS = ("head_dim", "head_size", "attention_head_size")
MHA_WEIGHT = "in_proj_weight"
"""``nn.MultiheadAttention``'s fused ``[q; k; v]`` weight (``3 d x d``)."""


@dataclass
class Side:
    """Where one projection's rows live: ``weight[index]`` (or ``weight[:, index].T`` when
    ``transposed``, GPT-2's ``Conv1D`` stores ``in x out``)."""

    module: nn.Module
    attr: str
    index: Tensor
    transposed: bool = False

    @property
    def param(self) -> Tensor:
        """The stored Parameter (behind the main guard's identity parametrization, if any)."""
        if self.attr == "weight" and parametrize.is_parametrized(self.module, "weight"):
            return self.module.parametrizations.weight.original
        return getattr(self.module, self.attr)

    def rows(self, W: Tensor | None = None) -> Tensor:
        """The projection's ``(heads * d_h) x n`` block (a differentiable gather)."""
        W = self.param if W is None else W
        return W.index_select(1, self.index).mT if self.transposed else W.index_select(0,
                                                                                      self.index)

    @torch.no_grad()
    def scale_rows(self, factor: Tensor) -> None:
        """``rows <- factor[:, None] * rows`` in place (``factor`` per row)."""
        W = self.param
        f = factor.to(W.dtype)
        if self.transposed:
            W.index_copy_(1, self.index, W.index_select(1, self.index) * f)
        else:
            W.index_copy_(0, self.index, W.index_select(0, self.index) * f[:, None])


@dataclass
class AttentionPair:
    """One attention block's query and key projections and their head geometry."""

    name: str
    q: Side
    k: Side
    n_heads: int
    n_kv_heads: int
    head_dim: int
    in_features: int

    @property
    def group(self) -> int:
        return self.n_heads // self.n_kv_heads

    def kv_of_head(self, device: torch.device) -> Tensor:
        """Key head used by each query head (Llama's ``repeat_kv``: ``h // group``)."""
        return torch.arange(self.n_heads, device=device) // self.group

    def heads(self, Wq: Tensor | None = None, Wk: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(W_q,h, W_k,kv(h))`` stacked: two ``heads x d_h x n`` tensors (differentiable)."""
        q = self.q.rows(Wq).reshape(self.n_heads, self.head_dim, self.in_features)
        k = self.k.rows(Wk).reshape(self.n_kv_heads, self.head_dim, self.in_features)
        if self.n_kv_heads != self.n_heads:
            k = k.index_select(0, self.kv_of_head(k.device))
        return q, k


def int_attr(objs: Iterable[Any], names: Sequence[str]) -> int | None:
    for obj in objs:
        if obj is None:
            continue
        for name in names:
            value = getattr(obj, name, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def head_geometry(q_rows: int, k_rows: int, n: int, owners: list[Any],
              n_heads: int | None = None) -> tuple[int, int, int]:
    """``(n_heads, n_kv_heads, head_dim)`` from the given count or the owners' attributes."""
    if n_heads is None:
        n_heads = int_attr(owners, HEAD_ATTRS)
    head_dim = int_attr(owners, HEAD_DIM_ATTRS)
    if n_heads is None and head_dim is not None and q_rows % head_dim == 0:
        n_heads = q_rows // head_dim
    if n_heads is None:
        raise ValueError("number of heads not found (name it: attention_pairs=((q, k, heads),))")
    if q_rows % n_heads:
        raise ValueError(f"{q_rows} query rows do not split into {n_heads} heads")
    d_h = q_rows // n_heads
    if k_rows % d_h:
        raise ValueError(f"{k_rows} key rows are not a multiple of head_dim {d_h}")
    n_kv = k_rows // d_h
    if n_kv < 1 or n_heads % n_kv:
        raise ValueError(f"{n_heads} query heads do not group over {n_kv} key heads")
    return n_heads, n_kv, d_h


def _owners(model: nn.Module, parent: nn.Module) -> list[Any]:
    return [parent, getattr(parent, "config", None), getattr(model, "config", None)]


def linear_weight_shape(module: nn.Module) -> tuple[int, int, bool] | None:
    """``(out, in, transposed)`` of a Linear-like module, or ``None``."""
    if isinstance(module, nn.Linear):
        out, n = module.out_features, module.in_features
        return out, n, False
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # GPT-2: weight is in x out
        W = module.weight
        if W.dim() == 2:
            return int(W.shape[1]), int(W.shape[0]), True
    return None


def stored_transposed(shape: Sequence[int]) -> bool | None:
    """Whether a fused q/k/v projection's 2-D weight, read without its module, is stored
    ``in x out`` (GPT-2's ``Conv1D``): its outputs ``(heads + 2 kv_heads) d_h`` outnumber its
    inputs, so a Linear weight (``out x in``) has more rows than columns and a ``Conv1D`` weight
    fewer. ``None`` for a square weight (the orientation cannot be told from the shape)."""
    rows, cols = int(shape[0]), int(shape[1])
    return None if rows == cols else rows < cols


def fused_head_dim(out: int, n_heads: int, n_kv: int) -> int:
    """``d_h`` of a fused projection with ``out`` outputs, ``n_heads`` query heads and ``n_kv``
    key/value heads (``out = (n_heads + 2 n_kv) d_h``); ``ValueError`` when they do not fit."""
    if n_kv < 1 or n_heads % n_kv or out % (n_heads + 2 * n_kv):
        raise ValueError(f"{out} fused rows do not split into q, k, v of {n_heads}/{n_kv} heads")
    return out // (n_heads + 2 * n_kv)


def fused_qkv_indices(n_heads: int, n_kv: int, d_h: int,
                      layout: str) -> tuple[Tensor, Tensor, Tensor]:
    """Sorted output indices of the query, key and value blocks of a fused projection:
    ``contiguous`` ``[q (n_heads d_h); k (n_kv d_h); v (n_kv d_h)]``, or ``interleaved`` per
    head ``[head][q, k, v][d_h]`` (GPT-NeoX, BLOOM; ``n_kv == n_heads``)."""
    if layout == "contiguous":
        q, kv = n_heads * d_h, n_kv * d_h
        return torch.arange(q), torch.arange(q, q + kv), torch.arange(q + kv, q + 2 * kv)
    if layout == "interleaved":
        if n_kv != n_heads:
            raise ValueError(f"an interleaved fused projection has as many key as query heads "
                             f"({n_kv} vs {n_heads})")
        base = torch.arange(n_heads)[:, None] * 3 * d_h
        offs = torch.arange(d_h)[None, :]
        return tuple((base + i * d_h + offs).reshape(-1) for i in range(3))  # type: ignore
    raise ValueError(f"unknown fused layout {layout!r}")


def fused_indices(out: int, n_heads: int, n_kv: int, d_h: int,
                   layout: str) -> tuple[Tensor, Tensor]:
    """The query and key blocks of :func:`fused_qkv_indices`."""
    q, k, _ = fused_qkv_indices(n_heads, n_kv, d_h, layout)
    return q, k


@dataclass(frozen=True)
class FusedModule:
    """A fused q/k/v projection of a live model: its weight ``param`` (a parameter name),
    layout, orientation (``transposed``: stored ``in x out``) and the head counts its module,
    its parent or the configs say (``None`` where they do not)."""

    param: str
    layout: str
    transposed: bool
    n_heads: int | None
    n_kv_heads: int | None


def fused_modules(model: nn.Module) -> list[FusedModule]:
    """Every fused q/k/v projection of ``model`` (:data:`FUSED_PATTERNS` children that are
    ``nn.Linear`` or ``Conv1D``, and ``nn.MultiheadAttention``'s ``in_proj_weight``)."""
    fused = dict(FUSED_PATTERNS)
    out = []
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None:
            out.append(FusedModule(prefix + MHA_WEIGHT, "contiguous", False, module.num_heads,
                                   module.num_heads))
            continue
        owners = _owners(model, module)
        for child_name, child in module.named_children():
            shape = linear_weight_shape(child) if child_name in fused else None
            if shape is None:
                continue
            layout = fused[child_name]
            kv = int_attr(owners, KV_HEAD_ATTRS) if layout == "contiguous" else None
            out.append(FusedModule(f"{prefix}{child_name}.weight", layout, shape[2],
                                   int_attr(owners, HEAD_ATTRS), kv))
    return out


def _fused_pair(model: nn.Module, name: str, module: nn.Module, parent: nn.Module,
                layout: str, n_heads: int | None = None) -> AttentionPair:
    shape = linear_weight_shape(module)
    if shape is None:
        raise ValueError(f"{name} is not a Linear or Conv1D")
    out, n, transposed = shape
    owners = _owners(model, parent)
    if n_heads is None:
        n_heads = int_attr(owners, HEAD_ATTRS)
    if n_heads is None:
        raise ValueError("number of heads not found")
    kv = int_attr(owners, KV_HEAD_ATTRS) if layout == "contiguous" else None
    n_kv = kv or n_heads
    d_h = fused_head_dim(out, n_heads, n_kv)
    qi, ki = fused_indices(out, n_heads, n_kv, d_h, layout)
    dev = module.weight.device
    return AttentionPair(name, Side(module, "weight", qi.to(dev), transposed),
                         Side(module, "weight", ki.to(dev), transposed), n_heads, n_kv, d_h, n)


def _separate_pair(model: nn.Module, name: str, q_mod: nn.Module, k_mod: nn.Module,
                   parent: nn.Module, n_heads: int | None = None) -> AttentionPair:
    qs, ks = linear_weight_shape(q_mod), linear_weight_shape(k_mod)
    if qs is None or ks is None:
        raise ValueError(f"{name}: query/key are not Linear or Conv1D")
    if qs[1] != ks[1]:
        raise ValueError(f"{name}: query and key read different widths ({qs[1]} vs {ks[1]})")
    n_h, n_kv, d_h = head_geometry(qs[0], ks[0], qs[1], _owners(model, parent), n_heads)
    dev = q_mod.weight.device
    return AttentionPair(name, Side(q_mod, "weight", torch.arange(qs[0], device=dev), qs[2]),
                         Side(k_mod, "weight", torch.arange(ks[0], device=dev), ks[2]),
                         n_h, n_kv, d_h, qs[1])


def _mha_pair(name: str, mha: nn.MultiheadAttention) -> AttentionPair:
    d, h = mha.embed_dim, mha.num_heads
    d_h = d // h
    if mha.in_proj_weight is not None:
        dev = mha.in_proj_weight.device
        return AttentionPair(name, Side(mha, "in_proj_weight", torch.arange(d, device=dev)),
                             Side(mha, "in_proj_weight", torch.arange(d, 2 * d, device=dev)),
                             h, h, d_h, d)
    if mha.kdim != d:
        raise ValueError(f"{name}: kdim {mha.kdim} != embed_dim {d} (cross attention)")
    dev = mha.q_proj_weight.device
    return AttentionPair(name, Side(mha, "q_proj_weight", torch.arange(d, device=dev)),
                         Side(mha, "k_proj_weight", torch.arange(d, device=dev)), h, h, d_h, d)


def _parent(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name.rpartition(".")[0]) if "." in name else model


def find_pairs(model: nn.Module, named: Sequence[tuple] | None = None
               ) -> tuple[list[AttentionPair], dict[str, str]]:
    """Attention pairs of ``model`` and ``{module: reason}`` for candidates that were skipped.

    ``named``: user pairs ``(q_module, k_module)`` or ``(q_module, k_module, n_heads)``; the same
    name twice means a fused ``[q; k; v]`` projection. When given, nothing else is searched.
    """
    pairs: list[AttentionPair] = []
    skipped: dict[str, str] = {}
    if named is not None:
        for spec in named:
            q_name, k_name = spec[0], spec[1]
            heads = int(spec[2]) if len(spec) > 2 else None
            q_mod, k_mod = model.get_submodule(q_name), model.get_submodule(k_name)
            parent = _parent(model, q_name)
            if q_name == k_name:
                pairs.append(_fused_pair(model, q_name, q_mod, parent, "contiguous", heads))
            else:
                pairs.append(_separate_pair(model, q_name.rpartition(".")[0] or q_name, q_mod,
                                            k_mod, parent, heads))
        return _usable(pairs, skipped)
    fused = dict(FUSED_PATTERNS)
    for name, module in model.named_modules():
        try:
            if isinstance(module, nn.MultiheadAttention):
                pairs.append(_mha_pair(name, module))
                continue
            children = dict(module.named_children())
            for q_child, k_child in SEPARATE_PATTERNS:
                if q_child in children and k_child in children:
                    pairs.append(_separate_pair(model, name or q_child, children[q_child],
                                                children[k_child], module))
                    break
            for child_name, child in children.items():
                if child_name in fused and linear_weight_shape(child) is not None:
                    prefix = f"{name}." if name else ""
                    pairs.append(_fused_pair(model, prefix + child_name, child, module,
                                             fused[child_name]))
        except ValueError as exc:
            skipped[name] = str(exc)
    return _usable(pairs, skipped)


def _unusable(W: Tensor) -> str | None:
    """Why a weight cannot be read by the guard's device math, or ``None``."""
    if isinstance(W, nn.parameter.UninitializedParameter):
        return "uninitialized (lazy) weight"
    if W.is_meta:
        return "weight on the meta device"
    if type(W).__name__ == "DTensor" or type(getattr(W, "data", W)).__name__ == "DTensor":
        return "sharded (DTensor) weight: not supported by the attention guard"
    if not W.is_floating_point():
        return f"{W.dtype} weight"
    return None


def _usable(pairs: list[AttentionPair], skipped: dict[str, str]
            ) -> tuple[list[AttentionPair], dict[str, str]]:
    """Drop the pairs whose weights the device math cannot read (recording the reason)."""
    kept = []
    for p in pairs:
        reason = _unusable(p.q.param) or _unusable(p.k.param)
        if reason:
            skipped[p.name] = reason
        else:
            kept.append(p)
    return kept, skipped
