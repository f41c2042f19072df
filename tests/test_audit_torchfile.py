"""PyTorch checkpoint files: .pt/.bin/.pth/.ckpt written by torch and Lightning themselves,
wrappers, sharded pytorch_model.bin.index.json, refusals (custom classes, legacy, truncated or
corrupt zips, missing shards) through the CLI, and folders holding both formats."""

from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path

import pytest
import torch
from audit_fixtures import gaussian_matrices, tiny_models, write_sharded
from safetensors.torch import save_file
from test_cli_audit import assert_input_error, run

from spectral_guard.audit import audit
from spectral_guard.checkpoint import CheckpointError, TensorStream, open_checkpoint
from spectral_guard.checkpoint.torchfile import load_torch_file


def one_line_exit_2(result, needle: str) -> str:
    """The CLI's input-error contract (exit 2, one line on stderr); returns that line."""
    assert_input_error(result, needle)
    return result.stderr.strip()


def damaged_state() -> dict[str, torch.Tensor]:
    """Healthy Gaussian matrices plus a collapsed and a NaN layer, mixed dtypes."""
    t = gaussian_matrices()
    gen = torch.Generator().manual_seed(1)
    t["layers.2.low.weight"] = torch.randn(200, 1, generator=gen) @ torch.randn(1, 150,
                                                                                 generator=gen)
    nan = torch.randn(64, 48, generator=gen)
    nan[3, 5] = math.nan
    t["layers.2.nan.weight"] = nan
    t["layers.2.norm.weight"] = torch.ones(64)
    return t


def summary(report) -> dict[str, tuple]:
    return {m.name: (m.status, m.shape, m.dtype, m.stable_rank, m.condition_number,
                     m.effective_rank, m.nonfinite, m.dead_rows, m.dead_cols)
            for m in report.matrices}


@pytest.mark.parametrize("mode", ["biopsy", "exact"])
@pytest.mark.parametrize("ext", [".pt", ".bin", ".pth"])
def test_torch_save_file_audits_like_its_safetensors_twin(tmp_path, mode, ext):
    state = damaged_state()
    save_file(state, str(tmp_path / "m.safetensors"))
    torch.save(state, tmp_path / f"m{ext}")
    ref = audit(tmp_path / "m.safetensors", mode=mode, limit=64)
    got = audit(tmp_path / f"m{ext}", mode=mode, limit=64)
    assert summary(got) == summary(ref)  # same bytes, same code path: identical numbers
    assert got.status_counts()["collapsed"] == 1 and got.status_counts()["nonfinite"] == 1
    assert [s.name for s in got.skipped] == ["layers.2.norm.weight"]
    src = got.sources[0]
    assert src["format"] == "pytorch" and src["kind"] == "file"
    assert src["bytes"] == (tmp_path / f"m{ext}").stat().st_size
    assert got.exit_code == 1


def test_wrappers_are_found(tmp_path):
    state = gaussian_matrices()
    cases = {"model": {"model": state, "optimizer": {"lr": 0.1}, "epoch": 3},
             "module": {"module": state, "global_steps": 7},
             "model_state_dict": {"model_state_dict": state, "loss": 0.5},
             "model.module": {"model": {"module": state}, "step": 1}}
    for key, obj in cases.items():
        p = tmp_path / f"{key}.pt"
        torch.save(obj, p)
        coll = load_torch_file(p)
        assert coll.state_dict_key == key
        assert [t.name for t in coll.tensors] == list(state)
        assert audit(p).sources[0]["state_dict_key"] == key


def test_no_state_dict_inside(tmp_path):
    p = tmp_path / "x.pt"
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}}, p)
    with pytest.raises(CheckpointError, match="no state_dict found.*'epoch'"):
        open_checkpoint(p)
    torch.save([torch.randn(3, 3)], p)
    with pytest.raises(CheckpointError, match="holds a list"):
        open_checkpoint(p)


def test_non_tensor_entries_tied_and_strided_tensors(tmp_path):
    base = torch.randn(96, 64)
    state = {"emb.weight": base, "head.weight": base,  # tied: one storage, saved once
             "t.weight": torch.randn(64, 80).T,  # a transposed (non-contiguous) view
             "version": 3}
    torch.save(state, tmp_path / "m.pt")
    report = audit(tmp_path / "m.pt", mode="exact")
    assert sorted(m.name for m in report.matrices) == ["emb.weight", "t.weight"]
    skipped = {s.name: s.reason for s in report.skipped}
    assert skipped["head.weight"].startswith("tied to emb.weight")
    assert skipped["version"] == "not a tensor (int)"
    ref = audit({"t.weight": state["t.weight"].contiguous()}, mode="exact")
    t = next(m for m in report.matrices if m.name == "t.weight")
    assert t.shape == (80, 64)
    assert t.stable_rank == pytest.approx(ref.matrices[0].stable_rank, rel=1e-6)


def test_mapped_pages_dropped_and_read_back(tmp_path):
    big = torch.randn(256, 1024)  # 1 MiB: whole pages inside
    torch.save({"big": big, "small": torch.randn(5, 3)}, tmp_path / "m.pt")
    coll = load_torch_file(tmp_path / "m.pt")
    info = coll.tensors[0]
    assert info.mapped and info.name == "big"
    with TensorStream(info) as s:
        assert torch.equal(s.read((slice(0, 256),)), big)
    with TensorStream(info) as s:  # the pages were dropped: this faults them back in
        assert torch.equal(s.read((slice(0, 256),)), big)


def test_lightning_checkpoint(tmp_path):
    L = pytest.importorskip("lightning")

    class Net(L.LightningModule):
        def __init__(self, width: int = 48) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.model = torch.nn.Sequential(torch.nn.Linear(32, width), torch.nn.ReLU(),
                                             torch.nn.Linear(width, 4))

        def training_step(self, batch, idx):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.model(x), y)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), 1e-3)

    gen = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 32, generator=gen),
                                          torch.randint(0, 4, (64,), generator=gen))
    trainer = L.Trainer(max_steps=2, default_root_dir=tmp_path, logger=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu", devices=1)
    net = Net()
    trainer.fit(net, torch.utils.data.DataLoader(data, batch_size=16))
    ckpts = sorted(tmp_path.rglob("*.ckpt"))  # written by Lightning's ModelCheckpoint
    assert len(ckpts) == 1
    report = audit(ckpts[0], mode="exact")
    assert report.sources[0]["state_dict_key"] == "state_dict"
    assert sorted(m.name for m in report.matrices) == ["model.0.weight", "model.2.weight"]
    live = audit(net, mode="exact")  # the trained module itself: the same values
    for (name, got), want in zip(summary(report).items(), summary(live).values(), strict=True):
        assert got[:3] == want[:3] and got[3:] == pytest.approx(want[3:], rel=1e-6), name
    loaded = torch.load(ckpts[0], weights_only=True)  # the whole Lightning dict, in memory
    assert summary(audit(loaded, mode="exact")) == summary(report)
    r = run(ckpts[0], "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["sources"][0]["format"] == "pytorch"


class Custom:
    """A class that only a full (unsafe) unpickle could rebuild."""

    def __init__(self) -> None:
        self.payload = [1, 2, 3]


def test_pickle_with_custom_class_is_refused(tmp_path):
    p = tmp_path / "evil.pt"
    torch.save({"w": torch.randn(4, 4), "extra": Custom()}, p)
    err = one_line_exit_2(run(p), "refused")
    assert "Custom" in err and "no option to bypass" in err
    whole = tmp_path / "whole_model.pt"  # torch.save(model): the module's class is pickled
    torch.save(torch.nn.Linear(4, 4), whole)
    assert "torch.nn.modules.linear.Linear" in one_line_exit_2(run(whole), "refused")


@pytest.mark.parametrize("keep", [0.5, 0.97])
def test_truncated_zip_exits_2(tmp_path, keep):
    good = tmp_path / "good.bin"
    torch.save(gaussian_matrices(), good)
    data = good.read_bytes()
    cut = tmp_path / "cut.bin"
    cut.write_bytes(data[:int(len(data) * keep)])
    one_line_exit_2(run(cut), "truncated or corrupt zip")


def test_corrupt_or_foreign_files_exit_2(tmp_path):
    src = tmp_path / "good.pt"
    torch.save({"w": torch.randn(8, 8)}, src)
    rezipped = tmp_path / "deflated.pt"  # same entries, compressed: cannot be mapped
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(rezipped, "w",
                                                      zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info.filename))
    one_line_exit_2(run(rezipped), "is compressed")
    not_torch = tmp_path / "plain.pt"
    with zipfile.ZipFile(not_torch, "w") as z:
        z.writestr("readme.txt", "hello")
    one_line_exit_2(run(not_torch), "without data.pkl")
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint at all")
    one_line_exit_2(run(junk), "not a PyTorch zip checkpoint")
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    one_line_exit_2(run(empty), "an empty file")
    legacy = tmp_path / "legacy.pt"
    torch.save({"w": torch.randn(8, 8)}, legacy, _use_new_zipfile_serialization=False)
    one_line_exit_2(run(legacy), "legacy (non-zip)")


def write_bin_shards(folder: Path, state: dict[str, torch.Tensor], n: int = 3) -> Path:
    """A Hugging Face style sharded PyTorch checkpoint: torch.save shards + index."""
    return write_sharded(folder, state, n, "pytorch_model.bin.index.json", pytorch=True)


def test_sharded_bin_index(tmp_path):
    state = damaged_state()
    index = write_bin_shards(tmp_path / "ckpt", state)
    save_file(state, str(tmp_path / "single.safetensors"))
    ref = audit(tmp_path / "single.safetensors")
    for target in (index, tmp_path / "ckpt"):
        got = audit(target)
        assert summary(got) == summary(ref)
        assert got.sources[0]["kind"] == "index" and len(got.sources[0]["files"]) == 3


def test_sharded_bin_index_errors_exit_2(tmp_path):
    index = write_bin_shards(tmp_path / "ckpt", gaussian_matrices(), n=2)
    (tmp_path / "ckpt" / "pytorch_model-00002-of-00002.bin").unlink()
    err = one_line_exit_2(run(index), "does not exist")
    assert "pytorch_model-00002-of-00002.bin" in err
    one_line_exit_2(run(tmp_path / "ckpt"), "does not exist")
    data = json.loads(index.read_text())
    first = next(iter(data["weight_map"]))
    for bad in ("../outside.bin", "/etc/passwd", "C:\\x.bin"):
        data["weight_map"][first] = bad
        index.write_text(json.dumps(data))
        one_line_exit_2(run(index), "escapes the checkpoint folder")
    data = json.loads(index.read_text())
    data["weight_map"] = {"ghost.weight": "pytorch_model-00001-of-00002.bin"}
    index.write_text(json.dumps(data))
    one_line_exit_2(run(index), "'ghost.weight'")


def test_folder_with_both_formats_prefers_safetensors_and_says_so(tmp_path):
    state = gaussian_matrices()
    save_file(state, str(tmp_path / "model.safetensors"))
    # different values in the PyTorch file: the report must be the safetensors one
    torch.save({k: torch.zeros_like(v) for k, v in state.items()}, tmp_path / "pytorch_model.bin")
    report = audit(tmp_path)
    assert report.status_counts()["ok"] == len(state)
    src = report.sources[0]
    assert src["format"] == "safetensors" and src["files"] == [str(tmp_path / "model.safetensors")]
    assert len(src["notes"]) == 1 and "pytorch_model.bin" in src["notes"][0]
    assert "Note:" in report.verdict_text() and "safetensors were audited" in report.notes[0]
    r = run(tmp_path, "--quiet")
    assert r.exit_code == 0 and "PyTorch files were not read" in " ".join(r.stdout.split())


def test_folder_pytorch_only_choices(tmp_path):
    torch.save({"w": torch.randn(8, 8)}, tmp_path / "last.ckpt")
    torch.save({"w": torch.randn(8, 8)}, tmp_path / "epoch=1.ckpt")
    torch.save({"lr": 0.1}, tmp_path / "optimizer.pt")  # a Trainer side file: never the model
    one_line_exit_2(run(tmp_path), "several PyTorch files and no index")
    (tmp_path / "epoch=1.ckpt").unlink()
    report = audit(tmp_path)
    assert report.sources[0]["files"] == [str(tmp_path / "last.ckpt")]


def test_trained_model_bin_flags_injected_damage(tmp_path):
    state, _, _ = tiny_models.train_char_lm(seed=0, d=32, heads=2, ffn=64, layers=1, ctx=16,
                                            steps=20, batch=8)
    bad = "model.layers.0.mlp.up_proj.weight"
    state[bad] = tiny_models.inject(state[bad], "rank1", seed=0)
    torch.save({k: v.to(torch.bfloat16) for k, v in state.items()}, tmp_path / "model.bin")
    report = audit(tmp_path / "model.bin")
    assert [m.name for m in report.failing] == [bad]
    assert {m.dtype for m in report.matrices} == {"BF16"}


def test_corrupted_bytes_are_input_errors_or_findings(tmp_path):
    # overwrite a byte range anywhere in a real file: the audit either reads it (the values
    # changed: a report) or fails with a one-line CheckpointError, never another exception
    good = tmp_path / "good.pt"
    torch.save({"a.weight": torch.randn(48, 32), "b.weight": torch.randn(32, 40)}, good)
    data = good.read_bytes()
    gen = torch.Generator().manual_seed(0)
    outcomes = set()
    for i in range(40):
        start = int(torch.randint(0, len(data) - 16, (1,), generator=gen))
        junk = bytes(torch.randint(0, 256, (16,), generator=gen).tolist())
        bad = tmp_path / f"bad{i}.pt"
        bad.write_bytes(data[:start] + junk + data[start + 16:])
        try:
            audit(bad)
            outcomes.add("report")
        except CheckpointError as exc:
            assert "\n" not in str(exc) and str(bad) in str(exc)
            outcomes.add("error")
    assert outcomes == {"report", "error"}
