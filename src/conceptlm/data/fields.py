"""Dotted-path field lookup in JSON records (no heavy imports: token-shard workers use it)."""

from __future__ import annotations

import re
from typing import Any

__all__ = ["field_value"]


def field_value(obj: Any, dotted: str) -> Any:
    """``obj`` at a dotted path such as ``messages.1.content`` (integer parts, negative ones too, index lists);
    raises ``KeyError`` naming the first missing part."""
    cur = obj
    for part in dotted.split("."):
        if isinstance(cur, list) and re.fullmatch(r"-?\d+", part):
            i = int(part)
            if not -len(cur) <= i < len(cur):
                raise KeyError(part)
            cur = cur[i]
        elif isinstance(cur, dict) and part in cur:
            cur = cur[part]
        else:
            raise KeyError(part)
    return cur
