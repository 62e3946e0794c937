"""One metrics schema for every method: ``runs/<name>/metrics.jsonl`` plus TensorBoard event files (and the
optional trackers of :mod:`conceptlm.core.trackers`, fed with the same rows).

Each line is a JSON object ``{"step": int, "split": "train" | "eval", "time": seconds since start, ...values}``.
Train lines carry ``loss`` (the weighted total), every named loss part, ``lr``, ``grad_norm``, ``tokens_per_s``;
eval lines carry ``loss`` and the parts. Only rank 0 writes. ``plots/`` reads this file and never imports training
code.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

__all__ = ["MetricLogger", "read_metrics"]

log = logging.getLogger(__name__)


class MetricLogger:
    """Append metrics rows to ``metrics.jsonl`` (line-buffered, flushed each write) and TensorBoard.

    Args:
        run_dir: the run folder.
        enabled: False on non-zero ranks (then every call is a no-op).
        resume_step: when resuming from a checkpoint at this step, rows with ``step > resume_step`` left by the
            killed run are dropped first, so the file reads as one uninterrupted run.
        tensorboard: also write TensorBoard scalars under ``run_dir/tb``.
        trackers: started trackers (:func:`conceptlm.core.trackers.open_trackers`) that get every row too; closed
            with the logger.
    """

    def __init__(self, run_dir: str | Path, *, enabled: bool = True, resume_step: int | None = None,
                 tensorboard: bool = True, trackers: list | None = None):
        self.enabled = enabled
        self._trackers = list(trackers or []) if enabled else []
        self.path = Path(run_dir) / "metrics.jsonl"
        self._start = time.perf_counter()
        self._tb = None
        self._file = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            from conceptlm.core.io import atomic_write_jsonl

            atomic_write_jsonl(self.path, kept)
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self._file = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tb"), purge_step=resume_step)
            except ImportError:  # tensorboard is optional at run time
                log.warning("tensorboard is not installed; writing metrics.jsonl only")

    def log(self, step: int, split: str, values: dict[str, float]) -> dict:
        """Write one row; returns it (also on disabled ranks, for progress bars)."""
        row = {"step": int(step), "split": split, "time": round(time.perf_counter() - self._start, 3)}
        for k, v in values.items():
            row[k] = float(v) if isinstance(v, (int, float)) and math.isfinite(v) else v
        if self.enabled and self._file is not None:
            self._file.write(json.dumps(row) + "\n")
            self._file.flush()
            if self._tb is not None:
                for k, v in values.items():
                    if isinstance(v, (int, float)) and math.isfinite(v):
                        self._tb.add_scalar(f"{split}/{k}", v, step)
            if self._trackers:
                from conceptlm.core.trackers import tracker_values

                scalars = tracker_values(split, values)
                for t in self._trackers:
                    t.log(int(step), scalars)
        return row

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        for t in self._trackers:
            t.close()
        self._trackers = []


def read_metrics(path: str | Path, split: str | None = None) -> list[dict]:
    """Read ``metrics.jsonl`` rows (optionally one split); a truncated last line (killed writer) is ignored."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if split is None or row.get("split") == split:
                rows.append(row)
    return rows
