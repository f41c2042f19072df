"""The checkpoint package's vocabulary: what every reader returns, and its one error type.

* :class:`CheckpointError`: a checkpoint that cannot be read, one line naming the path
  (:func:`fail` builds it, :func:`require_file` is the check every file reader starts with);
* :data:`DTYPES`: the safetensors dtype table; reports name every source's dtypes with it
  (:data:`TORCH_TO_DTYPE`);
* :class:`TensorInfo` (one tensor to audit), :class:`SafetensorsFile` and
  :class:`TensorCollection` (one file's or one in-memory object's tensors), :class:`Source` (one
  PATH argument as resolved) and :class:`Checkpoint` (all of them, in reading order);
* :func:`natural_key`, the order of tensor names in reports.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch


class CheckpointError(ValueError):
    """A checkpoint that cannot be read; the message is one line naming the path."""


def fail(path: Path, what: str) -> CheckpointError:
    """The error for ``path``: ``"<path>: <what>"``."""
    return CheckpointError(f"{path}: {what}")


def require_file(path: Path) -> None:
    """Raise a one-line :class:`CheckpointError` unless ``path`` is an existing regular file."""
    if not path.exists():
        raise fail(path, "no such file")
    if not path.is_file():
        raise fail(path, "not a regular file")


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


def natural_key(name: str) -> list:
    """Sort key that orders ``layers.10`` after ``layers.9``."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]
