"""Run set-up shared by every method's recipe: process group, seeds, run folder, logging, resolved config."""

from __future__ import annotations

import logging
import os
import random
import sys

import torch

from conceptlm.core.config import BaseRunConfig, save_config
from conceptlm.core.distributed import DistInfo, init_distributed

__all__ = ["seed_everything", "prepare_run"]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def prepare_run(cfg: BaseRunConfig, *, command: str | None = None) -> DistInfo:
    """Init distributed, seed all RNGs with ``train.seed``, create the run folder and save the resolved config.

    Rank 0 logs INFO to stderr; other ranks log warnings only.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    info = init_distributed()
    level = logging.INFO if info.is_main else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    seed_everything(cfg.train.seed)
    if info.is_main:
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, cfg.run_dir / "config.yaml", header=command)
    return info
