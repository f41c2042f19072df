"""From PATH arguments to a validated :class:`~.types.Checkpoint`: single files (routed by
extension to :mod:`.safetensors` or :mod:`.torchfile`), sharded checkpoints' indexes, and
folders.

* Sharded checkpoints: ``*.safetensors.index.json`` (or ``pytorch_model.bin.index.json``, the
  same format) with a ``weight_map`` of string shard names that stay inside the index's folder
  (no absolute paths, drive letters or ``..``), every shard present, and every mapped tensor
  present in its shard.
* Folders: a safetensors checkpoint (index, or ``*.safetensors`` files) is preferred over
  PyTorch files in the same folder, and the :class:`~.types.Source` says so in its ``notes``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path, PurePosixPath, PureWindowsPath

from .safetensors import read_header
from .torchfile import load_torch_file
from .types import Checkpoint, CheckpointError, SafetensorsFile, Source, TensorCollection, fail

INDEX_LIMIT = 10 * 1024 * 1024
"""Largest ``index.json`` accepted (the limit huggingface_hub uses)."""

INDEX_SUFFIX = ".safetensors.index.json"
TORCH_INDEX_SUFFIX = ".bin.index.json"
TORCH_SUFFIXES = (".pt", ".bin", ".pth", ".ckpt")
"""File extensions read as PyTorch (``torch.save``) checkpoints."""


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
        raise fail(path, "no such file")
    size = path.stat().st_size
    if size > INDEX_LIMIT:
        raise fail(path, f"index file is {size} bytes, over the {INDEX_LIMIT}-byte limit")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise fail(path, f"malformed index JSON ({exc})") from None
    except OSError as exc:
        raise fail(path, f"cannot read: {exc.strerror or exc}") from None
    wmap = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(wmap, dict) or not wmap:
        raise fail(path, "malformed index: needs a non-empty 'weight_map' object")
    folder = path.parent.resolve()
    shard_names: list[str] = []
    for tensor, shard in wmap.items():
        if not isinstance(shard, str):
            raise fail(path, f"weight_map[{tensor!r}]: shard name must be a string")
        if _bad_shard_name(shard):
            raise fail(path, f"weight_map[{tensor!r}]: shard path {shard!r} escapes the "
                        "checkpoint folder (absolute, drive or '..')")
        if shard not in shard_names:
            shard_names.append(shard)
    files = []
    for shard in shard_names:
        shard_path = (folder / shard)
        if folder not in shard_path.resolve().parents:
            raise fail(path, f"shard path {shard!r} escapes the checkpoint folder")
        if not shard_path.is_file():
            raise fail(path, f"index names shard {shard!r}, which does not exist")
        sf = read_file(shard_path)
        present = {t.name for t in sf.tensors}
        missing = [t for t, s in wmap.items() if s == shard and t not in present]
        if missing:
            raise fail(path, f"index maps tensor {missing[0]!r} to shard {shard!r}, which does "
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
            raise fail(folder, f"several index files ({names}); pass one of them")
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
        raise fail(folder, f"several PyTorch files and no index ({names}); pass one of them")
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
    raise fail(folder, "no checkpoint found (no *.safetensors, *" + INDEX_SUFFIX + ", *"
                + TORCH_INDEX_SUFFIX + " or " + "/".join("*" + s for s in TORCH_SUFFIXES)
                + " file)")


def read_file(path: Path) -> SafetensorsFile | TensorCollection:
    """One checkpoint file: ``.pt``/``.bin``/``.pth``/``.ckpt`` are loaded as PyTorch
    checkpoints (:func:`.torchfile.load_torch_file`), anything else is read as
    safetensors (whose validation names a PyTorch file given another extension)."""
    if path.suffix in TORCH_SUFFIXES:
        return load_torch_file(path)
    return read_header(path)


def resolve_source(path: str | Path) -> Source:
    """One PATH argument: a checkpoint file, an ``index.json``, or a folder of either."""
    path = Path(path)
    if not path.exists():
        raise fail(path, "no such file or directory")
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
