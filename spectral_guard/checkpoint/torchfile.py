"""PyTorch checkpoint files (``torch.save`` zip archives) as audit sources.

A ``.pt``/``.bin``/``.pth``/``.ckpt`` file is loaded with
``torch.load(path, map_location="cpu", weights_only=True, mmap=True)``:

* ``weights_only``: the unpickler only builds tensors and plain containers, so no code from the
  file runs; a file holding any other object is refused with one line naming it, and there is
  deliberately no option to load it unsafely;
* ``mmap``: tensors are views of one read-only mapping of the file, so only the pages the audit
  touches are read, and each tensor's pages are dropped from the resident set after its scan
  (``TensorInfo.mapped``), as for safetensors.

Before ``torch.load`` sees the file, its zip structure is checked with :mod:`zipfile` (central
directory present, entries stored uncompressed and inside the file, a ``data.pkl`` record), so a
truncated or corrupt archive gets a precise one-line error. Legacy (non-zip) pickles cannot be
memory-mapped and are refused. The state_dict is then found in the loaded object: the object
itself when it maps names to tensors, else under one of
:data:`~.inmemory.WRAPPER_KEYS` (Lightning's ``state_dict``, ``model``,
``module``, ...), one or two levels down.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path

import torch

from .inmemory import find_state_dict, tensor_entries
from .sniff import LEGACY_PICKLE, is_pickle, is_zip
from .types import CheckpointError, TensorCollection, fail, require_file


def _one_line(text: str, limit: int = 240) -> str:
    """Printable, whitespace-collapsed, at most ``limit`` characters."""
    text = "".join(c if c.isprintable() else " " for c in text)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def check_zip(path: Path, size: int) -> None:
    """Refuse a truncated or corrupt archive, compressed entries, or a zip without data.pkl."""
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except MemoryError:
        raise
    except Exception as exc:  # BadZipFile, but also UnicodeDecodeError, struct.error, ...
        raise fail(path, f"truncated or corrupt zip archive ({_one_line(str(exc))}); "
                    "was the file copied completely?") from None
    if not any(i.filename.endswith("data.pkl") for i in infos):
        raise fail(path, "a zip archive without data.pkl: not a torch.save checkpoint")
    for info in infos:
        if info.compress_type != zipfile.ZIP_STORED:
            raise fail(path, f"zip entry {info.filename!r} is compressed: torch.save archives "
                        "store tensors uncompressed (was the file re-zipped?)")
        if info.header_offset + info.compress_size > size:
            raise fail(path, f"truncated: zip entry {info.filename!r} ends past the end of the "
                        f"file ({size} bytes)")


def _refusal(path: Path, exc: Exception) -> CheckpointError:
    text = str(exc)
    found = re.search(r"GLOBAL (\S+) was not an allowed global", text)
    if found:
        what = f"it holds {_one_line(found.group(1), 120)}"
    else:
        after = text.split("WeightsUnpickler error:", 1)[-1] if "WeightsUnpickler" in text \
            else text
        what = _one_line(after.split(". ")[0], 160)
    return fail(path, f"refused: a weights-only load does not allow what this file holds "
                 f"({what}); only tensors and plain containers are read, since unpickling "
                 "other objects can run arbitrary code, and there is no option to bypass this")


def _load(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        raise _refusal(path, exc) from None
    except MemoryError:
        raise
    except Exception as exc:  # a corrupt pickle can fail in many ways: all are input errors
        first = _one_line(str(exc).split(". ")[0]) or type(exc).__name__
        raise fail(path, f"cannot load the PyTorch checkpoint: {first}") from None


def load_torch_file(path: str | Path) -> TensorCollection:
    """Validate and load one PyTorch zip checkpoint (weights-only, memory-mapped).

    Raises :class:`~.types.CheckpointError` (one line) for a missing,
    legacy, truncated, corrupt or refused file, and for a file without a state_dict.
    """
    path = Path(path)
    require_file(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(8)
    except OSError as exc:
        raise fail(path, f"cannot read: {exc.strerror or exc}") from None
    if is_pickle(head):
        raise fail(path, LEGACY_PICKLE)
    if not is_zip(head):
        what = "an empty file" if size == 0 else f"first bytes {head[:4]!r}"
        raise fail(path, f"not a PyTorch zip checkpoint ({what})")
    check_zip(path, size)
    state, key = find_state_dict(_load(path), path)
    entries = tensor_entries(state, path, mapped=True)
    return TensorCollection(path, tuple(entries), size, "pytorch", key)
