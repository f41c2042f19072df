"""Safetensors files, validated byte by byte with plain file I/O *before* ``safe_open`` sees them,
so each kind of bad input gets a precise one-line :class:`~.types.CheckpointError` instead of a
library exception:

* file layout: 8-byte little-endian header length ``N``, ``N`` bytes of UTF-8 JSON, data buffer;
  ``N <= 100,000,000`` (the format's limit) and ``8 + N <= file size``;
* header: a JSON object ``{name: {"dtype", "shape", "data_offsets": [begin, end)}}`` plus an
  optional string-to-string ``__metadata__``; no duplicate names; known dtype;
  ``end - begin == numel * bits / 8``; offsets contiguous from 0, without holes or overlaps;
  ``8 + N + last end == file size`` exactly (a shorter file is reported as truncated).

Only the header is read here; tensor data is streamed by :mod:`.stream`.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

from .sniff import sniff_other_format
from .types import DTYPES, SafetensorsFile, TensorInfo, fail, require_file

HEADER_LIMIT = 100_000_000
"""Largest header the safetensors format allows (bytes)."""


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


class _DuplicateKey(Exception):
    pass


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def read_header(path: str | Path) -> SafetensorsFile:
    """Read and validate a safetensors file's header (no tensor data is read)."""
    path = Path(path)
    require_file(path)
    try:
        with path.open("rb") as fh:
            size = path.stat().st_size
            head = fh.read(8)
            if len(head) < 8:
                other = sniff_other_format(head)
                raise fail(path, other or f"not a safetensors file: only {size} bytes, "
                            "shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > HEADER_LIMIT or n + 8 > size:
                other = sniff_other_format(head)
                if other:
                    raise fail(path, other)
                if n > HEADER_LIMIT:
                    raise fail(path, f"not a valid safetensors file: header length {n} exceeds "
                                f"the format's limit of {HEADER_LIMIT} bytes")
                raise fail(path, f"truncated or not safetensors: header length {n} is larger "
                            f"than the file ({size} bytes)")
            raw = fh.read(n)
    except OSError as exc:
        raise fail(path, f"cannot read: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        other = sniff_other_format(head)
        raise fail(path, other or "not a safetensors file: header is not UTF-8 text") from None
    try:
        header = json.loads(text, object_pairs_hook=_no_duplicates)
    except _DuplicateKey as exc:
        raise fail(path, f"malformed header: duplicate tensor name {exc.args[0]!r}") from None
    except json.JSONDecodeError as exc:
        other = sniff_other_format(head)
        raise fail(path, other or f"malformed JSON header ({exc.msg} at byte {exc.pos})"
                    ) from None
    if not isinstance(header, dict):
        raise fail(path, "malformed header: expected a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise fail(path, "malformed header: __metadata__ must map strings to strings")
    tensors = [_tensor_entry(path, name, entry) for name, entry in header.items()]
    tensors.sort(key=lambda t: (t.begin, t.end))
    expected = 0
    for t in tensors:
        if t.begin != expected:
            what = "overlaps the previous tensor" if t.begin < expected else "leaves a gap"
            raise fail(path, f"tensor {t.name!r}: data_offsets [{t.begin}, {t.end}) {what} "
                        f"(expected begin {expected})")
        expected = t.end
    data_size = size - 8 - n
    if expected > data_size:
        raise fail(path, f"truncated: header describes {expected} data bytes but the file holds "
                    f"{data_size}")
    if expected < data_size:
        raise fail(path, f"malformed: {data_size - expected} trailing bytes after the last "
                    "tensor (offsets do not cover the file)")
    return SafetensorsFile(path, n, tuple(tensors), dict(metadata))


def _tensor_entry(path: Path, name: str, entry: object) -> TensorInfo:
    if not isinstance(entry, dict):
        raise fail(path, f"tensor {name!r}: header entry is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str):
        raise fail(path, f"tensor {name!r}: missing or non-string dtype")
    if dtype not in DTYPES:
        raise fail(path, f"tensor {name!r}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise fail(path, f"tensor {name!r}: shape must be a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(_is_int(o) and o >= 0 for o in offsets)):
        raise fail(path, f"tensor {name!r}: data_offsets must be two non-negative integers")
    begin, end = offsets
    if end < begin:
        raise fail(path, f"tensor {name!r}: data_offsets [{begin}, {end}) end before begin")
    bits = math.prod(shape) * DTYPES[dtype].bits
    nbytes = (bits + 7) // 8
    if end - begin != nbytes:
        raise fail(path, f"tensor {name!r}: data_offsets span {end - begin} bytes but "
                    f"{dtype}{shape} needs {nbytes}")
    return TensorInfo(name, dtype, tuple(shape), begin, end, path)
