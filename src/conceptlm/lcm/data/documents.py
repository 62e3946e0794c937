"""Documents for the Large Concept Model: a built-in generator of structured multi-sentence documents (the offline
default) and readers for plain text and JSONL files.

``iter_documents(section)`` yields ``(doc_id, text)`` pairs in a deterministic order:

- ``source: generated``: ``n_documents`` documents from a small set of document *scripts* (a story, a recipe, a
  weather report, a trip log, a match report). Sentence k of a script follows from sentence k-1 and from the
  document's entities (names, places, objects, numbers), so the next sentence is largely predictable from the
  context — a next-concept model has something to learn. Document ``i`` depends only on ``(seed, i)``.
- ``source: path/to/file.txt``: ``txt_split`` says what a document is: the whole file, each blank-line separated
  paragraph block, or each line. Ids are ``<file>:<first line>``.
- ``source: path/to/file.jsonl``: one document per line, the text at ``text_field`` (a dotted path; integers index
  lists, e.g. ``messages.1.content``). Ids are ``<file>:<line>`` or the value at ``id_field``.
- ``source: path/to/file.parquet``: one document per row, the text at ``text_field`` (a column, or a dotted path
  into a struct column), read in batches of rows. Ids are ``<file>:<row>`` (1-based) or the value at ``id_field``.
- ``source: a directory``: every ``*.txt``, ``*.jsonl`` and ``*.parquet`` file in it (sorted, not recursive).

Every source is streamed (text files line by line, after a first pass that checks they are UTF-8; JSONL line by
line; Parquet by batches of rows), so a source never has to fit in memory (``txt_split: file`` excepted: the
file is the document).

Bad input (bytes that are not UTF-8, invalid JSON, a missing or non-string field, an empty document) raises a
one-line :class:`DataError` naming file, line and field, or — with ``skip_bad=True`` — is skipped and counted in
the ``skipped`` counter the caller passes.
"""

from __future__ import annotations

import codecs
import json
import random
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from conceptlm.core.errors import DataError
from conceptlm.data.chat import DuplicateKeyError, field_value, refuse_duplicate_keys
from conceptlm.lcm.config import DocsSection

__all__ = ["iter_documents", "generate_document", "SCRIPTS", "instruction_text", "split_instruction"]


# ----------------------------------------------------------------------------------------------------------------
# Built-in generator

_PEOPLE = [("Anna", "she", "her"), ("Ben", "he", "his"), ("Clara", "she", "her"), ("David", "he", "his"),
           ("Emma", "she", "her"), ("Felix", "he", "his"), ("Grace", "she", "her"), ("Henry", "he", "his"),
           ("Iris", "she", "her"), ("Jonas", "he", "his"), ("Lena", "she", "her"), ("Marco", "he", "his"),
           ("Nora", "she", "her"), ("Oscar", "he", "his"), ("Paula", "she", "her"), ("Samuel", "he", "his")]
_TOWNS = ["Millbrook", "Riverton", "Ashford", "Pinecrest", "Lakeside", "Stonebridge", "Fairhaven", "Oakvale",
          "Westport", "Greenfield", "Hillcrest", "Northwood"]
_PLACES = ["the old bakery", "the harbor", "the village square", "the library", "the train station",
           "the market", "the park", "the bridge"]
_OBJECTS = [("a silver key", "the key"), ("a leather wallet", "the wallet"), ("a small map", "the map"),
            ("a red umbrella", "the umbrella"), ("a wooden box", "the box"), ("a pocket watch", "the watch"),
            ("a blue notebook", "the notebook"), ("a lost kitten", "the kitten")]
_PETS = ["dog", "cat", "parrot", "rabbit"]
_GIFTS = ["a basket of apples", "a warm scarf", "a jar of honey", "a handmade card", "a loaf of bread"]
_DISHES = [("tomato soup", ["tomatoes", "onions", "garlic"], "pot", "hot with fresh bread"),
           ("vegetable curry", ["potatoes", "carrots", "peas"], "pan", "with a bowl of rice"),
           ("lemon cake", ["flour", "eggs", "lemons"], "oven", "cold with a cup of tea"),
           ("mushroom risotto", ["mushrooms", "rice", "onions"], "pan", "warm with grated cheese"),
           ("apple pie", ["apples", "flour", "butter"], "oven", "warm with vanilla ice cream"),
           ("bean stew", ["beans", "carrots", "celery"], "pot", "hot with a slice of bread")]
_WEATHER = ["sunny", "cloudy", "rainy", "windy", "foggy", "snowy"]
_NEXT_WEATHER = {"sunny": ["sunny", "cloudy"], "cloudy": ["rainy", "sunny"], "rainy": ["cloudy", "windy"],
                 "windy": ["cloudy", "rainy"], "foggy": ["cloudy", "sunny"], "snowy": ["snowy", "cloudy"]}
_ADVICE = {"sunny": "wear a hat and drink plenty of water", "cloudy": "bring a light jacket",
           "rainy": "take an umbrella", "windy": "hold on to your hat", "foggy": "drive slowly",
           "snowy": "wear warm boots"}
_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
_VEHICLES = [("train", "the platform"), ("bus", "the bus stop"), ("ferry", "the pier"), ("plane", "the gate")]
_TEAMS = ["the Falcons", "the Tigers", "the Rovers", "the Wolves", "the Comets", "the Pirates"]


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _story(r: random.Random) -> list[str]:
    (name, he, his), (friend, _, _) = r.sample(_PEOPLE, 2)
    town, place = r.choice(_TOWNS), r.choice(_PLACES)
    obj, the_obj = r.choice(_OBJECTS)
    pet, gift = r.choice(_PETS), r.choice(_GIFTS)
    owner = r.choice([p for p in _PEOPLE if p[0] not in (name, friend)])[0]
    out = [f"{name} lived in a small house in {town}.",
           f"Every morning {he} walked to {place} with {his} {pet}."]
    if r.random() < 0.5:
        out.append(f"The {pet} liked to run ahead and chase the birds.")
    out += [f"One day {name} found {obj} near {place}.",
            f"{_cap(he)} picked up {the_obj} and looked around, but nobody was there."]
    if r.random() < 0.6:
        out += [f"{name} showed {the_obj} to {his} friend {friend}.",
                f"{friend} said that {the_obj} belonged to {owner}."]
    else:
        out.append(f"{name} asked the people of {town} about {the_obj}, and they said it belonged to {owner}.")
    out += [f"So {name} brought {the_obj} back to {owner} that evening.",
            f"{owner} was so happy that {name} received {gift}."]
    if r.random() < 0.5:
        out.append(f"From then on, {name} and {owner} were good friends.")
    return out


def _recipe(r: random.Random) -> list[str]:
    dish, (a, b, c), tool, serving = r.choice(_DISHES)
    minutes, cook, servings = r.choice([5, 10, 15]), r.choice([20, 25, 30, 40]), r.randint(2, 6)
    heat = "Preheat the oven" if tool == "oven" else f"Heat a little oil in a {tool}"
    out = [f"This is a simple recipe for {dish}.", f"The {dish} serves {servings} people.",
           f"You will need {a}, {b} and {c}.", f"First, weigh the {a} and the {b}.",
           f"Then put the {a} in a large bowl."]
    if r.random() < 0.5:
        out.append(f"Leave the bowl of {a} aside for a moment.")
    out += [f"{heat} for {minutes} minutes.", f"Add the {a} and the {b}.",
            f"Cook them for {cook} minutes and stir from time to time.", f"Finally, add the {c}."]
    if r.random() < 0.5:
        out.append(f"Taste the {dish} and add a pinch of salt if needed.")
    out.append(f"Serve the {dish} {serving}.")
    return out


def _weather(r: random.Random) -> list[str]:
    town, day = r.choice(_TOWNS), r.randrange(7)
    w1 = r.choice(_WEATHER)
    w2 = r.choice(_NEXT_WEATHER[w1])
    w3 = r.choice(_NEXT_WEATHER[w2])
    t = r.randint(-5, 10) if w1 == "snowy" else r.randint(8, 30)
    t2 = t + r.choice([-3, -2, 2, 3])
    out = [f"Here is the weather report for {town} on {_DAYS[day]}.",
           f"In the morning it will be {w1} with a temperature of {t} degrees.",
           f"By the afternoon it will turn {w2}." if w2 != w1 else f"The afternoon will stay {w1}.",
           f"The temperature will reach {t2} degrees in the afternoon."]
    if r.random() < 0.5:
        out.append(f"The wind will come from the {r.choice(['north', 'south', 'east', 'west'])}.")
    out += [f"If you go out in {town} on {_DAYS[day]}, {_ADVICE[w2]}.",
            f"On {_DAYS[(day + 1) % 7]} the weather will be {w3}."]
    return out


def _trip(r: random.Random) -> list[str]:
    name, he, his = r.choice(_PEOPLE)
    src, dst = r.sample(_TOWNS, 2)
    vehicle, stop = r.choice(_VEHICLES)
    hour, hours = r.randint(6, 11), r.randint(1, 5)
    out = [f"On {r.choice(_DAYS)}, {name} travelled from {src} to {dst}.",
           f"{_cap(he)} arrived at {stop} at {hour} o'clock.",
           f"The {vehicle} left {src} on time."]
    late = r.random() < 0.4
    if late:
        out.append(f"Halfway to {dst}, the {vehicle} stopped for half an hour.")
    duration = f"{hours} hour{'s' if hours > 1 or late else ''}{' and a half' if late else ''}"
    out += [f"The trip from {src} to {dst} took {duration}.",
            f"In {dst}, {name} met {his} cousin at {r.choice(_PLACES)}.",
            f"Together they had lunch and talked about {src}."]
    if r.random() < 0.5:
        out.append(f"In the evening {name} took the {vehicle} back to {src}.")
    return out


def _match(r: random.Random) -> list[str]:
    home, away = r.sample(_TEAMS, 2)
    g1, g2 = r.randint(0, 4), r.randint(0, 4)
    town = r.choice(_TOWNS)
    player = r.choice(_PEOPLE)[0]
    out = [f"{_cap(home)} played against {away} in {town} on {r.choice(_DAYS)}.",
           f"The stadium in {town} was full."]
    if g1 + g2 == 0:
        out += ["Neither team scored in the first half.", "The second half was just as tight."]
    else:
        first = home if g1 >= g2 else away
        out += [f"{_cap(first)} scored first after twenty minutes.",
                f"{player} of {first} scored {'twice' if max(g1, g2) > 1 else 'the goal'}."]
    if g1 > g2:
        result = f"In the end {home} won {g1} to {g2}."
        after = f"The fans of {home} sang in the streets of {town}."
    elif g2 > g1:
        result = f"In the end {away} won {g2} to {g1}."
        after = f"The fans of {away} travelled home happy."
    else:
        result = f"The match ended in a draw, {g1} to {g2}."
        after = f"Both {home} and {away} will play again next week."
    return out + [result, after]


SCRIPTS = {"story": _story, "recipe": _recipe, "weather": _weather, "trip": _trip, "match": _match}
"""The document scripts of the built-in generator: ``name -> f(random.Random) -> list of sentences``."""


def generate_document(seed: int, index: int, task: str = "document", marker: str = "[MODEL]:") -> str:
    """Document ``index`` of the built-in generator: sentences joined by single spaces (deterministic); with
    ``task="summary"`` followed by ``marker`` and its summary (first and last sentences, :func:`instruction_text`)."""
    r = random.Random(f"conceptlm-lcm-docs:{seed}:{index}")
    script = SCRIPTS[r.choice(sorted(SCRIPTS))]
    sentences = script(r)
    text = " ".join(sentences)
    if task == "summary":
        return instruction_text(text, f"{sentences[0]} {sentences[-1]}", marker)
    return text


def instruction_text(source: str, target: str, marker: str) -> str:
    """One instruction example as a document: ``source``, the marker on a line of its own, the answer
    (:func:`split_instruction` undoes it)."""
    return f"{source}\n{marker}\n{target}"


def split_instruction(text: str, marker: str) -> tuple[str, str] | None:
    """``(source, answer)`` of a text made by :func:`instruction_text`, or None when it holds no marker line."""
    sep = f"\n{marker}\n"
    if sep not in text:
        return None
    source, target = text.split(sep, 1)
    return source, target


# ----------------------------------------------------------------------------------------------------------------
# Files

_ESCAPES = {"\\n": "\n", "\\t": "\t", '\\"': '"'}


def _unescape(text: str) -> str:
    return re.sub(r'\\[nt"]', lambda m: _ESCAPES[m.group()], text)


def _decode(raw: bytes, path: Path, line: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"not valid UTF-8 (bad byte at offset {e.start} of the line)", path=path, line=line) from None


def _bad(err: DataError, skip_bad: bool, skipped: Counter | None, reason: str) -> None:
    if not skip_bad:
        raise err
    if skipped is not None:
        skipped[reason] += 1


def _jsonl_docs(path: Path, section: DocsSection, skip_bad: bool, skipped: Counter | None
                ) -> Iterator[tuple[str, str]]:
    with path.open("rb") as fh:
        for line_no, raw in enumerate(fh, start=1):
            if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                text = _decode(raw, path, line_no)
                if not text.strip():
                    continue
                try:
                    obj = json.loads(text, object_pairs_hook=refuse_duplicate_keys)
                except DuplicateKeyError as e:
                    raise DataError(str(e), path=path, line=line_no, field=e.key) from None
                except (json.JSONDecodeError, RecursionError, ValueError) as e:
                    msg = f"invalid JSON at column {e.colno}: {e.msg}" if isinstance(e, json.JSONDecodeError) \
                        else "invalid JSON"
                    raise DataError(msg, path=path, line=line_no) from None
                doc_id, doc = _record(obj, section, path, line_no)
            except DataError as e:
                _bad(e, skip_bad, skipped, "bad_record")
                continue
            yield doc_id, doc, line_no


def _record(obj, section: DocsSection, path: Path, line_no: int) -> tuple[str, str]:
    """``(id, text)`` of one JSONL record or Parquet row (``line_no``: its 1-based line or row)."""
    doc = _field(obj, section.text_field, path, line_no)
    if section.target_field:
        target = _field(obj, section.target_field, path, line_no)
        if not target.strip():
            raise DataError("empty answer", path=path, line=line_no, field=section.target_field)
        doc = instruction_text(doc, target, section.instruction_marker)
    doc_id = f"{path.name}:{line_no}"
    if section.id_field:
        doc_id = str(_field(obj, section.id_field, path, line_no, allow_number=True))
    return doc_id, doc


def _parquet_docs(path: Path, section: DocsSection, skip_bad: bool, skipped: Counter | None
                  ) -> Iterator[tuple[str, str, int]]:
    """Rows of a Parquet file, read a batch of rows at a time (only the columns the fields name)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fields = [f for f in (section.text_field, section.target_field, section.id_field) if f]
    try:
        pf = pq.ParquetFile(path)
        names = set(pf.schema_arrow.names)
        columns = sorted({f.split(".")[0] for f in fields} & names)
        row_no = 0
        for batch in pf.iter_batches(batch_size=256, columns=columns):
            for obj in batch.to_pylist():
                row_no += 1
                try:
                    doc_id, doc = _record(obj, section, path, row_no)
                except DataError as e:
                    _bad(e, skip_bad, skipped, "bad_record")
                    continue
                yield doc_id, doc, row_no
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"cannot read Parquet ({type(e).__name__})", path=path) from None


def _field(obj, dotted: str, path: Path, line: int, allow_number: bool = False):
    try:
        value = field_value(obj, dotted)
    except KeyError:
        raise DataError("missing", path=path, line=line, field=dotted) from None
    if isinstance(value, str) or (allow_number and isinstance(value, int) and not isinstance(value, bool)):
        return value
    raise DataError(f"expected a string, got {type(value).__name__}", path=path, line=line, field=dotted)


def _first_bad_utf8_line(path: Path) -> int | None:
    """The 1-based line of the first invalid UTF-8 byte of ``path`` (None when it is valid), read in 1 MiB
    chunks."""
    dec = codecs.getincrementaldecoder("utf-8")()
    newlines = 0
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            pending = len(dec.getstate()[0])  # bytes of a sequence begun in the previous chunk (no newline)
            try:
                dec.decode(chunk)
            except UnicodeDecodeError as e:
                return newlines + chunk.count(b"\n", 0, max(e.start - pending, 0)) + 1
            newlines += chunk.count(b"\n")
    try:
        dec.decode(b"", final=True)
    except UnicodeDecodeError:
        return newlines + 1
    return None


def _txt_lines(path: Path) -> Iterator[str]:
    """The lines of a valid UTF-8 file as ``str.splitlines`` of its whole text gives them, read line by line."""
    with path.open("rb") as fh:
        for k, raw in enumerate(fh):
            piece = raw.decode("utf-8")
            yield from (piece.removeprefix("\ufeff") if k == 0 else piece).splitlines()


def _txt_docs(path: Path, section: DocsSection) -> Iterator[tuple[str, str, int]]:
    bad = _first_bad_utf8_line(path)  # a first pass, so that a bad file yields no document (skipped whole)
    if bad is not None:
        raise DataError("not valid UTF-8", path=path, line=bad)
    if section.txt_split == "file":
        yield f"{path.name}:1", path.read_text(encoding="utf-8").removeprefix("\ufeff"), 1
        return
    block: list[str] = []
    start = 0
    for line_no, line in enumerate(_txt_lines(path), start=1):
        if section.txt_split == "lines":
            if line.strip():
                yield f"{path.name}:{line_no}", line, line_no
            continue
        if line.strip():
            if not block:
                start = line_no
            block.append(line)
        elif block:
            yield f"{path.name}:{start}", "\n".join(block), start
            block = []
    if block:
        yield f"{path.name}:{start}", "\n".join(block), start


def _file_docs(path: Path, section: DocsSection, skip_bad: bool, skipped: Counter | None
               ) -> Iterator[tuple[str, str]]:
    if path.suffix == ".jsonl":
        items = _jsonl_docs(path, section, skip_bad, skipped)
    elif path.suffix == ".parquet":
        items = _parquet_docs(path, section, skip_bad, skipped)
    else:
        items = _txt_docs(path, section)
    try:
        for doc_id, text, line_no in items:
            if section.unescape:
                text = _unescape(text)
            if not text.strip():
                _bad(DataError("empty document", path=path, line=line_no,
                               field=section.text_field if path.suffix == ".jsonl" else None),
                     skip_bad, skipped, "empty_document")
                continue
            yield doc_id, text
    except DataError as e:  # a whole text file that is not UTF-8
        _bad(e, skip_bad, skipped, "bad_file")


def iter_documents(section: DocsSection, *, skip_bad: bool = False, skipped: Counter | None = None
                   ) -> Iterator[tuple[str, str]]:
    """Yield ``(doc_id, text)`` for every document of ``section`` (deterministic order, unique ids).

    Args:
        skip_bad: skip bad records, undecodable files and empty documents instead of raising.
        skipped: a counter that receives the number of skips by reason (``bad_record``, ``empty_document``,
            ``bad_file``).

    Raises:
        DataError: one line naming the file, 1-based line and field of a bad record (unless ``skip_bad``).
    """
    if section.source == "generated":
        for i in range(section.n_documents):
            yield f"gen-{section.seed}-{i:06d}", generate_document(section.seed, i, section.generated_task,
                                                                   section.instruction_marker)
        return
    root = Path(section.source)
    if not root.exists():
        raise DataError("not found", path=root)
    if root.is_dir():
        files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix in (".txt", ".jsonl", ".parquet"))
        if not files:
            raise DataError("no .txt, .jsonl or .parquet files in directory", path=root)
    else:
        files = [root]
    count = 0
    for path in files:
        for item in _file_docs(path, section, skip_bad, skipped):  # ids carry the file name
            if section.limit is not None and count >= section.limit:
                return
            yield item
            count += 1
