"""Helpers for the audit tests: hand-written safetensors bytes, sharded layouts, tiny models."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "examples") not in sys.path:
    sys.path.insert(0, str(ROOT / "examples"))

import tiny_models  # noqa: E402,F401  (re-exported for the tests)


def raw_safetensors(header: dict | bytes, data: bytes = b"",
                    header_len: int | None = None) -> bytes:
    """Bytes of a safetensors file written by hand: ``<u64 len><header><data>``.

    ``header`` may be a dict (serialized as JSON) or raw bytes; ``header_len`` overrides the
    length field (to fake a corrupt one).
    """
    hb = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(hb) if header_len is None else header_len
    return struct.pack("<Q", n) + hb + data


def f32_entry(shape: list[int], begin: int) -> dict:
    size = 4
    for d in shape:
        size *= d
    return {"dtype": "F32", "shape": shape, "data_offsets": [begin, begin + size]}


def write_sharded(folder: Path, tensors: dict[str, torch.Tensor], n_shards: int = 2,
                  index_name: str = "model.safetensors.index.json",
                  pytorch: bool = False) -> Path:
    """Write a Hugging Face style sharded checkpoint; returns the index path.

    ``pytorch``: ``torch.save`` shards ``pytorch_model-0000i-of-0000n.bin`` (pass
    ``index_name="pytorch_model.bin.index.json"``) instead of safetensors shards.
    """
    folder.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    weight_map = {}
    for i in range(n_shards):
        part = {k: tensors[k] for k in names[i::n_shards]}
        if pytorch:
            shard = f"pytorch_model-{i + 1:05d}-of-{n_shards:05d}.bin"
            torch.save(part, folder / shard)
        else:
            shard = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
            save_file(part, str(folder / shard))
        weight_map.update(dict.fromkeys(part, shard))
    index = folder / index_name
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return index


def gaussian_matrices(seed: int = 0) -> dict[str, torch.Tensor]:
    """A few healthy random matrices of different shapes and dtypes."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "layers.0.a.weight": torch.randn(96, 64, generator=gen),
        "layers.0.b.weight": torch.randn(64, 128, generator=gen).to(torch.bfloat16),
        "layers.1.a.weight": torch.randn(80, 80, generator=gen).to(torch.float16),
        "layers.1.b.weight": torch.randn(64, 96, generator=gen).to(torch.float64),
    }
