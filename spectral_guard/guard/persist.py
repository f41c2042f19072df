"""The guard's state dict: clock, per-layer host state and device vectors, the check in
flight, the attention and block components, the alarm's latch and log state, the back-off and
``guard.history`` (the newest ``config.history`` records).

A resumed run applies the saved in-flight check at the same step as an uninterrupted one.
"""

from __future__ import annotations

import warnings
from typing import Any

from .check import Readings
from .config import RENAMED, GuardConfig
from .cycle import NAME
from .install import GuardedLayer
from .state import LayerState
from .worker import Measurement

STATE_VERSION = 2


def schedule_config(config: GuardConfig) -> dict[str, Any]:
    """The settings a resumed run must share with the saved one to continue it exactly."""
    return {"seed": config.seed, "ratio": config.ratio, "every": config.every,
            "sensors": list(config.sensors), "biopsy_limit": config.biopsy_limit,
            "actuator": config.actuator, "msign_every": config.msign_every,
            "msign_gate": config.msign_gate,
            "alarm_attention_factor": config.alarm_attention_factor,
            "alarm_quorum": config.alarm_quorum, "alarm_fall_steps": config.alarm_fall_steps,
            "alarm_depth": config.alarm_depth,
            "lr_backoff": config.lr_backoff,
            "lr_floor": config.lr_floor, "lr_policy": config.lr_policy,
            "lr_recovery": config.lr_recovery, "lr_grace": config.lr_grace,
            "lr_count": config.lr_count}


def measurement_to_dict(m: Measurement, name: str) -> dict[str, Any]:
    return {"layer": name, "generation": m.generation, "readings": m.readings.as_dict(),
            "nonfinite_entries": m.nonfinite_entries, "error": m.error,
            "svd": None if m.svd is None else [t.clone() for t in m.svd]}


def measurement_from_dict(d: dict[str, Any], by_name: dict[str, GuardedLayer]) -> Measurement:
    svd = d.get("svd")
    return Measurement(by_name[d["layer"]].index, int(d["generation"]), Readings(**d["readings"]),
                       int(d["nonfinite_entries"]), None if svd is None else tuple(svd),
                       d.get("error", ""))


def save(guard: Any) -> dict[str, Any]:
    """``guard.state_dict()`` (waits for the check in flight: not a training-step call)."""
    pending = guard.checks.pending(NAME)
    inflight = None if pending is None else {
        "step": pending[0],
        "measurements": [measurement_to_dict(m, guard.layers[m.index].name)
                         for m in pending[1]]}
    return {
        "version": STATE_VERSION,
        "step": guard.global_step,
        "config": schedule_config(guard.config),
        "layers": {layer.name: {
            "state": layer.state.to_dict(),
            "tensors": {k: v.detach().cpu().clone() for k, v in (
                ("u", layer.probe.u), ("v", layer.probe.v), ("cond_u", layer.probe.cond_u),
                ("cond_v", layer.probe.cond_v))},
        } for layer in guard.layers},
        "inflight": inflight,
        "attention": None if guard.attention is None else guard.attention.state_dict(),
        "blocks": None if guard.blocks is None else guard.blocks.state_dict(guard.checks),
        "msign_alarm_seen": guard.signs.alarm_seen,
        "signs": guard.signs.state_dict(),
        "history": [dict(record) for record in guard.history],
        "lr_backoff": guard.backoff.state_dict(),
    }


def check_compatible(state: Any, by_name: dict[str, GuardedLayer],
                     config: GuardConfig) -> None:
    """Refuse a state of another version or other layers; warn about other settings."""
    version = state.get("version") if isinstance(state, dict) else None
    if version != STATE_VERSION:
        raise ValueError(f"unsupported guard state version {version!r} (expected "
                         f"{STATE_VERSION})")
    missing = sorted(set(by_name) - set(state["layers"]))
    extra = sorted(set(state["layers"]) - set(by_name))
    if missing or extra:
        raise ValueError(f"guard state is for other layers: missing {missing[:3]}, "
                         f"unexpected {extra[:3]}")
    saved, now = dict(state.get("config", {})), schedule_config(config)
    # states saved before the matrix sign, its fall rule and the back-off: switched off
    off = GuardConfig(msign_every=0, lr_backoff=1.0, alarm_fall_steps=0)
    for old, new in RENAMED.items():  # saved under the alarm's former names
        if old in saved:
            saved.setdefault(new, saved.pop(old))
    if "alarm_fall_steps" in saved:  # saved before the depth count: the fall alone
        saved.setdefault("alarm_depth", None)
    if "lr_backoff" in saved:   # saved before the graded back-off: the alarm policy
        saved.setdefault("lr_policy", "alarm")
    if "lr_policy" in saved:    # saved before lr_count: the graded law counted every layer
        saved.setdefault("lr_count", "treated")
    for key, value in schedule_config(off).items():
        if key.startswith(("msign_", "alarm_", "lr_")):
            saved.setdefault(key, value)
    changed = {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v}
    if saved.get("msign_every") == now["msign_every"] == 0:   # no sign: its gate is moot
        changed = {k: v for k, v in changed.items() if not k.startswith(("msign_", "alarm_"))}
    if changed:
        what = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items())
        warnings.warn(f"guard state saved with other settings ({what}): the run will "
                      "differ from an uninterrupted one", stacklevel=3)


def load(guard: Any, state: dict[str, Any]) -> int:
    """Restore :func:`save` output into ``guard``; returns the saved clock."""
    by_name = {layer.name: layer for layer in guard.layers}
    check_compatible(state, by_name, guard.config)
    for name, saved_layer in state["layers"].items():
        layer = by_name[name]
        layer.state = LayerState.from_dict(saved_layer["state"])
        for key, value in saved_layer["tensors"].items():
            current = getattr(layer.probe, key)
            setattr(layer.probe, key, value.detach().clone().to(device=current.device,
                                                                dtype=current.dtype))
    guard.signs.alarm_seen = bool(state.get("msign_alarm_seen", False))
    guard.backoff.load_state_dict(state.get("lr_backoff", {}))
    guard.signs.load_state_dict(state.get("signs", {}))
    if "history" in state:   # states saved before it was part of them keep the current one
        guard.history.clear()
        guard.history.extend(dict(record) for record in state["history"])
    guard.checks.inflight = None
    inflight = state.get("inflight")
    if inflight is not None:
        guard.checks.restore(int(inflight["step"]), NAME,
                             [measurement_from_dict(d, by_name)
                              for d in inflight["measurements"]])
    if guard.attention is not None and state.get("attention") is not None:
        guard.attention.load_state_dict(state["attention"])
    if guard.blocks is not None and state.get("blocks") is not None:
        guard.blocks.load_state_dict(state["blocks"], guard.checks)
    return int(state["step"])
