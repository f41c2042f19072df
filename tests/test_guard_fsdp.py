"""The guard under FSDP2 (``fully_shard``), 2 processes, gloo, CPU, against an unsharded run.

Both runs train the same model on the same global batch with SGD: the sharded run gives each
rank half of the batch (FSDP2 averages the task gradient over ranks, so it is the global
batch's mean gradient), the unsharded run takes the whole batch in one process. The guard is
forced to fire on every check (thresholds no layer can meet), so every step carries penalty
terms: collapse and conditioning (``actuator="spectral"``) in one arm, ``l2`` in the other.
Layer sizes are odd (37 and 29 rows: uneven shards) and the biopsy is smaller than the
layers, so its rows fall on both ranks.

One spawn (the ``runs`` fixture) records everything the tests compare: both arms, 2
micro-batches with the gradient sync on the last, a save/restore at step 2, a NaN injected on
rank 1's rows, the all-reduce sizes, and the refusals.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import os
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

ARMS: dict[str, dict[str, Any]] = {
    "spectral": {"sensors": ("effective_rank", "condition_number", "fiedler"),
                 "fields": {"effective_rank_retention_min": 2.0,
                            "condition_number_growth_max": 0.5}},
    "l2": {"sensors": ("effective_rank",), "actuator": "l2", "lambda_base": 0.05,
           "fields": {"effective_rank_retention_min": 2.0}, "auto_loss": False},
}
"""``spectral``: the penalty joins ``output["loss"]`` in the root forward hook (auto_loss);
``l2``: a plain loop adds ``guard.penalty()`` after the forward."""
STEPS = 3
BATCH = 8
GUARDED = ("up", "mid", "out")


class MLP(nn.Module):
    """Three Linear layers with uneven row counts; returns ``{"out", "loss"}``."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(24, 37)
        self.mid = nn.Linear(37, 29)
        self.out = nn.Linear(29, 11)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.out(F.gelu(self.mid(F.gelu(self.up(x)))))
        return {"out": h, "loss": F.mse_loss(h, y)}


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH, 24, generator=gen), torch.randn(BATCH, 11, generator=gen))
            for _ in range(STEPS)]


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (t.to_local() if isinstance(t, DTensor) else t).detach().clone()


def _setup(arm: str, world: int, guarded: bool = True, init_seed: int = 0) -> tuple:
    """``(model, guard, optimizer)``: instrumented first, then (``world > 1``) sharded."""
    import spectral_guard
    from spectral_guard.thresholds import Rule, Thresholds

    spec = ARMS[arm]
    with torch.random.fork_rng():
        torch.manual_seed(init_seed)
        model = MLP()
    guard = None
    if guarded:
        guard = spectral_guard.instrument(
            model, ratio=1.0, biopsy_limit=16, fiedler_rows=8, sensors=spec["sensors"],
            actuator=spec.get("actuator", "spectral"), lambda_base=spec.get("lambda_base"),
            auto_loss=spec.get("auto_loss", True), thresholds=Thresholds(Rule(**spec["fields"])))
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        fully_shard(model.up, mesh=mesh)
        fully_shard(model.mid, mesh=mesh)
        fully_shard(model, mesh=mesh)  # `out` stays in the root group
    return model, guard, torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.5)


def _half(batch: tuple[torch.Tensor, torch.Tensor], rank: int, world: int) -> tuple:
    part = BATCH // world
    return tuple(t[rank * part:(rank + 1) * part] for t in batch)


def _train(arm: str, rank: int, world: int, guarded: bool = True, micro: int = 1
           ) -> dict[str, Any]:
    """One run of ``arm``: unsharded with the whole batch (``world == 1``) or FSDP2 with this
    rank's half, in ``micro`` micro-batches (loss / micro; FSDP2 reduces after the last).
    Returns per step the gradients and penalty, then the final state."""
    model, guard, opt = _setup(arm, world, guarded)
    rec: dict[str, Any] = {"grads": [], "penalty": [], "forward_sizes": [], "check_sizes": []}
    with _counting_all_reduce() as sizes:
        for batch in _batches():
            x, y = _half(batch, rank, world)
            for i, (xs, ys) in enumerate(zip(x.chunk(micro), y.chunk(micro), strict=True)):
                if world > 1:
                    model.set_requires_gradient_sync(i == micro - 1)
                loss = model(xs, ys)["loss"]
                if guard is not None and not guard.config.auto_loss:
                    loss = loss + guard.penalty()
                (loss / micro).backward()
            rec["forward_sizes"].append(sizes[:])
            sizes.clear()
            rec["grads"].append({n: _local(p.grad) for n, p in model.named_parameters()})
            last = guard.last_penalty if guard else None   # this step's (metrics: one behind)
            rec["penalty"].append(float(last) if last is not None else 0.0)
            opt.step()  # the guard's clock: apply the last check, launch this step's
            rec["check_sizes"].append(sizes[:])
            sizes.clear()
            opt.zero_grad()
    rec["params"] = {n: _local(p) for n, p in model.named_parameters()}
    rec["keys"] = list(model.state_dict())
    if guard is not None:
        rec["history"] = list(guard.history)
        rec["state"] = guard.state_dict()
        rec["surrogate"] = _collapse_grads(model, guard)
        rec["nonfinite"] = _inject_nan(model, guard)
    return rec


def _resumed(arm: str, rank: int, world: int, at: int = 2) -> dict[str, Any]:
    """``at`` steps, save (model, optimizer, guard), restore into a freshly built, instrumented
    and sharded model with another init, then the remaining steps."""
    model, guard, opt = _setup(arm, world)
    batches = _batches()
    for batch in batches[:at]:
        model(*_half(batch, rank, world))["loss"].backward()
        opt.step()
        opt.zero_grad()
    saved = {"model": {k: v.detach().clone() for k, v in model.state_dict().items()},
             "opt": copy.deepcopy(opt.state_dict()), "guard": guard.state_dict()}
    model, guard, opt = _setup(arm, world, init_seed=5)
    model.load_state_dict(saved["model"])  # retakes the baselines (collectives on every rank)
    opt.load_state_dict(saved["opt"])
    guard.load_state_dict(saved["guard"])
    for batch in batches[at:]:
        model(*_half(batch, rank, world))["loss"].backward()
        opt.step()
        opt.zero_grad()
    return {"params": {n: _local(p) for n, p in model.named_parameters()},
            "state": guard.state_dict()}


@contextlib.contextmanager
def _counting_all_reduce() -> Iterator[list[int]]:
    """Record the number of elements of each all-reduce the guard issues."""
    from spectral_guard.guard import sharded

    sizes: list[int] = []
    real = sharded._all_reduce

    def counting(x: torch.Tensor, group: Any) -> torch.Tensor:
        sizes.append(x.numel())
        return real(x, group)

    sharded._all_reduce = counting
    try:
        yield sizes
    finally:
        sharded._all_reduce = real


def _inject_nan(model: nn.Module, guard: Any) -> dict[str, tuple[bool, int]]:
    """A NaN in row 20 of ``mid`` (rank 1's rows when sharded), then three guard steps: the
    check that sees it flags the layer, the next one counts its non-finite entries."""
    from spectral_guard.guard import sharded

    W = model.mid.parametrizations.weight.original
    with torch.no_grad():
        if sharded.is_sharded(W):
            s = sharded.row_shard(W)
            if s.offset <= 20 < s.offset + s.rows:
                W.to_local()[20 - s.offset, 3] = float("nan")
        else:
            W[20, 3] = float("nan")
    for _ in range(3):
        guard.step()
    return {n: (v["nonfinite"], v["nonfinite_entries"])
            for n, v in guard.stats()["layers"].items()}


def _collapse_grads(model: nn.Module, guard: Any) -> dict[str, torch.Tensor]:
    """Gradient of the collapse term alone, per guarded layer, through the sharded surrogate
    (``guard/sharded.py``) on a DTensor weight, or the plain term on a plain one."""
    from spectral_guard.guard import sharded
    from spectral_guard.guard.penalties import spectral_collapse_term

    out = {}
    for name in GUARDED:
        module = getattr(model, name)
        W = module.parametrizations.weight.original
        probe = module.parametrizations.weight[0]
        fn = sharded.collapse_term if sharded.is_sharded(W) else spectral_collapse_term
        (g,) = torch.autograd.grad(fn(W, probe.u, probe.v), W)
        out[name] = _local(g)
    return out


def _worker(rank: int, world: int, rdv: str, out_dir: str) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rdv}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        result = {arm: _train(arm, rank, world) for arm in ARMS}
        result["resumed"] = _resumed("spectral", rank, world)
        result["accumulated"] = _train("spectral", rank, world, micro=2)
        result["refused"] = _refusals(world)
        result["sign"] = _alarmed_sign(world)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _alarmed_sign(world: int) -> dict[str, float]:
    """Every layer treated for collapse (a retention floor no layer meets; ``alarm_fall_steps=0``:
    counted however it fell) raises the alarm at each step (``msign_every=1``): unsharded, the
    fresh layers are signed and the learning rate backs off; sharded, the sign skips the shards
    and so the back-off does not act either."""
    import spectral_guard
    from spectral_guard.thresholds import Rule, Thresholds

    torch.manual_seed(0)
    model = MLP()
    guard = spectral_guard.instrument(
        model, ratio=1.0, msign_every=1, attention=False, alarm_fall_steps=0,   # no fall needed
        thresholds=Thresholds(Rule(effective_rank_retention_min=2.0)),
        lr_policy="alarm")   # the back-off driven by the sign (the graded one reads host state)
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        fully_shard(model.up, mesh=mesh)
        fully_shard(model.mid, mesh=mesh)
        fully_shard(model, mesh=mesh)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    for batch in _batches():
        model(*batch)["loss"].backward()
        opt.step()
        opt.zero_grad()
    totals = guard.stats()["totals"]
    skipped = sum(v["msigns_skipped"] for v in guard.stats()["layers"].values())
    return {"msigns": totals["msigns"], "skipped": skipped, "lr_scale": totals["lr_scale"]}


def _refusals(world: int) -> dict[str, str]:
    """The messages of what is refused: instrument() after fully_shard, guard.remove() after
    fully_shard, a Shard(1) weight."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor

    import spectral_guard
    from spectral_guard.guard import sharded

    out = {}
    mesh = init_device_mesh("cpu", (world,))
    model = MLP()
    fully_shard(model, mesh=mesh)
    try:
        spectral_guard.instrument(model)
    except ValueError as exc:
        out["order"] = str(exc)
    out["order_clean"] = str(getattr(model, "_spectral_guard", None) is None
                             and not hasattr(model.up, "parametrizations"))
    model = MLP()
    guard = spectral_guard.instrument(model)
    fully_shard(model, mesh=mesh)
    try:
        guard.remove()
    except ValueError as exc:
        out["remove"] = str(exc)
    out["remove_clean"] = str(hasattr(model.up, "parametrizations")
                              and getattr(model, "_spectral_guard", None) is guard)
    try:
        sharded.row_shard(distribute_tensor(torch.ones(6, 4), mesh, [Shard(1)]))
    except ValueError as exc:
        out["placement"] = str(exc)
    return out


def _cat(ranks: list[dict], pick) -> torch.Tensor:
    return torch.cat([pick(r) for r in ranks])


TOL = {"rtol": 1e-4, "atol": 1e-6}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[dict[str, Any]]:
    """What each of the 2 FSDP2 ranks recorded (one spawn for the whole module)."""
    if not dist.is_available():
        pytest.skip("torch.distributed not available")
    import torch.distributed.fsdp as fsdp

    if not hasattr(fsdp, "fully_shard"):
        pytest.skip("FSDP2 on CPU needs torch >= 2.6 (2.5's fully_shard requires CUDA)")
    tmp = tmp_path_factory.mktemp("fsdp")
    mp.spawn(_worker, args=(2, str(tmp / "rdv"), str(tmp)), nprocs=2, join=True)
    return [torch.load(tmp / f"rank{i}.pt", weights_only=False) for i in range(2)]


@pytest.fixture(scope="module")
def refs() -> dict[str, dict[str, Any]]:
    """The unsharded runs: per arm, guarded and (``<arm>/plain``) unguarded."""
    out = {arm: _train(arm, 0, 1) for arm in ARMS}
    out |= {f"{arm}/plain": _train(arm, 0, 1, guarded=False) for arm in ARMS}
    return out


@pytest.mark.timeout(150)
@pytest.mark.parametrize("arm", list(ARMS))
def test_fsdp2_readings_lambdas_and_state_match_unsharded(runs, refs, arm):
    ref, sh = refs[arm], [r[arm] for r in runs]
    # every rank holds the same guard state (schedule, readings, lambdas, u, v, in flight)
    assert repr(sh[0]["history"]) == repr(sh[1]["history"])
    assert repr(sh[0]["state"]) == repr(sh[1]["state"])
    # readings and lambdas: as unsharded, every layer at every step
    assert len(ref["history"]) == len(sh[0]["history"]) == len(GUARDED) * STEPS
    for a, b in zip(ref["history"], sh[0]["history"], strict=True):
        assert (a["step"], a["layer"], a["triggered"]) == (b["step"], b["layer"], b["triggered"])
        for key in ("effective_rank", "stable_rank", "sigma_max", "lambda",
                    "effective_rank_retention", "condition_growth"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-7), (a, key)
    assert all(h["lambda"] > 0 for h in ref["history"])
    for name, saved in ref["state"]["layers"].items():
        other = sh[0]["state"]["layers"][name]
        assert other["state"]["lambdas"] == pytest.approx(saved["state"]["lambdas"], rel=1e-5)
        for key in ("u", "v", "cond_u", "cond_v"):
            torch.testing.assert_close(other["tensors"][key], saved["tensors"][key], **TOL)
    # the NaN on rank 1's rows is flagged and counted on both ranks, as unsharded
    assert ref["nonfinite"] == sh[0]["nonfinite"] == sh[1]["nonfinite"]
    assert ref["nonfinite"] == {"up": (False, 0), "mid": (True, 1), "out": (False, 0)}
    assert sh[0]["keys"] == refs[f"{arm}/plain"]["keys"] == [
        "up.weight", "up.bias", "mid.weight", "mid.bias", "out.weight", "out.bias"]


@pytest.mark.timeout(150)
@pytest.mark.parametrize("arm", list(ARMS))
def test_fsdp2_penalty_and_gradients_match_unsharded(runs, refs, arm):
    ref, plain, sh = refs[arm], refs[f"{arm}/plain"], [r[arm] for r in runs]
    # the penalty's value is the global one on each rank
    for step in range(1, STEPS):
        assert sh[0]["penalty"][step] == pytest.approx(ref["penalty"][step], rel=1e-4)
        assert sh[1]["penalty"][step] == sh[0]["penalty"][step]
        assert ref["penalty"][step] > 0
    # gradients: FSDP2's reduce-scatter mean of the task part + the exact penalty part
    for step in range(STEPS):
        for name, g in ref["grads"][step].items():
            got = _cat(sh, lambda r, n=name, s=step: r["grads"][s][n])
            torch.testing.assert_close(got, g, **TOL, msg=f"step {step} {name}")
    for name in GUARDED:  # the penalty moved the gradient far beyond the tolerance
        g = ref["grads"][1][f"{name}.parametrizations.weight.original"]
        moved = (g - plain["grads"][1][f"{name}.weight"]).abs().max()
        assert moved > 1e-3, (name, float(moved))
    for name, p in ref["params"].items():
        torch.testing.assert_close(_cat(sh, lambda r, n=name: r["params"][n]), p, **TOL)
    for name, g in ref["surrogate"].items():
        torch.testing.assert_close(_cat(sh, lambda r, n=name: r["surrogate"][n]), g, **TOL)


@pytest.mark.timeout(150)
@pytest.mark.parametrize("arm", list(ARMS))
def test_fsdp2_collective_sizes(runs, arm):
    _check_collectives(arm, runs[0][arm])
    assert runs[0][arm]["check_sizes"] == runs[1][arm]["check_sizes"]
    assert runs[0][arm]["forward_sizes"] == runs[1][arm]["forward_sizes"]


@pytest.mark.timeout(150)
def test_fsdp2_gradient_accumulation_matches_one_unsharded_batch(runs, refs):
    """2 micro-batches per rank, gradient sync on the last: as one batch unsharded."""
    ref, acc = refs["spectral"], [r["accumulated"] for r in runs]
    assert repr(acc[0]["history"]) == repr(acc[1]["history"])
    for a, b in zip(ref["history"], acc[0]["history"], strict=True):
        assert b["lambda"] == pytest.approx(a["lambda"], rel=1e-4)
        assert b["effective_rank"] == pytest.approx(a["effective_rank"], rel=1e-4)
    for step in range(STEPS):
        for name, g in ref["grads"][step].items():
            got = _cat(acc, lambda r, n=name, s=step: r["grads"][s][n])
            torch.testing.assert_close(got, g, **TOL, msg=f"step {step} {name}")


@pytest.mark.timeout(150)
def test_fsdp2_resume_is_bit_for_bit(runs):
    for r in runs:
        for name, p in r["spectral"]["params"].items():
            assert torch.equal(r["resumed"]["params"][name], p), name
        assert repr(r["resumed"]["state"]) == repr(r["spectral"]["state"])


@pytest.mark.timeout(150)
def test_fsdp2_refusals(runs):
    refused = runs[0]["refused"]
    assert "before fully_shard" in refused["order"] and "\n" not in refused["order"]
    assert refused["order_clean"] == "True"
    assert "dim 0 over a 1-D mesh" in refused["placement"]
    assert "remove() is not supported after fully_shard" in refused["remove"]
    assert refused["remove_clean"] == "True"  # the guard is still installed and working


def _check_collectives(arm: str, rec: dict[str, Any]) -> None:
    """What the guard sends, per step (docs/guard.md, FSDP2): one all-reduce per check of
    ``sum (m + n + r c + 1)`` numbers over the checked layers (one power iteration), and in the
    forward, per treated layer sharded at that point (``up`` and ``mid``: ``out`` is in the
    root group, unsharded until the backward), 2 numbers for collapse, 1 for l2 and ``r c``
    for conditioning."""
    shapes = {"up": (37, 24), "mid": (29, 37), "out": (11, 29)}
    per_check = sum(m + n + min(m, 16) * min(n, 16) + 1 for m, n in shapes.values())
    assert rec["check_sizes"] == [[per_check]] * STEPS, arm
    assert rec["forward_sizes"][0] == [], arm  # nothing treated before the first check
    for sizes in rec["forward_sizes"][1:]:
        if arm == "l2":
            assert sizes == [1, 1]
        else:
            assert sizes == [2, 16 * 16, 2, 16 * 16], sizes  # collapse, then conditioning


@pytest.mark.timeout(150)
def test_fsdp2_skips_the_sign_and_so_the_backoff(runs):
    plain = _alarmed_sign(1)
    assert plain["msigns"] > 0 and plain["lr_scale"] < 1.0   # unsharded: signed, backed off
    for r in runs:
        assert r["sign"]["msigns"] == 0 and r["sign"]["skipped"] > 0
        assert r["sign"]["lr_scale"] == 1.0
