"""SFT config: the shared sections only (see ``conceptlm.core.config``)."""

from __future__ import annotations

from dataclasses import dataclass

from conceptlm.core.config import BaseRunConfig

__all__ = ["SFTConfig"]


@dataclass(kw_only=True)
class SFTConfig(BaseRunConfig):
    """Next-token training on chat JSONL (labels per ``data.label_mode``) or plain text (all tokens)."""
