"""What the guard reports: per-layer stats, totals, and flat metrics for loggers (host values
only: ``metrics()["penalty"]`` is the value the step's packed copy carried to the host, one
step behind)."""

from __future__ import annotations

from typing import Any

from .alarm import collapse_depth


def layer_stats(layer: Any) -> dict[str, Any]:
    st = layer.state
    return {
        "shape": tuple(int(d) for d in layer.weight.shape),
        "sensors": st.readings.as_dict(),
        "baseline": None if st.baseline is None else st.baseline.as_dict(),
        "thresholds": dict(layer.sensors),
        "lambda": st.lam,
        "lambda_collapse": st.lambdas["collapse"],
        "lambda_conditioning": st.lambdas["conditioning"],
        "checks": st.checks,
        "interventions": st.interventions,
        "msigns": st.msigns,
        "msigns_skipped": st.msigns_skipped,
        "last_checked_step": st.last_checked_step,
        "collapse_fall": st.collapse_fall,
        "collapse_depth": collapse_depth(st.readings, layer.sensors),
        "nonfinite": st.nonfinite,
        "nonfinite_entries": st.nonfinite_entries,
        "failed_checks": st.failed_checks,
        "frozen": not layer.weight.requires_grad,
        "penalized": bool(layer.sensors),
    }


def stats(guard: Any) -> dict[str, Any]:
    """``guard.stats()``: latest applied readings, lambdas, counters per layer, and totals."""
    layers = {layer.name: layer_stats(layer) for layer in guard.layers}
    totals = {
        "step": guard.global_step,
        "layers": len(layers),
        "skipped": len(guard.skipped),
        "checks": sum(v["checks"] for v in layers.values()),
        "interventions": sum(v["interventions"] for v in layers.values()),
        "msigns": sum(v["msigns"] for v in layers.values()),
        "lr_scale": guard.backoff.scale,
        "lr_backoffs": guard.backoff.backoffs,
        "lr_policy": guard.backoff.policy,
        "alarm_raised": guard.signs.raised,
        "alarm_latched": guard.signs.alarm_seen,
        "alarm_signs": guard.signs.alarm_signs,
        "alarm_reason": guard.signs.reason,
        "treated_layers": sum(layer.state.treated for layer in guard.layers),
        "nonfinite_layers": sum(v["nonfinite"] for v in layers.values()),
        "failed_checks": sum(v["failed_checks"] for v in layers.values()),
        "guard_time_s": guard.guard_time_s,
    }
    out = {"layers": layers, "totals": totals,
           "skipped": {s.name: s.reason for s in guard.skipped}}
    if guard.blocks is not None:
        out["blocks"] = guard.blocks.stats()
    return out


def metrics(guard: Any) -> dict[str, float]:
    """``guard.metrics()``: flat floats for loggers. ``alarm`` (1: raised at the last step it
    was read), ``alarm_signs`` (steps where it signed layers), ``lr_scale`` (the back-off),
    ``lr_backoffs``; ``penalty`` is the penalty built before the previous optimizer step
    (``penalty_step``: that step; -1 and 0.0 before any), copied to the host with that step's
    checks: one step behind, never a read of a device tensor."""
    t = stats(guard)["totals"]
    readings = [layer.state.readings for layer in guard.layers]
    retention = [r.effective_rank_retention for r in readings
                 if r.effective_rank_retention == r.effective_rank_retention]
    ratios = [r.stable_rank_ratio for r in readings
              if r.stable_rank_ratio == r.stable_rank_ratio]
    step, penalty = guard.penalty_host if guard.penalty_host is not None else (-1, 0.0)
    return {
        "interventions": float(t["interventions"]),
        "msigns": float(t["msigns"]),
        "lr_scale": float(t["lr_scale"]),
        "lr_backoffs": float(t["lr_backoffs"]),
        "alarm": float(t["alarm_raised"]),
        "alarm_signs": float(t["alarm_signs"]),
        "treated_layers": float(t["treated_layers"]),
        "min_effective_rank_retention": min(retention) if retention else float("nan"),
        "mean_stable_rank_ratio": sum(ratios) / len(ratios) if ratios else float("nan"),
        "nonfinite_layers": float(t["nonfinite_layers"]),
        "penalty": penalty,
        "penalty_step": float(step),
    } | (guard.attention.metrics() if guard.attention is not None else {}) \
        | (guard.blocks.metrics() if guard.blocks is not None else {})


def render(guard: Any, console: Any = None) -> None:
    """``guard.report()``: :func:`stats` as a rich table."""
    from .report import render_stats

    render_stats(guard.stats(), console)


def log_to(guard: Any, writer: Any, step: int) -> None:
    """``guard.log_to()``: per-layer scalars to a TensorBoard ``SummaryWriter``."""
    from ..integrations.tensorboard import log_guard

    log_guard(guard, writer, step)


def plot(guard: Any, path: Any) -> None:
    """``guard.plot()``: each layer's readings over the steps."""
    from ..integrations.plot import plot_guard_history

    plot_guard_history(guard, path)
