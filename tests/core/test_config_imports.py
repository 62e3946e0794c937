"""Each method's config schema is one light module: importing ``conceptlm.<method>.config`` loads config modules and
``core.config`` / ``core.errors`` only (PyYAML, never torch, transformers or numpy), so a config can be read,
validated and documented without the training stack. Loading and validating each method's shipped tiny config stays
light too (validation must not reach for model code)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
_CORE = ["conceptlm", "conceptlm.core", "conceptlm.core.config", "conceptlm.core.errors"]
_LM = _CORE + ["conceptlm.lm", "conceptlm.lm.config"]
EXPECTED = {
    "conceptlm.lm.config": _LM,
    "conceptlm.sft.config": _LM + ["conceptlm.sft", "conceptlm.sft.config"],
    "conceptlm.jepa.config": _LM + ["conceptlm.jepa", "conceptlm.jepa.config"],
    "conceptlm.cocomix.config": _CORE + ["conceptlm.cocomix", "conceptlm.cocomix.config"],
    "conceptlm.lcm.config": _CORE + ["conceptlm.lcm", "conceptlm.lcm.config"],
    "conceptlm.lcm.variants": _CORE + ["conceptlm.lcm", "conceptlm.lcm.config", "conceptlm.lcm.variants"],
}
HEAVY = ("torch", "transformers", "numpy", "safetensors", "peft")
CONFIGS = {  # (config class, a shipped config)
    "sft": ("conceptlm.sft.config:SFTConfig", "configs/sft/tiny_cpu.yaml"),
    "jepa": ("conceptlm.jepa.config:JepaConfig", "configs/jepa/tiny_stp.yaml"),
    "cocomix": ("conceptlm.cocomix.config:CocomixConfig", "configs/cocomix/tiny_cpu.yaml"),
    "lcm": ("conceptlm.lcm.config:LCMConfig", "configs/lcm/tiny_cpu.yaml"),
}


def _loaded(code: str) -> dict[str, list[str]]:
    code += ("\nimport json, sys\n"
             "print(json.dumps({'conceptlm': sorted(k for k in sys.modules if k.split('.')[0] == 'conceptlm'),\n"
             f"                  'heavy': sorted(k for k in {HEAVY!r} if k in sys.modules)}}))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("module", sorted(EXPECTED))
def test_a_method_config_imports_only_config_modules(module):
    loaded = _loaded(f"import {module}")
    assert loaded["conceptlm"] == sorted(EXPECTED[module])
    assert loaded["heavy"] == []


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_loading_and_validating_a_shipped_config_stays_light(method):
    target, path = CONFIGS[method]
    module, name = target.split(":")
    loaded = _loaded(f"from conceptlm.core.config import load_config\nfrom {module} import {name}\n"
                     f"cfg = load_config({name}, {path!r}, [])\nassert cfg.run.name")
    assert loaded["heavy"] == [], f"validating {path} imported {loaded['heavy']}"
