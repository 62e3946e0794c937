"""LLM-JEPA views: turn a record into the LM sequence, the Text view and the Code view, as token ids.

A chat record ``[system?, user, ..., assistant]`` gives three token sequences (LLM-JEPA paper §3):

* LM sequence: the whole chat, rendered and labelled exactly like SFT (:func:`conceptlm.data.chat.tokenize_chat`),
  so with λ = 0 LLM-JEPA is plain SFT.
* Text view: the content of the last user turn (or the record's ``"text"`` field) followed (``after``) or preceded
  (``before``) by ``k`` predictor tokens, rendered with the chat template either with the preceding context exactly as
  in the LM sequence (``text_view="context"``: system prompt and earlier turns) or as a lone user turn
  (``text_view="user_only"``, what the reference code does).
* Code view: the last assistant turn (or the record's ``"code"`` field) rendered ALONE as an assistant message.
  Templates that reject a lone assistant message (Gemma-2 requires the first turn to be a user turn) get it with
  role ``user`` instead — the same fallback as the reference code.

  Templates that give EVERY conversation a system turn (SmolLM2 and Qwen2.5 write a default system prompt,
  Llama-3.1/3.2 a dated system header; see :func:`conceptlm.data.templates.default_system_prompt`) would put into
  a lone assistant turn a system turn that no LM sequence of a record with its own system prompt contains: on
  SYNTH with SmolLM2, "You are a helpful AI assistant named SmolLM, trained by Hugging Face" doubles the Code view
  and Enc(Code) is read in a foreign context. For these templates (``code_view="with_system"``, the default) the
  Code view is the assistant turn under the SAME system turn as the LM sequence: the record's own system message
  when it has one, else the template's default (which the LM sequence then also starts with). That system turn is
  a token prefix of the LM sequence (``code_prefix_len``), so packed mode reads it from the LM tokens and the Code
  view costs only its assistant turn. Templates without such a system turn keep the lone assistant turn (there is
  no foreign context to remove); ``code_view="alone"`` always renders the lone assistant turn (the reference).

Paraphrase groups ``{"views": [s0, s1, ...]}`` (pretraining) give one example per consecutive pair (s_i predicts
s_{i+1}); they are rendered as plain text without a chat template: LM = BOS + s_i + EOS (every token but the BOS is
a target), Text = BOS + s_i + predictors, Code = BOS + s_{i+1}.

The encoder index of a view is derived from the tokenized rendering, never from per-family offsets: the span of the
view's content in the rendered string is found by rendering the same messages with two different one-character
sentinels in place of the content (the common prefix/suffix of the two renderings are the template text around the
content), and the index is that of the last token whose character span ends at or before the content end (the last
predictor for ``after``, the last content token otherwise).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from conceptlm.core.errors import DataError
from conceptlm.data.chat import (
    IGNORE_INDEX,
    check_encodable,
    template_error,
    tokenize_chat,
    validate_messages,
)
from conceptlm.data.templates import default_system_prompt, render_chat, token_id
from conceptlm.jepa.config import ViewConfig

__all__ = [
    "JepaExample",
    "predictor_token",
    "add_predictor_tokens",
    "build_views",
    "common_prefix_len",
]

_SENTINELS = ("\u00a7", "\u00b6")  # two different characters that no template rewrites or trims


def predictor_token(i: int) -> str:
    """The string of predictor token ``i`` (1-based): ``<|predictor_i|>``."""
    return f"<|predictor_{i}|>"


@dataclass(frozen=True)
class JepaExample:
    """Token views of one training example.

    Attributes:
        lm_ids: (n,) LM sequence.
        lm_labels: (n,) unshifted LM labels, -100 = not a target.
        text_ids: Text view tokens.
        text_enc: index into ``text_ids`` where Enc(Text) (or Pred(Enc(Text))) is read.
        code_ids: Code view tokens.
        code_enc: index into ``code_ids`` where Enc(Code) is read.
        text_prefix_len: p = length of the longest common prefix of ``text_ids[:text_enc + 1]`` and ``lm_ids``
            (token ids); packed mode shares these p LM tokens with the Text view.
        pred_is_text: True for ``text_to_code`` (Text is the predicting view), False for ``code_to_text``.
        code_prefix_len: q = LM tokens packed mode shares with the Code view: the common prefix of
            ``code_ids[:code_enc + 1]`` and ``lm_ids`` when the Code view carries the LM sequence's system turn,
            else 0.
        num_predictors, predictor_position, text_view, code_view: the :class:`ViewConfig` the example was built
            with (None when unknown), recorded so that trainers can check their settings against the data.
    """

    lm_ids: tuple[int, ...]
    lm_labels: tuple[int, ...]
    text_ids: tuple[int, ...]
    text_enc: int
    code_ids: tuple[int, ...]
    code_enc: int
    text_prefix_len: int
    pred_is_text: bool = True
    code_prefix_len: int = 0
    num_predictors: int | None = None
    predictor_position: str | None = None
    text_view: str | None = None
    code_view: str | None = None

    @property
    def text_remainder(self) -> tuple[int, ...]:
        """R_T: the Text tokens after the shared prefix, up to and including the Enc token."""
        return self.text_ids[self.text_prefix_len: self.text_enc + 1]

    @property
    def code_remainder(self) -> tuple[int, ...]:
        """C: the Code tokens after the shared prefix, up to and including the Enc token."""
        return self.code_ids[self.code_prefix_len: self.code_enc + 1]

    @property
    def packed_len(self) -> int:
        """Slots of this example in packed mode: n + |R_T| + |C|."""
        return len(self.lm_ids) + len(self.text_remainder) + len(self.code_remainder)

    @property
    def max_position(self) -> int:
        """Largest position id any view uses + 1 (must fit the model context)."""
        return max(len(self.lm_ids), len(self.text_ids), len(self.code_ids))


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token-id sequences."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def add_predictor_tokens(tokenizer, model=None, k: int = 1) -> list[int]:
    """Add ``<|predictor_1|>`` … ``<|predictor_k|>`` as special tokens (those missing) and resize ``model``.

    New embedding rows are the mean of the existing rows (``conceptlm.core.hf.resize_token_embeddings``,
    init="mean"), as the reference's ``mean_resizing``. Idempotent.

    Args:
        tokenizer: a Hugging Face fast tokenizer (modified in place).
        model: HF causal LM (or PeftModel) to resize to ``len(tokenizer)`` rows if it has fewer; None = tokenizer
            only.
        k: number of predictor tokens.

    Returns:
        The k predictor token ids, ``[id(<|predictor_1|>), …, id(<|predictor_k|>)]``.
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    names = [predictor_token(i) for i in range(1, k + 1)]
    vocab = tokenizer.get_vocab()
    missing = [t for t in names if t not in vocab]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    if model is not None:
        from conceptlm.core.hf import resize_token_embeddings

        current = model.get_input_embeddings().weight.shape[0]
        if current < len(tokenizer):
            resize_token_embeddings(model, len(tokenizer), init="mean")
    return [tokenizer.convert_tokens_to_ids(t) for t in names]


def _check_predictors(tokenizer, k: int) -> None:
    missing = [predictor_token(i) for i in range(1, k + 1) if token_id(tokenizer, predictor_token(i)) is None]
    if missing:
        raise ValueError(f"tokenizer lacks predictor tokens {missing}; call add_predictor_tokens(tokenizer, model, k) "
                         "first")


def _with_predictors(content: str, k: int, position: str) -> str:
    if k == 0:
        return content
    if position == "after":
        return content + "".join(predictor_token(i) for i in range(k, 0, -1))
    return "".join(predictor_token(i) for i in range(1, k + 1)) + content


def _render_messages(tokenizer, messages: list[dict]) -> str:
    """Render with the chat template; a lone assistant message the template rejects is rendered as a user turn.

    Raises:
        DataError: field ``messages`` when the template cannot render the view (any exception of the template).
    """
    from jinja2.exceptions import TemplateError

    try:
        return render_chat(tokenizer, messages, add_generation_prompt=False)
    except TemplateError as e:
        if not (len(messages) == 1 and messages[0]["role"] == "assistant"):
            raise template_error(e) from None
        first = e
    except Exception as e:  # noqa: BLE001 - any template failure is a property of this record
        raise template_error(e) from None
    try:
        return render_chat(tokenizer, [{"role": "user", "content": messages[0]["content"]}],
                           add_generation_prompt=False)
    except Exception as e:  # noqa: BLE001
        raise template_error(first if isinstance(e, TemplateError) else e) from None


def _render_with_span(tokenizer, messages: list[dict], index: int) -> tuple[str, int, int]:
    """Render ``messages`` and find the character span of ``messages[index]``'s content in the rendering.

    Returns:
        (rendered text, content start, content end).
    """
    def render(content: str) -> str:
        msgs = [dict(m) for m in messages]
        msgs[index] = {"role": msgs[index]["role"], "content": content}
        return _render_messages(tokenizer, msgs)

    text = render(messages[index]["content"])
    a, b = render(_SENTINELS[0]), render(_SENTINELS[1])
    pre = common_prefix_len(a, b)
    suf = common_prefix_len(a[::-1], b[::-1])
    start, end = pre, len(text) - suf
    if not (text.startswith(a[:pre]) and text.endswith(a[len(a) - suf:]) and end > start):
        raise DataError("cannot locate the view content in the chat-template rendering (does the template rewrite "
                        "contents?)", field=f"messages[{index}].content")
    return text, start, end


def _tokenize_view(tokenizer, text: str, start: int, end: int, override: int | None,
                   what: str) -> tuple[tuple[int, ...], int]:
    """Tokenize a rendered view and return (ids, Enc index)."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = tuple(int(t) for t in enc["input_ids"])
    if not ids:
        raise DataError(f"the {what} view tokenizes to nothing", field=what)
    if override is not None:
        idx = len(ids) + override
        if idx < 0:
            raise DataError(f"enc_index_override={override} points before the start of the {what} view "
                            f"({len(ids)} tokens)", field=what)
        return ids, idx
    idx = -1
    for k, (_, b) in enumerate(enc["offset_mapping"]):
        if b <= end and b > start:
            idx = k
    if idx < 0:
        raise DataError(f"no token of the {what} view ends inside its content span [{start}, {end}) of the "
                        f"rendering", field=what)
    return ids, idx


def _plain_view(tokenizer, content: str, *, eos: bool) -> tuple[str, int, int]:
    bos = tokenizer.bos_token or ""
    text = bos + content + ((tokenizer.eos_token or "") if eos else "")
    return text, len(bos), len(bos) + len(content)


def _example(tokenizer, cfg: ViewConfig, lm_ids, lm_labels, text_r, code_r, *,
             code_shares_system: bool = False) -> JepaExample:
    text_ids, text_enc = _tokenize_view(tokenizer, *text_r, cfg.enc_index_override, "text")
    code_ids, code_enc = _tokenize_view(tokenizer, *code_r, cfg.enc_index_override, "code")
    p = common_prefix_len(text_ids[: text_enc + 1], lm_ids)
    q = common_prefix_len(code_ids[: code_enc + 1], lm_ids) if code_shares_system else 0
    return JepaExample(lm_ids=tuple(lm_ids), lm_labels=tuple(lm_labels), text_ids=text_ids, text_enc=text_enc,
                       code_ids=code_ids, code_enc=code_enc, text_prefix_len=p,
                       pred_is_text=cfg.direction == "text_to_code", code_prefix_len=q,
                       num_predictors=cfg.num_predictors, predictor_position=cfg.predictor_position,
                       text_view=cfg.text_view, code_view=cfg.code_view)


def _content_field(record: Mapping, key: str) -> str | None:
    if key not in record:
        return None
    value = record[key]
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"expected a non-empty string, got {value!r:.40}", field=key)
    check_encodable(value, field=key)
    return value


def _chat_example(tokenizer, messages: list[dict], cfg: ViewConfig, text: str | None,
                  code: str | None) -> JepaExample:
    a = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    users = [i for i in range(a) if messages[i]["role"] == "user"]
    if not users:
        raise DataError("no user message before the last assistant message (the Text view needs one)",
                        field="messages")
    u = users[-1]
    text_content = messages[u]["content"] if text is None else text
    code_content = messages[a]["content"] if code is None else code
    k, pos = cfg.num_predictors, cfg.predictor_position
    if cfg.direction == "text_to_code":
        text_content = _with_predictors(text_content, k, pos)
    else:
        code_content = _with_predictors(code_content, k, pos)
    if cfg.text_view == "context":
        text_msgs = [dict(m) for m in messages[: u + 1]]
        text_msgs[u] = {"role": "user", "content": text_content}
        text_idx = u
    else:
        text_msgs, text_idx = [{"role": "user", "content": text_content}], 0
    lm = tokenize_chat(tokenizer, messages, label_mode=cfg.label_mode)
    text_r = _render_with_span(tokenizer, text_msgs, text_idx)
    code_msgs = _code_messages(tokenizer, messages, code_content, cfg)
    code_r = _render_with_span(tokenizer, code_msgs, len(code_msgs) - 1)
    return _example(tokenizer, cfg, lm["input_ids"], lm["labels"], text_r, code_r,
                    code_shares_system=cfg.code_view == "with_system" and _has_system_turn(tokenizer))


def _has_system_turn(tokenizer) -> bool:
    """Whether the template writes a system turn into every conversation (cached per template)."""
    key = (tokenizer.chat_template, tokenizer.bos_token, tokenizer.eos_token)
    if key not in _SYSTEM_TURN_CACHE:
        _SYSTEM_TURN_CACHE[key] = default_system_prompt(tokenizer) is not None
    return _SYSTEM_TURN_CACHE[key]


_SYSTEM_TURN_CACHE: dict[tuple, bool] = {}


def _code_messages(tokenizer, messages: list[dict], code_content: str, cfg: ViewConfig) -> list[dict]:
    """The messages the Code view renders: the assistant turn, under the LM sequence's system message when the
    template gives every conversation a system turn (``code_view="with_system"``, see the module docstring)."""
    turn = {"role": "assistant", "content": code_content}
    if cfg.code_view == "with_system" and messages[0]["role"] == "system" and _has_system_turn(tokenizer):
        return [{"role": "system", "content": messages[0]["content"]}, turn]
    return [turn]


def _group_examples(tokenizer, views: Sequence[str], cfg: ViewConfig) -> list[JepaExample]:
    out = []
    k, pos = cfg.num_predictors, cfg.predictor_position
    for i in range(len(views) - 1):
        src, dst = views[i], views[i + 1]
        if cfg.direction == "text_to_code":
            src_p, dst_p = _with_predictors(src, k, pos), dst
        else:
            src_p, dst_p = src, _with_predictors(dst, k, pos)
        lm_text = _plain_view(tokenizer, src, eos=True)[0]
        lm_ids = [int(t) for t in tokenizer(lm_text, add_special_tokens=False)["input_ids"]]
        labels = list(lm_ids)
        if lm_ids and tokenizer.bos_token_id is not None and lm_ids[0] == tokenizer.bos_token_id:
            labels[0] = IGNORE_INDEX
        out.append(_example(tokenizer, cfg, lm_ids, labels, _plain_view(tokenizer, src_p, eos=False),
                            _plain_view(tokenizer, dst_p, eos=False)))
    return out


def build_views(record, tokenizer, config: ViewConfig | None = None, *, path=None,
                line: int | None = None) -> list[JepaExample]:
    """Build the LLM-JEPA token views of one record.

    Args:
        record: one of
            * a list of ``{"role", "content"}`` messages (system?, user, …, assistant);
            * ``{"messages": [...], "text": str?, "code": str?}`` — ``text``/``code`` replace the user / assistant
              content in the Text / Code views (the LM sequence stays the chat), e.g. HellaSwag's context and gold
              ending;
            * ``{"views": [s0, s1, …]}`` — a paraphrase group (≥ 2 strings), plain-text rendering.
        tokenizer: HF fast tokenizer with a chat template (chat records) and the predictor tokens if k > 0.
        config: view settings (default ``ViewConfig()``).
        path, line: where the record came from, for error messages.

    Returns:
        One :class:`JepaExample` for a chat record; ``len(views) - 1`` for a paraphrase group.

    Raises:
        DataError: malformed record, or a view whose content cannot be located; names ``path``, ``line`` and the
            field.
        ValueError: the tokenizer lacks the predictor tokens.
    """
    cfg = config or ViewConfig()
    _check_predictors(tokenizer, cfg.num_predictors)
    try:
        if isinstance(record, Mapping) and "views" in record:
            views = record["views"]
            if not isinstance(views, list) or len(views) < 2:
                raise DataError("a paraphrase group needs a list of at least 2 strings", field="views")
            for i, v in enumerate(views):
                if not isinstance(v, str) or not v.strip():
                    raise DataError(f"expected a non-empty string, got {v!r:.40}", field=f"views[{i}]")
                check_encodable(v, field=f"views[{i}]")
            return _group_examples(tokenizer, views, cfg)
        if isinstance(record, Mapping):
            if "messages" not in record:
                keys = ", ".join(repr(k) for k in record) or "none"
                raise DataError(f"expected 'messages' or 'views' (keys present: {keys})", field="messages")
            messages = validate_messages(record["messages"], path=path, line=line)
            text, code = _content_field(record, "text"), _content_field(record, "code")
        else:
            messages, text, code = validate_messages(record, path=path, line=line), None, None
        return [_chat_example(tokenizer, messages, cfg, text, code)]
    except DataError as e:
        if e.path is not None:
            raise
        raise DataError(e.reason, path=path, line=line, field=e.field) from None
