"""Reading checkpoints: finding files, validating headers, streaming tensor rows.

Safetensors is the fast path and the format this module validates byte by byte. PyTorch zip
checkpoints (``.pt``/``.bin``/``.pth``/``.ckpt``, sharded ``pytorch_model.bin.index.json``) are
loaded by :mod:`spectral_guard.torchfile`, and models or state_dicts already in memory are
described by :mod:`spectral_guard.inmemory`; both hand back :class:`TensorCollection` objects
whose :class:`TensorInfo` entries carry a ``load`` function, so the audit streams every source
the same way (:class:`TensorStream`).

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

Folders: a safetensors checkpoint (index, or ``*.safetensors`` files) is preferred over PyTorch
files in the same folder, and the :class:`Source` says so in its ``notes``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import math
import mmap
import re
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath

import torch

HEADER_LIMIT = 100_000_000
"""Largest header the safetensors format allows (bytes)."""

INDEX_LIMIT = 10 * 1024 * 1024
"""Largest ``index.json`` accepted (the limit huggingface_hub uses)."""

INDEX_SUFFIX = ".safetensors.index.json"
TORCH_INDEX_SUFFIX = ".bin.index.json"
TORCH_SUFFIXES = (".pt", ".bin", ".pth", ".ckpt")
"""File extensions read as PyTorch (``torch.save``) checkpoints."""


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


TORCH_TO_DTYPE: dict[torch.dtype, str] = {
    d.torch_dtype: d.name for d in DTYPES.values() if d.torch_dtype is not None}
"""The safetensors dtype name of a torch dtype (reports use these names for every source)."""


@dataclass(frozen=True)
class TensorInfo:
    """One tensor to audit.

    From a safetensors header: offsets relative to the data buffer. From any other source
    (a PyTorch file, a model, a state_dict): ``load()`` returns the tensor, ``begin`` is 0 and
    ``end`` its size in bytes; ``mapped`` marks a view of a file mapping this package opened
    (its pages are dropped from the resident set after the scan; never set for memory a caller
    owns); ``skip`` is a reason, decided when the source was read, not to audit it (a tied
    duplicate, a meta tensor, an entry that is not a tensor).
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int
    file: Path
    load: Callable[[], torch.Tensor] | None = field(default=None, compare=False, repr=False)
    mapped: bool = False
    skip: str | None = None

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
class TensorCollection:
    """Tensors that do not come from a safetensors header: one PyTorch file (``format``
    ``"pytorch"``) or a model/state_dict in memory (``"memory"``, ``path`` is a label such as
    ``<model GPT2>``). ``size`` is the file's size, or the bytes of the distinct tensors."""

    path: Path
    tensors: tuple[TensorInfo, ...]
    size: int
    format: str
    state_dict_key: str | None = None


def file_format(f: SafetensorsFile | TensorCollection) -> str:
    """``"safetensors"``, ``"pytorch"`` or ``"memory"``."""
    return f.format if isinstance(f, TensorCollection) else "safetensors"


@dataclass(frozen=True)
class Source:
    """One PATH argument (or in-memory object) as resolved: a single file, an index and its
    shards, a folder's files, or a model/state_dict (``kind`` ``"model"``/``"state_dict"``).
    ``notes`` are sentences for the report (e.g. which format a mixed folder was read in)."""

    path: Path
    kind: str  # "file", "index", "folder", "model" or "state_dict"
    files: tuple[SafetensorsFile | TensorCollection, ...]
    notes: tuple[str, ...] = ()

    @property
    def in_memory(self) -> bool:
        return self.kind in ("model", "state_dict")

    def to_json_dict(self) -> dict:
        formats = sorted({file_format(f) for f in self.files})
        out = {"path": str(self.path), "kind": self.kind,
               "files": [] if self.in_memory else [str(f.path) for f in self.files],
               "tensors": sum(len(f.tensors) for f in self.files),
               "bytes": sum(f.size for f in self.files),
               "format": formats[0] if len(formats) == 1 else "mixed",
               "notes": list(self.notes)}
        keys = [f.state_dict_key for f in self.files
                if isinstance(f, TensorCollection) and f.state_dict_key]
        if keys:
            out["state_dict_key"] = keys[0]
        return out


@dataclass(frozen=True)
class Checkpoint:
    """Everything the PATH arguments name, validated, in reading order."""

    sources: tuple[Source, ...]
    files: tuple[SafetensorsFile | TensorCollection, ...] = field(default=())

    @property
    def tensors(self) -> list[TensorInfo]:
        return [t for f in self.files for t in f.tensors]


# ----------------------------------------------------------------------------------------------
# Header validation

LEGACY_PICKLE = ("a legacy (non-zip) PyTorch pickle, which is not supported: only zip-format "
                 "files (torch.save since PyTorch 1.6) can be memory-mapped and loaded "
                 "weights-only; re-save it with a current torch.save")


def is_zip(head: bytes) -> bool:
    """The first bytes of a zip archive (the ``torch.save`` format)."""
    return head.startswith(b"PK\x03\x04")


def is_pickle(head: bytes) -> bool:
    """The first bytes of a bare pickle (protocol 2-5: a legacy ``torch.save`` file)."""
    return head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5


def _sniff_other_format(head: bytes) -> str | None:
    """A one-line description of a known non-safetensors format, from the first bytes."""
    if is_zip(head):
        return ("a PyTorch zip checkpoint (torch.save format), not safetensors; audit it as a "
                ".pt/.bin file or through a pytorch_model.bin.index.json")
    if is_pickle(head):
        return LEGACY_PICKLE
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


def require_file(path: Path) -> None:
    """Raise a one-line :class:`CheckpointError` unless ``path`` is an existing regular file."""
    if not path.exists():
        raise _fail(path, "no such file")
    if not path.is_file():
        raise _fail(path, "not a regular file")


def read_header(path: str | Path) -> SafetensorsFile:
    """Read and validate a safetensors file's header (no tensor data is read)."""
    path = Path(path)
    require_file(path)
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
    """Validate a sharded checkpoint's index and every shard it names.

    ``*.safetensors.index.json`` and ``pytorch_model.bin.index.json`` share one format and the
    same checks; each shard is read by :func:`read_file` (by its extension).
    """
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
        sf = read_file(shard_path)
        present = {t.name for t in sf.tensors}
        missing = [t for t, s in wmap.items() if s == shard and t not in present]
        if missing:
            raise _fail(path, f"index maps tensor {missing[0]!r} to shard {shard!r}, which does "
                        f"not contain it ({len(missing)} missing)")
        files.append(sf)
    return Source(path, "index", tuple(files))


AUX_TORCH_FILE = re.compile(
    r"^(training_args\.bin|optimizer\.(pt|bin)|scheduler\.pt|scaler\.pt|rng_state.*\.pth)$")
"""Files a Hugging Face Trainer writes next to the weights: never taken for the model."""


def _one_index(folder: Path, suffix: str, preferred: str) -> Path | None:
    indexes = sorted(folder.glob("*" + suffix))
    if len(indexes) > 1:
        indexes = [p for p in indexes if p.name == preferred + suffix]
        if not indexes:
            names = ", ".join(p.name for p in sorted(folder.glob("*" + suffix)))
            raise _fail(folder, f"several index files ({names}); pass one of them")
    return indexes[0] if indexes else None


def _torch_weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.suffix in TORCH_SUFFIXES and p.is_file()
                  and not AUX_TORCH_FILE.match(p.name))


def _resolve_safetensors_folder(folder: Path) -> Source | None:
    index = _one_index(folder, INDEX_SUFFIX, "model")
    if index is not None:
        return read_index(index)
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return Source(folder, "file" if len(files) == 1 else "folder",
                      tuple(read_header(p) for p in files))
    return None


def _resolve_torch_folder(folder: Path) -> Source | None:
    index = _one_index(folder, TORCH_INDEX_SUFFIX, "pytorch_model")
    if index is not None:
        return read_index(index)
    files = _torch_weight_files(folder)
    if (folder / "pytorch_model.bin").is_file():
        files = [folder / "pytorch_model.bin"]
    if len(files) > 1:
        names = ", ".join(p.name for p in files[:4]) + (", ..." if len(files) > 4 else "")
        raise _fail(folder, f"several PyTorch files and no index ({names}); pass one of them")
    return Source(folder, "file", (read_file(files[0]),)) if files else None


def _resolve_folder(folder: Path) -> Source:
    """A model folder: safetensors if it holds any (said in the notes when PyTorch weights are
    there too), else a PyTorch index, ``pytorch_model.bin`` or the one PyTorch file."""
    source = _resolve_safetensors_folder(folder)
    if source is not None:
        other = sorted(p.name for p in folder.glob("*" + TORCH_INDEX_SUFFIX)) or \
            [p.name for p in _torch_weight_files(folder)]
        if other:
            names = ", ".join(other[:3]) + (", ..." if len(other) > 3 else "")
            note = (f"{folder} holds both safetensors and PyTorch weights ({names}); the "
                    "safetensors were audited (preferred: no unpickling, zero-copy reads) and "
                    "the PyTorch files were not read.")
            source = Source(source.path, source.kind, source.files, (*source.notes, note))
        return source
    source = _resolve_torch_folder(folder)
    if source is not None:
        return source
    raise _fail(folder, "no checkpoint found (no *.safetensors, *" + INDEX_SUFFIX + ", *"
                + TORCH_INDEX_SUFFIX + " or " + "/".join("*" + s for s in TORCH_SUFFIXES)
                + " file)")


def read_file(path: Path) -> SafetensorsFile | TensorCollection:
    """One checkpoint file: ``.pt``/``.bin``/``.pth``/``.ckpt`` are loaded as PyTorch
    checkpoints (:func:`spectral_guard.torchfile.load_torch_file`), anything else is read as
    safetensors (whose validation names a PyTorch file given another extension)."""
    if path.suffix in TORCH_SUFFIXES:
        from .torchfile import load_torch_file

        return load_torch_file(path)
    return read_header(path)


def resolve_source(path: str | Path) -> Source:
    """One PATH argument: a checkpoint file, an ``index.json``, or a folder of either."""
    path = Path(path)
    if not path.exists():
        raise _fail(path, "no such file or directory")
    if path.is_dir():
        return _resolve_folder(path)
    if path.name.endswith(".json"):
        return read_index(path)
    return Source(path, "file", (read_file(path),))


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
        if self.info.load is not None:  # a PyTorch file's or an in-memory tensor
            return self
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
        # only ever on file mappings this package opened: on a caller's anonymous memory
        # MADV_DONTNEED would zero the pages
        mapped = self.info.mapped if self.info.load is not None else self._shared is not None
        if mapped and self._tensor is not None:
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
        if self.info.load is not None:
            try:
                return self.info.load()
            except CheckpointError:
                raise
            except Exception as exc:  # e.g. a collective that failed for a sharded tensor
                raise _safetensors_error(self.info.file, exc) from None
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
    # the bytes from the first element to the last (a view of a PyTorch file may be strided)
    span = 1 + sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride(), strict=True))
    end = start + span * t.element_size()
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
