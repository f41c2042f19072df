"""What a calibrated file records about how it was made: its references (path, size and sha256
of every file read, hashed while the audit streams them), the audit settings, the rule, where
the fields it does not learn come from, and the random-weights check."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .. import __version__
from .build import HYGIENE_FIELDS
from .random_weights import RandomCheck
from .rule import CEILINGS, WIDEN_ONLY, CalibrationRule

HASH_BLOCK = 8 * 1024 * 1024


class ReferenceHasher(threading.Thread):
    """sha256 and size of files, on a background thread started with the audit of a reference.

    Both read the file front to back at about the same time, so the disk is read once: the
    second reader of each page finds it in the page cache. ``hashlib`` releases the GIL on
    large blocks, so hashing overlaps with the audit's decompositions."""

    def __init__(self, files: Sequence[Path]) -> None:
        super().__init__(daemon=True, name="spectral-guard-sha256")
        self.files = list(files)
        self.results: dict[str, dict[str, Any]] = {}
        self.error: OSError | None = None

    def run(self) -> None:
        try:
            for path in self.files:
                digest = hashlib.sha256()
                size = 0
                with open(path, "rb", buffering=0) as fh:
                    while block := fh.read(HASH_BLOCK):
                        digest.update(block)
                        size += len(block)
                self.results[str(path)] = {"path": str(path), "bytes": size,
                                           "sha256": digest.hexdigest()}
        except OSError as exc:  # reported by the caller; the audit raises its own error first
            self.error = exc


def reference_files(path: str | Path) -> list[Path]:
    """The regular files a reference reads (a file, an index and its shards, a folder's)."""
    from ..checkpoint import CheckpointError, resolve_source

    p = Path(path)
    try:
        source = resolve_source(p)
    except (CheckpointError, OSError, ValueError):
        return [p] if p.is_file() else []
    files = [f.path for f in source.files]
    if source.kind == "index":
        files.insert(0, source.path)
    return files


def logit_provenance(logit_pairs: int) -> str:
    """Where the file's q-k logit limits come from (the audit's attention pass reports each
    pair's statistics on both of its matrices and judges them against these fields)."""
    fields = ", ".join(f for f in CEILINGS if f in WIDEN_ONLY) or "none"
    if logit_pairs:
        return (f"{fields}: the shipped rule of each role (limits set across models, "
                "docs/audit.md), raised only where one of the "
                f"{logit_pairs} attention pair(s) the audit measured on the references "
                "exceeds it (to its value / reference_margin)")
    return (f"{fields}: the shipped rule of each role; the audit measured no attention pair "
            "of the references (no head count known), so nothing was checked against them")


def utc_now() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def provenance(*, mode: str, limit: int, seed: int, include: Sequence[str],
               exclude: Sequence[str], rule: CalibrationRule, references: list[dict[str, Any]],
               run_length: int | None, logit_pairs: int, random: RandomCheck,
               alpha_estimator: str = "csn") -> dict[str, Any]:
    """The ``provenance`` object of a calibrated file (``run_length``: number of successive
    checkpoints of one run, ``None`` when not a run; ``alpha_estimator``: the estimator the
    references' alpha was measured with, which an audit judging the file's alpha bounds must
    use too)."""
    return {
        "source": "spectral-guard calibrate",
        "created": utc_now(),
        "tool": f"spectral_guard {__version__}",
        "mode": mode, "limit": int(limit), "seed": int(seed),
        "include": list(include), "exclude": list(exclude),
        "rule": asdict(rule),
        "references": references,
        "guard_fields": (f"derived from a run of {run_length} checkpoints (drift from the "
                         "first)" if run_length else "shipped defaults: the references are not "
                         "successive checkpoints of one run, which would derive them"),
        "hygiene_fields": "shipped rule of each role (" + ", ".join(HYGIENE_FIELDS) + ")",
        "q_k_logit_scale": logit_provenance(logit_pairs),
        "alpha_estimator": alpha_estimator,
        "random_weights": random.to_json_dict(),
    }
