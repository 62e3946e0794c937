"""``python -m conceptlm.harness ARGS``: the ``lm_eval`` command line (same arguments) with conceptlm's models
registered, e.g. ``--model conceptlm-cocomix --model_args pretrained=HUB_FOLDER`` or ``--model conceptlm-lcm
--model_args config=CFG,pretrained=FOLDER``."""

from __future__ import annotations

from lm_eval.__main__ import cli_evaluate

import conceptlm.cocomix.harness  # noqa: F401  (registers conceptlm-cocomix)
import conceptlm.lcm.harness  # noqa: F401  (registers conceptlm-lcm)

if __name__ == "__main__":
    cli_evaluate()
