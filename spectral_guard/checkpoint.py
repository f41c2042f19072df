"""Reading safetensors checkpoints: finding files, validating headers, streaming tensor rows.

Every input is checked with plain file I/O *before* ``safe_open`` sees it, so each kind of bad
input gets a precise one-line :class:`CheckpointError` instead of a library exception:

* file layout: 8-byte little-endian header length ``N``, ``N`` bytes of UTF-8 JSON, data buffer;
  ``N <= 100,000,000`` (the format's limit) and ``8 + N <= file size``;
* header: a JSON object ``{name: {"dtype", "shape", "data_offsets": [begin, end)}}`` plus an
  optional string-to-string ``__metadata__``; no duplicate names; known dtype;
  ``end - begin == numel * bits / 8``; offsets contiguous from 0, without holes or overlaps;
  ``8 + N + last end == file size`` exactly (a shorter file is reported as truncated);
* sharded checkpoints: ``*.safetensors.index.json`` with a ``weight_map`` of string shard names
  that stay inside the index's folder (no absolute paths, drive letters or ``..``), every shard
  present, and every mapped tensor present in its shard.

Tensor data is then read with ``safe_open(path, framework="pt")`` one tensor at a time, in row
chunks that are views of the file mapping (:func:`iter_row_chunks`), so memory stays near one
tensor's pages: either one mapping per tensor, or one per file shared through
:class:`ShardHandles`, with each tensor's pages dropped from it after use.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import math
import mmap
import re
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath

import torch

HEADER_LIMIT = 100_000_000
"""Largest header the safetensors format allows (bytes)."""

INDEX_LIMIT = 10 * 1024 * 1024
"""Largest ``index.json`` accepted (the limit huggingface_hub uses)."""

INDEX_SUFFIX = ".safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read; the message is one line naming the path."""


@dataclass(frozen=True)
class DType:
    """A safetensors dtype: storage bits, the torch dtype (None if torch cannot hold it), kind."""

    name: str
    bits: int
    torch_dtype: torch.dtype | None
    kind: str  # "float", "int", "bool", "complex", "packed"


def _tdt(attr: str) -> torch.dtype | None:
    return getattr(torch, attr, None)


DTYPES: dict[str, DType] = {d.name: d for d in (
    DType("F64", 64, torch.float64, "float"),
    DType("F32", 32, torch.float32, "float"),
    DType("F16", 16, torch.float16, "float"),
    DType("BF16", 16, torch.bfloat16, "float"),
    DType("F8_E4M3", 8, _tdt("float8_e4m3fn"), "float"),
    DType("F8_E5M2", 8, _tdt("float8_e5m2"), "float"),
    DType("F8_E4M3FNUZ", 8, _tdt("float8_e4m3fnuz"), "float"),
    DType("F8_E5M2FNUZ", 8, _tdt("float8_e5m2fnuz"), "float"),
    DType("F8_E8M0", 8, None, "packed"),
    DType("F6_E2M3", 6, None, "packed"),
    DType("F6_E3M2", 6, None, "packed"),
    DType("F4", 4, None, "packed"),
    DType("C64", 64, torch.complex64, "complex"),
    DType("BOOL", 8, torch.bool, "bool"),
    DType("U8", 8, torch.uint8, "int"),
    DType("I8", 8, torch.int8, "int"),
    DType("I16", 16, torch.int16, "int"),
    DType("U16", 16, _tdt("uint16"), "int"),
    DType("I32", 32, torch.int32, "int"),
    DType("U32", 32, _tdt("uint32"), "int"),
    DType("I64", 64, torch.int64, "int"),
    DType("U64", 64, _tdt("uint64"), "int"),
)}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor entry of a validated header (offsets relative to the data buffer)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int
    file: Path

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class SafetensorsFile:
    """A validated safetensors file: its tensors in data-buffer order and its metadata."""

    path: Path
    header_length: int
    tensors: tuple[TensorInfo, ...]
    metadata: dict[str, str]

    @property
    def size(self) -> int:
        return 8 + self.header_length + (self.tensors[-1].end if self.tensors else 0)


@dataclass(frozen=True)
class Source:
    """One PATH argument as resolved: a single file, or an index and its shards."""

    path: Path
    kind: str  # "file" or "index"
    files: tuple[SafetensorsFile, ...]

    def to_json_dict(self) -> dict:
        return {"path": str(self.path), "kind": self.kind,
                "files": [str(f.path) for f in self.files],
                "tensors": sum(len(f.tensors) for f in self.files),
                "bytes": sum(f.size for f in self.files)}


@dataclass(frozen=True)
class Checkpoint:
    """Everything the PATH arguments name, validated, in reading order."""

    sources: tuple[Source, ...]
    files: tuple[SafetensorsFile, ...] = field(default=())

    @property
    def tensors(self) -> list[TensorInfo]:
        return [t for f in self.files for t in f.tensors]


# ----------------------------------------------------------------------------------------------
# Header validation

_PICKLE_HINT = ("PyTorch pickle checkpoints are not supported: unpickling can execute arbitrary "
                "code and needs the whole file in memory; convert it to safetensors first "
                "(safetensors.torch.save_file(torch.load(path, weights_only=True), out))")


def _sniff_other_format(head: bytes) -> str | None:
    """A one-line description of a known non-safetensors format, from the first bytes."""
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive (torch.save format); " + _PICKLE_HINT
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        return "a Python pickle; " + _PICKLE_HINT
    if head.startswith(b"\x93NUMPY"):
        return "a NumPy .npy file, not safetensors"
    if head.startswith(b"\x89HDF"):
        return "an HDF5 file, not safetensors"
    if head.startswith(b"GGUF"):
        return "a GGUF file, not safetensors"
    return None


def _fail(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"{path}: {what}")


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
    if not path.exists():
        raise _fail(path, "no such file")
    if not path.is_file():
        raise _fail(path, "not a regular file")
    try:
        with path.open("rb") as fh:
            size = path.stat().st_size
            head = fh.read(8)
            if len(head) < 8:
                other = _sniff_other_format(head)
                raise _fail(path, other or f"not a safetensors file: only {size} bytes, "
                            "shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > HEADER_LIMIT or n + 8 > size:
                other = _sniff_other_format(head)
                if other:
                    raise _fail(path, other)
                if n > HEADER_LIMIT:
                    raise _fail(path, f"not a valid safetensors file: header length {n} exceeds "
                                f"the format's limit of {HEADER_LIMIT} bytes")
                raise _fail(path, f"truncated or not safetensors: header length {n} is larger "
                            f"than the file ({size} bytes)")
            raw = fh.read(n)
    except OSError as exc:
        raise _fail(path, f"cannot read: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        other = _sniff_other_format(head)
        raise _fail(path, other or "not a safetensors file: header is not UTF-8 text") from None
    try:
        header = json.loads(text, object_pairs_hook=_no_duplicates)
    except _DuplicateKey as exc:
        raise _fail(path, f"malformed header: duplicate tensor name {exc.args[0]!r}") from None
    except json.JSONDecodeError as exc:
        other = _sniff_other_format(head)
        raise _fail(path, other or f"malformed JSON header ({exc.msg} at byte {exc.pos})"
                    ) from None
    if not isinstance(header, dict):
        raise _fail(path, "malformed header: expected a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise _fail(path, "malformed header: __metadata__ must map strings to strings")
    tensors = [_tensor_entry(path, name, entry) for name, entry in header.items()]
    tensors.sort(key=lambda t: (t.begin, t.end))
    expected = 0
    for t in tensors:
        if t.begin != expected:
            what = "overlaps the previous tensor" if t.begin < expected else "leaves a gap"
            raise _fail(path, f"tensor {t.name!r}: data_offsets [{t.begin}, {t.end}) {what} "
                        f"(expected begin {expected})")
        expected = t.end
    data_size = size - 8 - n
    if expected > data_size:
        raise _fail(path, f"truncated: header describes {expected} data bytes but the file holds "
                    f"{data_size}")
    if expected < data_size:
        raise _fail(path, f"malformed: {data_size - expected} trailing bytes after the last "
                    "tensor (offsets do not cover the file)")
    return SafetensorsFile(path, n, tuple(tensors), dict(metadata))


def _tensor_entry(path: Path, name: str, entry: object) -> TensorInfo:
    if not isinstance(entry, dict):
        raise _fail(path, f"tensor {name!r}: header entry is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str):
        raise _fail(path, f"tensor {name!r}: missing or non-string dtype")
    if dtype not in DTYPES:
        raise _fail(path, f"tensor {name!r}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise _fail(path, f"tensor {name!r}: shape must be a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(_is_int(o) and o >= 0 for o in offsets)):
        raise _fail(path, f"tensor {name!r}: data_offsets must be two non-negative integers")
    begin, end = offsets
    if end < begin:
        raise _fail(path, f"tensor {name!r}: data_offsets [{begin}, {end}) end before begin")
    bits = math.prod(shape) * DTYPES[dtype].bits
    nbytes = (bits + 7) // 8
    if end - begin != nbytes:
        raise _fail(path, f"tensor {name!r}: data_offsets span {end - begin} bytes but "
                    f"{dtype}{shape} needs {nbytes}")
    return TensorInfo(name, dtype, tuple(shape), begin, end, path)


# ----------------------------------------------------------------------------------------------
# Index files and folders


def _bad_shard_name(name: str) -> bool:
    if not name or "\x00" in name:
        return True
    for pure in (PurePosixPath(name), PureWindowsPath(name)):
        if pure.is_absolute() or pure.drive or pure.anchor or ".." in pure.parts:
            return True
    return False


def read_index(path: str | Path) -> Source:
    """Validate a sharded checkpoint's ``*.safetensors.index.json`` and every shard it names."""
    path = Path(path)
    if not path.is_file():
        raise _fail(path, "no such file")
    size = path.stat().st_size
    if size > INDEX_LIMIT:
        raise _fail(path, f"index file is {size} bytes, over the {INDEX_LIMIT}-byte limit")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(path, f"malformed index JSON ({exc})") from None
    except OSError as exc:
        raise _fail(path, f"cannot read: {exc.strerror or exc}") from None
    wmap = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(wmap, dict) or not wmap:
        raise _fail(path, "malformed index: needs a non-empty 'weight_map' object")
    folder = path.parent.resolve()
    shard_names: list[str] = []
    for tensor, shard in wmap.items():
        if not isinstance(shard, str):
            raise _fail(path, f"weight_map[{tensor!r}]: shard name must be a string")
        if _bad_shard_name(shard):
            raise _fail(path, f"weight_map[{tensor!r}]: shard path {shard!r} escapes the "
                        "checkpoint folder (absolute, drive or '..')")
        if shard not in shard_names:
            shard_names.append(shard)
    files = []
    for shard in shard_names:
        shard_path = (folder / shard)
        if folder not in shard_path.resolve().parents:
            raise _fail(path, f"shard path {shard!r} escapes the checkpoint folder")
        if not shard_path.is_file():
            raise _fail(path, f"index names shard {shard!r}, which does not exist")
        sf = read_header(shard_path)
        present = {t.name for t in sf.tensors}
        missing = [t for t, s in wmap.items() if s == shard and t not in present]
        if missing:
            raise _fail(path, f"index maps tensor {missing[0]!r} to shard {shard!r}, which does "
                        f"not contain it ({len(missing)} missing)")
        files.append(sf)
    return Source(path, "index", tuple(files))


def _resolve_folder(folder: Path) -> Source:
    indexes = sorted(folder.glob("*" + INDEX_SUFFIX))
    if len(indexes) > 1:
        preferred = [p for p in indexes if p.name == "model" + INDEX_SUFFIX]
        if not preferred:
            names = ", ".join(p.name for p in indexes)
            raise _fail(folder, f"several index files ({names}); pass one of them")
        indexes = preferred
    if indexes:
        return read_index(indexes[0])
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return Source(folder, "file" if len(files) == 1 else "folder",
                      tuple(read_header(p) for p in files))
    pickles = sorted(p.name for ext in ("*.bin", "*.pt", "*.pth", "*.ckpt")
                     for p in folder.glob(ext))
    if pickles:
        raise _fail(folder, f"no safetensors checkpoint, only {pickles[0]}: " + _PICKLE_HINT)
    raise _fail(folder, "no checkpoint found (no *.safetensors or *" + INDEX_SUFFIX + " file)")


def resolve_source(path: str | Path) -> Source:
    """One PATH argument: a ``.safetensors`` file, an ``index.json``, or a folder of either."""
    path = Path(path)
    if not path.exists():
        raise _fail(path, "no such file or directory")
    if path.is_dir():
        return _resolve_folder(path)
    if path.name.endswith(".json"):
        return read_index(path)
    return Source(path, "file", (read_header(path),))


def open_checkpoint(paths: str | Path | Sequence[str | Path]) -> Checkpoint:
    """Resolve and validate every PATH; a file named twice is read once."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    if not paths:
        raise CheckpointError("no checkpoint path given")
    sources = [resolve_source(p) for p in paths]
    seen: set[Path] = set()
    files = []
    for src in sources:
        for f in src.files:
            key = f.path.resolve()
            if key not in seen:
                seen.add(key)
                files.append(f)
    return Checkpoint(tuple(sources), tuple(files))


# ----------------------------------------------------------------------------------------------
# Streaming reads


def _safetensors_error(path: Path, exc: Exception) -> CheckpointError:
    msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return _fail(path, f"read failed: {msg}")


class TensorStream:
    """Row-chunk reader for one tensor through ``safe_open`` (a file mapping).

    :meth:`read` returns views of the mapping (``get_tensor`` maps, it does not copy): the
    bytes are read from the page cache when the caller touches them, without the extra copy
    ``get_slice`` makes (measured: a scan of the mapped rows costs less than that copy alone).
    Open it as a context manager; the mapping is released on exit (once no returned view is
    alive), so reading a whole checkpoint one stream at a time keeps about one tensor's pages
    mapped.
    """

    def __init__(self, info: TensorInfo, handles: ShardHandles | None = None) -> None:
        self.info = info
        self._shared = handles
        self._handle = None
        self._tensor: torch.Tensor | None = None

    def __enter__(self) -> TensorStream:
        if self._shared is not None:
            self._handle = self._shared.get(self.info.file)
            return self
        from safetensors import safe_open

        try:
            self._handle = safe_open(str(self.info.file), framework="pt")
        except Exception as exc:  # safetensors raises its own error types
            raise _safetensors_error(self.info.file, exc) from None
        return self

    def __exit__(self, *exc: object) -> None:
        if self._shared is not None and self._tensor is not None:
            _drop_pages(self._tensor)
        self._tensor = None
        self._handle = None

    def read(self, index: tuple[slice | int, ...] | slice) -> torch.Tensor:
        """``tensor[index]``: a view of the mapped file (only the bytes the caller touches
        are read)."""
        if self._tensor is None:
            self._tensor = self.full()
        try:
            return self._tensor[index]
        except Exception as exc:
            raise _safetensors_error(self.info.file, exc) from None

    def full(self) -> torch.Tensor:
        try:
            return self._handle.get_tensor(self.info.name)
        except Exception as exc:
            raise _safetensors_error(self.info.file, exc) from None


class ShardHandles:
    """One ``safe_open`` handle per file, opened on first use and shared by the
    :class:`TensorStream` objects given it (opening and releasing a mapping per tensor cost
    about 0.04 s over a 156-tensor checkpoint). A stream using it drops its tensor's pages from
    the mapping on exit (``madvise(MADV_DONTNEED)``), so the resident set stays near one
    tensor's pages as with one mapping per tensor; the page cache is untouched."""

    def __init__(self) -> None:
        self._open: dict[Path, object] = {}

    def get(self, file: Path) -> object:
        handle = self._open.get(file)
        if handle is None:
            from safetensors import safe_open

            try:
                handle = self._open[file] = safe_open(str(file), framework="pt")
            except Exception as exc:  # safetensors raises its own error types
                raise _safetensors_error(file, exc) from None
        return handle

    def close(self) -> None:
        self._open.clear()

    def __enter__(self) -> ShardHandles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_LIBC = None
_PAGE = mmap.PAGESIZE


def _drop_pages(t: torch.Tensor) -> None:
    """``madvise(MADV_DONTNEED)`` on the whole pages inside a mapped tensor's bytes (Linux;
    elsewhere a no-op). For a read-only file mapping this only unmaps the pages: a later read
    faults them back in from the page cache."""
    global _LIBC
    advice = getattr(mmap, "MADV_DONTNEED", None)
    if advice is None or t.numel() == 0:
        return
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
            _LIBC.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        except (OSError, AttributeError):
            _LIBC = False
    if not _LIBC:
        return
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()  # the full tensor: contiguous
    lo = -(-start // _PAGE) * _PAGE
    hi = end // _PAGE * _PAGE
    if hi > lo:
        _LIBC.madvise(lo, hi - lo, advice)


def chunk_rows(n_cols: int, itemsize: float, chunk_bytes: int = 16 * 1024 * 1024) -> int:
    """Rows per chunk so one chunk of ``n_cols``-wide rows stays near ``chunk_bytes``."""
    return max(1, int(chunk_bytes // max(n_cols * itemsize, 1)))


def iter_row_chunks(stream: TensorStream, lead: tuple[int, ...], rows: int, cols: int,
                    chunk: int) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(first_row, block)`` with ``block`` of shape ``(r, cols)`` covering a matrix.

    The matrix is ``tensor[lead]`` (``lead`` fixes leading indices of a stacked tensor, e.g.
    one expert) with its trailing dimensions flattened into ``cols`` columns. Each block is
    one contiguous byte range of the file.
    """
    for start in range(0, rows, chunk):
        stop = min(start + chunk, rows)
        index = tuple(slice(i, i + 1) for i in lead) + (slice(start, stop),)
        block = stream.read(index)
        yield start, block.reshape(stop - start, cols)


def natural_key(name: str) -> list:
    """Sort key that orders ``layers.10`` after ``layers.9``."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]
