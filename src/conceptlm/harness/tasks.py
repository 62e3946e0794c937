"""lm-eval tasks over local rows: a task YAML (``dataset_path: json`` with ``data_files``) next to its JSONL, so the
harness reads nothing from the network. Point ``include_path`` (``--include_path``) at the folder.

Three kinds (the harness's output types):

* ``multiple_choice``: rows ``{"question", "choices": [...], "answer": index}``; the prompt is ``question`` and each
  choice is scored as its continuation after the harness's ``target_delimiter``, a space (so write ``"yes"``, not
  ``" yes"``); metrics ``acc`` and ``acc_norm``;
* ``perplexity``: rows ``{"text"}`` scored with ``loglikelihood_rolling``; metrics ``word_perplexity``,
  ``byte_perplexity`` and ``bits_per_byte``;
* ``generate``: rows ``{"prompt", "target"}``; greedy generation until a newline (or the ``until`` strings; at most
  ``max_gen_toks`` tokens), metric ``exact_match`` of the stripped text.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from conceptlm.core.io import atomic_write_text

__all__ = ["write_task", "tasks_digest", "TASK_KINDS"]

TASK_KINDS = ("multiple_choice", "perplexity", "generate")


def _yaml(name: str, data: Path, kind: str, max_gen_toks: int, target_delimiter: str, until: list[str]) -> str:
    head = [f"task: {name}", "dataset_path: json", "dataset_kwargs:", "  data_files:",
            f"    test: {json.dumps(str(data))}", "test_split: test"]
    if target_delimiter != " ":
        head.append(f"target_delimiter: {json.dumps(target_delimiter)}")
    if kind == "multiple_choice":
        body = ["output_type: multiple_choice", 'doc_to_text: "{{question}}"', 'doc_to_choice: "{{choices}}"',
                'doc_to_target: "{{answer}}"', "metric_list:", "  - metric: acc", "    aggregation: mean",
                "    higher_is_better: true", "  - metric: acc_norm", "    aggregation: mean",
                "    higher_is_better: true"]
    elif kind == "perplexity":
        body = ["output_type: loglikelihood_rolling", 'doc_to_text: ""', 'doc_to_target: "{{text}}"',
                "metric_list:", "  - metric: word_perplexity", "  - metric: byte_perplexity",
                "  - metric: bits_per_byte"]
    else:
        body = ["output_type: generate_until", 'doc_to_text: "{{prompt}}"', 'doc_to_target: "{{target}}"',
                "generation_kwargs:", f"  until: {json.dumps(list(until))}", f"  max_gen_toks: {max_gen_toks}",
                "  do_sample: false",
                "metric_list:", "  - metric: exact_match", "    aggregation: mean", "    higher_is_better: true",
                "    regexes_to_ignore: [\"^\\\\s+\", \"\\\\s+$\"]"]
    return "\n".join(head + body + ["metadata:", "  version: 1.0"]) + "\n"


def write_task(directory: str | Path, name: str, rows: Iterable[dict[str, Any]], *, kind: str = "multiple_choice",
               max_gen_toks: int = 16, target_delimiter: str = " ", until: Iterable[str] = ("\n",)) -> Path:
    """Write ``{directory}/{name}.yaml`` and ``{name}.jsonl`` (rows as described in the module docstring); returns
    the YAML's path. ``directory`` is what ``include_path`` names. ``target_delimiter`` joins the prompt and a
    choice (``""`` when the prompt already ends where the answer starts, e.g. a rendered chat prompt); ``until``:
    where a ``generate`` task's generations stop (default a newline)."""
    if kind not in TASK_KINDS:
        raise ValueError(f"unknown task kind {kind!r}; one of {', '.join(TASK_KINDS)}")
    directory = Path(directory)
    data = (directory / f"{name}.jsonl").resolve()
    atomic_write_text(data, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    path = directory / f"{name}.yaml"
    atomic_write_text(path, _yaml(name, data, kind, max_gen_toks, target_delimiter, list(until)))
    return path


def tasks_digest(include_path: str | Path | None) -> str | None:
    """sha256 over the task files under ``include_path`` (YAML, JSON/JSONL, Python; relative names and bytes): stored
    results of a changed local task are stale. None without a path."""
    import hashlib

    if not include_path:
        return None
    root = Path(include_path)
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")) if root.is_dir() else [root]:
        if p.is_file() and p.suffix in (".yaml", ".yml", ".jsonl", ".json", ".py"):
            h.update(p.relative_to(root if root.is_dir() else root.parent).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()
