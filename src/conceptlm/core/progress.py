"""Progress bars for long work, all switched off at once by ``CONCEPTLM_NO_PROGRESS=1`` (logs, CI, benchmarks)."""

from __future__ import annotations

import os
from collections.abc import Iterable

from tqdm.auto import tqdm

__all__ = ["ENV_VAR", "progress_enabled", "progress_bar", "silence_library_bars"]

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


def silence_library_bars() -> None:
    """With ``CONCEPTLM_NO_PROGRESS=1``, switch off the bars of Hugging Face libraries too (transformers' "Loading
    weights", datasets, hub): through their environment variables for modules not imported yet, and directly for
    those already imported. Without the variable, nothing changes."""
    if progress_enabled():
        return
    import sys

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.disable_progress_bar()
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()
