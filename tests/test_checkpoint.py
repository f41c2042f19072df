"""spectral_guard.checkpoint: header validation of hand-written files, index files, folders,
row streaming."""

from __future__ import annotations

import json
import pickle
import struct

import pytest
import torch
from audit_fixtures import f32_entry, raw_safetensors, write_sharded
from safetensors.torch import save_file

from spectral_guard.checkpoint import (
    HEADER_LIMIT,
    CheckpointError,
    ShardHandles,
    TensorStream,
    iter_row_chunks,
    open_checkpoint,
    read_header,
    resolve_source,
)


def _write(tmp_path, name, content: bytes):
    p = tmp_path / name
    p.write_bytes(content)
    return p


def _error(path) -> str:
    with pytest.raises(CheckpointError) as info:
        open_checkpoint(path)
    msg = str(info.value)
    assert "\n" not in msg
    assert str(path) in msg
    return msg


def test_valid_file_matches_safetensors_own_layout(tmp_path):
    tensors = {"a": torch.randn(3, 4), "b": torch.zeros(5, dtype=torch.bfloat16),
               "c": torch.ones(2, 2, 2, dtype=torch.float16)}
    save_file(tensors, str(tmp_path / "m.safetensors"))
    sf = read_header(tmp_path / "m.safetensors")
    assert {t.name: t.shape for t in sf.tensors} == {k: tuple(v.shape) for k, v in tensors.items()}
    assert sf.size == (tmp_path / "m.safetensors").stat().st_size
    for t in sf.tensors:
        assert t.nbytes == tensors[t.name].numel() * tensors[t.name].element_size()


def test_hand_written_valid_file_is_accepted(tmp_path):
    data = struct.pack("<6f", *range(6))
    p = _write(tmp_path, "h.safetensors",
               raw_safetensors({"w": f32_entry([2, 3], 0), "__metadata__": {"k": "v"}}, data))
    sf = read_header(p)
    assert sf.metadata == {"k": "v"}
    with TensorStream(sf.tensors[0]) as s:
        assert torch.equal(s.full(), torch.arange(6, dtype=torch.float32).reshape(2, 3))


def test_missing_file(tmp_path):
    assert "no such file" in _error(tmp_path / "nope.safetensors")


def test_folder_without_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    assert "no checkpoint found" in _error(tmp_path)


def test_folder_with_only_pytorch_file_is_read(tmp_path):
    torch.save({"w": torch.randn(2, 2)}, tmp_path / "pytorch_model.bin")
    torch.save({"args": 1}, tmp_path / "training_args.bin")  # a Trainer's side file: ignored
    ck = open_checkpoint(tmp_path)
    assert [t.name for t in ck.tensors] == ["w"]
    assert ck.sources[0].to_json_dict()["format"] == "pytorch"


def test_legacy_pickle_bin_file_is_refused(tmp_path):
    p = tmp_path / "pytorch_model.bin"
    p.write_bytes(pickle.dumps({"w": [1.0, 2.0]}, protocol=4))
    msg = _error(p)
    assert "legacy (non-zip)" in msg and "not supported" in msg


@pytest.mark.parametrize("legacy", [False, True])
def test_pytorch_file_named_safetensors_is_explained(tmp_path, legacy):
    p = tmp_path / "model.safetensors"
    if legacy:
        torch.save({"w": torch.randn(2, 2)}, p, _use_new_zipfile_serialization=False)
    else:
        torch.save({"w": torch.randn(2, 2)}, p)
    msg = _error(p)
    assert ("legacy (non-zip)" if legacy else "PyTorch zip checkpoint") in msg


def test_truncated_file(tmp_path):
    good = tmp_path / "good.safetensors"
    save_file({"w": torch.randn(16, 16)}, str(good))
    content = good.read_bytes()
    p = _write(tmp_path, "cut.safetensors", content[:-100])
    assert "truncated" in _error(p)


def test_file_shorter_than_length_field(tmp_path):
    p = _write(tmp_path, "tiny.safetensors", b"\x01\x02\x03")
    assert "shorter than the 8-byte header length" in _error(p)


def test_header_length_larger_than_file(tmp_path):
    p = _write(tmp_path, "h.safetensors", raw_safetensors({}, b"", header_len=5000))
    assert "larger than the file" in _error(p)


def test_header_length_above_format_limit(tmp_path):
    p = _write(tmp_path, "h.safetensors", raw_safetensors(b"{}", b"", header_len=HEADER_LIMIT + 1))
    assert "limit" in _error(p)


def test_malformed_json_header(tmp_path):
    p = _write(tmp_path, "h.safetensors", raw_safetensors(b'{"w": {"dtype": "F32",'))
    assert "malformed JSON header" in _error(p)


def test_header_not_an_object(tmp_path):
    p = _write(tmp_path, "h.safetensors", raw_safetensors(b"[1, 2]"))
    assert "expected a JSON object" in _error(p)


def test_duplicate_tensor_names(tmp_path):
    e = json.dumps(f32_entry([1], 0))
    header = f'{{"w": {e}, "w": {e}}}'.encode()
    p = _write(tmp_path, "h.safetensors", raw_safetensors(header, b"\0" * 4))
    assert "duplicate tensor name 'w'" in _error(p)


def test_overlapping_offsets(tmp_path):
    header = {"a": f32_entry([2], 0), "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}
    p = _write(tmp_path, "h.safetensors", raw_safetensors(header, b"\0" * 12))
    assert "overlaps" in _error(p)


def test_offsets_with_gap(tmp_path):
    header = {"a": f32_entry([1], 0), "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}}
    p = _write(tmp_path, "h.safetensors", raw_safetensors(header, b"\0" * 12))
    assert "gap" in _error(p)


def test_offsets_past_end_of_file(tmp_path):
    header = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}
    p = _write(tmp_path, "h.safetensors", raw_safetensors(header, b"\0" * 8))
    assert "truncated" in _error(p)


def test_offsets_size_mismatch_with_dtype(tmp_path):
    header = {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}
    p = _write(tmp_path, "h.safetensors", raw_safetensors(header, b"\0" * 8))
    assert "needs 12" in _error(p)


def test_trailing_bytes_are_rejected(tmp_path):
    p = _write(tmp_path, "h.safetensors", raw_safetensors({"a": f32_entry([1], 0)}, b"\0" * 9))
    assert "trailing bytes" in _error(p)


def test_unknown_dtype(tmp_path):
    header = {"a": {"dtype": "F13", "shape": [1], "data_offsets": [0, 4]}}
    p = _write(tmp_path, "h.safetensors", raw_safetensors(header, b"\0" * 4))
    assert "unknown dtype 'F13'" in _error(p)


def test_bad_shape(tmp_path):
    header = {"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}
    p = _write(tmp_path, "h.safetensors", raw_safetensors(header, b"\0" * 4))
    assert "shape" in _error(p)


def test_sharded_index_resolves_all_shards(tmp_path):
    tensors = {f"l{i}.w": torch.randn(4, 3) for i in range(5)}
    index = write_sharded(tmp_path / "ckpt", tensors, n_shards=2)
    for target in (index, tmp_path / "ckpt"):
        ck = open_checkpoint(target)
        assert sorted(t.name for t in ck.tensors) == sorted(tensors)
        assert len(ck.files) == 2 and ck.sources[0].kind == "index"


def test_index_naming_missing_shard(tmp_path):
    index = write_sharded(tmp_path / "ckpt", {"a": torch.randn(2, 2), "b": torch.randn(2, 2)})
    (tmp_path / "ckpt" / "model-00002-of-00002.safetensors").unlink()
    msg = _error(index)
    assert "model-00002-of-00002.safetensors" in msg and "does not exist" in msg


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "C:\\x.safetensors",
                                   "sub/../../x.safetensors"])
def test_index_shard_path_escaping_folder(tmp_path, shard):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    save_file({"a": torch.randn(2, 2)}, str(tmp_path / "outside.safetensors"))
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": shard}}))
    assert "escapes the checkpoint folder" in _error(index)


def test_index_tensor_missing_from_shard(tmp_path):
    index = write_sharded(tmp_path / "ckpt", {"a": torch.randn(2, 2)}, n_shards=1)
    data = json.loads(index.read_text())
    data["weight_map"]["ghost"] = "model-00001-of-00001.safetensors"
    index.write_text(json.dumps(data))
    assert "'ghost'" in _error(index)


def test_malformed_index(tmp_path):
    index = tmp_path / "model.safetensors.index.json"
    index.write_text("{not json")
    assert "malformed index JSON" in _error(index)
    index.write_text(json.dumps({"weight_map": {"a": 3}}))
    assert "must be a string" in _error(index)


def test_folder_with_single_file(tmp_path):
    save_file({"w": torch.randn(3, 3)}, str(tmp_path / "model.safetensors"))
    src = resolve_source(tmp_path)
    assert [t.name for f in src.files for t in f.tensors] == ["w"]


def test_same_file_named_twice_is_read_once(tmp_path):
    p = tmp_path / "model.safetensors"
    save_file({"w": torch.randn(3, 3)}, str(p))
    assert len(open_checkpoint([p, tmp_path]).files) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_row_chunks_cover_matrix_exactly(tmp_path, dtype):
    W = torch.randn(37, 11).to(dtype)
    E = torch.randn(3, 9, 10).to(dtype)
    save_file({"w": W, "e": E}, str(tmp_path / "m.safetensors"))
    sf = read_header(tmp_path / "m.safetensors")
    info = {t.name: t for t in sf.tensors}
    with TensorStream(info["w"]) as s:
        parts = list(iter_row_chunks(s, (), 37, 11, chunk=5))
    assert [start for start, _ in parts] == list(range(0, 37, 5))
    assert torch.equal(torch.cat([b for _, b in parts]), W)
    with TensorStream(info["e"]) as s:
        got = torch.cat([b for _, b in iter_row_chunks(s, (1,), 9, 10, chunk=4)])
    assert torch.equal(got, E[1])


def test_stream_reads_views_of_the_mapping_even_unaligned(tmp_path):
    # a hand-written file whose F32 tensor starts at an odd byte offset (save_file aligns)
    W = torch.arange(30, dtype=torch.float32).reshape(6, 5)
    header = json.dumps({"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
                         "w": {"dtype": "F32", "shape": [6, 5], "data_offsets": [1, 121]}})
    raw = header.encode()
    p = tmp_path / "odd.safetensors"
    p.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\x07" + W.numpy().tobytes())
    info = {t.name: t for t in read_header(p).tensors}["w"]
    with TensorStream(info) as s:
        parts = list(iter_row_chunks(s, (), 6, 5, chunk=4))
    assert torch.equal(torch.cat([b for _, b in parts]), W)
    # zero-copy: both chunks are views of one mapping
    assert parts[0][1].untyped_storage().data_ptr() == parts[1][1].untyped_storage().data_ptr()


def test_shared_handles_read_every_tensor_and_dropped_pages_read_back(tmp_path):
    # biopsy mode opens each file once and drops a tensor's pages after its scan: the values
    # read through the shared handle, and read again after the drop, are the stored ones
    big = torch.randn(64, 1024)  # 256 KiB: whole pages to drop
    small = torch.randn(7, 3).to(torch.bfloat16)
    save_file({"big": big, "small": small}, str(tmp_path / "m.safetensors"))
    info = {t.name: t for t in read_header(tmp_path / "m.safetensors").tensors}
    with ShardHandles() as handles:
        with TensorStream(info["big"], handles) as s:
            view = torch.cat([b for _, b in iter_row_chunks(s, (), 64, 1024, chunk=10)])
            kept = s.read((slice(0, 64),))
        assert torch.equal(view, big)
        assert torch.equal(kept, big)  # the pages were dropped: this reads them back
        with TensorStream(info["small"], handles) as s:
            assert torch.equal(s.read((slice(0, 7),)), small)
        assert len(handles._open) == 1  # one handle for the file
