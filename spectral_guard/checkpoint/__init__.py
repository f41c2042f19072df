"""Reading checkpoints: finding files, validating them, streaming tensor rows.

Safetensors is the fast path and the format validated byte by byte. PyTorch zip checkpoints
(``.pt``/``.bin``/``.pth``/``.ckpt``, sharded ``pytorch_model.bin.index.json``) are loaded
weights-only and memory-mapped, and models or state_dicts already in memory are described the
same way: every reader hands back :class:`TensorInfo` entries (those of non-safetensors sources
carry a ``load`` function), so the audit streams every source alike (:class:`TensorStream`).

One idea per module; each imports only the ones listed before it:

* :mod:`.types`: :class:`CheckpointError`, the dtype table, :class:`TensorInfo`,
  :class:`Source`, :class:`Checkpoint` and the other records every reader returns;
* :mod:`.sniff`: what a file is, from its first bytes;
* :mod:`.safetensors`: header validation;
* :mod:`.inmemory`: models and state_dicts (:func:`~.inmemory.open_in_memory`), and the
  state_dict found inside a loaded object;
* :mod:`.torchfile`: ``torch.save`` files, weights-only and memory-mapped, read as in-memory
  state_dicts (:func:`~.torchfile.load_torch_file`);
* :mod:`.sources`: PATH arguments (files, indexes, folders) -> :func:`open_checkpoint`;
* :mod:`.stream`: row chunks of one tensor at a time (:class:`TensorStream`,
  :class:`ShardHandles`, :func:`iter_row_chunks`).

This module only re-exports the names other modules use.
"""

from __future__ import annotations

from .safetensors import HEADER_LIMIT, read_header
from .sources import open_checkpoint, read_file, read_index, resolve_source
from .stream import ShardHandles, TensorStream, chunk_rows, iter_row_chunks
from .types import (
    DTYPES,
    Checkpoint,
    CheckpointError,
    DType,
    SafetensorsFile,
    Source,
    TensorCollection,
    TensorInfo,
    natural_key,
)

__all__ = [
    "DTYPES",
    "HEADER_LIMIT",
    "Checkpoint",
    "CheckpointError",
    "DType",
    "SafetensorsFile",
    "ShardHandles",
    "Source",
    "TensorCollection",
    "TensorInfo",
    "TensorStream",
    "chunk_rows",
    "iter_row_chunks",
    "natural_key",
    "open_checkpoint",
    "read_file",
    "read_header",
    "read_index",
    "resolve_source",
]
