"""Run set-up shared by every method's recipe: process group, seeds, logging, the run folder (locked while a run
writes it) and the resolved config.

A recipe is::

    with run_session(cfg, command) as session:
        ...validate inputs, build data and unit (nothing written yet)...
        session.create_run_dir()          # checks run.resume, takes the lock, writes config.yaml
        return fit(cfg, session.info, unit, ...)

A resumed run keeps its ``config.yaml`` until the trainer has accepted the resume (the checkpoint's config, data
order and weights all fit): a refused resume leaves the run folder as it was.
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
from conceptlm.core.config import RunConfig, config_text
from conceptlm.core.distributed import DistInfo, all_reduce_sum, cleanup_distributed, init_distributed
from conceptlm.core.errors import ConfigError
from conceptlm.core.io import atomic_write_text
from conceptlm.core.lock import RunLock
from conceptlm.core.resume import check_config_changes

__all__ = ["seed_everything", "prepare_run", "create_run_dir", "check_resume", "resume_checkpoint", "run_session",
           "RunSession", "ResumePlan", "take_resume_plan"]


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


@dataclass
class ResumePlan:
    """What :func:`create_run_dir` decided for a run folder, for the trainer to carry out.

    ``checkpoint``: the checkpoint to resume (None: start from scratch); ``changes``: the accepted config changes
    (``run.resume_changes=apply``); ``config_yaml``: the run's new ``config.yaml``, written by the trainer once it has
    accepted the resume (None: already written, for a run that starts from scratch).
    """

    checkpoint: Path | None
    changes: dict = field(default_factory=dict)
    config_yaml: str | None = None

    def accept(self, run_dir: Path, info: DistInfo) -> None:
        """The resume has been accepted: write the run's ``config.yaml`` (rank 0)."""
        if self.config_yaml is not None and info.is_main:
            atomic_write_text(Path(run_dir) / "config.yaml", self.config_yaml)
        self.config_yaml = None


_PLANS: dict[Path, ResumePlan] = {}


def _plan_key(run_dir: Path) -> Path:
    return Path(run_dir).resolve()


def take_resume_plan(run_dir: str | Path) -> ResumePlan | None:
    """The plan :func:`create_run_dir` left for ``run_dir`` in this process (removed: it is used once), or None."""
    return _PLANS.pop(_plan_key(Path(run_dir)), None)


def resume_checkpoint(cfg: RunConfig) -> Path | None:
    """The checkpoint ``run.resume`` continues, after :func:`check_resume`: the newest intact one for ``auto`` (an
    error when every checkpoint is damaged), the given folder, or None (start from scratch)."""
    check_resume(cfg)
    resume = cfg.run.resume
    if resume == "never":
        return None
    if resume == "auto":
        return ckpt_lib.find_resumable_checkpoint(cfg.run_dir) if cfg.run_dir.is_dir() else None
    return Path(resume)


def create_run_dir(cfg: RunConfig, info: DistInfo, *, command: str | None = None,
                   lock: RunLock | None = None) -> None:
    """Check ``run.resume`` (and, when resuming, the config against the checkpoint's), take the run folder's lock
    (rank 0, when given), clear temporary folders a killed save left behind, and save the resolved config: now for a
    run that starts from scratch, by the trainer once it has accepted the resume otherwise (see :class:`ResumePlan`),
    so that a refused resume leaves ``config.yaml`` as it was."""
    resume_from = resume_checkpoint(cfg)
    changes = check_config_changes(cfg, resume_from) if resume_from is not None else {}
    text = config_text(cfg, header=command)
    failed: BaseException | None = None
    if info.is_main:
        try:
            cfg.run_dir.mkdir(parents=True, exist_ok=True)
            if lock is not None:
                lock.acquire()
            ckpt_lib.remove_stale_temporaries(cfg.run_dir)
            if resume_from is None:
                atomic_write_text(cfg.run_dir / "config.yaml", text)
        except BaseException as e:  # noqa: BLE001 - re-raised below, after telling the other ranks
            failed = e
    flag = all_reduce_sum(torch.tensor([1.0 if failed is not None else 0.0]))
    if failed is not None:
        raise failed
    if flag.item() > 0:
        raise ConfigError(f"rank 0 could not set up {cfg.run_dir} (see its error)", field="run")
    _PLANS[_plan_key(cfg.run_dir)] = ResumePlan(resume_from, changes, text if resume_from is not None else None)


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
        _PLANS.pop(_plan_key(cfg.run_dir), None)
        if session.lock is not None:
            session.lock.release()
        cleanup_distributed()
