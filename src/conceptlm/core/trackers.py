"""Optional experiment trackers fed with the rows of ``metrics.jsonl``: Weights & Biases and trackio.

``run.trackers: [wandb, trackio]`` (default: none) sends every row that :class:`~conceptlm.core.metrics.MetricLogger`
writes to each tracker as scalars ``"<split>/<name>"`` at the row's ``step`` (the same names TensorBoard gets), with
the run's resolved config as the tracker run's config. Only rank 0 logs. Nothing is imported unless a tracker is
named, so a run without trackers needs neither package.

- ``wandb`` honours its own environment (``WANDB_MODE=offline`` writes the run under ``<run>/wandb/`` without a
  network; ``WANDB_PROJECT`` / ``WANDB_ENTITY`` as usual); the project is ``run.tracker_project``.
- ``trackio`` (local-first, wandb-compatible API) writes to its local store (``TRACKIO_DIR``, by default under the
  Hugging Face cache) and needs no account.

A resumed run continues the same tracker run: the tracker run ids are kept in ``<run>/trackers.json``. Trackers
cannot forget what a killed run logged after its last checkpoint (``metrics.jsonl`` drops those rows), so a resumed
tracker run may hold a few rows twice at the same steps; ``metrics.jsonl`` stays the record to trust.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
from pathlib import Path
from typing import Any, Protocol

from conceptlm.core.errors import ConfigError
from conceptlm.core.io import atomic_write_text

__all__ = ["TRACKERS", "Tracker", "open_trackers", "tracker_values"]

log = logging.getLogger(__name__)

TRACKERS = ("wandb", "trackio")
"""The tracker names ``run.trackers`` accepts."""
IDS_FILE = "trackers.json"


class Tracker(Protocol):
    def log(self, step: int, values: dict[str, float]) -> None: ...

    def close(self) -> None: ...


def tracker_values(split: str, values: dict[str, Any]) -> dict[str, float]:
    """The scalars of one metrics row as tracker keys: ``{"<split>/<name>": value}`` for every finite number
    (bools and strings are left out, as in TensorBoard)."""
    return {f"{split}/{k}": float(v) for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def _run_id(run_dir: Path, name: str, resume: bool) -> str:
    """The tracker run id of this run folder: the stored one when resuming, else a new one (stored)."""
    path = run_dir / IDS_FILE
    ids: dict[str, str] = {}
    if path.is_file():
        try:
            ids = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            ids = {}
    if not resume or not isinstance(ids.get(name), str):
        ids[name] = secrets.token_hex(4)
        atomic_write_text(path, json.dumps(ids, indent=1) + "\n")
    return ids[name]


def _import(name: str):
    try:
        return __import__(name)
    except ImportError:
        raise ConfigError(f"{name} is not installed; pip install {name} (or conceptlm[trackers])",
                          field="run.trackers") from None


class _Wandb:
    def __init__(self, run_dir: Path, *, project: str, run_name: str, config: dict, resume: bool):
        wandb = _import("wandb")
        self._run = wandb.init(project=project, name=run_name, dir=str(run_dir), config=config,
                               id=_run_id(run_dir, "wandb", resume), resume="allow", reinit="create_new")

    def log(self, step: int, values: dict[str, float]) -> None:
        self._run.log(values, step=step)

    def close(self) -> None:
        self._run.finish()


class _Trackio:
    def __init__(self, run_dir: Path, *, project: str, run_name: str, config: dict, resume: bool):
        self._trackio = _import("trackio")
        # trackio names runs (not ids): the run folder's name plus its stored id keeps two run folders of the same
        # name apart and lets a resumed run continue its own
        name = f"{run_name}-{_run_id(run_dir, 'trackio', resume)}"
        self._run = self._trackio.init(project=project, name=name, config=config, resume="allow", auto_log_cpu=False,
                                       auto_log_gpu=False, capture_console=False)

    def log(self, step: int, values: dict[str, float]) -> None:
        self._run.log(values, step=step)

    def close(self) -> None:
        self._run.finish()


_SINKS = {"wandb": _Wandb, "trackio": _Trackio}


def open_trackers(names, run_dir: str | Path, *, project: str, run_name: str, config: dict,
                  resume: bool) -> list[Tracker]:
    """Start the named trackers for a run folder (``resume``: continue the tracker runs stored there)."""
    out: list[Tracker] = []
    for name in names:
        if name not in _SINKS:
            raise ConfigError(f"unknown tracker {name!r} (choose from {', '.join(TRACKERS)})", field="run.trackers")
        try:
            out.append(_SINKS[name](Path(run_dir), project=project, run_name=run_name, config=config, resume=resume))
        except ConfigError:
            for t in out:
                t.close()
            raise
    return out
