"""Run set-up shared by every method's recipe: process group, seeds, run folder, logging, resolved config."""

from __future__ import annotations

import logging
import os
import random
import sys

import torch

from conceptlm.core.config import BaseRunConfig, save_config
from conceptlm.core.distributed import DistInfo, init_distributed

__all__ = ["seed_everything", "prepare_run", "create_run_dir"]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def prepare_run(cfg: BaseRunConfig) -> DistInfo:
    """Init distributed, seed all RNGs with ``train.seed`` and set up logging (rank 0: INFO, others: WARNING).

    Nothing is written yet: a recipe calls :func:`create_run_dir` once its inputs have been validated, so bad
    input never leaves a half-made run folder behind.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    info = init_distributed()
    level = logging.INFO if info.is_main else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    seed_everything(cfg.train.seed)
    return info


def create_run_dir(cfg: BaseRunConfig, info: DistInfo, *, command: str | None = None) -> None:
    """Create the run folder and save the resolved config (rank 0)."""
    if info.is_main:
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, cfg.run_dir / "config.yaml", header=command)
