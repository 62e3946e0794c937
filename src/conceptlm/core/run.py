"""Run set-up shared by every method's recipe: process group, seeds, logging, the run folder (locked while a run
writes it) and the resolved config.

A recipe is::

    with run_session(cfg, command) as session:
        ...validate inputs, build data and unit (nothing written yet)...
        session.create_run_dir()          # checks run.resume, takes the lock, writes config.yaml
        return fit(cfg, session.info, unit, ...)
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from conceptlm.core import checkpoint as ckpt_lib
from conceptlm.core.config import RunConfig, save_config
from conceptlm.core.distributed import DistInfo, all_reduce_sum, cleanup_distributed, init_distributed
from conceptlm.core.errors import ConfigError
from conceptlm.core.lock import RunLock

__all__ = ["seed_everything", "prepare_run", "create_run_dir", "check_resume", "run_session", "RunSession"]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def prepare_run(cfg: RunConfig) -> DistInfo:
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


def check_resume(cfg: RunConfig) -> None:
    """Refuse, before anything is written, a ``run.resume`` that cannot work.

    ``never`` with checkpoints in the run folder, and a path that is not an intact checkpoint, are errors that
    suggest ``run.resume=auto``.
    """
    resume = cfg.run.resume
    if resume == "never":
        if ckpt_lib.list_checkpoints(cfg.run_dir):
            raise ConfigError(f"{cfg.run_dir} already holds checkpoints: set run.resume=auto to continue it, or "
                              "choose another run.name", field="run.resume")
    elif resume != "auto":
        path = Path(resume)
        problem = ckpt_lib.verify_checkpoint(path) if path.is_dir() else "no such directory"
        if problem is not None:
            raise ConfigError(f"{path} is not a usable checkpoint ({problem}); use run.resume=auto to continue "
                              "from the run's newest intact checkpoint", field="run.resume")


def create_run_dir(cfg: RunConfig, info: DistInfo, *, command: str | None = None,
                   lock: RunLock | None = None) -> None:
    """Check ``run.resume``, take the run folder's lock (rank 0, when given), save the resolved config, and clear
    temporary folders a killed save left behind."""
    check_resume(cfg)
    failed: BaseException | None = None
    if info.is_main:
        try:
            cfg.run_dir.mkdir(parents=True, exist_ok=True)
            if lock is not None:
                lock.acquire()
            ckpt_lib.remove_stale_temporaries(cfg.run_dir)
            save_config(cfg, cfg.run_dir / "config.yaml", header=command)
        except BaseException as e:  # noqa: BLE001 - re-raised below, after telling the other ranks
            failed = e
    flag = all_reduce_sum(torch.tensor([1.0 if failed is not None else 0.0]))
    if failed is not None:
        raise failed
    if flag.item() > 0:
        raise ConfigError(f"rank 0 could not set up {cfg.run_dir} (see its error)", field="run")


@dataclass
class RunSession:
    """What a recipe holds while it runs: the config, this process's :class:`DistInfo` and the run lock."""

    cfg: RunConfig
    info: DistInfo
    command: str | None = None
    lock: RunLock | None = field(default=None, repr=False)

    def create_run_dir(self) -> Path:
        """Inputs are valid: check resume, lock the run folder, write the resolved config. Returns the folder."""
        self.lock = self.lock or RunLock(self.cfg.run_dir)
        create_run_dir(self.cfg, self.info, command=self.command, lock=self.lock)
        return self.cfg.run_dir


@contextlib.contextmanager
def run_session(cfg: RunConfig, command: str | None = None) -> Iterator[RunSession]:
    """Set up the process (``prepare_run``); on exit release the run lock and tear down the process group."""
    session = RunSession(cfg, prepare_run(cfg), command)
    try:
        yield session
    finally:
        if session.lock is not None:
            session.lock.release()
        cleanup_distributed()
