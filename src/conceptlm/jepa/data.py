"""LLM-JEPA datasets: records (chat JSONL, explicit text/code fields, paraphrase groups) -> JepaExample views."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from conceptlm.core.errors import DataError
from conceptlm.data.chat import iter_jsonl_objects
from conceptlm.jepa.config import ViewConfig
from conceptlm.jepa.views import JepaExample, build_views

__all__ = ["JepaDataset"]

log = logging.getLogger(__name__)


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
        self.examples: list[JepaExample] = []
        self.skipped = 0
        for line, record in numbered:
            for ex in build_views(record, tokenizer, config, path=path, line=line):
                if ex.max_position > max_length:
                    if on_too_long == "error":
                        raise DataError(f"a view has {ex.max_position} tokens, model context is {max_length} "
                                        "(set data.on_too_long=skip or raise data.max_length)", path=path,
                                        line=line, field="messages")
                    self.skipped += 1
                    continue
                self.examples.append(ex)
        if self.skipped:
            log.warning("%s: skipped %d examples longer than max_length=%d", path, self.skipped, max_length)
        if not self.examples:
            raise DataError(f"no usable records (skipped {self.skipped})", path=path)
        # Batches are bucketed by the LM length (the packed row length follows it closely), so an NTP baseline
        # (lam=0) and a JEPA run of the same data see exactly the same batches.
        self.lengths = [len(ex.lm_ids) for ex in self.examples]
        self.source = str(path)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> JepaExample:
        return self.examples[i]
