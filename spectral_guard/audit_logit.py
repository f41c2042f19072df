"""The audit's attention-logit pass: per-head query-key logit scale of the pairs it can find.

For an attention head ``h`` with query rows ``W_q,h`` and key rows ``W_k,h`` (``d_h x n`` each)
the head's logit scale is (as in :mod:`spectral_guard.guard.attention`)

    ``s_h = sigma_max(W_q,h^T W_k,h) / sqrt(d_h)``,

so ``|logit_ij| <= s_h ||x_i|| ||x_j||``; inputs of unit RMS (``||x|| = sqrt(n)``, behind a
LayerNorm/RMSNorm with unit gains) reach at most ``s_h n``. The audit reports ``s_h n`` per head
(``logit_head_scales``) and its maximum over heads (``logit_scale``): the quantity that the
training-time guard's default target ``t = 64 / n`` bounds at 64.

Exact and cheap: with the thin QR factorizations ``W_q,h^T = Q_q R_q`` and ``W_k,h^T = Q_k R_k``
(``Q`` with orthonormal columns, ``R`` ``d_h x d_h``), ``W_q,h^T W_k,h = Q_q R_q R_k^T Q_k^T``,
hence ``sigma_max(W_q,h^T W_k,h) = sigma_max(R_q R_k^T)``: a QR of two ``n x d_h`` matrices and
the SVD of a ``d_h x d_h`` core per head, in float64, never the ``n x n`` product.

Pairing on a checkpoint's tensor names uses the attention guard's patterns
(:data:`~spectral_guard.attention_pairs.SEPARATE_PATTERNS`,
:data:`~spectral_guard.attention_pairs.FUSED_PATTERNS`, plus ``nn.MultiheadAttention``'s
``in_proj_weight``). A fused projection stored ``in x out`` (GPT-2's ``Conv1D``: fewer rows
than columns) is read transposed. The head count comes from ``heads=`` or from a
``config.json`` next to the checkpoint (``num_attention_heads``, ``n_head``, T5's
``num_heads``; key heads from ``num_key_value_heads``, else from the key projection's size);
without one the pass is skipped with a note. A live model is paired by
:func:`~spectral_guard.attention_pairs.find_pairs` (its modules' head attributes).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from .attention_pairs import (
    FUSED_PATTERNS,
    SEPARATE_PATTERNS,
    find_pairs,
    fused_indices,
    head_geometry,
)
from .checkpoint.inmemory import original_name, unwrap_module

Tensor = torch.Tensor

CONFIG_HEAD_KEYS = ("num_attention_heads", "n_head", "num_heads")
CONFIG_KV_KEYS = ("num_key_value_heads",)
MHA_SUFFIX = "in_proj_weight"


def exact_head_scales(Wq: Tensor, Wk: Tensor) -> Tensor:
    """``s_h = sigma_max(W_q,h^T W_k,h) / sqrt(d_h)`` for ``heads x d_h x n`` stacks, exactly.

    Float64. When ``d_h < n``, through ``sigma_max(R_q R_k^T)`` with ``W^T = Q R`` (module
    docstring); otherwise the ``n x n`` product is small and decomposed directly.
    """
    Wq, Wk = Wq.detach().to(torch.float64), Wk.detach().to(torch.float64)
    d_h, n = Wq.shape[-2], Wq.shape[-1]
    if d_h < n:
        Rq = torch.linalg.qr(Wq.mT, mode="r").R
        Rk = torch.linalg.qr(Wk.mT, mode="r").R
        core = Rq @ Rk.mT
    else:
        core = Wq.mT @ Wk
    return torch.linalg.svdvals(core)[..., 0] / math.sqrt(d_h)


@dataclass(frozen=True)
class NamedPair:
    """A q/k pair found by tensor names: rows ``q_index`` of tensor ``q_tensor`` (columns when
    ``transposed``) and likewise for the key."""

    name: str
    q_tensor: str
    k_tensor: str
    q_index: Tensor
    k_index: Tensor
    transposed: bool
    n_heads: int
    n_kv_heads: int
    head_dim: int
    in_features: int


@dataclass
class PairScale:
    """The measured pair: ``bounds[h] = s_h n`` for each query head."""

    name: str
    tensors: tuple[str, ...]
    bounds: list[float]

    @property
    def max_bound(self) -> float:
        return max(self.bounds)

    @property
    def worst_head(self) -> int:
        return max(range(len(self.bounds)), key=self.bounds.__getitem__)


def config_heads(source_paths: list[Path]) -> tuple[int | None, int | None, Path | None]:
    """``(heads, kv_heads, config path)`` from the first ``config.json`` next to a source
    (in the folder itself, or next to a file or an index); ``None`` where not found."""
    for p in source_paths:
        folder = p if p.is_dir() else p.parent
        cfg = folder / "config.json"
        if not cfg.is_file():
            continue
        try:
            data = json.loads(cfg.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict):
            continue
        heads = next((data[k] for k in CONFIG_HEAD_KEYS if _pos_int(data.get(k))), None)
        kv = next((data[k] for k in CONFIG_KV_KEYS if _pos_int(data.get(k))), None)
        if heads is not None:
            return heads, kv, cfg
    return None, None, None


def _pos_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


def candidate_pairs(shapes: Mapping[str, tuple[int, ...]]) -> list[tuple[str, str, str, str]]:
    """``(pair name, q tensor, k tensor, layout)`` found by name among 2-D tensors; ``layout``
    is ``"separate"``, a fused layout (``"contiguous"``/``"interleaved"``) or ``"mha"``."""
    fused = dict(FUSED_PATTERNS)
    found = []
    for name, shape in shapes.items():
        if len(shape) != 2:
            continue
        prefix, _, last = name.rpartition(".")
        if last == MHA_SUFFIX:
            found.append((prefix or name, name, name, "mha"))
            continue
        if last != "weight":
            continue
        parent, _, child = prefix.rpartition(".")
        head = f"{parent}." if parent else ""
        for q_child, k_child in SEPARATE_PATTERNS:
            k_name = f"{head}{k_child}.weight"
            if child == q_child and len(shapes.get(k_name, ())) == 2:
                found.append((parent or q_child, name, k_name, "separate"))
                break
        if child in fused:
            found.append((prefix, name, name, fused[child]))
    return found


def geometry(cand: tuple[str, str, str, str], shapes: Mapping[str, tuple[int, ...]],
             heads: int, kv_heads: int | None) -> NamedPair:
    """Head geometry of a candidate (``ValueError`` with the reason when it does not fit)."""
    name, q_name, k_name, layout = cand
    qs, ks = shapes[q_name], shapes[k_name]
    if layout == "separate":
        if qs[1] != ks[1]:
            raise ValueError(f"query and key read different widths ({qs[1]} vs {ks[1]})")
        n_h, n_kv, d_h = head_geometry(qs[0], ks[0], qs[1], [], heads)
        if kv_heads is not None and kv_heads != n_kv:
            raise ValueError(f"{n_kv} key heads in the weights, {kv_heads} in config.json")
        return NamedPair(name, q_name, k_name, torch.arange(qs[0]), torch.arange(ks[0]),
                         False, n_h, n_kv, d_h, qs[1])
    transposed = layout != "mha" and qs[0] < qs[1]
    out, n = (qs[1], qs[0]) if transposed else qs
    n_kv = heads if layout != "contiguous" or kv_heads is None else kv_heads
    if layout == "mha":
        layout = "contiguous"
    if heads % n_kv or out % (heads + 2 * n_kv):
        raise ValueError(f"{out} fused rows do not split into q, k, v of {heads}/{n_kv} heads")
    d_h = out // (heads + 2 * n_kv)
    qi, ki = fused_indices(out, heads, n_kv, d_h, layout)
    return NamedPair(name, q_name, k_name, qi, ki, transposed, heads, n_kv, d_h, n)


def _rows(W: Tensor, index: Tensor, transposed: bool) -> Tensor:
    return W.index_select(1, index).mT if transposed else W.index_select(0, index)


def measure_named(pair: NamedPair, load: Callable[[str], Tensor]) -> PairScale | None:
    """Per-head ``s_h n`` of a named pair (tensors read one at a time through ``load``);
    ``None`` when a weight holds NaN/Inf."""
    q = _rows(load(pair.q_tensor), pair.q_index, pair.transposed).to(torch.float64)
    k = _rows(load(pair.k_tensor), pair.k_index, pair.transposed).to(torch.float64)
    if not (bool(torch.isfinite(q).all()) and bool(torch.isfinite(k).all())):
        return None
    q = q.reshape(pair.n_heads, pair.head_dim, pair.in_features)
    k = k.reshape(pair.n_kv_heads, pair.head_dim, pair.in_features)
    k = k.index_select(0, torch.arange(pair.n_heads) // (pair.n_heads // pair.n_kv_heads))
    bounds = (exact_head_scales(q, k) * pair.in_features).tolist()
    return PairScale(pair.name, tuple(dict.fromkeys((pair.q_tensor, pair.k_tensor))), bounds)


def measure_model(model: torch.nn.Module) -> tuple[list[PairScale], dict[str, str]]:
    """Pairs of a live model by the attention guard's pairing, measured exactly; and the
    ``{module: reason}`` of the candidates it skipped."""
    model = unwrap_module(model)
    names = {id(p): original_name(n)
             for n, p in model.named_parameters(remove_duplicate=False)}
    pairs, skipped = find_pairs(model)
    out = []
    with torch.no_grad():
        for p in pairs:
            q, k = p.heads()
            if not (bool(torch.isfinite(q).all()) and bool(torch.isfinite(k).all())):
                continue
            bounds = (exact_head_scales(q.cpu(), k.cpu()) * p.in_features).tolist()
            tensors = tuple(dict.fromkeys(names.get(id(s.param), "") for s in (p.q, p.k)))
            out.append(PairScale(p.name, tuple(t for t in tensors if t), bounds))
    return out, skipped
