"""LLM-JEPA datasets: records (chat JSONL, explicit text/code fields, paraphrase groups) -> JepaExample views."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TypeVar

from conceptlm.core.errors import DataError
from conceptlm.data.chat import iter_jsonl_objects
from conceptlm.jepa.config import ViewConfig
from conceptlm.jepa.views import JepaExample, build_views

__all__ = ["JepaDataset"]

log = logging.getLogger(__name__)
T = TypeVar("T")


def fitting_examples(numbered: Iterable[tuple[int, T]], *, length: Callable[[T], int], max_length: int,
                     on_too_long: str, path: str | Path, what: str, noun: str) -> tuple[list[T], int]:
    """``(examples, skipped)``: the ``(line, example)`` pairs whose ``length(example)`` fits ``max_length``. A longer
    one is a one-line DataError naming ``path`` and its line (``on_too_long="error"``) or skipped, counted and
    warned about (``"skip"``); no example left is an error. ``what`` / ``noun`` word the messages."""
    kept: list[T] = []
    skipped = 0
    for line, ex in numbered:
        n = length(ex)
        if n > max_length:
            if on_too_long == "error":
                raise DataError(f"{what} has {n} tokens, model context is {max_length} (set data.on_too_long=skip "
                                "or raise data.max_length)", path=path, line=line, field="messages")
            skipped += 1
            continue
        kept.append(ex)
    if skipped:
        log.warning("%s: skipped %d %s longer than max_length=%d", path, skipped, noun, max_length)
    if not kept:
        raise DataError(f"no usable records (skipped {skipped})", path=path)
    return kept, skipped


class JepaDataset:
    """Pre-built JEPA views of every record.

    Args:
        source: a JSONL path, or a list of records (message lists or dicts).
        tokenizer: the run's tokenizer (with the predictor tokens when k > 0).
        config: view settings.
        max_length: no view may use a position >= max_length (the model context).
        on_too_long: "error" (DataError naming file/line) or "skip" (counted, warned). Truncating would cut the
            predictor or the answer, so it is not offered.
        name: what error messages call an in-memory record list.

    Attributes:
        examples: list of :class:`JepaExample`; ``lengths``: bucketing length per example; ``skipped``: count.
    """

    def __init__(self, source, tokenizer, config: ViewConfig, *, max_length: int, on_too_long: str = "error",
                 limit: int | None = None, name: str = "<records>"):
        if on_too_long not in ("error", "skip"):
            raise DataError(f"on_too_long={on_too_long!r} is not supported for JEPA views (use error or skip)",
                            field="data.on_too_long")
        if isinstance(source, (str, Path)):
            path: str | Path = source
            numbered: Sequence[tuple[int, object]] = list(iter_jsonl_objects(source, limit=limit))
        else:
            path = name
            numbered = list(enumerate(list(source)[:limit], start=1))
        views = ((line, ex) for line, record in numbered
                 for ex in build_views(record, tokenizer, config, path=path, line=line))
        self.examples, self.skipped = fitting_examples(views, length=lambda ex: ex.max_position,
                                                       max_length=max_length, on_too_long=on_too_long, path=path,
                                                       what="a view", noun="examples")
        # Batches are bucketed by the LM length (the packed row length follows it closely), so an NTP baseline
        # (lam=0) and a JEPA run of the same data see exactly the same batches.
        self.lengths = [len(ex.lm_ids) for ex in self.examples]
        self.source = str(path)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> JepaExample:
        return self.examples[i]
