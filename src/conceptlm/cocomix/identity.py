"""What made each CoCoMix stage output: the artifact identities (:mod:`conceptlm.core.artifact`) of the tiny
teacher's tokenizer, the tiny teacher, the SAE, the label caches, the students and the report.

Every identity holds the stage's resolved settings that shape its result and the *content* fingerprints of its
inputs, chained so that a change anywhere upstream changes every fingerprint downstream of it and nothing else:

========================  ======================================================  =====================================
output                    settings                                                inputs (by content)
========================  ======================================================  =====================================
``teacher/tokenizer/``    ``teacher.vocab_size``                                  the training documents
``teacher/``              the tiny teacher's architecture, length, step size,     the documents (train and val split)
                          seed; ``corpus.window``
``sae/``                  the SAE section, its resolved steps / batch / lr, the   the teacher's weights, the training
                          optimizer and schedule, ``teacher.layer``, the window   windows' token ids
``labels/{split}/``       the labelling settings, batch / chunk sizes, layer,     the teacher's and the SAE's weights,
                          window, split                                           the split's token ids
``students/<arm>-s<n>/``  the arm's resolved ``student`` and ``cocomix``          the token ids of both splits, the
                          sections, optimizer, schedule, length, seed, eval       label caches it reads, the teacher
                          cadence, window                                         (KD, online labels), the SAE (online)
``report/``               arms, seeds                                             every student's fingerprint
========================  ======================================================  =====================================

Weights are identified by :func:`weights_fingerprint` (their bytes, whatever file holds them), data by the sha256
of its documents or token ids: never by a path, a file size or an id, so a moved, renamed or symlinked run folder
stays valid. Cosmetic settings (logging, progress bars, checkpoint cadence, eval batch size) are left out.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from torch import nn

from conceptlm.core.artifact import (
    Identity,
    StaleArtifactError,
    damaged_file,
    decide,
    is_complete,
    read_manifest,
    tensors_digest,
)

__all__ = ["ON_CHANGE_OPTION", "ON_CHANGE_CHOICES", "TOKENIZER_KIND", "TEACHER_KIND", "SAE_KIND", "LABELS_KIND",
           "STUDENT_KIND", "REPORT_KIND", "on_change_of", "world_size", "documents_fingerprint",
           "weights_fingerprint", "windows_digest", "tokenizer_identity", "tiny_teacher_identity", "sae_identity",
           "labels_identity", "student_identity", "report_identity", "remove_output", "run_stage", "log_to_stderr"]

log = logging.getLogger(__name__)

ON_CHANGE_OPTION = "pipeline.on_change"
ON_CHANGE_CHOICES = ("refuse", "rebuild")
TOKENIZER_KIND = "cocomix.tokenizer"
TEACHER_KIND = "cocomix.teacher"
SAE_KIND = "cocomix.sae"
LABELS_KIND = "cocomix.labels"
STUDENT_KIND = "cocomix.student"
REPORT_KIND = "cocomix.report"


def on_change_of(cfg: Any) -> str:
    """``cfg.pipeline.on_change`` (``refuse`` when the config has no ``pipeline`` section)."""
    return str(getattr(getattr(cfg, "pipeline", None), "on_change", "refuse"))


def log_to_stderr() -> None:
    """Show the stages' INFO lines (what is reused, rebuilt, resumed) on stderr, as a training run does (rank 0;
    WARNING on the others); a no-op when logging is configured already."""
    import sys

    level = logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def world_size() -> int:
    """Processes of this launch (``WORLD_SIZE`` of torchrun, else 1): the global batch is ``micro_batch_size x
    grad_accum x world_size``."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


# ------------------------------------------------------------------------------------------------ content digests
def documents_fingerprint(*splits: Iterable[str]) -> str:
    """sha256 over the documents of one or more splits (their text, in order; split boundaries count)."""
    h = hashlib.sha256()
    for docs in splits:
        h.update(b"\x1dsplit\x1d")
        for doc in docs:
            data = doc.encode("utf-8", "surrogatepass")
            h.update(len(data).to_bytes(8, "little"))
            h.update(data)
    return h.hexdigest()


def weights_fingerprint(module: nn.Module) -> str:
    """The identity of a model's weights by content: :func:`~conceptlm.core.artifact.tensors_digest` of its named
    parameters (tied ones once; buffers left out: they are derived from the config or training statistics)."""
    return tensors_digest(dict(module.named_parameters()))


def windows_digest(windows: Any) -> str:
    """sha256 of the token ids (int64, little endian, row after row) of a window set: the ``tokens_sha256`` of a
    label cache header (:func:`conceptlm.cocomix.label_cache.windows_fingerprint`)."""
    from conceptlm.cocomix.label_cache import windows_fingerprint

    return windows_fingerprint(getattr(windows, "windows", windows))[2]


# ------------------------------------------------------------------------------------------------ identities
def _pick(section: Any, names: Iterable[str]) -> dict[str, Any]:
    return {n: getattr(section, n) for n in names}


_TINY_TEACHER = ("arch", "hidden_size", "num_layers", "num_heads", "vocab_size", "steps", "batch_size", "lr",
                 "warmup_steps", "weight_decay", "seed")
_SAE = ("n_latents", "k", "aux_k", "aux_coef", "dead_after_tokens", "normalize_input", "eps", "init_windows", "seed")


def tokenizer_identity(train_documents: list[str], vocab_size: int) -> Identity:
    """The tiny teacher's BPE tokenizer: trained on the training documents only."""
    return Identity(TOKENIZER_KIND, 1, {"tokenizer": "bpe", "teacher": {"vocab_size": vocab_size}},
                    {"train_documents": documents_fingerprint(train_documents)})


def tiny_teacher_identity(corpus: Any, teacher: Any, documents: tuple[list[str], list[str]] | None,
                          n_processes: int = 1) -> Identity:
    """The tiny teacher run (``teacher.path: null``): its settings, the window and the documents of both splits
    (the tokenizer is a function of the training documents and ``teacher.vocab_size``); for a token-shard corpus
    (``documents`` None) the shard folder's fingerprint instead (it holds the tokens and the tokenizer)."""
    if documents is None:
        from conceptlm.cocomix.corpus import shard_fingerprint

        inputs = {"token_shards": shard_fingerprint(corpus)}
    else:
        inputs = {"documents": documents_fingerprint(*documents)}
    return Identity(TEACHER_KIND, 1,
                    {"teacher": _pick(teacher, _TINY_TEACHER), "corpus": {"window": corpus.window},
                     "train": {"world_size": n_processes}}, inputs)


def sae_identity(cfg: Any, teacher_fingerprint: str, train_windows: str, n_processes: int = 1) -> Identity:
    """The SAE of ``cfg`` (the SAE run's config, after :func:`~conceptlm.cocomix.sae_train.sae_run_config`) on
    the teacher ``teacher_fingerprint``, trained on the windows whose token digest is ``train_windows``.

    Format 2: the SAE folder is the SAE's own run (its config, metrics and checkpoints with it); an SAE of format 1
    (its run's checkpoints and metrics at the top of the pipeline's run folder) is another artifact."""
    t = cfg.train
    settings = {
        "sae": {**_pick(cfg.sae, _SAE), "steps": t.max_steps, "batch_size": t.micro_batch_size, "lr": cfg.optim.lr},
        "teacher": {"layer": cfg.teacher.layer}, "corpus": {"window": cfg.corpus.window},
        "optim": {k: v for k, v in dataclasses.asdict(cfg.optim).items() if k != "lr"},
        "schedule": dataclasses.asdict(cfg.schedule),
        "train": {"grad_accum": t.grad_accum, "seed": t.seed, "precision": t.precision, "world_size": n_processes},
    }
    return Identity(SAE_KIND, 2, settings, {"teacher": teacher_fingerprint, "train_windows": train_windows})


def labels_identity(labels: Any, *, layer: int, window: int, split: str, n_windows: int, teacher: str, sae: str,
                    windows: str) -> Identity:
    """One split's label cache: the labelling settings (``labels.describe()``), the batch and chunk sizes (and the
    shard size of a sharded cache: its file layout), the teacher block, the windows, and the teacher's and SAE's
    weights."""
    layout = {"shard_windows": labels.shard_windows} if getattr(labels, "shard_windows", 0) else {}
    settings = {"labeling": labels.describe(),
                "labels": {"batch_size": labels.batch_size, "chunk_windows": labels.chunk_windows, **layout},
                "teacher": {"layer": layer}, "corpus": {"window": window, "windows": n_windows}, "split": split}
    return Identity(LABELS_KIND, 1, settings, {"teacher": teacher, "sae": sae, "windows": windows})


_STUDENT_TRAIN = ("max_steps", "micro_batch_size", "grad_accum", "seed", "precision", "eval_every")


def student_identity(cfg: Any, *, windows: dict[str, str], labels: dict[str, str] | None = None,
                     teacher: str | None = None, sae: str | None = None, online_labels: Any = None,
                     n_processes: int = 1) -> Identity:
    """One student run: the arm's resolved sections (``student``, ``cocomix``, ``optim``, ``schedule``, the
    training length, seed and eval cadence, the window) and what it reads: the token digests of its ``windows``
    (``{"train", "val"}``), the fingerprints of the label caches it reads, the teacher's weights (KD, online
    labels) and the SAE's (online labels; ``online_labels`` then holds the labelling settings and layer)."""
    t = cfg.train
    settings: dict[str, Any] = {
        "student": dataclasses.asdict(cfg.student), "cocomix": dataclasses.asdict(cfg.cocomix),
        "optim": dataclasses.asdict(cfg.optim), "schedule": dataclasses.asdict(cfg.schedule),
        "train": {**_pick(t, _STUDENT_TRAIN), "world_size": n_processes}, "corpus": {"window": cfg.corpus.window},
    }
    inputs: dict[str, Any] = {"windows": dict(windows)}
    if labels:
        inputs["labels"] = dict(labels)
    if online_labels is not None:
        settings["labels"] = {"online": online_labels}
    if teacher is not None:
        inputs["teacher"] = teacher
    if sae is not None:
        inputs["sae"] = sae
    return Identity(STUDENT_KIND, 1, settings, inputs)


def report_identity(arms: list[str], seeds: list[int], students: dict[str, str | None]) -> Identity:
    """The report: which arms and seeds, and the fingerprint of every student run it read (None: unverified)."""
    return Identity(REPORT_KIND, 1, {"arms": list(arms), "seeds": list(seeds)}, {"students": dict(students)})


def remove_output(directory: str | Path) -> None:
    """Delete a stage output that is being rebuilt (``pipeline.on_change=rebuild``)."""
    directory = Path(directory)
    if directory.is_symlink() or directory.is_file():
        directory.unlink()
    elif directory.exists():
        shutil.rmtree(directory)


def run_stage(directory: str | Path, identity: Identity, *, on_change: str, what: str,
              remove: bool = True) -> str:
    """Whether a training stage (teacher, SAE, student) may skip, must continue, or starts afresh in ``directory``.

    Returns:
        ``"skip"``: its manifest is complete, has ``identity``'s fingerprint and every listed file is intact;
        ``"resume"``: same fingerprint, but unfinished (recorded by :func:`~conceptlm.core.artifact.begin`) or a
        file under ``checkpoints/`` is damaged: continue from the run's newest intact checkpoint
        (``run.resume=auto``), which rewrites it;
        ``"build"``: nothing there yet;
        ``"rebuild"``: ``on_change == "rebuild"`` and it differed (the folder is removed when ``remove``, i.e. on
        rank 0; the caller removes whatever else the stage wrote elsewhere).

    Raises:
        StaleArtifactError: it differs (other settings or inputs, no manifest, or a damaged file outside
            ``checkpoints/``) and ``on_change == "refuse"``: one line naming what changed and
            ``pipeline.on_change=rebuild``.
    """
    decision = decide(directory, identity, on_change=on_change, what=what, option=ON_CHANGE_OPTION,
                      verify=False)  # type: ignore[arg-type]
    if decision == "build":
        return "build"
    if decision == "rebuild":
        if remove:
            remove_output(directory)
        return "rebuild"
    manifest = read_manifest(directory)
    if not is_complete(manifest):
        log.info("%s: unfinished with the same settings and inputs; continuing it", what)
        return "resume"
    names = list((manifest or {}).get("files") or {})
    other = damaged_file(directory, manifest, [n for n in names if not n.startswith("checkpoints/")])
    if other is not None:
        if on_change != "rebuild":
            raise StaleArtifactError(f"{what}: {other}; rerun with {ON_CHANGE_OPTION}=rebuild")
        log.warning("%s: rebuilding (%s)", what, other)
        if remove:
            remove_output(directory)
        return "rebuild"
    broken = damaged_file(directory, manifest, [n for n in names if n.startswith("checkpoints/")])
    if broken is not None:
        log.warning("%s: %s; continuing its run from the newest intact checkpoint", what, broken)
        return "resume"
    return "skip"
