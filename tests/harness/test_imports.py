"""lm-eval is optional: the config schema, the pipeline and the report do not import it (only the harness code
does, when tasks are given)."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def test_training_and_config_modules_do_not_import_lm_eval():
    code = ("import json, sys; import conceptlm.cocomix.config, conceptlm.cocomix.pipeline, conceptlm.cocomix.report, "
            "conceptlm.cocomix.hub, conceptlm.harness, conceptlm.harness.tasks, conceptlm.cli; "
            "print(json.dumps('lm_eval' in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert json.loads(out.stdout.strip().splitlines()[-1]) is False
