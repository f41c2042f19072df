"""The audit's attention-logit pass: per-head query-key logit scales of the pairs it can find.

For an attention head ``h`` with query rows ``W_q,h`` and key rows ``W_k,h`` (``d_h x n`` each)
and ``A_h = W_q,h^T W_k,h`` (``n x n``), the logit of inputs ``x_i, x_j`` is
``x_i^T A_h x_j / sqrt(d_h)``. Two scales per head, for inputs of unit RMS (``||x|| = sqrt(n)``,
behind a LayerNorm/RMSNorm with unit gains):

* **typical** ``tau_h = ||A_h||_F / sqrt(d_h)``: the RMS of the logit when ``x_i, x_j`` are
  independent with ``E[x x^T] = I`` (``E[(x^T A y)^2] = ||A||_F^2``); about 1 at a
  ``1/sqrt(n)`` initialization whatever the width. This is what the verdict reads
  (``logit_typical = max_h tau_h`` against ``logit_typical_max``): a head whose logits have an RMS
  of several tens turns softmax into an argmax for ordinary inputs, while the sharpest healthy
  heads of pretrained encoders stay near 12 (docs/audit.md, "Attention logit scale").
* **worst case** ``s_h n`` with ``s_h = sigma_max(A_h) / sqrt(d_h)``: the largest logit such
  inputs can reach (``|logit| <= s_h ||x_i|| ||x_j||``), the quantity the training-time guard's
  target ``64 / n`` bounds at 64. Reported (``logit_scale``, ``logit_head_scales``); judged only
  against ``logit_scale_max``, which the shipped defaults leave off: it grows with ``n`` and
  with the anisotropy of ``A_h``, and healthy pretrained encoders reach 2293 at ``n = 384``.

Both are exact and cheap, in float64, never through the ``n x n`` product: with the thin QR
factorizations ``W_q,h^T = Q_q R_q`` and ``W_k,h^T = Q_k R_k``, ``sigma_max(A_h) =
sigma_max(R_q R_k^T)`` (a ``d_h x d_h`` SVD); and ``||A_h||_F^2 = <W_q,h W_q,h^T, W_k,h
W_k,h^T>`` (two ``d_h x d_h`` Gram matrices).

Pairing on a checkpoint's tensor names uses the attention patterns of
:mod:`spectral_guard.attention_pairs` (:data:`~spectral_guard.attention_pairs.SEPARATE_PATTERNS`,
:data:`~spectral_guard.attention_pairs.FUSED_PATTERNS`, plus ``nn.MultiheadAttention``'s
``in_proj_weight``). A fused projection stored ``in x out`` (GPT-2's ``Conv1D``: fewer rows
than columns) is read transposed. The head count is given by the caller or read from the model's
config (``num_attention_heads``, ``n_head``, T5's ``num_heads``; key heads from
``num_key_value_heads``, else from the key projection's size); without one the pass is skipped
with a note. A live model is paired by :func:`~spectral_guard.attention_pairs.find_pairs` (its
modules' head attributes). A pair whose weights hold NaN/Inf is not measured, with a note.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from ..attention_pairs import (
    FUSED_PATTERNS,
    MHA_WEIGHT,
    SEPARATE_PATTERNS,
    find_pairs,
    fused_head_dim,
    fused_indices,
    head_geometry,
    stored_transposed,
)
from ..checkpoint import Checkpoint, TensorInfo, TensorStream
from ..checkpoint.inmemory import original_name, unwrap_module
from .plan import FUSED_QK, config_heads
from .report import MatrixResult

Tensor = torch.Tensor

MHA_SUFFIX = MHA_WEIGHT


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


def typical_head_scales(Wq: Tensor, Wk: Tensor) -> Tensor:
    """``tau_h = ||W_q,h^T W_k,h||_F / sqrt(d_h)`` for ``heads x d_h x n`` stacks, exactly:
    the RMS logit of independent isotropic unit-RMS inputs (module docstring). Float64, through
    ``||W_q^T W_k||_F^2 = <W_q W_q^T, W_k W_k^T>`` (``d_h x d_h`` Gram matrices)."""
    Wq, Wk = Wq.detach().to(torch.float64), Wk.detach().to(torch.float64)
    gram = (Wq @ Wq.mT) * (Wk @ Wk.mT)
    return gram.sum((-2, -1)).clamp_min(0).sqrt() / math.sqrt(Wq.shape[-2])


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
    """The measured pair, per query head: ``bounds[h] = s_h n`` (worst case) and
    ``typical[h] = tau_h``."""

    name: str
    tensors: tuple[str, ...]
    bounds: list[float]
    typical: list[float] = field(default_factory=list)

    @property
    def max_bound(self) -> float:
        return max(self.bounds)

    @property
    def max_typical(self) -> float:
        return max(self.typical)

    @property
    def worst_head(self) -> int:
        """The head that reaches the worst-case bound."""
        return max(range(len(self.bounds)), key=self.bounds.__getitem__)

    @property
    def typical_head(self) -> int:
        """The head with the largest typical scale (the one the verdict reads)."""
        return max(range(len(self.typical)), key=self.typical.__getitem__)


def head_scales(name: str, tensors: tuple[str, ...], q: Tensor, k: Tensor, n: int
                ) -> PairScale | None:
    """Both scales of ``heads x d_h x n`` query and key stacks (keys already repeated for
    grouped-query attention); ``None`` when a weight holds NaN/Inf."""
    if not (bool(torch.isfinite(q).all()) and bool(torch.isfinite(k).all())):
        return None
    bounds = (exact_head_scales(q, k) * n).tolist()
    return PairScale(name, tensors, bounds, typical_head_scales(q, k).tolist())


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
    transposed = layout != "mha" and stored_transposed(qs) is True
    out, n = (qs[1], qs[0]) if transposed else qs
    n_kv = heads if layout != "contiguous" or kv_heads is None else kv_heads
    if layout == "mha":
        layout = "contiguous"
    d_h = fused_head_dim(out, heads, n_kv)
    qi, ki = fused_indices(out, heads, n_kv, d_h, layout)
    return NamedPair(name, q_name, k_name, qi, ki, transposed, heads, n_kv, d_h, n)


def _rows(W: Tensor, index: Tensor, transposed: bool) -> Tensor:
    return W.index_select(1, index).mT if transposed else W.index_select(0, index)


def measure_named(pair: NamedPair, load: Callable[[str], Tensor]) -> PairScale | None:
    """Per-head scales of a named pair (tensors read one at a time through ``load``);
    ``None`` when a weight holds NaN/Inf."""
    q = _rows(load(pair.q_tensor), pair.q_index, pair.transposed).to(torch.float64)
    k = _rows(load(pair.k_tensor), pair.k_index, pair.transposed).to(torch.float64)
    q = q.reshape(pair.n_heads, pair.head_dim, pair.in_features)
    k = k.reshape(pair.n_kv_heads, pair.head_dim, pair.in_features)
    k = k.index_select(0, torch.arange(pair.n_heads) // (pair.n_heads // pair.n_kv_heads))
    return head_scales(pair.name, tuple(dict.fromkeys((pair.q_tensor, pair.k_tensor))), q, k,
                       pair.in_features)


def measure_model(model: torch.nn.Module
                  ) -> tuple[list[PairScale], dict[str, str], list[str]]:
    """Pairs of a live model by :func:`~spectral_guard.attention_pairs.find_pairs`, measured
    exactly; the ``{module: reason}`` of the candidates it skipped; the names of the pairs not
    measured because a weight holds NaN/Inf."""
    model = unwrap_module(model)
    names = {id(p): original_name(n)
             for n, p in model.named_parameters(remove_duplicate=False)}
    pairs, skipped = find_pairs(model)
    out, nonfinite = [], []
    with torch.no_grad():
        for p in pairs:
            q, k = p.heads()
            tensors = tuple(dict.fromkeys(names.get(id(s.param), "") for s in (p.q, p.k)))
            sc = head_scales(p.name, tuple(t for t in tensors if t), q.cpu(), k.cpu(),
                             p.in_features)
            if sc is None:
                nonfinite.append(p.name)
            else:
                out.append(sc)
    return out, skipped, nonfinite


def _nonfinite_note(names: list[str]) -> str:
    return (f"q-k logit scale: {len(names)} attention pair(s) not measured because their query "
            f"or key weights hold NaN/Inf (e.g. {names[0]}; those matrices are reported "
            "nonfinite).")


def logit_pass(ckpt: Checkpoint, results: list[MatrixResult], heads: int | None,
               config: tuple[Mapping | None, str | None] = (None, None),
               model: torch.nn.Module | None = None) -> tuple[int, list[str], bool]:
    """Pair the audited 2-D matrices, measure each pair's heads exactly (each weight re-read
    whole, on its own) and attach the pair's values to its matrices (not judged here).
    ``heads``: the head count when the caller gives one, else ``config`` (``(dict, where)``)
    says it; a live ``model`` is paired by its modules. Returns the number of measured pairs,
    the notes for the report (why pairs were skipped) and whether pairs were found but no head
    count (a caller can say how to give one)."""
    by_tensor: dict[str, list[MatrixResult]] = {}  # a fused projection: its q and k blocks
    for r in results:
        if len(r.tensor_shape) == 2 and (r.name == r.tensor or r.read_as in FUSED_QK):
            by_tensor.setdefault(r.tensor, []).append(r)
    notes: list[str] = []
    scales: list[PairScale] = []
    nonfinite: list[str] = []
    if model is not None:
        scales, skipped_pairs, nonfinite = measure_model(model)
        if skipped_pairs:
            where, why = next(iter(skipped_pairs.items()))
            notes.append(f"q-k logit scale: {len(skipped_pairs)} attention candidate(s) not "
                         f"paired (e.g. {where or 'the model'}: {why}).")
    else:
        infos: dict[str, TensorInfo] = {t.name: t for t in ckpt.tensors if t.name in by_tensor}
        shapes = {name: info.shape for name, info in infos.items()}
        cands = candidate_pairs(shapes)
        kv_heads, source = None, "the given head count"
        if cands and heads is None:
            heads, kv_heads = config_heads(config[0])
            source = config[1] or "the model's config"
        if cands and heads is None:
            notes.append(f"q-k logit scale not checked: {len(cands)} attention pair(s) found "
                         "but no head count (no config.json with num_attention_heads or n_head "
                         "next to the checkpoint, and none given).")
            return 0, notes, True
        bad: list[str] = []
        for cand in cands:
            try:
                pair = geometry(cand, shapes, heads, kv_heads)
            except ValueError as exc:
                bad.append(f"{cand[0]}: {exc} ({heads} heads from {source})")
                continue

            def load(name: str) -> Tensor:
                with TensorStream(infos[name]) as stream:
                    return stream.full().to("cpu", torch.float64, copy=True)

            measured = measure_named(pair, load)
            if measured is None:
                nonfinite.append(pair.name)
            else:
                scales.append(measured)
        if bad:
            notes.append(f"q-k logit scale: {len(bad)} attention pair(s) not measured "
                         f"(e.g. {bad[0]}).")
    if nonfinite:
        notes.append(_nonfinite_note(nonfinite))
    scales = [sc for sc in scales if any(t in by_tensor for t in sc.tensors)]
    for sc in scales:
        for res in (r for t in sc.tensors for r in by_tensor.get(t, ())):
            res.logit_scale, res.logit_typical = sc.max_bound, sc.max_typical
            res.logit_head, res.logit_typical_head = sc.worst_head, sc.typical_head
            res.logit_pair = sc.name
            res.logit_head_scales, res.logit_head_typical = list(sc.bounds), list(sc.typical)
    return len(scales), notes, False
