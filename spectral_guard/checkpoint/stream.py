"""Streaming a tensor's rows: every source is read the same way, one tensor at a time.

Safetensors data is read with ``safe_open(path, framework="pt")`` in row chunks that are views
of the file mapping (:func:`iter_row_chunks`), so memory stays near one tensor's pages: either
one mapping per tensor, or one per file shared through :class:`ShardHandles`, with each tensor's
pages dropped from it after use. Tensors of other sources (a PyTorch file, a model, a
state_dict) carry a ``load`` function in their :class:`~.types.TensorInfo` and are streamed
through the same :class:`TensorStream`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
from collections.abc import Iterator
from pathlib import Path

import torch

from .types import CheckpointError, TensorInfo, fail


def _safetensors_error(path: Path, exc: Exception) -> CheckpointError:
    msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return fail(path, f"read failed: {msg}")


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
