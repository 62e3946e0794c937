"""The package's layers: ``core`` imports only ``core`` (and third-party code); ``data`` imports only ``core``."""

from __future__ import annotations

import functools
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import conceptlm

PKG = Path(conceptlm.__file__).parent
ABOVE_CORE = ("data", "eval", "lm", "sft", "jepa", "cocomix", "lcm", "plots", "demo", "cli")


def _modules(sub: str) -> list[str]:
    return [f"conceptlm.{sub}"] + [m.name for m in pkgutil.walk_packages([str(PKG / sub)], prefix=f"conceptlm.{sub}.")]


def _loaded_after_import(modules: list[str]) -> dict[str, list[str]]:
    """For each module, import it in a fresh interpreter and list the conceptlm modules that got loaded."""
    code = ("import importlib, json, sys\n"
            f"out = {{}}\nfor m in {modules!r}:\n"
            "    before = set(sys.modules)\n"
            "    importlib.import_module(m)\n"
            "    out[m] = sorted(k for k in sys.modules if k.startswith('conceptlm.'))\n"
            "    print(json.dumps({m: out[m]}))\n"
            "    [sys.modules.pop(k) for k in list(sys.modules) if k.startswith('conceptlm') and k not in before]\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    merged: dict[str, list[str]] = {}
    for line in res.stdout.splitlines():
        merged.update(json.loads(line))
    return merged


def _violations(loaded: dict[str, list[str]], forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    bad = {}
    for mod, mods in loaded.items():
        hits = [m for m in mods if m.split(".")[1] in forbidden]
        if hits:
            bad[mod] = hits
    return bad


@functools.lru_cache(maxsize=1)
def _core_and_data() -> dict[str, list[str]]:
    return _loaded_after_import(_modules("core") + _modules("data"))


def test_core_imports_only_core():
    loaded = {k: v for k, v in _core_and_data().items() if k.startswith("conceptlm.core")}
    assert len(loaded) >= 20  # every core module was imported
    assert _violations(loaded, ABOVE_CORE) == {}


def test_data_imports_only_core():
    loaded = {k: v for k, v in _core_and_data().items() if k.startswith("conceptlm.data")}
    assert _violations(loaded, tuple(x for x in ABOVE_CORE if x != "data")) == {}


def test_the_check_catches_a_violation():
    """The detector itself: a module list that pulls in conceptlm.data is reported."""
    loaded = _loaded_after_import(["conceptlm.core.errors", "conceptlm.data.batching"])
    assert "conceptlm.data.batching" in _violations(loaded, ABOVE_CORE)
    assert "conceptlm.core.errors" not in _violations(loaded, ABOVE_CORE)
