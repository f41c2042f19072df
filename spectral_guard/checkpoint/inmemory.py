"""Models and state_dicts already in memory as audit sources.

:func:`open_in_memory` turns an ``nn.Module`` (its ``named_parameters``) or a mapping of names
to tensors into a :class:`~.types.Checkpoint` whose entries carry a ``load``
function, so :func:`spectral_guard.audit` streams them exactly as it streams a file:

* **Tied weights once.** Entries that are the same tensor (same storage, offset, shape and
  strides; for a module, the same ``Parameter`` under two names) are audited under the first
  name; the others are listed in ``skipped`` as tied to it.
* **Parametrized modules** (``torch.nn.utils.parametrize``, e.g. an instrumented model): the
  stored tensor ``<path>.parametrizations.<name>.original`` is audited and reported as
  ``<path>.<name>``, the name a plain model and its saved checkpoints use.
* **Wrappers**: ``DistributedDataParallel``/``DataParallel`` (``.module``) and ``torch.compile``
  (``._orig_mod``) are unwrapped; ``_fsdp_wrapped_module.`` and ``_checkpoint_wrapped_module.``
  name components are dropped.
* **Any device.** Nothing is copied here: the audit scans each tensor where it lives and moves
  only its biopsy (or, in exact mode on an accelerator, its singular values) to the CPU.
* **DTensor / FSDP2 parameters** (``dtensor=``): ``"full"`` (default) gathers each tensor with
  ``full_tensor()`` when its turn comes (a collective: call the audit on every rank, with the
  same arguments; one full tensor per rank at a time), so the report is the one of the whole
  model, the same on every rank; ``"local"`` audits this rank's shard (``to_local()``, no
  communication), reported under the parameter's name with the shard's shape.
* Meta tensors and non-dense layouts are skipped with the reason; entries that are not tensors
  are skipped too. A mapping that is a loaded checkpoint rather than a state_dict (e.g. a
  Lightning ``.ckpt`` dict) is searched with :func:`find_state_dict`, as PyTorch files are.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch

from .types import (
    TORCH_TO_DTYPE,
    Checkpoint,
    CheckpointError,
    Source,
    TensorCollection,
    TensorInfo,
)

DTENSOR_MODES = ("full", "local")

WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module")
"""Keys under which checkpoints commonly keep the state_dict (Lightning: ``state_dict``;
DeepSpeed: ``module``; many training scripts: ``model`` or ``model_state_dict``)."""

_PARAMETRIZED = re.compile(r"(^|\.)parametrizations\.([^.]+)\.original$")
_WRAPPER_PARTS = re.compile(r"(^|\.)(_fsdp_wrapped_module|_checkpoint_wrapped_module)(?=\.|$)")


def _dtensor_type() -> type | None:
    if not torch.distributed.is_available():
        return None
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch < 2.5
        try:
            from torch.distributed._tensor import DTensor
        except ImportError:
            return None
    return DTensor


def is_dtensor(t: object) -> bool:
    """A ``torch.distributed`` DTensor (FSDP2, tensor parallel)."""
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def original_name(name: str) -> str:
    """The parameter's name as a plain model has it: ``a.parametrizations.weight.original`` ->
    ``a.weight``; FSDP/activation-checkpointing wrapper components dropped."""
    name = _WRAPPER_PARTS.sub("", name).lstrip(".")
    return _PARAMETRIZED.sub(r"\1\2", name)


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype (``BF16``), else torch's own (``complex128``)."""
    return TORCH_TO_DTYPE.get(dtype, str(dtype).removeprefix("torch."))


def _alias_key(t: torch.Tensor) -> tuple:
    """Equal for two names of the same tensor (tied weights), different otherwise."""
    if is_dtensor(t) or t.device.type == "meta" or t.layout != torch.strided:
        return ("id", id(t))
    try:
        ptr = t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensor subclasses without a storage
        return ("id", id(t))
    return (t.device, ptr, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def _skip_reason(t: torch.Tensor) -> str | None:
    if t.device.type == "meta":
        return "meta tensor: no values to audit"
    if t.layout != torch.strided:
        return f"{t.layout} layout: only dense tensors are audited"
    return None


def _entry(name: str, t: torch.Tensor, file: Path, mapped: bool, dtensor: str) -> TensorInfo:
    t = t.detach()
    if is_dtensor(t):
        if dtensor == "local":
            local = t.to_local()
            shape, load = tuple(local.shape), (lambda: local)
        else:
            shape, load = tuple(t.shape), t.full_tensor
        skip = _skip_reason(t.to_local())
    else:
        shape, load, skip = tuple(t.shape), (lambda: t), _skip_reason(t)
    nbytes = 0 if skip else int(torch.Size(shape).numel()) * t.element_size()
    return TensorInfo(name, dtype_name(t.dtype), shape, 0, nbytes, file, load=load,
                      mapped=mapped, skip=skip)


def tensor_entries(state: Mapping, file: Path, *, mapped: bool = False,
                   dtensor: str = "full") -> list[TensorInfo]:
    """One :class:`TensorInfo` per entry of a state_dict-like mapping, in its order.

    ``mapped``: the tensors are views of a file mapping this package opened (their pages are
    dropped after each scan); never pass it for memory a caller owns.
    """
    seen: dict[tuple, str] = {}
    out: list[TensorInfo] = []
    for raw, value in state.items():
        name = original_name(str(raw))
        if not isinstance(value, torch.Tensor):
            out.append(TensorInfo(name, type(value).__name__, (), 0, 0, file,
                                  skip=f"not a tensor ({type(value).__name__})"))
            continue
        if isinstance(value, torch.nn.parameter.UninitializedTensorMixin):
            out.append(TensorInfo(name, "uninitialized", (), 0, 0, file,
                                  skip="uninitialized (lazy) parameter: no values yet"))
            continue
        key = _alias_key(value)
        if key in seen:
            out.append(TensorInfo(name, dtype_name(value.dtype), tuple(value.shape), 0, 0, file,
                                  skip=f"tied to {seen[key]} (the same tensor): audited once"))
            continue
        seen[key] = name
        out.append(_entry(name, value, file, mapped, dtensor))
    return out


def _is_state_dict(obj: object) -> bool:
    """A mapping of names to tensors (non-tensor leaves allowed, nested containers not)."""
    if not isinstance(obj, Mapping) or not obj:
        return False
    values = list(obj.values())
    return (any(isinstance(v, torch.Tensor) for v in values)
            and not any(isinstance(v, (Mapping, list, tuple)) for v in values))


def find_state_dict(obj: object, path: Path) -> tuple[Mapping, str | None]:
    """The state_dict inside a loaded checkpoint, and the key path it was under (or None)."""
    if _is_state_dict(obj):
        return obj, None
    if isinstance(obj, Mapping):
        for key in WRAPPER_KEYS:
            inner = obj.get(key)
            if _is_state_dict(inner):
                return inner, key
            if isinstance(inner, Mapping):
                for key2 in WRAPPER_KEYS:
                    if _is_state_dict(inner.get(key2)):
                        return inner[key2], f"{key}.{key2}"
        keys = ", ".join(repr(k) for k in list(obj)[:6]) + (", ..." if len(obj) > 6 else "")
        raise CheckpointError(f"{path}: no state_dict found: expected a mapping of names to "
                              f"tensors, or one under {', '.join(map(repr, WRAPPER_KEYS))} "
                              f"(top-level keys: {keys or 'none'})")
    raise CheckpointError(f"{path}: no state_dict found: the file holds a "
                          f"{type(obj).__name__}, not a mapping of names to tensors")


def unwrap_module(model: torch.nn.Module) -> torch.nn.Module:
    """The user's module inside DDP/DataParallel and ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, (torch.nn.parallel.DistributedDataParallel,
                              torch.nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
            model = model._orig_mod
        else:
            return model


def open_in_memory(obj: torch.nn.Module | Mapping, dtensor: str = "full") -> Checkpoint:
    """A model or state_dict as a :class:`Checkpoint` with one in-memory source."""
    if dtensor not in DTENSOR_MODES:
        raise ValueError(f"dtensor={dtensor!r}: use 'full' or 'local'")
    if isinstance(obj, torch.nn.Module):
        model = unwrap_module(obj)
        label, kind = Path(f"<model {type(model).__name__}>"), "model"
        state: Mapping = dict(model.named_parameters(remove_duplicate=False))
    else:  # a state_dict, or a loaded checkpoint holding one (e.g. a Lightning dict)
        label, kind = Path("<state_dict>"), "state_dict"
        state, key = find_state_dict(obj, label)
    entries = tensor_entries(state, label, dtensor=dtensor)
    notes = []
    if any(is_dtensor(v) for v in state.values()):
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        notes.append("sharded (DTensor) parameters: " + (
            f"audited this rank's ({rank}) local shards only" if dtensor == "local" else
            "audited the full tensors, gathered one at a time on every rank"))
    coll = TensorCollection(label, tuple(entries), sum(e.nbytes for e in entries), "memory")
    source = Source(label, kind, (coll,), tuple(notes))
    return Checkpoint((source,), (coll,))
