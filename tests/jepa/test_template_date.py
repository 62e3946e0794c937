"""Reproducible tokenization: chat templates that read the clock see a pinned date (``tokenizer.template_date``).

The templates here call ``strftime_now`` directly, and Llama-3-style through ``date_string``. The clock is moved
with monkeypatch (transformers' ``strftime_now`` reads ``datetime.now()``): the template itself follows the clock,
while ``render_chat``, ``tokenize_chat`` and the LLM-JEPA views give identical renderings and token ids with the
pinned date — the default "26 Jul 2024", one recorded on the tokenizer (kept by save_pretrained), or an explicit
argument.
"""

from __future__ import annotations

import datetime as dt
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import transformers.utils.chat_template_utils as ctu  # noqa: E402

from conceptlm.core.errors import ConfigError  # noqa: E402
from conceptlm.core.hf import load_tokenizer  # noqa: E402
from conceptlm.core.tokenizer import train_bpe_tokenizer  # noqa: E402
from conceptlm.data.chat import tokenize_chat  # noqa: E402
from conceptlm.data.templates import (  # noqa: E402
    DEFAULT_TEMPLATE_DATE,
    parse_template_date,
    pin_template_date,
    render_chat,
)
from conceptlm.jepa.config import ViewConfig  # noqa: E402
from conceptlm.jepa.views import build_views  # noqa: E402
from conceptlm.lm.config import TokenizerSection  # noqa: E402

CLOCK = ("{{ bos_token }}<|im_start|>system\nToday is {{ strftime_now('%d %B %Y') }}.<|im_end|>\n"
         "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
         "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
LLAMA3_DATE = ("{{ bos_token }}{%- if not date_string is defined %}{%- if strftime_now is defined %}"
               "{%- set date_string = strftime_now('%d %b %Y') %}{%- else %}{%- set date_string = '26 Jul 2024' %}"
               "{%- endif %}{%- endif %}<|im_start|>system\nToday Date: {{ date_string }}<|im_end|>\n"
               "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
               "{% endfor %}")
CHAT = [{"role": "user", "content": "lines with words"}, {"role": "assistant", "content": "(a|b)*"}]
CORPUS = ["Today is the day, lines with words (a|b)* January March July December 2024 2031"] * 40


class _Clock:
    """Stand-in for ``datetime.datetime`` in transformers' chat-template module: ``now()`` is settable."""

    current = dt.datetime(2031, 3, 5, 14, 30)

    @classmethod
    def now(cls, tz=None):
        return cls.current


@pytest.fixture
def clock(monkeypatch):
    monkeypatch.setattr(ctu, "datetime", _Clock)

    def set_day(day: dt.datetime) -> None:
        monkeypatch.setattr(_Clock, "current", day)

    return set_day


@pytest.fixture(scope="module", params=["clock", "llama3"])
def tok(request):
    t = train_bpe_tokenizer(CORPUS, vocab_size=320)
    t.chat_template = CLOCK if request.param == "clock" else LLAMA3_DATE
    return t


def _raw(tok) -> str:
    return tok.apply_chat_template(CHAT, tokenize=False)


def test_rendering_ignores_the_clock(tok, clock):
    clock(dt.datetime(2031, 3, 5))
    raw_a, a = _raw(tok), render_chat(tok, CHAT)
    ids_a = tokenize_chat(tok, CHAT)["input_ids"]
    view_a = build_views(CHAT, tok, ViewConfig())[0]
    clock(dt.datetime(2019, 11, 23))
    raw_b, b = _raw(tok), render_chat(tok, CHAT)
    assert raw_a != raw_b and "2031" in raw_a and "2019" in raw_b  # the template itself follows the clock
    assert a == b
    assert ("26 July 2024" if tok.chat_template == CLOCK else "Today Date: 26 Jul 2024") in a
    assert "2031" not in a and "2019" not in a
    assert tokenize_chat(tok, CHAT)["input_ids"] == ids_a
    assert build_views(CHAT, tok, ViewConfig())[0] == view_a


def test_pinned_date_is_used_and_saved(tok, clock, tmp_path):
    clock(dt.datetime(2031, 3, 5))
    t = load_tokenizer(_save(tok, tmp_path / "a"))  # a copy: the module fixture stays unpinned
    pin_template_date(t, "2024-12-01")
    pinned = render_chat(t, CHAT)
    assert ("01 December 2024" if tok.chat_template == CLOCK else "Today Date: 01 Dec 2024") in pinned
    assert render_chat(t, CHAT, date="3 Feb 2020") != pinned and "Feb" in render_chat(t, CHAT, date="3 Feb 2020")
    reloaded = load_tokenizer(_save(t, tmp_path / "b"))
    clock(dt.datetime(2019, 11, 23))
    assert render_chat(reloaded, CHAT) == pinned
    with pytest.raises(ValueError, match="not a date"):
        pin_template_date(t, "tomorrow")


def _save(tok, path):
    tok.save_pretrained(str(path))
    return path


def test_parse_and_config_field():
    assert parse_template_date("26 Jul 2024") == parse_template_date("2024-07-26") == dt.datetime(2024, 7, 26)
    assert DEFAULT_TEMPLATE_DATE == "26 Jul 2024" == TokenizerSection().template_date
    TokenizerSection(template_date="2025-01-31").validate()
    with pytest.raises(ConfigError, match="tokenizer.template_date"):
        TokenizerSection(template_date="31/01/2025").validate()



@pytest.mark.parametrize("source", ["trained", "path"])
def test_build_tokenizer_pins_the_configured_date(tmp_path, clock, source):
    """A trained tokenizer and a loaded one (which recorded another date) both see ``tokenizer.template_date``."""
    from conceptlm.lm.build import build_tokenizer
    from conceptlm.lm.config import LMRunConfig

    clock(dt.datetime(2031, 3, 5))
    path = None
    if source == "path":
        t = train_bpe_tokenizer(CORPUS, vocab_size=320)
        t.chat_template = CLOCK
        pin_template_date(t, "3 Feb 2020")
        path = str(_save(t, tmp_path / "tok"))
    cfg = LMRunConfig(tokenizer=TokenizerSection(template_date="2024-12-01", vocab_size=320, path=path))
    tok = build_tokenizer(cfg, CORPUS)
    tok.chat_template = CLOCK
    text = render_chat(tok, CHAT)
    assert "01 December 2024" in text and "2031" not in text and "2020" not in text
    clock(dt.datetime(2019, 11, 23))
    assert render_chat(load_tokenizer(_save(tok, tmp_path / "saved")), CHAT) == text  # kept by save_pretrained
