"""Find the host synchronizations a piece of code would cause on a CUDA device, on any device.

On a CPU every tensor is on the host, so nothing here waits; what matters is which ops would
make the host wait for the device if the same code ran on CUDA. :class:`SyncProbe` decides by
op identity and records each such op run on the thread that entered it, with its call site:

* aten ops (a ``TorchDispatchMode``, the ops as the kernels see them): reading a value
  (``_local_scalar_dense``: ``item()``, ``float()``, ``int()``, ``bool()``, ``if t:``),
  ops whose output shape depends on the data (``nonzero``, ``masked_select``, the ``unique``
  family, ``repeat_interleave`` without ``output_size``, boolean-mask indexing and
  ``index_put_``, ``bincount``, ``histc``), ops returning a Python value (``equal``,
  ``is_nonzero``), ``normal`` with a tensor ``std`` (its check reads it), the decompositions
  that check their result on the host (``_linalg_svd``, ``_linalg_eigh``, ``linalg_eig``,
  ``_linalg_check_errors``, the ``_ex`` variants with ``check_errors=True``: the "synchronizes
  that device with the CPU" notes of ``torch/linalg``), and a blocking copy between host and
  device (``copy_`` / ``_to_copy`` across devices or into pinned memory without
  ``non_blocking``). A ``non_blocking=True`` copy into pinned memory is not a sync;
* Tensor methods (a ``TorchFunctionMode``) that read the data on the host without an aten op
  when the tensor is already there: ``item``, ``tolist``, ``numpy``, ``cpu``,
  ``__bool__``/``__int__``/``__float__``/``__index__``/``__complex__``, ``__array__``,
  ``__format__``/``__repr__``, ``equal``, ``allclose``. Not ``.to(device)``: on a CPU the
  model's device is the host, so a copy's direction cannot be told there (the aten rule above
  sees it on a GPU).

The call site of a record is the innermost frame inside the watched package
(``spectral_guard``): an op is the package's when any of the package's frames is on the stack
(code the package calls, hooks included). Sources: ``torch/_torch_docs.py`` (nonzero,
normal, repeat_interleave), ``torch/linalg/__init__.py`` (``sync_note``), the ATen kernels
that call ``at::cuda::memcpy_and_sync`` or ``.item()`` (``_local_scalar_dense_cuda``,
``nonzero_cuda``, ``unique_cuda``, ``bincount``/``histc``'s ``minmax``, ``copy_kernel_cuda``).

Also :class:`OpCounter`, the number of aten ops run on this thread (each one a kernel launch on
a GPU), for ``bench/guard_ops.py``.
"""

from __future__ import annotations

import sys
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

SYNC_ATEN = frozenset({
    "_local_scalar_dense", "item", "is_nonzero", "equal", "allclose",
    "nonzero", "argwhere", "masked_select", "bincount", "histc",
    "_unique", "_unique2", "unique_dim", "unique_consecutive", "unique_dim_consecutive",
    "_linalg_svd", "_linalg_eigh", "linalg_eig", "linalg_eigvals", "_linalg_check_errors",
})
"""aten ops (overload packets) that read device data on the host, whatever their arguments."""

CHECKED_EX = frozenset({"linalg_cholesky_ex", "linalg_inv_ex", "linalg_solve_ex",
                        "linalg_lu_factor_ex", "linalg_ldl_factor_ex"})
"""Decompositions that read their ``info`` on the host when ``check_errors=True``."""

SYNC_METHODS = frozenset({
    "item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__",
    "__complex__", "__array__", "__format__", "__repr__", "equal", "allclose",
})
"""Tensor methods and torch functions (by ``__name__``) that read data on the host."""

_BOOL_INDEX = (torch.bool, torch.uint8)


@dataclass
class SyncRecord:
    """One would-be host sync: the op, and the innermost frame of the watched package (or
    ``None``), with the innermost frame outside torch (where the user's code was)."""

    op: str
    site: str | None
    caller: str

    def __str__(self) -> str:
        return f"{self.op} at {self.site or self.caller}"


def _site(path: str, frame: Any) -> str:
    return f"{Path(path).name}:{frame.f_lineno} ({frame.f_code.co_name})"


def _pinned(t: Any) -> bool:
    try:
        return isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.is_pinned()
    except RuntimeError:  # no accelerator to ask
        return False


def _device_of(x: Any) -> torch.device | None:
    if isinstance(x, (str, torch.device)):
        try:
            return torch.device(x)
        except RuntimeError:
            return None
    return None


def aten_sync_reason(func: Any, args: tuple, kwargs: dict) -> str | None:
    """Why the aten op ``func(*args, **kwargs)`` would sync on CUDA, or ``None``."""
    name = func.overloadpacket.__name__
    if name in SYNC_ATEN:
        return name
    if name in CHECKED_EX and kwargs.get("check_errors", False):
        return f"{name}(check_errors=True)"
    if name == "repeat_interleave" and kwargs.get("output_size") is None and (
            len(args) < 4 or args[3] is None):
        if any(isinstance(a, torch.Tensor) for a in args[:2]):
            return "repeat_interleave without output_size"
    if name in ("index", "index_put", "index_put_", "_index_put_impl_") and len(args) > 1:
        if any(isinstance(i, torch.Tensor) and i.dtype in _BOOL_INDEX for i in args[1] or ()):
            return f"{name} with a boolean mask"
    if name == "normal" and any(isinstance(a, torch.Tensor) for a in args[1:2]):
        return "normal with a tensor std"
    if name in ("copy_", "_to_copy", "to"):
        non_blocking = kwargs.get("non_blocking", False) or (
            name == "copy_" and len(args) > 2 and bool(args[2]))
        if non_blocking:
            return None
        src = args[1] if name == "copy_" else args[0]
        dst_dev = args[0].device if name == "copy_" else _device_of(kwargs.get("device"))
        if isinstance(src, torch.Tensor) and dst_dev is not None and (
                (src.device.type == "cpu") != (dst_dev.type == "cpu")):
            return f"blocking {name} between host and device"
        if name == "copy_" and _pinned(args[0]):
            return "blocking copy_ into pinned memory"
    return None


def method_sync_reason(func: Any, args: tuple, kwargs: dict) -> str | None:
    """Why the torch-function-level call would sync on CUDA, or ``None``."""
    name = getattr(func, "__name__", "")
    if name in SYNC_METHODS:
        return f"Tensor.{name}" if name.startswith("__") or name in ("tolist", "numpy",
                                                                     "cpu", "item") else name
    return None


@dataclass
class SyncProbe:
    """``with SyncProbe() as probe: ...``: the would-be syncs of this thread, with call sites.

    Args:
        package: directory of the package whose call sites are reported (default: the
            imported ``spectral_guard``).
    """

    package: Path | None = None
    records: list[SyncRecord] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.package is None:
            import spectral_guard

            self.package = Path(spectral_guard.__file__).resolve().parent
        self._prefix = str(self.package) + "/"
        self._torch = str(Path(torch.__file__).resolve().parent) + "/"
        self._here = str(Path(__file__).resolve())
        self._thread = threading.get_ident()
        self._modes: list[Any] = []

    def from_package(self) -> list[SyncRecord]:
        """The records with a call site inside the package."""
        return [r for r in self.records if r.site is not None]

    def record(self, reason: str) -> None:
        if threading.get_ident() != self._thread:
            return  # another thread (the guard's worker): host work there is its job
        site, caller = None, "?"
        frame = sys._getframe(1)
        while frame is not None:
            path = frame.f_code.co_filename
            if path.startswith(self._prefix):
                site = _site(path, frame)
                break
            if caller == "?" and path != self._here and not path.startswith(self._torch):
                caller = _site(path, frame)
            frame = frame.f_back
        self.records.append(SyncRecord(reason, site, caller))

    def __enter__(self) -> SyncProbe:
        self._thread = threading.get_ident()
        self._modes = [_FunctionSpy(self), _DispatchSpy(self)]
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
        self._modes = []


class _FunctionSpy(TorchFunctionMode):
    def __init__(self, probe: SyncProbe) -> None:
        super().__init__()
        self.probe = probe

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        reason = method_sync_reason(func, args, kwargs)
        if reason is not None:
            self.probe.record(reason)
        return func(*args, **kwargs)


class _DispatchSpy(TorchDispatchMode):
    def __init__(self, probe: SyncProbe) -> None:
        super().__init__()
        self.probe = probe

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        reason = aten_sync_reason(func, args, kwargs)
        if reason is not None:
            self.probe.record(f"aten.{reason}")
        return func(*args, **kwargs)


class OpCounter(TorchDispatchMode):
    """Counts the aten ops (by overload packet) run on the thread that entered it.

    ``with OpCounter() as c: step()``; ``c.total``, ``c.ops.most_common()``. Views and
    metadata-only ops count too: on a GPU most other ops are one kernel launch each.
    """

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self._thread = threading.get_ident()

    def __enter__(self) -> OpCounter:
        self._thread = threading.get_ident()
        return super().__enter__()

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if threading.get_ident() == self._thread:
            self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


class CudaWaitSpy:
    """Records host waits the CUDA sync-debug mode cannot see (``Event.synchronize``,
    ``Stream.synchronize``, ``torch.cuda.synchronize``) made on the entering thread, by
    wrapping them while active. For GPU tests only."""

    TARGETS = (("Event", "synchronize"), ("Stream", "synchronize"), (None, "synchronize"))

    def __init__(self) -> None:
        self.calls: list[str] = []
        self._saved: list[tuple[Any, str, Any]] = []
        self._thread = threading.get_ident()

    def __enter__(self) -> CudaWaitSpy:
        self._thread = threading.get_ident()
        for owner_name, attr in self.TARGETS:
            owner = torch.cuda if owner_name is None else getattr(torch.cuda, owner_name)
            original = getattr(owner, attr)
            self._saved.append((owner, attr, original))
            setattr(owner, attr, self._wrap(f"{owner_name or 'torch.cuda'}.{attr}", original))
        return self

    def _wrap(self, label: str, original: Any) -> Any:
        spy = self

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            if threading.get_ident() == spy._thread:
                frame, where = sys._getframe(1), "?"
                if frame is not None:
                    where = _site(frame.f_code.co_filename, frame)
                spy.calls.append(f"{label} at {where}")
            return original(*args, **kwargs)

        return wrapped

    def __exit__(self, *exc: Any) -> None:
        for owner, attr, original in reversed(self._saved):
            setattr(owner, attr, original)
        self._saved = []
