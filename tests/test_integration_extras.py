"""The optional extras: a test skips only when its extra is missing, and never in CI.

``require(module)`` is what every ``test_integration_*`` file uses to import its framework:
outside CI a missing extra skips the test; with ``SPECTRAL_GUARD_REQUIRE_EXTRAS=1`` (set by
``.ci/run``) or ``CI=true`` it is an error instead. ``.ci/run`` also fails when pytest reports any
skipped integration test.
"""

from __future__ import annotations

import importlib
import os
import tomllib
from pathlib import Path
from types import ModuleType

import pytest

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
