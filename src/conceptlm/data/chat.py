"""Chat data: read and validate ``{"messages": [...]}`` JSONL, tokenize chats with label masks, a chat dataset.

A record is one conversation: a list of ``{"role", "content"}`` messages with roles ``system`` (first only),
``user`` and ``assistant``, and at least one assistant message. Every malformed record stops reading with a
:class:`~conceptlm.core.errors.DataError` that names the file, the 1-based line and the field, e.g.
``synth.jsonl:17: field 'messages[2].content': empty content``.

Label masks are found from character offsets of the rendered chat, so they work for any Hugging Face chat
tokenizer, not only the ChatML one of :func:`conceptlm.core.tokenizer.train_bpe_tokenizer`.

The module is long (about 530 lines) because reading, validating and tokenizing share the one definition of a chat
record and its error messages; split, its rules would live in two places.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from conceptlm.core.errors import DataError
from conceptlm.data.fields import field_value  # noqa: F401 - re-exported: the one dotted-path lookup
from conceptlm.data.templates import end_of_turn_ids, render_chat

__all__ = [
    "ROLES",
    "LABEL_MODES",
    "IGNORE_INDEX",
    "validate_messages",
    "read_chat_jsonl",
    "iter_jsonl_objects",
    "field_value",
    "refuse_duplicate_keys",
    "DuplicateKeyError",
    "iter_chat_jsonl",
    "check_encodable",
    "render_or_fail",
    "template_error",
    "tokenize_chat",
    "content_token_ranges",
    "ChatDataset",
]

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
LABEL_MODES = ("assistant", "all")
ON_TOO_LONG = ("error", "skip", "truncate")
IGNORE_INDEX = -100
PROGRESS_MIN_RECORDS = 2000
# A str holding a UTF-16 surrogate code point cannot be encoded as UTF-8 (tokenizers reject it); json.loads
# produces one from an unpaired "\\ud800"-style escape (a valid escaped pair becomes one ordinary character).
_SURROGATE = re.compile("[\ud800-\udfff]")
_MAX_REASON_CHARS = 200
_SENTINELS = ("\u00a7", "\u00b6")  # two different characters that no template rewrites or trims


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "object", list: "list", str: "string", bool: "boolean", int: "integer",
            float: "number"}.get(type(value), type(value).__name__)


def check_encodable(text: str, *, field: str | None = None, path: str | Path | None = None,
                    line: int | None = None) -> None:
    """Raise :class:`DataError` (naming ``path``, ``line``, ``field``) if ``text`` holds a lone surrogate.

    Such a string cannot be encoded as UTF-8, so no tokenizer can encode it; JSON ``"\\ud800"`` escapes that are
    not part of a valid high/low pair produce one.
    """
    m = _SURROGATE.search(text)
    if m is not None:
        raise DataError(f"lone surrogate U+{ord(m.group()):04X} at character {m.start()} cannot be encoded "
                        "(a JSON \\uD800-\\uDFFF escape must be part of a valid surrogate pair)",
                        path=path, line=line, field=field)


def _one_line(err: BaseException) -> str:
    """``Type: message`` of an exception on one line, shortened."""
    text = " ".join(str(err).split()) or "(no message)"
    if len(text) > _MAX_REASON_CHARS:
        text = text[: _MAX_REASON_CHARS - 3] + "..."
    return f"{type(err).__name__}: {text}"


def template_error(err: BaseException, field: str = "messages") -> DataError:
    """The :class:`DataError` for a conversation the chat template refused (no location: callers add it)."""
    return DataError(f"the chat template cannot render this conversation ({_one_line(err)})", field=field)


def render_or_fail(tokenizer, messages: Sequence[dict], *, add_generation_prompt: bool = False,
                   field: str = "messages") -> str:
    """:func:`~conceptlm.data.templates.render_chat`, with any failure of the template (a jinja ``TemplateError``
    such as "Conversation roles must alternate", or any other exception of ``apply_chat_template``) turned into a
    :class:`DataError` on ``field`` (no path/line: the dataset adds them)."""
    try:
        return render_chat(tokenizer, messages, add_generation_prompt=add_generation_prompt)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - any template failure is a property of this record
        raise template_error(e, field) from None


def _encode(tokenizer, text: str, **kwargs):
    """Tokenize a rendered chat; a string the tokenizer cannot encode is a DataError, not a TypeError."""
    try:
        return tokenizer(text, add_special_tokens=False, **kwargs)
    except Exception as e:  # noqa: BLE001
        check_encodable(text, field="messages")
        raise DataError(f"the tokenizer cannot encode this conversation ({_one_line(e)})", field="messages") from None


def validate_messages(messages: Any, *, path: str | Path | None = None, line: int | None = None) -> list[dict]:
    """Check one conversation and return it as clean ``{"role", "content"}`` dicts.

    Args:
        messages: the value of a record's ``"messages"`` field.
        path: file or dataset name for error messages.
        line: 1-based line (or row) for error messages.

    Returns:
        A new list of ``{"role": str, "content": str}`` dicts (other keys of a message are dropped).

    Raises:
        DataError: naming ``path``, ``line`` and the field (``messages``, ``messages[i]``, ``messages[i].role``,
            ``messages[i].content``) when anything is malformed.
    """
    def fail(field: str, reason: str) -> DataError:
        return DataError(reason, path=path, line=line, field=field)

    if not isinstance(messages, list) or not messages:
        got = "an empty list" if isinstance(messages, list) else _type_name(messages)
        raise fail("messages", f"expected a non-empty list of messages, got {got}")
    clean: list[dict] = []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise fail(where, f"expected an object with 'role' and 'content', got {_type_name(msg)}")
        for key in ("role", "content"):
            if msg.get(key) is None:
                raise fail(f"{where}.{key}", f"missing '{key}' (or null)")
        role, content = msg["role"], msg["content"]
        if not isinstance(role, str):
            raise fail(f"{where}.role", f"expected a string, got {_type_name(role)}")
        if role not in ROLES:
            raise fail(f"{where}.role", f"unknown role {role!r} (expected one of {', '.join(ROLES)})")
        if role == "system" and i != 0:
            raise fail(f"{where}.role", "a 'system' message is only allowed as the first message")
        if not isinstance(content, str):
            raise fail(f"{where}.content", f"expected a string, got {_type_name(content)}")
        if not content.strip():
            raise fail(f"{where}.content", "empty content")
        check_encodable(content, path=path, line=line, field=f"{where}.content")
        clean.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in clean):
        raise fail("messages", "no assistant message (nothing to train on)")
    return clean


class DuplicateKeyError(ValueError):
    """A JSON object names the same key twice (``json.loads`` would silently keep the last value)."""

    def __init__(self, key: str):
        self.key = key
        shown = key if len(key) <= 80 else key[:77] + "..."
        super().__init__(f"duplicate key {shown!r} in a JSON object (which value is meant?)")


def refuse_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    """``object_pairs_hook`` for ``json.loads`` that raises :class:`DuplicateKeyError` on a repeated key."""
    obj: dict = {}
    for key, value in pairs:
        if key in obj:
            raise DuplicateKeyError(key)
        obj[key] = value
    return obj


def iter_jsonl_objects(path: str | Path, *, limit: int | None = None) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, object)`` for each JSON-object line of a JSONL file (1-based lines, blank lines skipped).

    Each line is decoded strictly as UTF-8 (a leading byte-order mark is accepted). Raises :class:`DataError`
    naming the file and line for bad bytes, invalid JSON, a key given twice in one object or a line that is not an
    object.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    path = Path(path)
    if not path.is_file():
        raise DataError("file not found", path=path)
    count = 0
    with path.open("rb") as fh:
        for line_no, raw in enumerate(fh, start=1):
            if limit is not None and count >= limit:
                return
            if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"not valid UTF-8 (bad byte at offset {e.start} of the line)",
                                path=path, line=line_no) from None
            if not text.strip():
                continue
            try:
                obj = json.loads(text, object_pairs_hook=refuse_duplicate_keys)
            except DuplicateKeyError as e:
                raise DataError(str(e), path=path, line=line_no) from None
            except json.JSONDecodeError as e:
                raise DataError(f"invalid JSON at column {e.colno}: {e.msg}", path=path, line=line_no) from None
            except RecursionError:
                raise DataError("invalid JSON: nested too deeply", path=path, line=line_no) from None
            except ValueError as e:  # e.g. an integer literal longer than Python's digit limit
                raise DataError(f"invalid JSON: {' '.join(str(e).split())[:_MAX_REASON_CHARS]}", path=path,
                                line=line_no) from None
            if not isinstance(obj, dict):
                raise DataError(f"expected a JSON object per line, got {_type_name(obj)}", path=path, line=line_no)
            yield line_no, obj
            count += 1


def iter_chat_jsonl(path: str | Path, *, limit: int | None = None) -> Iterator[tuple[int, list[dict]]]:
    """Yield ``(line_number, messages)`` for each record of a chat JSONL file (1-based lines, blank lines skipped).

    Raises :class:`DataError` on the first malformed record; see :func:`read_chat_jsonl`.
    """
    for line_no, obj in iter_jsonl_objects(path, limit=limit):
        if "messages" not in obj:
            keys = ", ".join(repr(k) for k in obj) or "none"
            raise DataError(f"missing 'messages' (keys present: {keys})", path=path, line=line_no,
                            field="messages")
        yield line_no, validate_messages(obj["messages"], path=path, line=line_no)


def read_chat_jsonl(path: str | Path, *, limit: int | None = None) -> list[list[dict]]:
    """Read a chat JSONL file: one ``{"messages": [{"role": ..., "content": ...}, ...]}`` object per line.

    Extra top-level keys are ignored; blank lines are skipped. The whole file (up to ``limit`` records) is checked
    before anything is returned.

    Args:
        path: the JSONL file.
        limit: read at most this many records (``None`` = all).

    Returns:
        One list of ``{"role", "content"}`` dicts per record.

    Raises:
        DataError: ``path:line: field '...': reason`` for invalid UTF-8 or JSON, a non-object line, a missing or
            empty ``messages`` list, a bad message, role or content, a misplaced system message, or a record with
            no assistant message. Line-level problems (UTF-8, JSON, non-object) have no field.
    """
    return [msgs for _, msgs in iter_chat_jsonl(path, limit=limit)]


def _find(text: str, needle: str, start: int) -> tuple[int, int]:
    """Find ``needle`` (or its stripped form, for templates that strip contents) in ``text`` from ``start``."""
    pos = text.find(needle, start)
    if pos >= 0:
        return pos, pos + len(needle)
    stripped = needle.strip()
    if stripped and stripped != needle:
        pos = text.find(stripped, start)
        if pos >= 0:
            return pos, pos + len(stripped)
    return -1, -1


def _prompt_prefix(tokenizer, messages: Sequence[dict], i: int) -> str | None:
    """The rendering that comes before the content of assistant message ``i``, or None if it cannot be found.

    ``messages[:i]`` rendered with a generation prompt; for a leading assistant turn (``i == 0``: Hugging Face
    refuses to render an empty conversation) or a template that refuses that prefix conversation, the common prefix
    of ``messages[:i + 1]`` rendered with two different one-character contents in place of message ``i``'s.
    """
    if i > 0:
        try:
            return render_chat(tokenizer, messages[:i], add_generation_prompt=True)
        except Exception:  # noqa: BLE001 - only a locating hint; fall back below
            pass
    renders = []
    for sentinel in _SENTINELS:
        msgs = [dict(m) for m in messages[: i + 1]]
        msgs[i] = {"role": msgs[i]["role"], "content": sentinel}
        try:
            renders.append(render_chat(tokenizer, msgs, add_generation_prompt=False))
        except Exception:  # noqa: BLE001
            return None
    a, b = renders
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return a[:n]


def _content_spans(tokenizer, messages: Sequence[dict], text: str) -> list[tuple[int, int, str]]:
    """Character span of each message's content in the rendered ``text``.

    Assistant turns are located by the prefix property (rendering ``messages[:i]`` with a generation prompt is a
    prefix of ``text``, and the content follows it); when the template breaks that property, by searching the
    content after the previous message's content. Other messages are searched after the previous one, so an
    assistant content that also occurs in a user message is never matched there.

    Returns:
        ``(start, end, how)`` per message; ``how`` is ``"prefix"``, ``"search"`` or ``"missing"`` (start = end = -1;
        only possible for non-assistant messages).

    Raises:
        DataError: field ``messages[i].content`` when an assistant content cannot be located.
    """
    spans: list[tuple[int, int, str]] = []
    cursor = 0
    for i, msg in enumerate(messages):
        how = "search"
        start_at = cursor
        if msg["role"] == "assistant":
            prefix = _prompt_prefix(tokenizer, messages, i)
            if prefix is not None and text.startswith(prefix) and len(prefix) >= cursor:
                start_at, how = len(prefix), "prefix"
        start, end = _find(text, msg["content"], start_at)
        if start < 0 and how == "prefix":  # content rewritten right after the prompt: try a plain search
            start, end = _find(text, msg["content"], cursor)
            how = "search"
        if start < 0:
            if msg["role"] == "assistant":
                raise DataError(
                    "cannot locate this assistant message in the chat-template rendering (does the template "
                    "rewrite or drop assistant contents?)", field=f"messages[{i}].content")
            spans.append((-1, -1, "missing"))
            continue
        spans.append((start, end, how))
        cursor = end
    return spans


def _assistant_token_mask(tokenizer, messages: Sequence[dict], text: str, ids: list[int],
                          offsets: list[tuple[int, int]], eot: set[int]) -> list[bool]:
    """True for the tokens of every assistant content plus its end-of-turn token."""
    spans = _content_spans(tokenizer, messages, text)
    mask = [False] * len(ids)
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        start, end, _ = spans[i]
        # The end-of-turn token must come before the next located message.
        limit = next((s for s, _, how in spans[i + 1:] if how != "missing"), len(text))
        last_content = -1
        for k, (a, b) in enumerate(offsets):
            if a < end and b > start:
                mask[k] = True
                last_content = k
        eot_index = None
        for k in range(last_content + 1, len(ids)):
            a, _ = offsets[k]
            if a >= limit:
                break
            if a >= end and ids[k] in eot:
                eot_index = k
                break
        if eot_index is None:
            raise DataError(
                "no end-of-turn token after this assistant message in the chat-template rendering "
                f"(looked for ids {sorted(eot)})", field=f"messages[{i}].content")
        mask[eot_index] = True
    return mask


def tokenize_chat(tokenizer, messages: Sequence[dict], *, label_mode: str = "assistant",
                  eot_ids: Sequence[int] | None = None) -> dict[str, list[int]]:
    """Render a chat with the tokenizer's template and tokenize it, with a label mask.

    The template adds the BOS itself, so the rendering is tokenized with ``add_special_tokens=False``.

    Args:
        tokenizer: any Hugging Face fast tokenizer with a chat template.
        messages: ``{"role", "content"}`` dicts (see :func:`validate_messages`).
        label_mode: ``"assistant"``: targets are the tokens of each assistant content plus its end-of-turn token;
            ``"all"``: every token except a leading BOS.
        eot_ids: end-of-turn token ids; ``None`` = ``end_of_turn_ids(tokenizer)`` (pass them when tokenizing many
            chats: looking them up reads the whole vocabulary).

    Returns:
        ``{"input_ids": list[int] (T,), "labels": list[int] (T,)}``; labels are not shifted and hold
        ``-100`` where a token is not a target.

    Raises:
        ValueError: unknown ``label_mode``.
        DataError: the chat template cannot render the conversation or the tokenizer cannot encode it (field
            ``messages``), or an assistant span or its end-of-turn token cannot be located (field
            ``messages[i].content``).
    """
    if label_mode not in LABEL_MODES:
        raise ValueError(f"label_mode must be one of {LABEL_MODES}, got {label_mode!r}")
    text = render_or_fail(tokenizer, messages, add_generation_prompt=False)
    enc = _encode(tokenizer, text, return_offsets_mapping=label_mode == "assistant")
    ids = list(enc["input_ids"])
    if label_mode == "all":
        labels = list(ids)
        if ids and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id:
            labels[0] = IGNORE_INDEX
        return {"input_ids": ids, "labels": labels}
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    eot = set(end_of_turn_ids(tokenizer) if eot_ids is None else eot_ids)
    mask = _assistant_token_mask(tokenizer, messages, text, ids, offsets, eot)
    labels = [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]
    return {"input_ids": ids, "labels": labels}


def content_token_ranges(tokenizer, messages: Sequence[dict]) -> tuple[list[int], list[tuple[int, int] | None]]:
    """The tokens of the rendered chat (exactly the ``input_ids`` of :func:`tokenize_chat`) and, per message, the
    token range ``[first, last + 1)`` of its content: the tokens whose character span overlaps the content in the
    rendering (found as for the label mask; a token that straddles the content's edge is included). None for a
    message the template dropped.

    Raises:
        DataError: as :func:`tokenize_chat` (template, encoding, an assistant content that cannot be located).
    """
    text = render_or_fail(tokenizer, messages, add_generation_prompt=False)
    enc = _encode(tokenizer, text, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    ranges: list[tuple[int, int] | None] = []
    for start, end, how in _content_spans(tokenizer, messages, text):
        toks = [] if how == "missing" else [k for k, (a, b) in enumerate(offsets) if a < end and b > start]
        ranges.append((toks[0], toks[-1] + 1) if toks else None)
    return ids, ranges


def _progress(iterable, total: int, desc: str):
    """Wrap in a progress bar for long work (more than 2000 items), unless CONCEPTLM_NO_PROGRESS=1."""
    from conceptlm.core.progress import progress_bar

    return progress_bar(iterable, total=total, desc=desc, unit="rec", enabled=total > PROGRESS_MIN_RECORDS)


class ChatDataset(Dataset):
    """Pre-tokenized chat examples with label masks.

    Args:
        path_or_records: a chat JSONL file, or a list of records (each a list of messages or a
            ``{"messages": [...]}`` dict; errors then name ``name`` and the 1-based index as the line).
        tokenizer: a Hugging Face tokenizer with a chat template.
        label_mode: ``"assistant"`` or ``"all"`` (see :func:`tokenize_chat`).
        max_length: the model context; longer sequences are handled by ``on_too_long``.
        on_too_long: ``"error"`` (DataError naming file, line, field ``messages`` and both lengths), ``"skip"``
            (drop, count in ``.skipped``, log a warning) or ``"truncate"`` (cut on the right).
        limit: read at most this many records.
        name: what errors call a list of records (default ``<records>``; ignored for a file).

    Records left with no target token (after truncation) are dropped and counted in ``.skipped``.

    Attributes:
        source: the file, or ``name`` for a list of records.
        records: the messages of each kept example.
        lengths: token count of each kept example.
        source_lines: the 1-based line (or record index) each kept example came from.
        skipped: number of dropped records.

    Items are ``{"input_ids": list[int] (T,), "labels": list[int] (T,)}``.
    """

    def __init__(self, path_or_records, tokenizer, *, label_mode: str = "assistant", max_length: int,
                 on_too_long: str = "error", limit: int | None = None, name: str | None = None):
        if on_too_long not in ON_TOO_LONG:
            raise ValueError(f"on_too_long must be one of {ON_TOO_LONG}, got {on_too_long!r}")
        if label_mode not in LABEL_MODES:
            raise ValueError(f"label_mode must be one of {LABEL_MODES}, got {label_mode!r}")
        if not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length must be an integer >= 2, got {max_length!r}")
        source, numbered = self._load(path_or_records, limit, name or "<records>")
        self.source = source
        self.label_mode = label_mode
        self.max_length = max_length
        self.records: list[list[dict]] = []
        self.lengths: list[int] = []
        self.source_lines: list[int] = []
        self._items: list[tuple[list[int], list[int]]] = []
        too_long = no_target = 0
        eot_ids = end_of_turn_ids(tokenizer)
        for line, messages in _progress(numbered, len(numbered), f"tokenizing {Path(str(source)).name}"):
            try:
                enc = tokenize_chat(tokenizer, messages, label_mode=label_mode, eot_ids=eot_ids)
            except DataError as e:
                raise DataError(e.reason, path=source, line=line, field=e.field) from None
            ids, labels = enc["input_ids"], enc["labels"]
            if len(ids) > max_length:
                if on_too_long == "error":
                    raise DataError(
                        f"sequence has {len(ids)} tokens, model context is {max_length} (set on_too_long to "
                        "'skip' or 'truncate', or raise the context)", path=source, line=line, field="messages")
                if on_too_long == "skip":
                    too_long += 1
                    continue
                ids, labels = ids[:max_length], labels[:max_length]
            if all(t == IGNORE_INDEX for t in labels):
                no_target += 1
                continue
            self._items.append((ids, labels))
            self.records.append(messages)
            self.lengths.append(len(ids))
            self.source_lines.append(line)
        self.skipped = too_long + no_target
        if self.skipped:
            logger.warning("%s: skipped %d of %d records (%d longer than max_length=%d, %d with no target token "
                           "after truncation)", source, self.skipped, len(numbered), too_long, max_length,
                           no_target)
        if not self._items:
            raise DataError(f"no usable records (read {len(numbered)}, skipped {self.skipped})", path=source)

    @staticmethod
    def _load(path_or_records, limit: int | None, name: str) -> tuple[str | Path, list[tuple[int, list[dict]]]]:
        if isinstance(path_or_records, (str, Path)):
            return path_or_records, list(iter_chat_jsonl(path_or_records, limit=limit))
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0 or None, got {limit}")
        records = list(path_or_records)[:limit]
        numbered = []
        for i, rec in enumerate(records, start=1):
            if isinstance(rec, dict):
                if "messages" not in rec:
                    raise DataError("missing 'messages'", path=name, line=i, field="messages")
                rec = rec["messages"]
            numbered.append((i, validate_messages(rec, path=name, line=i)))
        return name, numbered

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        ids, labels = self._items[index]
        return {"input_ids": list(ids), "labels": list(labels)}
