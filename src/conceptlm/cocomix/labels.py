"""The ``label`` verb: compute the concept labels of the corpus windows once and cache them on disk.

``label(cfg)`` loads the frozen teacher (``cfg.teacher``), the TopK SAE (``cfg.labels.sae_path``, else the run's
``sae/`` folder), builds the corpus windows (``cfg.corpus``, tokenized with the teacher's tokenizer) and writes one
label cache per split (``{cache_dir}/train``, ``{cache_dir}/val``; see :mod:`conceptlm.cocomix.label_cache`). An
interrupted call resumes from its last complete chunk; a cache of another configuration is refused.

The config needs the sections ``teacher`` (:class:`~conceptlm.cocomix.teacher.TeacherSection`), ``corpus``
(:class:`~conceptlm.cocomix.corpus.CorpusSection`), ``labels`` (:class:`~conceptlm.cocomix.attribution.LabelSection`)
and ``run`` (for the run folder).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from conceptlm.cocomix.attribution import ConceptLabeler
from conceptlm.cocomix.corpus import build_corpus, corpus_identity
from conceptlm.cocomix.label_cache import CacheSpec, LabelCache, LabeledWindows, state_fingerprint, write_label_cache
from conceptlm.cocomix.sae import SAE_CONFIG, TopKSAE, load_sae
from conceptlm.cocomix.sae_train import SAE_OUTPUT_DIR
from conceptlm.cocomix.teacher import (TINY_TEACHER_DIR, load_teacher, resolve_teacher_path, teacher_identity,
                                       teacher_width)
from conceptlm.core.errors import ConfigError

__all__ = ["SAE_DIR", "LABELS_DIR", "SPLITS", "label", "resolve_sae_dir", "resolve_teacher", "label_cache_dir",
           "open_labeled_windows"]

SAE_DIR = SAE_OUTPUT_DIR
"""Sub-folder of a run that holds its SAE (``sae.safetensors`` + ``sae.json``, written by ``train_sae``)."""
LABELS_DIR = "labels"
"""Sub-folder of a run that holds its label caches when ``labels.cache_dir`` is empty."""
SPLITS = ("train", "val")


def resolve_sae_dir(cfg: Any, checkpoint: str | Path | None = None) -> Path:
    """The SAE folder: ``checkpoint``, else ``cfg.labels.sae_path``, else ``{run_dir}/sae``; a folder holding an
    ``sae/`` sub-folder (a run folder) is followed into it."""
    where = Path(checkpoint or cfg.labels.sae_path or Path(cfg.run_dir) / SAE_DIR)
    for candidate in (where, where / SAE_DIR):
        if (candidate / SAE_CONFIG).is_file():
            return candidate
    raise ConfigError(f"no SAE at {where} (expected {SAE_CONFIG} there or in its {SAE_DIR}/ folder); train the SAE "
                      f"first or set labels.sae_path", field="labels.sae_path")


def resolve_teacher(cfg: Any, sae: TopKSAE | None = None) -> str:
    """The teacher's model location: ``cfg.teacher.path``; else the run's tiny teacher (``{run_dir}/teacher``);
    else the teacher the SAE records it was trained on (``sae.meta["teacher"]["path"]``), when it exists."""
    if cfg.teacher.path is not None:
        return resolve_teacher_path(cfg.teacher.path)
    tiny = Path(cfg.run_dir) / TINY_TEACHER_DIR
    if tiny.is_dir():
        return resolve_teacher_path(tiny)
    recorded = ((sae.meta.get("teacher") or {}) if sae is not None else {}).get("path")
    if recorded and Path(recorded).exists():
        return resolve_teacher_path(recorded)
    raise ConfigError(f"teacher.path is null, the run has no tiny teacher at {tiny} and the SAE names no teacher "
                      f"that exists; set teacher.path", field="teacher.path")


def label_cache_dir(cfg: Any, output: str | Path | None = None) -> Path:
    """Where the label caches go: ``output``, else ``cfg.labels.cache_dir``, else ``{run_dir}/labels``."""
    return Path(output or cfg.labels.cache_dir or Path(cfg.run_dir) / LABELS_DIR)


def _check_pair(cfg: Any, teacher: nn.Module, teacher_path: str, sae: TopKSAE, sae_dir: Path) -> None:
    """The SAE must read the configured layer of a teacher of its width (the teacher it was trained on, when its
    ``sae.json`` records that teacher's fingerprint)."""
    where = sae_dir / SAE_CONFIG
    recorded = (sae.meta.get("teacher") or {}).get("fingerprint")
    if recorded is not None:
        found = teacher_identity(teacher_path, cfg.teacher.layer).get("fingerprint")
        if found != recorded:
            raise ConfigError(f"the SAE at {sae_dir} was trained on another teacher (fingerprint {recorded}) than "
                              f"{teacher_path} ({found})", path=where, field="teacher")
    layer = sae.meta.get("layer")
    if layer is not None and layer != cfg.teacher.layer:
        raise ConfigError(f"the SAE at {sae_dir} was trained on block {layer}, but teacher.layer is "
                          f"{cfg.teacher.layer}", path=where, field="teacher.layer")
    width = teacher_width(teacher)
    if sae.d_in != width:
        raise ConfigError(f"the SAE at {sae_dir} reads width {sae.d_in}, the teacher's residual has width {width}",
                          path=where, field="d_in")


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def label(cfg: Any, *, checkpoint: str | Path | None = None, output: str | Path | None = None) -> dict[str, Any]:
    """Write the label caches of the train and val windows (resuming an interrupted run).

    Args:
        cfg: a config with ``teacher``, ``corpus``, ``labels`` and ``run`` sections (see the module docstring).
        checkpoint: the SAE folder (overrides ``labels.sae_path``).
        output: the cache folder (overrides ``labels.cache_dir``).

    Returns:
        ``{"path", "sae", "teacher", "layer", "windows", "tokens", "computed_tokens", "seconds", "tokens_per_s",
        "splits": {split: write_label_cache summary}}``; ``tokens_per_s`` counts the windows computed by this call.
    """
    cfg.labels.validate()
    sae_dir = resolve_sae_dir(cfg, checkpoint)
    device = _device()
    sae = load_sae(sae_dir, device=device)
    teacher_path = resolve_teacher(cfg, sae)
    teacher, tokenizer = load_teacher(cfg.teacher, path=teacher_path, device=device)
    _check_pair(cfg, teacher, teacher_path, sae, sae_dir)
    labeler = ConceptLabeler(teacher, sae, cfg.teacher.layer, cfg.labels)
    splits = build_corpus(cfg.corpus, tokenizer)
    teacher_id = {"path": str(teacher_path), "sha256": state_fingerprint(teacher)}
    out_dir = label_cache_dir(cfg, output)
    summaries: dict[str, dict[str, Any]] = {}
    start = time.perf_counter()
    for split in SPLITS:
        data = getattr(splits, split)
        if data is None:
            continue
        spec = CacheSpec(teacher=teacher_id, corpus={"identity": corpus_identity(cfg.corpus), "split": split},
                         batch_size=cfg.labels.batch_size, chunk_windows=cfg.labels.chunk_windows)
        summaries[split] = write_label_cache(out_dir / split, data.windows, labeler, spec,
                                             progress=cfg.labels.progress, desc=f"labels ({split})")
    seconds = time.perf_counter() - start
    computed = sum(s["computed_windows"] * cfg.corpus.window for s in summaries.values())
    label_seconds = sum(s["seconds"] for s in summaries.values())
    return {"path": str(out_dir), "sae": str(sae_dir), "teacher": str(teacher_path), "layer": cfg.teacher.layer,
            "windows": sum(s["windows"] for s in summaries.values()),
            "tokens": sum(s["tokens"] for s in summaries.values()), "computed_tokens": computed,
            "seconds": seconds, "tokens_per_s": computed / label_seconds if label_seconds > 0 else 0.0,
            "splits": summaries}


def open_labeled_windows(cache_dir: str | Path, windows: Any, *, k_attr: int | None = None,
                         n_latents: int | None = None, verify: bool = True) -> LabeledWindows:
    """The windows of one split with their cached labels, for a student's Dataset.

    Args:
        cache_dir: one split's cache folder (``{label_cache_dir}/train``).
        windows: that split's windows (same order as when the cache was written).
        k_attr, n_latents: values the student expects (checked against the cache header when given).
        verify: check the windows' token hash against the header.
    """
    expect = {k: v for k, v in (("k_attr", k_attr), ("n_latents", n_latents)) if v is not None}
    return LabeledWindows(windows, LabelCache(cache_dir, expect=expect), verify=verify)
