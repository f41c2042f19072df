"""The optional extras (a test skips only when its extra is missing, and never in CI), and the
helpers the ``test_integration_*`` files share.

``require(module)`` is what every ``test_integration_*`` file uses to import its framework:
outside CI a missing extra skips the test; with ``SPECTRAL_GUARD_REQUIRE_EXTRAS=1`` (set by
``.ci/run``) or ``CI=true`` it is an error instead. ``.ci/run`` also fails when pytest reports any
skipped integration test.
"""

from __future__ import annotations

import importlib
import math
import os
import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from spectral_guard import Thresholds, load_thresholds
from spectral_guard.integrations import EXTRA_FOR

ROOT = Path(__file__).resolve().parents[1]


def extras_required() -> bool:
    """True in CI: a missing extra must fail, not skip."""
    return (os.environ.get("SPECTRAL_GUARD_REQUIRE_EXTRAS") == "1"
            or os.environ.get("CI", "").lower() == "true")


def require(module: str) -> ModuleType:
    """Import ``module``; skip the calling test module if its extra is missing (not in CI)."""
    if extras_required():
        return importlib.import_module(module)
    extra = EXTRA_FOR.get(module.partition(".")[0], "all")
    return pytest.importorskip(module, reason=f"needs spectral-guard[{extra}]")


def always_firing() -> Thresholds:
    """Thresholds whose effective-rank floor (2.0) every layer is below: every check fires, so
    every checked layer is treated and the penalty is never zero once a check is applied."""
    data = load_thresholds().to_dict()
    data["default"]["effective_rank_retention_min"] = 2.0
    return Thresholds.from_dict(data)


def trained_guard(steps: int, after_step: Callable[[Any], None] | None = None) -> Any:
    """A guard on a 3-layer MLP after ``steps`` SGD steps, every layer checked at every step
    and treated (:func:`always_firing`); ``after_step(guard)`` runs after each step."""
    import torch.nn as nn

    import spectral_guard

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 48), nn.GELU(), nn.Linear(48, 48), nn.GELU(),
                          nn.Linear(48, 4))
    guard = spectral_guard.instrument(model, ratio=1.0, thresholds=always_firing())
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x, y = torch.randn(8, 16, generator=g), torch.randint(0, 4, (8,), generator=g)
        (nn.functional.cross_entropy(model(x), y) + guard.penalty()).backward()
        opt.step()
        opt.zero_grad()
        if after_step is not None:
            after_step(guard)
    return guard


def assert_same_state(a: Any, b: Any, where: str = "state") -> None:
    """Two guard ``state_dict()`` outputs are equal: tensors bit for bit (NaN equal to NaN)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            assert_same_state(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_state(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=where)
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), where
    else:
        assert a == b, (where, a, b)


def doc_example(tag: str) -> str:
    """The ```python block of docs/integrations.md that starts with ``# example: <tag>``."""
    text = (ROOT / "docs" / "integrations.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    found = [b for b in blocks if b.startswith(f"# example: {tag}\n")]
    assert len(found) == 1, tag
    return found[0]


def test_every_extra_is_declared_and_all_includes_them():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    for name in ("hf", "lightning", "plot", "tensorboard", "all"):
        assert name in extras, name
    assert set(EXTRA_FOR.values()) <= set(extras)
    assert extras["all"] == ["spectral-guard[hf,lightning,plot,tensorboard]"]


def test_ci_installs_all_extras_and_fails_on_skipped_integration_tests():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "'.[test,all]'" in ci
    assert "SPECTRAL_GUARD_REQUIRE_EXTRAS=1" in ci
    assert "test_integration_" in ci and "skipped" in ci and "--junitxml" in ci


@pytest.mark.skipif(not extras_required(), reason="outside CI the extras are optional")
@pytest.mark.parametrize("module", sorted(EXTRA_FOR))
def test_in_ci_every_extra_imports(module):
    importlib.import_module(module)


def test_missing_extra_message_names_the_extra():
    from spectral_guard.integrations import require as lib_require

    with pytest.raises(ImportError, match=r"pip install 'spectral-guard\[plot\]'"):
        lib_require("matplotlib.this_module_does_not_exist", "plots")
