"""Chat templates: render a conversation with a tokenizer's template, find the tokens that end a turn.

These belong to the chat-data layer: every chat recipe (SFT, LLM-JEPA views, generation eval) renders through
:func:`render_chat`, so a template quirk is handled once.

Reproducible renderings. Some templates read the clock: Llama-3.1/3.2 write "Today Date: <date_string>" into
their system header, taking ``date_string`` from ``strftime_now("%d %b %Y")`` when the caller does not pass one.
Token ids (and every cache built from them) would then change with the day a run starts. :func:`render_chat`
therefore always renders with a pinned date: ``date_string`` is passed, and every ``strftime_now('<format>')`` call
of the template is replaced by that date in that format before rendering (transformers turns functions passed as
template variables into inert strings, so the clock function itself cannot be swapped). A template that calls
``strftime_now`` with anything but a string literal cannot be pinned and is refused with a clear error. The date is,
in order, the ``date`` argument, the one recorded on the tokenizer by
:func:`pin_template_date` (saved with the tokenizer: it lives in ``init_kwargs``, so ``save_pretrained`` /
``from_pretrained`` keep it), or :data:`DEFAULT_TEMPLATE_DATE` — "26 Jul 2024", the value Llama-3's own template
falls back to when it has no clock.
"""

from __future__ import annotations

import datetime as _dt
import functools
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: validating a config (lm.config) parses dates without loading transformers
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "DEFAULT_TEMPLATE_DATE",
    "parse_template_date",
    "pin_template_date",
    "template_date",
    "render_chat",
    "default_system_prompt",
    "end_of_turn_ids",
    "token_id",
]

DEFAULT_TEMPLATE_DATE = "26 Jul 2024"
"""The date chat templates see unless configured otherwise (``tokenizer.template_date``)."""

_DATE_KEY = "conceptlm_template_date"  # tokenizer.init_kwargs key: saved in tokenizer_config.json
_DATE_FORMATS = ("%d %b %Y", "%Y-%m-%d")

# Tokens that end a turn in common chat templates; the tokenizer's EOS is always added too.
_END_OF_TURN_CANDIDATES = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")
_PROBE = "\u00a7"  # a one-character content no template rewrites


@functools.lru_cache(maxsize=64)
def parse_template_date(value: str) -> _dt.datetime:
    """Parse a template date written "26 Jul 2024" or "2024-07-26" (midnight of that day).

    Raises:
        ValueError: any other form (the message lists the accepted ones).
    """
    if isinstance(value, str):
        for fmt in _DATE_FORMATS:
            try:
                return _dt.datetime.strptime(value.strip(), fmt)
            except ValueError:
                continue
    raise ValueError(f"template date {value!r} is not a date like '26 Jul 2024' or '2024-07-26'")


def pin_template_date(tokenizer: PreTrainedTokenizerBase, date: str) -> None:
    """Record the date the chat template of ``tokenizer`` sees (kept by ``save_pretrained``).

    Args:
        tokenizer: a Hugging Face tokenizer (modified in place).
        date: "26 Jul 2024" or "2024-07-26".
    """
    parse_template_date(date)
    tokenizer.init_kwargs[_DATE_KEY] = date


def template_date(tokenizer: PreTrainedTokenizerBase, date: str | None = None) -> _dt.datetime:
    """The date a rendering with ``tokenizer`` uses: ``date``, else the pinned one, else the default."""
    if date is None:
        date = (getattr(tokenizer, "init_kwargs", None) or {}).get(_DATE_KEY, DEFAULT_TEMPLATE_DATE)
    return parse_template_date(date)


# strftime_now('<format>') / strftime_now("<format>") with a literal format
_STRFTIME_CALL = re.compile(r"""strftime_now\(\s*(?P<q>['"])(?P<fmt>(?:(?!(?P=q)).)*)(?P=q)\s*\)""")


@functools.lru_cache(maxsize=32)
def _pinned_template(template: str, day: _dt.datetime) -> str:
    """``template`` with each ``strftime_now('<format>')`` call replaced by the string literal of ``day``."""

    def literal(match: re.Match) -> str:
        text = day.strftime(match["fmt"])
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'

    pinned = _STRFTIME_CALL.sub(literal, template)
    if "strftime_now(" in pinned:
        raise ValueError("the chat template calls strftime_now() with a format that is not a string literal; its "
                         "date cannot be pinned (edit tokenizer.chat_template to pass a literal format)")
    return pinned


def _apply(tokenizer: PreTrainedTokenizerBase, messages: list[dict], add_generation_prompt: bool,
           day: _dt.datetime) -> str:
    template = tokenizer.get_chat_template()
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         chat_template=_pinned_template(template, day),
                                         date_string=day.strftime("%d %b %Y"))


def _merge_system_into_user(messages: Sequence[dict]) -> list[dict]:
    """Fold a leading system message into the first user turn (for templates that reject a system role)."""
    if not messages or messages[0]["role"] != "system":
        return list(messages)
    system, rest = messages[0], list(messages[1:])
    if rest and rest[0]["role"] == "user":
        rest[0] = {"role": "user", "content": f"{system['content']}\n\n{rest[0]['content']}"}
        return rest
    return [{"role": "user", "content": system["content"]}] + rest


def render_chat(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict], add_generation_prompt: bool = False, *,
    date: str | None = None,
) -> str:
    """Render ``messages`` with the tokenizer's chat template as a string.

    Templates that reject a system role (Gemma-style) get the system text folded into the first user turn. The
    template sees a pinned date, never the clock (see the module docstring): ``date`` if given, else the date
    recorded by :func:`pin_template_date`, else :data:`DEFAULT_TEMPLATE_DATE`.
    """
    from jinja2.exceptions import TemplateError

    day = template_date(tokenizer, date)
    msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
    try:
        return _apply(tokenizer, msgs, add_generation_prompt, day)
    except TemplateError:
        if not msgs or msgs[0]["role"] != "system":
            raise
        return _apply(tokenizer, _merge_system_into_user(msgs), add_generation_prompt, day)


def default_system_prompt(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The system prompt the chat template writes into a conversation that has no system message.

    Found by rendering a lone assistant turn and the same turn after a system message whose content is a probe
    character: when the lone rendering is the second one with the probe replaced by some text D, the template
    gives every conversation a system turn and D is its default content — SmolLM2's "You are a helpful AI
    assistant named SmolLM, …", Qwen2.5's "You are Qwen, …", or "" for Llama-3's dated header without a prompt.

    Returns:
        D, or None when a conversation without a system message gets no system turn (ChatML without a default,
        OLMo-2, or a template that rejects the system role, such as Gemma-2's).
    """
    day = template_date(tokenizer)
    turn = {"role": "assistant", "content": "x"}
    try:
        lone = _apply(tokenizer, [turn], False, day)
        with_system = _apply(tokenizer, [{"role": "system", "content": _PROBE}, turn], False, day)
    except Exception:  # noqa: BLE001 - a template that refuses either conversation injects nothing we can use
        return None
    at = with_system.find(_PROBE)
    if at < 0:
        return None
    head, tail = with_system[:at], with_system[at + len(_PROBE):]
    if len(lone) >= len(head) + len(tail) and lone.startswith(head) and lone.endswith(tail):
        return lone[len(head): len(lone) - len(tail)]
    return None


def token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int | None:
    """The id of ``token`` in the vocabulary (added tokens included), or None when it is not there.

    One lookup, not ``get_vocab()``: building the vocabulary dict of a 49k-token tokenizer costs ~0.1 s.
    """
    inner = getattr(tokenizer, "_tokenizer", None)
    if inner is not None and hasattr(inner, "token_to_id"):  # fast tokenizers
        return inner.token_to_id(token)
    return tokenizer.get_vocab().get(token)


def end_of_turn_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids that end an assistant turn: known end-of-turn tokens present in the vocab, plus EOS."""
    ids = [i for i in (token_id(tokenizer, t) for t in _END_OF_TURN_CANDIDATES) if i is not None]
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(ids))
