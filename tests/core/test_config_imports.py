"""Each token-LM method's config schema is one light module: importing ``conceptlm.{lm,sft,jepa}.config`` loads the
config modules and ``core.config`` / ``core.errors`` only (PyYAML, never torch or transformers), so a config can be
read, validated and documented without the training stack."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

_CORE = ["conceptlm", "conceptlm.core", "conceptlm.core.config", "conceptlm.core.errors", "conceptlm.lm",
         "conceptlm.lm.config"]
EXPECTED = {
    "conceptlm.lm.config": _CORE,
    "conceptlm.sft.config": _CORE + ["conceptlm.sft", "conceptlm.sft.config"],
    "conceptlm.jepa.config": _CORE + ["conceptlm.jepa", "conceptlm.jepa.config"],
}
HEAVY = ("torch", "transformers", "numpy", "safetensors", "peft")


def _loaded(module: str) -> dict[str, list[str]]:
    code = ("import importlib, json, sys\n"
            f"importlib.import_module({module!r})\n"
            "print(json.dumps({'conceptlm': sorted(k for k in sys.modules if k.split('.')[0] == 'conceptlm'),\n"
            f"                  'heavy': sorted(k for k in {HEAVY!r} if k in sys.modules)}}))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(res.stdout)


@pytest.mark.parametrize("module", sorted(EXPECTED))
def test_a_method_config_imports_only_config_modules(module):
    loaded = _loaded(module)
    assert loaded["conceptlm"] == sorted(EXPECTED[module])
    assert loaded["heavy"] == []
