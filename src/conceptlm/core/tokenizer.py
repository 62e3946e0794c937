"""Tokenizers: train a small byte-level BPE on the fly, with a ChatML template.

Rendering chats and finding end-of-turn tokens live in :mod:`conceptlm.data.templates`.

A tokenizer trained here is a plain ``transformers.PreTrainedTokenizerFast`` with a ChatML chat template, so it
saves with ``save_pretrained`` and loads back with ``AutoTokenizer.from_pretrained``; everything downstream treats
it exactly like a tokenizer a user brings.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence

from transformers import PreTrainedTokenizerFast

__all__ = [
    "CHATML_TEMPLATE",
    "SPECIAL_TOKENS",
    "train_bpe_tokenizer",
]

SPECIAL_TOKENS = {
    "pad_token": "<|pad|>",
    "bos_token": "<|bos|>",
    "eos_token": "<|endoftext|>",
    "unk_token": "<|unk|>",
}
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>"]

# ChatML with a single BOS emitted by the template (the tokenizer itself adds no special tokens, so rendering
# then tokenizing never doubles the BOS). ``{% generation %}`` marks assistant tokens for
# ``return_assistant_tokens_mask``. The newline after an assistant turn is emitted explicitly: chat templates
# render with ``trim_blocks``, which would drop a literal newline right after ``{% endgeneration %}``.
CHATML_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}"
    "<|im_start|>assistant\n{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}{{ '\\n' }}"
    "{% else %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_SURROGATE = re.compile("[\ud800-\udfff]")

MAX_TRAINING_RUN = 256
"""Longest run of non-whitespace (or of whitespace) characters the BPE trainer sees in one piece: longer runs (a
minified file, base64, text in a script written without spaces, a wall of blanks) are fed as consecutive chunks of at
most this many characters. The trainer's time grows with the square of its longest pre-token (200k characters
without whitespace: ~100 s), so this keeps training linear in the corpus size; no useful merge is that long."""
_LONG_RUN = re.compile(rf"\S{{{MAX_TRAINING_RUN + 1},}}|\s{{{MAX_TRAINING_RUN + 1},}}")


def train_bpe_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 2048,
    min_frequency: int = 2,
    extra_special_tokens: Sequence[str] = (),
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer with a ChatML chat template.

    Args:
        texts: training text (any iterable of strings; chat contents, documents, ...).
        vocab_size: target vocabulary size including the special tokens.
        min_frequency: minimum pair frequency for a merge.
        extra_special_tokens: more special tokens to reserve (e.g. predictor tokens).

    Returns:
        A fast tokenizer with pad/bos/eos/unk, ``<|im_start|>``/``<|im_end|>`` and a chat template. Deterministic for
        the same texts and settings.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = list(SPECIAL_TOKENS.values()) + CHAT_TOKENS + [t for t in extra_special_tokens]
    core = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(_encodable(texts), trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        additional_special_tokens=CHAT_TOKENS + list(extra_special_tokens),
        **SPECIAL_TOKENS,
    )
    tok.chat_template = CHATML_TEMPLATE
    tok.padding_side = "right"
    return tok


def _encodable(texts: Iterable[str]) -> Iterator[str]:
    """The training texts, with lone surrogates (unencodable: the tokenizers library raises on them) replaced.

    The tokenizer is trained before the data is validated; the record holding such a string is reported (file, line
    and field) when the dataset is built.
    """
    for text in texts:
        if isinstance(text, str) and _SURROGATE.search(text):
            text = text.encode("utf-8", "replace").decode("utf-8")
        yield from _bounded_runs(text)


def _bounded_runs(text: str) -> Iterator[str]:
    """``text`` as it is, or, when it holds a run of more than :data:`MAX_TRAINING_RUN` non-whitespace (or
    whitespace) characters, as consecutive pieces in which every such run is cut into chunks of at most that length
    (the text around a long run is kept whole). Joined, the pieces are ``text``."""
    if not isinstance(text, str) or len(text) <= MAX_TRAINING_RUN or _LONG_RUN.search(text) is None:
        yield text
        return
    pos = 0
    for m in _LONG_RUN.finditer(text):
        if m.start() > pos:
            yield text[pos:m.start()]
        for i in range(m.start(), m.end(), MAX_TRAINING_RUN):
            yield text[i:min(i + MAX_TRAINING_RUN, m.end())]
        pos = m.end()
    if pos < len(text):
        yield text[pos:]
