"""spectral_guard.audit(model_or_state_dict): the same report as the saved safetensors file,
tied weights once, parametrized (instrumented) names, wrappers, untouched parameters, the
accelerator path's arithmetic, and FSDP2 DTensor parameters in a real 2-process gloo run."""

from __future__ import annotations

import datetime
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from audit_fixtures import tiny_models
from safetensors.torch import save_file, save_model
from torch.nn.utils import parametrize

import spectral_guard
from spectral_guard.audit import accelerator_metrics, audit
from spectral_guard.checkpoint import CheckpointError
from spectral_guard.checkpoint.inmemory import original_name
from spectral_guard.estimators import spectral_metrics

METRICS = ("stable_rank", "stable_rank_ratio", "condition_number", "sigma_max", "sigma_min",
           "effective_rank", "effective_rank_ratio", "alpha")
COUNTS = ("status", "shape", "dtype", "measured_shape", "nonfinite", "nan", "inf", "dead_rows",
          "dead_cols", "duplicate_rows", "group")


def assert_same_report(got, want, rel: float = 1e-6, metrics: tuple[str, ...] = METRICS) -> None:
    """Same matrices, statuses, counts and reasons; ``metrics`` within ``rel``."""
    g = {m.name: m for m in got.matrices}
    w = {m.name: m for m in want.matrices}
    assert sorted(g) == sorted(w)
    for name, m in w.items():
        for key in COUNTS:
            assert getattr(g[name], key) == getattr(m, key), (name, key)
        assert g[name].reasons == m.reasons, name
        for key in metrics:
            a, b = getattr(g[name], key), getattr(m, key)
            assert (a is None) == (b is None), (name, key)
            if a is not None and math.isfinite(b):
                assert a == pytest.approx(b, rel=rel), (name, key)
    assert got.exit_code == want.exit_code


def char_lm(tied: bool = False) -> torch.nn.Module:
    """A seeded LLaMA-named transformer, with one rank-1 and one NaN layer."""
    torch.manual_seed(0)
    model = tiny_models.CharLM(vocab=40, d=64, heads=4, ffn=160, layers=2, ctx=16)
    with torch.no_grad():
        up = model.model.layers[1].mlp.up_proj.weight
        up.copy_(tiny_models.inject(up.detach(), "rank1", seed=0))
        model.model.layers[0].self_attn.v_proj.weight[3, 7] = math.nan
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


@pytest.mark.parametrize("mode", ["biopsy", "exact"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_live_model_audits_like_its_saved_safetensors(tmp_path, mode, dtype):
    model = char_lm().to(dtype)
    save_model(model, str(tmp_path / "model.safetensors"))
    live = audit(model, mode=mode, limit=48)
    saved = audit(tmp_path / "model.safetensors", mode=mode, limit=48)
    assert_same_report(live, saved)
    counts = live.status_counts()
    assert counts["collapsed"] == 1 and counts["nonfinite"] == 1 and live.exit_code == 1
    assert {s.name for s in live.skipped} == {s.name for s in saved.skipped}
    src = live.sources[0]
    assert src["kind"] == "model" and src["format"] == "memory" and src["files"] == []
    assert live.matrices[0].file == "<model CharLM>"
    assert "from model CharLM" in live.verdict_text()
    # a state_dict of the same model: same report
    assert_same_report(audit(model.state_dict(), mode=mode, limit=48), saved)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["biopsy", "exact"])
def test_cuda_model_audits_like_the_cpu_model(mode):
    # biopsy: scanned and sampled on the GPU, the same biopsy decomposed on the CPU (equal);
    # exact: the SVD on the GPU (float32 rounding differs; alpha's xmin fit is discontinuous)
    model = char_lm()
    cpu = audit(model, mode=mode, limit=48)
    gpu = audit(model.cuda(), mode=mode, limit=48)
    if mode == "biopsy":
        assert_same_report(gpu, cpu)
    else:
        assert_same_report(gpu, cpu, rel=1e-3, metrics=METRICS[:-1])
    assert next(model.parameters()).device.type == "cuda"


def test_tied_weights_are_audited_once(tmp_path):
    model = char_lm(tied=True)
    report = audit(model, mode="exact")
    names = [m.name for m in report.matrices]
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    tied = {s.name: s.reason for s in report.skipped}["lm_head.weight"]
    assert tied == "tied to model.embed_tokens.weight (the same tensor): audited once"
    # the state_dict holds both names for one tensor: also once
    sd = audit(model.state_dict(), mode="exact")
    assert [m.name for m in sd.matrices].count("model.embed_tokens.weight") == 1
    assert "lm_head.weight" not in [m.name for m in sd.matrices]
    untied = {k: v.clone() for k, v in model.state_dict().items()}
    assert len(audit(untied, mode="exact").matrices) == len(names) + 1


class Scale(torch.nn.Module):
    """A parametrization that is not the identity: the stored tensor is what is audited."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return 2.0 * w


@pytest.mark.parametrize("how", ["parametrize", "instrument"])
def test_parametrized_model_reports_original_names(how):
    model = char_lm()
    plain = audit(model, mode="exact")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    if how == "instrument":
        spectral_guard.instrument(model)
    else:
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                parametrize.register_parametrization(module, "weight", Scale())
    stored = [n for n, _ in model.named_parameters()]
    assert any(".parametrizations.weight.original" in n for n in stored)
    report = audit(model, mode="exact")
    assert not any("parametrizations" in m.name for m in report.matrices)
    assert_same_report(report, plain)
    if how == "instrument":
        spectral_guard.remove(model)
    for k, v in model.state_dict().items():  # the audit changed nothing
        torch.testing.assert_close(v, before[original_name(k)], rtol=0, atol=0, equal_nan=True)


def test_original_name_rules():
    assert original_name("a.b.parametrizations.weight.original") == "a.b.weight"
    assert original_name("parametrizations.weight.original") == "weight"
    assert original_name("a.parametrizations.weight.original0") == \
        "a.parametrizations.weight.original0"  # several originals: kept as stored
    assert original_name("_fsdp_wrapped_module.layers.0._checkpoint_wrapped_module.w") == \
        "layers.0.w"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # importing torch._dynamo
def test_parameters_untouched_no_graph_and_wrappers():
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.Linear(1024, 512))
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(4, 1024)
    out = model(x)
    report = audit(torch.nn.DataParallel(model), mode="biopsy")
    assert sorted(m.name for m in report.matrices) == ["0.weight", "1.weight"]  # no "module."
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p.detach(), b)  # anonymous memory: never madvise'd away
        assert p.grad is None
    assert torch.equal(model(x), out)
    compiled = torch.compile(model)  # wraps lazily: nothing is compiled until it is called
    assert [m.name for m in audit(compiled).matrices] == [m.name for m in report.matrices]


def test_meta_model_and_bad_options():
    with torch.device("meta"):
        model = torch.nn.Linear(64, 64)
    with pytest.raises(CheckpointError, match="meta tensor"):
        audit(model)
    with pytest.raises(ValueError, match="dtensor"):
        audit(torch.nn.Linear(8, 8), dtensor="gather")
    with pytest.raises(ValueError, match="one model or state_dict at a time"):
        audit([torch.nn.Linear(8, 8)])
    with pytest.raises(CheckpointError, match="no state_dict found"):
        audit({"epoch": 3, "optimizer": {"lr": 0.1}})
    report = audit({"w": torch.randn(16, 16), "n": torch.arange(4), "s": "text"})
    assert {s.name: s.reason for s in report.skipped}["s"] == "not a tensor (str)"
    lazy = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LazyLinear(4))
    skipped = {s.name: s.reason for s in audit(lazy).skipped}
    assert skipped["1.weight"].startswith("uninitialized (lazy) parameter")


@pytest.mark.parametrize("shape", [(300, 200), (3, 64, 96)])
def test_accelerator_path_arithmetic_matches_cpu_path(shape):
    # exact mode on an accelerator: singular values computed there, metrics on the CPU. The
    # function is device-agnostic; here it runs on CPU tensors against the CPU code path
    M = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    got = accelerator_metrics(M)
    mats = [M] if M.dim() == 2 else list(M)
    assert len(got) == len(mats)
    for g, m in zip(got, mats, strict=True):
        want = spectral_metrics(m, mode="exact", alpha=True)
        assert g.stable_rank == pytest.approx(want.stable_rank, rel=1e-5)
        assert g.effective_rank == pytest.approx(want.effective_rank, rel=1e-5)
        assert g.condition_number == pytest.approx(want.condition_number, rel=1e-4)


def test_state_dict_with_mixed_devices_and_files_side_by_side(tmp_path):
    sd = {"a.weight": torch.randn(64, 48), "b.weight": torch.randn(64, 1) @ torch.randn(1, 64)}
    save_file(sd, str(tmp_path / "m.safetensors"))
    assert_same_report(audit(sd, mode="exact"), audit(tmp_path / "m.safetensors", mode="exact"))


# ----------------------------------------------------------------------------------------------
# FSDP2: DTensor parameters sharded on dim 0 across 2 gloo ranks (CPU)


def _fsdp_worker(rank: int, world: int, rdv: str, out_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rdv}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(96, 128), torch.nn.ReLU(),
                                    torch.nn.Linear(128, 64))
        with torch.no_grad():  # a collapsed layer, so statuses differ between layers
            model[2].weight.copy_(torch.randn(64, 1) @ torch.randn(1, 128))
        plain = audit(model, mode="exact")
        mesh = init_device_mesh("cpu", (world,))
        for layer in (model[0], model[2]):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        assert type(model[0].weight).__name__ == "DTensor"
        full = audit(model, mode="exact")
        local = audit(model, mode="exact", dtensor="local")

        def rows(r):
            return {m.name: (m.status, m.shape, m.stable_rank) for m in r.matrices}

        torch.save({"plain": rows(plain), "full": rows(full), "local": rows(local),
                    "notes": (full.notes, local.notes)},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(240)
def test_fsdp2_dtensor_full_and_local(tmp_path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo not available")
    mp.spawn(_fsdp_worker, args=(2, str(tmp_path / "rdv"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{i}.pt") for i in range(2))
    for r in (r0, r1):
        assert r["full"].keys() == r["plain"].keys()
        for name, (status, shape, sr) in r["plain"].items():
            got = r["full"][name]
            assert got[:2] == (status, shape)
            assert got[2] == pytest.approx(sr, rel=1e-5)
        assert r["local"]["0.weight"][1] == (64, 96)  # this rank's half of the rows
        assert r["local"]["2.weight"][1] == (32, 128)
        assert r["local"]["2.weight"][0] == "collapsed"  # a rank-1 shard is still rank 1
        assert "gathered" in r["notes"][0][0] and "local shards" in r["notes"][1][0]
    assert r0["full"] == r1["full"]  # the gathered report is the same on every rank
    assert r0["local"]["0.weight"][2] != r1["local"]["0.weight"][2]  # different shards
