"""Progress bars for long work, all switched off at once by ``CONCEPTLM_NO_PROGRESS=1`` (logs, CI, benchmarks)."""

from __future__ import annotations

import os
from collections.abc import Iterable

from tqdm.auto import tqdm

__all__ = ["ENV_VAR", "progress_enabled", "progress_bar"]

ENV_VAR = "CONCEPTLM_NO_PROGRESS"


def progress_enabled(enabled: bool = True) -> bool:
    """``enabled``, unless the environment variable ``CONCEPTLM_NO_PROGRESS`` is ``1``."""
    return enabled and os.environ.get(ENV_VAR, "0") != "1"


def progress_bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str | None = None,
                 unit: str = "it", enabled: bool = True, initial: int = 0, **kwargs) -> tqdm:
    """A tqdm bar (over ``iterable``, or updated by hand), disabled when :func:`progress_enabled` says so. A disabled
    bar still iterates and accepts ``update``/``set_postfix``/``close``, so callers need no branch."""
    return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial,
                disable=not progress_enabled(enabled), **kwargs)
