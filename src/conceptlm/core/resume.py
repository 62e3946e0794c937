"""What may change when a run is resumed.

Resuming continues the run that the checkpoint's ``config.yaml`` describes. Settings that only say how long to run,
how often to log/evaluate/save, where to run, which trackers follow it and how to generate may change freely. Any
other difference (e.g. ``optim.lr`` after a non-finite stop) is refused with a message listing it, unless
``run.resume_changes=apply``:
then the new values hold from the resumed step on (the optimizer's learning rate, betas, eps and weight decay are
reset to the new config; the LR schedule keeps its position), and every applied change is logged. A setting the
checkpoint's ``config.yaml`` does not have (added by a newer version) is no change while it keeps its default.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml

from conceptlm.core.config import RunConfig, config_to_dict
from conceptlm.core.errors import ConfigError

__all__ = ["check_config_changes", "FREE_TO_CHANGE"]

log = logging.getLogger(__name__)

FREE_TO_CHANGE: tuple[str, ...] = (
    "run.resume", "run.resume_changes", "run.out_dir", "run.trackers", "run.tracker_project", "train.max_steps",
    "train.eval_every", "train.save_every", "train.keep_checkpoints", "train.log_every", "train.progress",
    "train.eval_batch_size", "dist.", "generate.",
)
"""Dotted keys (or prefixes ending in '.') that may differ from the checkpoint's config without notice."""


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: list(d) if isinstance(d, tuple) else d}


def _free(key: str) -> bool:
    return any(key == f or (f.endswith(".") and key.startswith(f)) for f in FREE_TO_CHANGE)


def _defaults(cfg: RunConfig) -> dict[str, Any]:
    """Flattened default values of ``cfg``'s class: a setting that a newer version added, absent from an older
    checkpoint's ``config.yaml`` and left at its default, is the behaviour that checkpoint was trained with."""
    try:
        return _flatten(config_to_dict(type(cfg)()))
    except TypeError:  # a config class without defaults for every field
        return {}


def check_config_changes(cfg: RunConfig, ckpt: Path) -> dict[str, tuple[Any, Any]]:
    """``{key: (checkpoint value, new value)}`` of the changes that matter; raises unless they may be applied.

    Raises:
        ConfigError: with ``run.resume_changes=refuse`` (the default) and any such change.
    """
    path = Path(ckpt) / "config.yaml"
    if not path.is_file():
        return {}
    old = _flatten(yaml.safe_load(path.read_text(encoding="utf-8")) or {})
    new = _flatten(config_to_dict(cfg))
    defaults = _defaults(cfg)
    changes = {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
               if not _free(k) and old.get(k) != new.get(k)
               and not (k not in old and k in defaults and new.get(k) == defaults[k])}
    if not changes:
        return {}
    listed = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items())
    if cfg.run.resume_changes != "apply":
        raise ConfigError(f"resuming {ckpt} with a config that differs from the checkpoint's ({listed}); undo the "
                          "change, or set run.resume_changes=apply to use the new values from the resumed step on",
                          field="run.resume")
    log.warning("resuming %s with changed settings (applied from step on): %s", ckpt, listed)
    return changes
