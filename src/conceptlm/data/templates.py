"""Chat templates: render a conversation with a tokenizer's template, find the tokens that end a turn.

These belong to the chat-data layer: every chat recipe (SFT, LLM-JEPA views, generation eval) renders through
:func:`render_chat`, so a template quirk is handled once.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

__all__ = ["render_chat", "end_of_turn_ids"]

# Tokens that end a turn in common chat templates; the tokenizer's EOS is always added too.
_END_OF_TURN_CANDIDATES = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")


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
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict], add_generation_prompt: bool = False
) -> str:
    """Render ``messages`` with the tokenizer's chat template as a string.

    Templates that reject a system role (Gemma-style) get the system text folded into the first user turn.
    """
    from jinja2.exceptions import TemplateError

    msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
    try:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt)
    except TemplateError:
        if not msgs or msgs[0]["role"] != "system":
            raise
        return tokenizer.apply_chat_template(
            _merge_system_into_user(msgs), tokenize=False, add_generation_prompt=add_generation_prompt
        )


def end_of_turn_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids that end an assistant turn: known end-of-turn tokens present in the vocab, plus EOS."""
    vocab = tokenizer.get_vocab()
    ids = [vocab[t] for t in _END_OF_TURN_CANDIDATES if t in vocab]
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(ids))
