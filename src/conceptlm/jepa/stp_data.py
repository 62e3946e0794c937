"""Semantic Tube Prediction data: one token sequence per example plus the token pieces of its trajectory.

STP needs no second view: an example is the LM sequence exactly as SFT tokenizes it (so λ = 0 is SFT bit for bit)
and the ranges of it whose hidden states form the trajectory (:mod:`conceptlm.jepa.stp`):

* **chat** records: the content of the last user turn and of the last assistant turn (the reference uses
  ``messages[1]`` / ``messages[2]`` of ``[system, user, assistant]`` records, the same thing there), located by
  character offsets in the rendered chat (:func:`conceptlm.data.chat.content_token_ranges`); ``span_scope`` joins
  them (``e2e``), starts the first one at the sequence start (``all``) or both (``all_e2e``);
* **plain text** (``data.train`` a ``.txt`` file or folder, or an ``hf:`` dataset with a ``text`` column): the
  token blocks of :class:`conceptlm.data.text.TextDataset`, each one piece ``[1, T)`` (the whole block; a block may
  hold a document boundary, an EOS token, and its trajectory runs through it).

A piece ``(a, b)`` always has ``a ≥ 1``: its first increment starts from the hidden state of token ``a − 1``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from conceptlm.core.errors import DataError
from conceptlm.data.chat import ChatDataset, content_token_ranges, tokenize_chat
from conceptlm.data.templates import end_of_turn_ids
from conceptlm.jepa.data import fitting_examples
from conceptlm.jepa.stp import trajectory_length

__all__ = ["SPAN_SCOPES", "StpExample", "build_stp_example", "StpChatDataset", "StpTextDataset"]


SPAN_SCOPES = ("content", "e2e", "all", "all_e2e")


@dataclass(frozen=True)
class StpExample:
    """One STP training example.

    Attributes:
        lm_ids: (n,) token ids of the LM sequence.
        lm_labels: (n,) unshifted LM labels, -100 = not a target.
        pieces: the trajectory's token ranges ``((a, b), ...)``, ordered, ``1 ≤ a < b ≤ n``.
        index: the example's position in its dataset (keys its per-step span draw; None = its batch position).
    """

    lm_ids: tuple[int, ...]
    lm_labels: tuple[int, ...]
    pieces: tuple[tuple[int, int], ...]
    index: int | None = None

    @property
    def trajectory_len(self) -> int:
        """N, the virtual tokens of the trajectory."""
        return trajectory_length(self.pieces)


def _scope_pieces(user: tuple[int, int], answer: tuple[int, int], scope: str) -> tuple[tuple[int, int], ...]:
    (us, ue), (as_, ae) = user, answer
    if scope == "content":
        pieces = [(us, ue), (as_, ae)]
    elif scope == "e2e":
        pieces = [(us, ae)]
    elif scope == "all":
        pieces = [(1, ue), (as_, ae)]
    elif scope == "all_e2e":
        pieces = [(1, ae)]
    else:
        raise ValueError(f"span_scope must be one of {', '.join(SPAN_SCOPES)}, got {scope!r}")
    return tuple((max(a, 1), b) for a, b in pieces if b > max(a, 1))


def build_stp_example(messages: Sequence[dict], tokenizer, *, span_scope: str = "content",
                      label_mode: str = "assistant", index: int | None = None,
                      eot_ids: Sequence[int] | None = None) -> StpExample:
    """The STP example of one validated chat (``[system?, user, …, assistant]`` messages).

    The LM sequence and labels are :func:`conceptlm.data.chat.tokenize_chat`'s; the pieces come from the last
    assistant turn and the last user turn before it (see the module docstring).

    Raises:
        DataError: no user turn before the last assistant turn, a content the template drops, or any
            ``tokenize_chat`` error (no path/line: the dataset adds them).
    """
    lm = tokenize_chat(tokenizer, messages, label_mode=label_mode, eot_ids=eot_ids)
    ids, ranges = content_token_ranges(tokenizer, messages)
    if ids != lm["input_ids"]:  # the same rendering and encoding; guards against a nondeterministic template
        raise DataError("the chat renders differently on two calls (a template with side effects?)",
                        field="messages")
    a = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    users = [i for i in range(a) if messages[i]["role"] == "user"]
    if not users:
        raise DataError("no user message before the last assistant message (STP's trajectory starts there)",
                        field="messages")
    u = users[-1]
    for i in (u, a):
        if ranges[i] is None:
            raise DataError("cannot locate this content in the chat-template rendering", field=f"messages[{i}].content")
    return StpExample(tuple(ids), tuple(lm["labels"]), _scope_pieces(ranges[u], ranges[a], span_scope), index)


class StpChatDataset:
    """STP examples of chat records.

    Args:
        source: a chat JSONL path, or a list of records (message lists or ``{"messages": [...]}`` dicts).
        tokenizer: the run's tokenizer (a chat template).
        span_scope: ``content`` | ``e2e`` | ``all`` | ``all_e2e`` (see the module docstring).
        label_mode: LM targets (``assistant`` or ``all``), as for SFT.
        max_length: the model context; longer sequences follow ``on_too_long``.
        on_too_long: ``error`` (DataError naming file and line) or ``skip`` (counted, warned); truncation is not
            offered (it would cut the assistant turn, and the NTP arm refuses it too).
        limit: read at most this many records.
        name: what errors call an in-memory record list.

    Attributes:
        examples, lengths (LM lengths, for bucketing: the same batches as the NTP arm), skipped, source.
    """

    def __init__(self, source, tokenizer, *, span_scope: str = "content", label_mode: str = "assistant",
                 max_length: int, on_too_long: str = "error", limit: int | None = None, name: str = "<records>"):
        if on_too_long not in ("error", "skip"):
            raise DataError(f"on_too_long={on_too_long!r} is not supported for STP (use error or skip)",
                            field="data.on_too_long")
        if span_scope not in SPAN_SCOPES:
            raise ValueError(f"span_scope must be one of {', '.join(SPAN_SCOPES)}, got {span_scope!r}")
        path, numbered = ChatDataset._load(source, limit, name)
        eot = end_of_turn_ids(tokenizer)

        def examples():
            for line, messages in numbered:
                try:
                    yield line, build_stp_example(messages, tokenizer, span_scope=span_scope, label_mode=label_mode,
                                                  eot_ids=eot)
                except DataError as e:
                    raise DataError(e.reason, path=path, line=line, field=e.field) from None

        self.examples, self.skipped = fitting_examples(examples(), length=lambda ex: len(ex.lm_ids),
                                                       max_length=max_length, on_too_long=on_too_long, path=path,
                                                       what="sequence", noun="records")
        # each kept example's position in the dataset keys its span draws
        self.examples = [dataclasses.replace(ex, index=i) for i, ex in enumerate(self.examples)]
        self.lengths = [len(ex.lm_ids) for ex in self.examples]
        self.source = str(path)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> StpExample:
        return self.examples[i]


class StpTextDataset:
    """STP examples of a token-block dataset (plain text), built on access (the blocks are not copied).

    Args:
        blocks: a dataset of ``{"input_ids", "labels"}`` items (e.g. :class:`conceptlm.data.text.TextDataset`).

    Every item is one piece ``[1, T)``: the trajectory is the whole block.
    """

    def __init__(self, blocks, *, source: str = "<text>"):
        self.blocks = blocks
        lengths = getattr(blocks, "lengths", None)
        if lengths is None:
            lengths = [len(blocks[i]["input_ids"]) for i in range(len(blocks))]
        self.lengths = list(lengths)
        self.source = source
        self.skipped = 0

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> StpExample:
        item = self.blocks[i]
        ids, labels = tuple(int(t) for t in item["input_ids"]), tuple(int(t) for t in item["labels"])
        pieces = ((1, len(ids)),) if len(ids) >= 2 else ()
        return StpExample(ids, labels, pieces, int(i))

