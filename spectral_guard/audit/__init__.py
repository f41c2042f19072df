"""Checkpoint audit: checkpoint -> plan -> measure -> attention pass -> verdict -> :class:`Report`.

Sources: safetensors files (the fast path), PyTorch zip checkpoints and models or state_dicts in
memory (:mod:`spectral_guard.checkpoint`); every tensor is streamed the same way. The package,
one idea per module:

* :mod:`.plan`: how each tensor is read (linear, embedding, conv, experts, fused q/k/v blocks;
  or skipped, why);
* :mod:`.scan`: NaN/Inf and all-zero rows/columns of row chunks, on IEEE bit patterns;
* :mod:`.measure`: one streaming pass per tensor (scan + biopsy), batched decompositions;
  :func:`~.measure.measure_matrices` is the public measuring entry (calibration uses it);
* :mod:`.logit`: the attention pass (per-head q-k logit scales of paired projections);
* :mod:`.report`: :class:`MatrixResult`, :class:`Skipped`, :class:`Report`;
* here: :func:`audit`, which runs them in that order and judges each matrix once
  (:func:`~spectral_guard.verdict.judge`).

The package is callable (``spectral_guard.audit(path)`` is :func:`audit`), so the name keeps
working as a function after ``spectral_guard.audit`` has been imported as a package.
"""

from __future__ import annotations

import math
import sys
import time
import types
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch

from ..checkpoint import natural_key
from ..thresholds import Thresholds, load_thresholds
from ..verdict import DEFAULT_FAIL_ON, STATUSES, judge, severity
from .logit import logit_pass
from .measure import (
    Progress,
    accelerator_metrics,
    audit_biopsy_indices,
    check_options,
    measure_matrices,
    measure_plan,
    open_source,
)
from .plan import (
    CONFIG_EXPERT_KEYS,
    TensorPlan,
    compile_patterns,
    config_value,
    plan_checkpoint,
    plan_tensor,
    reads_as_experts,
    source_config,
    source_heads,
)
from .report import SCHEMA_VERSION, MatrixResult, Report, Skipped

__all__ = [
    "SCHEMA_VERSION", "MatrixResult", "Progress", "Report", "Skipped", "TensorPlan",
    "accelerator_metrics", "audit", "audit_biopsy_indices", "judge_results",
    "measure_matrices", "plan_tensor", "reads_as_experts",
]


def judge_results(results: Iterable[MatrixResult], thresholds: Thresholds) -> None:
    """Set each result's ``group``, ``status`` and ``reasons`` under ``thresholds`` (in place)."""
    for res in results:
        res.group = thresholds.group_for(res.name)
        res.status, res.reasons = judge(res.observation(), thresholds.rule_for(res.name))


def _sort_key(m: MatrixResult) -> tuple:
    if m.status == "ill_conditioned":
        score = -(m.condition_number if m.condition_number is not None else math.inf)
    else:
        score = m.effective_rank_ratio if m.effective_rank_ratio is not None else -1.0
    return (severity(m.status), score, natural_key(m.name))


def audit(path: str | Path | Sequence[str | Path] | torch.nn.Module | Mapping, *,
          mode: str = "biopsy", limit: int = 128,
          seed: int = 0, include: Sequence[str] = (), exclude: Sequence[str] = (),
          thresholds: Thresholds | str | Path | None = None,
          fail_on: Sequence[str] = DEFAULT_FAIL_ON,
          progress: Progress | None = None, dtensor: str = "full",
          heads: int | None = None, alpha: str = "csn") -> Report:
    """Audit every matrix of one or more checkpoints, or of a model or state_dict in memory.

    ``path``: a ``.safetensors`` file, a PyTorch checkpoint (``.pt``/``.bin``/``.pth``/
    ``.ckpt``), a ``*.safetensors.index.json`` or ``pytorch_model.bin.index.json``, a folder
    holding any of these (safetensors preferred), or a list of those; or an ``nn.Module`` (its
    ``named_parameters``, tied weights once) or a mapping of names to tensors, on any device.
    ``mode``: ``"biopsy"`` (seeded ``<= limit x limit`` submatrix per
    matrix) or ``"exact"`` (full SVD). ``include``/``exclude``: regexes searched in tensor names.
    ``thresholds``: a :class:`Thresholds`, a thresholds file, or ``None`` for the shipped
    defaults. ``dtensor``: for DTensor/FSDP2 parameters, ``"full"`` (gather each tensor; a
    collective, so call it on every rank) or ``"local"`` (this rank's shards); see
    :mod:`spectral_guard.checkpoint.inmemory`. ``heads``: attention heads per layer for the
    q-k logit pass (:mod:`spectral_guard.audit.logit`) on checkpoints and state_dicts;
    ``None`` reads ``config.json`` next to the checkpoint (a model uses its modules'
    attributes), and without a head count the pass is skipped with a note. The same
    ``config.json`` (or a model's ``config``) says whether 3-D tensors are experts
    (:mod:`spectral_guard.audit.plan`). ``alpha``: the HT-SR estimator, ``"csn"`` (the
    power-law fit with ``xmin`` by minimum KS distance, WeightWatcher's alpha) or
    ``"hill_median"`` (a faster Hill estimator at the median eigenvalue: a different number,
    :mod:`spectral_guard.sensors`). Raises
    :class:`~spectral_guard.checkpoint.CheckpointError` for unreadable input,
    :class:`~spectral_guard.thresholds.ThresholdsError` for a bad thresholds file and
    ``ValueError`` for bad options (all with one-line messages).
    """
    check_options(mode, limit, alpha)
    bad = sorted(set(fail_on) - set(STATUSES))
    if bad:
        raise ValueError(f"unknown status {bad[0]!r} in the fail policy (choose from "
                         f"{', '.join(STATUSES)})")
    inc, exc = compile_patterns(include, "include"), compile_patterns(exclude, "exclude")
    if isinstance(thresholds, Thresholds):
        th, th_source = thresholds, "object"
    else:
        th = load_thresholds(thresholds)
        th_source = "default" if thresholds is None else str(thresholds)
    if heads is not None and (isinstance(heads, bool) or not isinstance(heads, int)
                              or heads < 1):
        raise ValueError(f"the head count must be a positive integer, got {heads!r}")
    alpha_notes = _alpha_estimator_notes(th, alpha)
    t0 = time.perf_counter()
    with torch.no_grad():
        ckpt = open_source(path, dtensor)
        config = source_config(ckpt, path)
        plan = plan_checkpoint(ckpt, inc, exc, config_value(config[0], CONFIG_EXPERT_KEYS),
                               source_heads(path, config[0], heads))
        results = measure_plan(plan, mode=mode, limit=int(limit), seed=int(seed),
                               progress=progress, alpha=alpha,
                               row_sr_below=_largest_stable_rank_floor(th))
        model = path if isinstance(path, torch.nn.Module) else None
        logit_pairs, logit_notes, needs_heads = logit_pass(ckpt, results, heads, config, model)
    judge_results(results, th)
    results.sort(key=_sort_key)
    return Report(
        sources=[s.to_json_dict() for s in ckpt.sources], thresholds=th,
        thresholds_source=th_source, mode=mode, limit=int(limit), seed=int(seed),
        fail_on=tuple(fail_on), matrices=results,
        skipped=[Skipped(t.name, str(t.file), t.shape, t.dtype, why) for t, why in plan.skipped],
        filtered_out=plan.filtered_out, bytes_read=plan.nbytes,
        elapsed_s=time.perf_counter() - t0, include=tuple(include), exclude=tuple(exclude),
        logit_pairs=logit_pairs, logit_notes=logit_notes, logit_needs_heads=needs_heads,
        plan_notes=[*plan.notes, *alpha_notes], alpha_estimator=alpha)


def _alpha_estimator_notes(th: Thresholds, alpha: str) -> list[str]:
    """Alpha bounds judge only the alpha of the estimator they were learned with: ``ValueError``
    when a calibrated file names another one than the audit's, a note when it names none."""
    if not any(r.alpha_min is not None or r.alpha_max is not None for r in th.rules()):
        return []
    learned = th.provenance.get("alpha_estimator")
    if learned is None:
        return ["the thresholds set alpha bounds without saying which alpha estimator they "
                f"were learned with; judged as {alpha!r} alpha"]
    if learned != alpha:
        flag = str(learned).replace("_", "-")
        raise ValueError(f"the thresholds' alpha bounds were learned with the {learned!r} "
                         f"alpha estimator: audit with alpha={learned!r} (--alpha {flag})")
    return []


def _largest_stable_rank_floor(th: Thresholds) -> float:
    """The largest ``stable_rank_min`` any rule of ``th`` sets (0 when none does)."""
    floors = [r.stable_rank_min for r in th.rules() if r.stable_rank_min is not None]
    return max(floors, default=0.0)


class _CallableModule(types.ModuleType):
    """``spectral_guard.audit(...)`` calls :func:`audit` even once this package is imported
    (importing a subpackage sets the parent's attribute to the module)."""

    def __call__(self, *args, **kwargs) -> Report:
        return audit(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
