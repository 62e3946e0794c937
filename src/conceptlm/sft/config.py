"""SFT config: the token-LM run sections only (see ``conceptlm.lm.config``)."""

from __future__ import annotations

from dataclasses import dataclass

from conceptlm.lm.config import LMRunConfig

__all__ = ["SFTConfig"]


@dataclass(kw_only=True)
class SFTConfig(LMRunConfig):
    """Next-token training on chat JSONL (labels per ``data.label_mode``) or plain text (all tokens)."""
