"""Loading the CoCoMix config imports its schema only: no torch model code, no transformers (issue 20)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ALLOWED = {"conceptlm", "conceptlm.cocomix", "conceptlm.cocomix.config", "conceptlm.core", "conceptlm.core.config",
           "conceptlm.core.errors"}


def test_config_import_loads_only_config_modules():
    code = ("import json, sys; import conceptlm.cocomix.config; "
            "print(json.dumps({'modules': sorted(m for m in sys.modules if m.split('.')[0] == 'conceptlm'), "
            "'transformers': 'transformers' in sys.modules}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(found["modules"]) <= ALLOWED, sorted(set(found["modules"]) - ALLOWED)
    assert "conceptlm.cocomix.config" in found["modules"]
    assert not found["transformers"]
