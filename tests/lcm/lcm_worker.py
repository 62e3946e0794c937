"""Entry point of the Base-LCM training tests run as subprocesses (one process or under torchrun):

    python -m tests.lcm.lcm_worker run.out_dir=/tmp/runs train.max_steps=4 ...
"""

from __future__ import annotations

import sys

from conceptlm.core.config import load_config
from conceptlm.lcm.config import LCMTrainConfig
from conceptlm.lcm.train import train_lcm

if __name__ == "__main__":
    res = train_lcm(load_config(LCMTrainConfig, None, sys.argv[1:]))
    print(res.step)
