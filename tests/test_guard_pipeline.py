"""The check pipeline: off the training thread, a fixed one-step lag, mixed precision, and
``torch.compile`` without recompiles."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
import torch.nn as nn
from guard_models import byte_batches, seeded_model, synthetic_text, thresholds
from torch.overrides import TorchFunctionMode

import spectral_guard

DECOMPOSITIONS = {torch.linalg.eigvalsh, torch.linalg.eigh, torch.linalg.svd,
                  torch.linalg.svdvals}


class _RecordDecompositions(TorchFunctionMode):
    """Records decompositions called on the thread that entered the mode (modes are
    thread-local: the worker thread's calls are not seen)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in DECOMPOSITIONS:
            self.calls.append(func.__name__)
        return func(*args, **(kwargs or {}))


def _batches(n: int, seed: int = 0):
    return list(byte_batches(synthetic_text(4000, seed), 4, 16, n, seed=seed))


def _train(model, opt, batches):
    for x, y in batches:
        model(x, y)["loss"].backward()
        opt.step()
        opt.zero_grad()


def test_decompositions_run_off_the_training_thread():
    threads_before = torch.get_num_threads()
    model = seeded_model(0, n_layers=2, d=32, seq=16)
    guard = spectral_guard.instrument(model, ratio=0.5,
                                      thresholds=thresholds(effective_rank_retention_min=2.0))
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    names = {t.name for t in threading.enumerate()}
    assert any(n.startswith("spectral_guard") for n in names)
    with _RecordDecompositions() as mode:
        _train(model, opt, _batches(4))
    assert mode.calls == []  # nothing decomposed on the training thread
    assert guard.stats()["totals"]["checks"] == sum(len(guard.sampled_layers(s))
                                                    for s in range(4))
    assert torch.get_num_threads() == threads_before  # the training thread kept its thread count


def test_training_thread_keeps_its_intra_op_threads():
    before = torch.get_num_threads()
    spectral_guard.instrument(seeded_model(0, n_layers=1, d=32, seq=16))
    assert torch.get_num_threads() == before


def test_a_check_lands_one_step_after_it_was_launched():
    """A layer collapsed during step s is checked at the hook ending step s (clock s + 1) and
    its lambda is set at the next clock advance (s + 2): the documented lag."""
    model = seeded_model(0, n_layers=1, d=32, seq=16)
    guard = spectral_guard.instrument(model, ratio=1.0, auto_loss=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    W = model.blocks[0].fc.parametrizations.weight.original
    treated_at = []
    for step, (x, y) in enumerate(_batches(5)):
        if step == 1:
            with torch.no_grad():
                W.copy_(torch.outer(W[:, 0], W[0]))  # rank 1 during step 1
        model(x, y)
        guard.penalty()
        opt.step()  # clock -> step + 1
        treated_at.append(guard.stats()["layers"]["blocks.0.fc"]["lambda"] > 0)
    assert treated_at == [False, False, True, True, True]
    row = guard.stats()["layers"]["blocks.0.fc"]
    assert row["last_checked_step"] == 4 and row["interventions"] == 3


def test_runs_are_deterministic():
    def run():
        model = seeded_model(0, n_layers=2, d=32, seq=16)
        guard = spectral_guard.instrument(
            model, ratio=0.5, thresholds=thresholds(effective_rank_retention_min=0.999))
        opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
        _train(model, opt, _batches(6, seed=1))
        return model.state_dict(), repr(guard.stats()["layers"])

    (a, sa), (b, sb) = run(), run()
    assert sa == sb
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------
# Mixed precision


class _OneLayer(nn.Module):
    def __init__(self, W: torch.Tensor) -> None:
        super().__init__()
        self.layer = nn.Linear(W.shape[1], W.shape[0], bias=False)
        with torch.no_grad():
            self.layer.weight.copy_(W)

    def forward(self, x: torch.Tensor) -> dict:
        return {"loss": self.layer(x).square().mean()}


def _rank6(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    A, B = torch.randn(256, 6, generator=g), torch.randn(6, 256, generator=g)
    return 0.02 * (A @ B) / 6**0.5 + 2e-4 * torch.randn(256, 256, generator=g)


def _erank_after_one_check(model: nn.Module, autocast: bool) -> float:
    guard = spectral_guard.instrument(model, ratio=1.0, biopsy_limit=256,
                                      step_on="manual")
    if autocast:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            guard.step()
    else:
        guard.step()
    return guard.stats()["layers"]["layer"]["sensors"]["effective_rank"]


def test_low_rank_layer_reads_the_same_in_fp32_autocast_and_bf16_weights():
    W = _rank6()
    fp32 = _erank_after_one_check(_OneLayer(W), autocast=False)
    under_autocast = _erank_after_one_check(_OneLayer(W), autocast=True)
    bf16 = _erank_after_one_check(_OneLayer(W).to(torch.bfloat16), autocast=False)
    assert 6.0 <= fp32 <= 10.0  # rank 6 plus a noise floor
    assert under_autocast == pytest.approx(fp32, rel=0.02)
    assert bf16 == pytest.approx(fp32, rel=0.02)
    # the failure this guards against: a bf16 Gram matrix reads far above the true rank
    B = W.to(torch.bfloat16)
    s = torch.linalg.eigvalsh((B.mT @ B).float()).flip(0).clamp_min(0).sqrt()
    p = s / s.sum()
    bf16_gram = float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum()))
    assert bf16_gram > 1.5 * fp32


def test_fp32_and_autocast_runs_trigger_the_same_layers():
    base = seeded_model(3, n_layers=2, d=64, seq=16)
    with torch.no_grad():  # two layers collapsed, one of them badly
        base.blocks[0].fc.weight.copy_(torch.outer(base.blocks[0].fc.weight[:, 0],
                                                   base.blocks[0].fc.weight[0]))
        W = base.blocks[1].q_proj.weight
        W.copy_(W[:, :2] @ W[:2])
    treated = []
    for autocast in (False, True):
        model = copy.deepcopy(base)
        guard = spectral_guard.instrument(model, ratio=1.0, step_on="manual")
        (x, y), = _batches(1)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(x, y)
            guard.step()
            out = model(x, y)
        assert out["loss"].dtype == torch.float32
        treated.append({n for n, r in guard.stats()["layers"].items() if r["lambda"] > 0})
    assert treated[0] == treated[1] == {"blocks.0.fc", "blocks.1.q_proj"}


def test_penalty_is_fp32_and_joins_the_loss_in_its_dtype():
    model = _OneLayer(_rank6()).to(torch.bfloat16)
    guard = spectral_guard.instrument(model, ratio=1.0, step_on="manual", auto_loss=False)
    guard.step()
    x = torch.randn(4, 256, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)
        pen = guard.penalty()
    assert pen.dtype == torch.float32 and float(pen.detach()) > 0
    auto = _OneLayer(_rank6())
    g2 = spectral_guard.instrument(auto, ratio=1.0, step_on="manual")
    g2.step()
    x = torch.randn(4, 256)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = auto(x)
        pen = float(g2.last_penalty)   # this forward's (metrics()["penalty"]: a step behind)
        g2.penalty_scale = 0.0
        task = auto(x)["loss"]
    assert out["loss"].dtype == task.dtype == torch.bfloat16  # the loss keeps its dtype
    assert pen > 0
    assert float(out["loss"].detach()) == pytest.approx(float(task.detach()) + pen, rel=1e-2)


# ---------------------------------------------------------------------------------------------
# torch.compile


@pytest.mark.parametrize("how", ["wrap", "in_place"])
def test_compiled_model_keeps_guarding_without_recompiles(how):
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters

    dynamo.reset()
    counters.clear()
    model = seeded_model(0, n_layers=2, d=32, seq=16)
    guard = spectral_guard.instrument(model, ratio=0.5)
    if how == "wrap":
        run = torch.compile(model, backend="aot_eager")
    else:
        model.compile(backend="aot_eager")
        run = model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batches = _batches(12)
    for step, (x, y) in enumerate(batches):
        if step == 2:  # warm-up done: any recompile from here on is an error
            graphs = counters["stats"]["unique_graphs"]
            dynamo.config.error_on_recompile = True
        if step == 4:
            with torch.no_grad():  # collapse a layer after instrumenting
                W = model.blocks[0].fc.weight
                W.copy_(torch.outer(W[:, 0], W[0]))
        out = run(x, y)
        out["loss"].backward()
        opt.step()
        opt.zero_grad()
    row = guard.stats()["layers"]["blocks.0.fc"]
    assert row["interventions"] >= 1 and row["lambda"] > 0
    W = model.blocks[0].fc.parametrizations.weight.original
    x, y = batches[-1]
    (with_penalty,) = torch.autograd.grad(run(x, y)["loss"], W)
    guard.penalty_scale = 0.0  # a per-step Python value: read eagerly, no recompile
    (without,) = torch.autograd.grad(run(x, y)["loss"], W)
    dynamo.config.error_on_recompile = False
    assert counters["stats"]["unique_graphs"] == graphs
    assert (with_penalty - without).abs().sum() > 0  # the penalty reaches the weight


def test_compiled_optimizer_step_runs_the_guard_eagerly_without_recompiles():
    """``torch.compile`` of the step (PyTorch's compiled-optimizer recipe, tensor ``lr``): the
    guard's step hooks are not traced, so the clock, the sign and the back-off run as in eager
    mode, with no recompile after warm-up, and the weights follow an eager twin."""
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters

    dynamo.reset()
    counters.clear()
    batches = _batches(12)
    runs = []
    for compiled in (False, True):
        model = seeded_model(0, n_layers=2, d=32, seq=16)
        guard = spectral_guard.instrument(model, ratio=0.5)
        guard.backoff.on_alarm()   # a backed-off guard: the pre-hook scales every step
        opt = torch.optim.AdamW(model.parameters(), lr=torch.tensor(1e-2))

        def step(opt=opt):
            opt.step()

        run_step = torch.compile(step, backend="eager") if compiled else step
        for i, (x, y) in enumerate(batches):
            if compiled and i == 2:   # warm-up done: any recompile from here on is an error
                graphs = counters["stats"]["unique_graphs"]
                dynamo.config.error_on_recompile = True
            model(x, y)["loss"].backward()
            run_step()
            opt.zero_grad()
        dynamo.config.error_on_recompile = False
        assert guard.global_step == len(batches)          # the clock ran at every step
        assert float(opt.param_groups[0]["lr"]) == pytest.approx(1e-2)   # put back
        runs.append((model, guard))
    assert counters["stats"]["unique_graphs"] == graphs >= 1
    (eager, g_eager), (comp, g_comp) = runs
    totals = [{k: v for k, v in g.stats()["totals"].items() if k != "guard_time_s"}
              for g in (g_eager, g_comp)]
    assert totals[0] == totals[1] and totals[1]["lr_scale"] < 1
    plain = seeded_model(0, n_layers=2, d=32, seq=16)
    plain_opt = torch.optim.AdamW(plain.parameters(), lr=1e-2)
    _train(plain, plain_opt, batches)   # no guard, no back-off: the scale must show
    eager_sd, comp_sd, plain_sd = eager.state_dict(), comp.state_dict(), plain.state_dict()
    assert list(eager_sd) == list(comp_sd)
    for name in eager_sd:   # compiled AdamW rounds a little differently: 3e-5 here
        torch.testing.assert_close(comp_sd[name], eager_sd[name], atol=1e-4, rtol=1e-4)
    assert max((comp_sd[n] - plain_sd[n]).abs().max() for n in plain_sd) > 1e-2


def test_stacked_same_shape_layers_read_what_one_by_one_layers_read(monkeypatch):
    """The GPU path (same-shape layers as one batched power iteration and one biopsy gather,
    worker.STACK_ON) forced on the CPU: the same biopsies, sigma and readings as the
    one-layer-at-a-time CPU path, to rounding."""
    from spectral_guard.guard import worker

    runs = {}
    for stacked in (False, True):
        if stacked:
            monkeypatch.setattr(worker, "STACK_ON", worker.STACK_ON | {"cpu"})
        model = seeded_model(0, n_layers=2, d=32, seq=16)
        guard = spectral_guard.instrument(model, ratio=1.0, biopsy_limit=24)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        _train(model, opt, _batches(3))
        runs[stacked] = ({n: s["sensors"] for n, s in guard.stats()["layers"].items()},
                         [layer.probe.u.clone() for layer in guard.layers])
    (plain, u_plain), (stacked, u_stacked) = runs[False], runs[True]
    for name, readings in plain.items():
        for key, value in readings.items():
            assert stacked[name][key] == pytest.approx(value, rel=1e-4, nan_ok=True), (name, key)
    for a, b in zip(u_plain, u_stacked, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("how", ["wrap", "in_place"])
def test_compiled_model_with_treated_blocks_does_not_recompile(how):
    """The block hooks read one flag (some block treated); once both of its variants are
    compiled, lambdas and targets changing at every check recompile nothing."""
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters

    dynamo.reset()
    counters.clear()
    model = seeded_model(0, n_layers=2, d=32, seq=16)
    guard = spectral_guard.instrument(model, ratio=0.5, block_max_update=1e-6)
    run = torch.compile(model, backend="aot_eager") if how == "wrap" else model
    if how == "in_place":
        model.compile(backend="aot_eager")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    lambdas = []
    for step, (x, y) in enumerate(_batches(10)):
        if step == 3:  # both variants seen: from here on a recompile is an error
            graphs = counters["stats"]["unique_graphs"]
            dynamo.config.error_on_recompile = True
        out = run(x, y)
        out["loss"].backward()
        opt.step()
        opt.zero_grad()
        lambdas.append(guard.blocks.states[0].lam)
    dynamo.config.error_on_recompile = False
    assert counters["stats"]["unique_graphs"] == graphs
    assert lambdas[0] == 0 and len(set(lambdas[3:])) > 1 and guard.metrics()["penalty"] > 0
