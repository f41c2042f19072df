"""What a file is, from its first bytes: a ``torch.save`` zip archive, a legacy pickle, or
another known format that is not safetensors (named in the safetensors reader's errors)."""

from __future__ import annotations

LEGACY_PICKLE = ("a legacy (non-zip) PyTorch pickle, which is not supported: only zip-format "
                 "files (torch.save since PyTorch 1.6) can be memory-mapped and loaded "
                 "weights-only; re-save it with a current torch.save")


def is_zip(head: bytes) -> bool:
    """The first bytes of a zip archive (the ``torch.save`` format)."""
    return head.startswith(b"PK\x03\x04")


def is_pickle(head: bytes) -> bool:
    """The first bytes of a bare pickle (protocol 2-5: a legacy ``torch.save`` file)."""
    return head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5


def sniff_other_format(head: bytes) -> str | None:
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
