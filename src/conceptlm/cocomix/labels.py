"""The ``label`` verb: compute the concept labels of the corpus windows once and cache them on disk.

``label(cfg)`` loads the frozen teacher (``cfg.teacher``), the TopK SAE (``cfg.labels.sae_path``, else the run's
``sae/`` folder), builds the corpus windows (``cfg.corpus``, tokenized with the teacher's tokenizer) and writes one
label cache per split (``{cache_dir}/train``, ``{cache_dir}/val``; see :mod:`conceptlm.cocomix.label_cache`), each
with an ``artifact.json`` (:func:`conceptlm.cocomix.identity.labels_identity`: the labelling settings, the teacher's
and the SAE's weights and the windows' token ids by content; the sha256 of its files once complete). An interrupted
call resumes from its last complete chunk; a cache of another identity is refused with one line naming the change
(``pipeline.on_change=rebuild`` recomputes it), a damaged one with one line naming the file. The call holds the run
folder's lock (and the cache folder's, when it lies elsewhere) like a training run.

The config needs the sections ``teacher`` (:class:`~conceptlm.cocomix.config.TeacherSection`), ``corpus``
(:class:`~conceptlm.cocomix.config.CorpusSection`), ``labels`` (:class:`~conceptlm.cocomix.config.LabelSection`)
and ``run`` (for the run folder).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from conceptlm.cocomix.attribution import ConceptLabeler
from conceptlm.cocomix.corpus import build_corpus, corpus_identity
from conceptlm.cocomix.identity import (
    LABELS_KIND,
    ON_CHANGE_OPTION,
    labels_identity,
    log_to_stderr,
    on_change_of,
    remove_output,
    windows_digest,
    world_size,
)
from conceptlm.cocomix.label_cache import (
    HEADER,
    LABELS,
    MASK,
    PROGRESS,
    CacheSpec,
    LabelCache,
    LabelCacheError,
    LabeledWindows,
    cache_header,
    finish_label_shards,
    missing_folders,
    prepare_label_shards,
    state_fingerprint,
    write_label_cache,
    write_label_shards,
)
from conceptlm.cocomix.sae import SAE_CONFIG, TopKSAE, load_sae
from conceptlm.cocomix.sae_formats import detect_sae_format
from conceptlm.cocomix.sae_train import SAE_DIR
from conceptlm.cocomix.teacher import (
    TINY_TEACHER_DIR,
    load_teacher,
    resolve_teacher_path,
    teacher_identity,
    teacher_width,
)
from conceptlm.core.artifact import (
    StaleArtifactError,
    begin,
    damaged_file,
    decide,
    is_complete,
    read_manifest,
    require,
    write_manifest,
)
from conceptlm.core.errors import CheckpointError, ConfigError, DataError
from conceptlm.core.lock import RunLock

__all__ = ["LABELS_DIR", "SPLITS", "label", "resolve_sae_dir", "check_sae_settings", "resolve_teacher",
           "compute_device",
           "label_cache_dir", "open_labeled_windows", "StaleLabelCacheError"]

log = logging.getLogger(__name__)

LABELS_DIR = "labels"
"""Sub-folder of a run that holds its label caches when ``labels.cache_dir`` is empty."""
SPLITS = ("train", "val")


def resolve_sae_dir(cfg: Any, checkpoint: str | Path | None = None) -> Path:
    """The SAE: ``checkpoint``, else ``cfg.labels.sae_path``, else ``{run_dir}/sae``; a folder holding an ``sae/``
    sub-folder (a run folder) is followed into it. Besides our own SAE folders (``sae.json``), an EleutherAI
    sparsify or SAELens folder, or an OpenAI TopK ``.pt`` file, is accepted (:func:`load_sae` converts it); any
    other path is a one-line :class:`ConfigError`."""
    where = Path(checkpoint or cfg.labels.sae_path or Path(cfg.run_dir) / SAE_DIR)
    for candidate in (where, where / SAE_DIR):
        if (candidate / SAE_CONFIG).is_file():
            return candidate
    if where.exists():
        try:
            detect_sae_format(where)
        except CheckpointError as e:
            raise ConfigError(f"no SAE at {e}", field="labels.sae_path") from None
        return where
    raise ConfigError(f"no SAE at {where} (expected {SAE_CONFIG} there or in its {SAE_DIR}/ folder); train the SAE "
                      f"first or set labels.sae_path", field="labels.sae_path")


def check_sae_settings(cfg: Any, sae: TopKSAE, sae_dir: Path) -> None:
    """Before any labelling: the SAE's latent count must be the config's ``sae.n_latents`` (when the config has an
    ``sae`` section: the students' concept heads are sized by it), and ``labels.k_attr`` must not exceed the latents
    a token can be labelled with (the SAE's ``k``; ``n_latents`` for dense pre-activation attribution)."""
    section = getattr(cfg, "sae", None)
    if section is not None and getattr(section, "n_latents", sae.n_latents) != sae.n_latents:
        raise ConfigError(f"the SAE at {sae_dir} has {sae.n_latents} latents, but sae.n_latents is "
                          f"{section.n_latents}; set sae.n_latents={sae.n_latents} (and student.n_concepts) or use "
                          f"another SAE", field="sae.n_latents")
    labels = cfg.labels
    dense = labels.mode == "pre" and labels.selection == "attribution"
    limit = sae.n_latents if dense else sae.k
    if labels.k_attr > limit:
        raise ConfigError(f"{labels.k_attr} labels per token, but the SAE at {sae_dir} has "
                          f"{'only ' + str(limit) + ' latents' if dense else 'k=' + str(limit) + ' active latents'} "
                          f"per token; set labels.k_attr <= {limit}", field="labels.k_attr")


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
    where = sae_dir / SAE_CONFIG if (sae_dir / SAE_CONFIG).is_file() else sae_dir  # a foreign SAE has no sae.json
    recorded = (sae.meta.get("teacher") or {}).get("fingerprint")
    if recorded is not None:
        found = teacher_identity(teacher_path, cfg.teacher.layer, model=teacher).get("fingerprint")
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


def compute_device() -> torch.device:
    """The current CUDA device when there is one, else the CPU (where labels and the interpretation verbs run)."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def label(cfg: Any, *, checkpoint: str | Path | None = None, output: str | Path | None = None) -> dict[str, Any]:
    """Write the label caches of the train and val windows (resuming an interrupted run).

    Under torchrun (more than one process; ``labels.shard_windows`` > 0 is then required) every process computes
    its own shards of each split's sharded cache (:func:`conceptlm.cocomix.label_cache.write_label_shards`);
    rank 0 holds the locks, decides reuse / resume / rebuild before and writes the manifest after.

    Args:
        cfg: a config with ``teacher``, ``corpus``, ``labels`` and ``run`` sections (see the module docstring).
        checkpoint: the SAE folder (overrides ``labels.sae_path``).
        output: the cache folder (overrides ``labels.cache_dir``).

    Returns:
        ``{"path", "sae", "teacher", "layer", "windows", "tokens", "computed_tokens", "seconds", "tokens_per_s",
        "processes", "splits": {split: write_label_cache summary}}``; ``tokens_per_s`` counts the windows computed
        by this call (by all processes).
    """
    cfg.labels.validate()
    log_to_stderr()
    world = world_size()
    if world > 1 and not cfg.labels.shard_windows:
        raise ConfigError(f"labelling with {world} processes writes a sharded cache: set labels.shard_windows (a "
                          f"multiple of labels.batch_size, e.g. {cfg.labels.chunk_windows})",
                          field="labels.shard_windows")
    with _process_group() as rank:
        sae_dir = resolve_sae_dir(cfg, checkpoint)
        device = compute_device()
        sae = load_sae(sae_dir, device=device)
        check_sae_settings(cfg, sae, sae_dir)
        teacher_path = resolve_teacher(cfg, sae)
        teacher, tokenizer = load_teacher(cfg.teacher, path=teacher_path, device=device)
        _check_pair(cfg, teacher, teacher_path, sae, sae_dir)
        labeler = ConceptLabeler(teacher, sae, cfg.teacher.layer, cfg.labels)
        splits = build_corpus(cfg.corpus, tokenizer)
        teacher_fp, sae_fp = state_fingerprint(teacher), state_fingerprint(sae)  # the weights, by content
        out_dir = label_cache_dir(cfg, output)
        summaries: dict[str, dict[str, Any]] = {}
        start = time.perf_counter()
        with contextlib.ExitStack() as locks:  # like training: one writer per run folder (and per outside cache)
            def lock() -> None:
                for folder in dict.fromkeys([Path(cfg.run_dir), out_dir]):
                    if folder == out_dir and out_dir.resolve().is_relative_to(Path(cfg.run_dir).resolve()):
                        continue
                    locks.enter_context(RunLock(folder))

            _on_main(lock, rank)
            for split in SPLITS:
                data = getattr(splits, split)
                if data is None:
                    continue
                spec = CacheSpec(teacher={"sha256": teacher_fp},
                                 corpus={"identity": corpus_identity(cfg.corpus), "split": split},
                                 batch_size=cfg.labels.batch_size, chunk_windows=cfg.labels.chunk_windows,
                                 shard_windows=cfg.labels.shard_windows)
                write = _label_split_sharded if cfg.labels.shard_windows else _label_split
                summaries[split] = write(cfg, out_dir / split, split, data.windows, labeler, spec,
                                         teacher_fp=teacher_fp, sae_fp=sae_fp, rank=rank, world=world)
        seconds = time.perf_counter() - start
    computed = sum(s["computed_windows"] * cfg.corpus.window for s in summaries.values())
    label_seconds = sum(s["seconds"] for s in summaries.values())
    return {"path": str(out_dir), "sae": str(sae_dir), "teacher": str(teacher_path), "layer": cfg.teacher.layer,
            "windows": sum(s["windows"] for s in summaries.values()),
            "tokens": sum(s["tokens"] for s in summaries.values()), "computed_tokens": computed,
            "seconds": seconds, "tokens_per_s": computed / label_seconds if label_seconds > 0 else 0.0,
            "processes": world, "splits": summaries}


@contextlib.contextmanager
def _process_group():
    """This process's rank; under torchrun the process group is set up (and torn down again when this call set it
    up and ends normally)."""
    import torch.distributed as dist

    from conceptlm.core.distributed import cleanup_distributed, get_rank, init_distributed

    own = world_size() > 1 and not dist.is_initialized()
    if own:
        init_distributed()
    yield get_rank()
    if own:
        cleanup_distributed()


def _on_main(fn, rank: int) -> Any:
    """Run ``fn`` on rank 0 only; its exception is raised there and a one-line error on the other ranks (which
    learn of it through an all-reduce, so none waits forever). Returns ``fn()`` on rank 0, else None."""
    failed: BaseException | None = None
    result = None
    if rank == 0:
        try:
            result = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised below, after telling the other ranks
            failed = e
    return _agree(failed, result, "rank 0 stopped the label verb (see its error)")


def _agree(failed: BaseException | None, result: Any, message: str) -> Any:
    """All ranks learn whether any failed (an all-reduce): the failed one re-raises, the others raise ``message``."""
    from conceptlm.core.distributed import all_reduce_sum

    if world_size() > 1:
        flag = all_reduce_sum(torch.tensor([1.0 if failed is not None else 0.0]))
        if failed is None and flag.item() > 0:
            raise LabelCacheError(message)
    if failed is not None:
        raise failed
    return result


class StaleLabelCacheError(LabelCacheError, StaleArtifactError):
    """A label cache of other settings or inputs is in the way (``pipeline.on_change=rebuild`` recomputes it)."""


def _prepare_split(cfg: Any, path: Path, split: str, identity: Any) -> tuple[bool, list[Path]]:
    """Decide what happens to one split's cache (reuse, resume, rebuild or refuse; see :func:`_label_split`) and
    record its identity when it is (re)started. Returns ``(finished, folders this call creates)``."""
    on_change = on_change_of(cfg)
    what = f"{path.parent.name}/{split}"
    try:
        decision = decide(path, identity, on_change=on_change, what=what,  # type: ignore[arg-type]
                          option=ON_CHANGE_OPTION, verify=False)
    except StaleArtifactError as e:
        raise StaleLabelCacheError(str(e)) from None
    manifest = read_manifest(path)
    if decision == "reuse" and is_complete(manifest):
        problem = damaged_file(path, manifest)
        if problem is not None and on_change != "rebuild":
            raise DataError(f"{problem}; rerun with {ON_CHANGE_OPTION}=rebuild to recompute the cache")
        if problem is not None:
            log.warning("%s: rebuilding (%s)", what, problem)
            decision = "rebuild"
        else:
            log.info("%s: reused (label cache %s)", what, identity.fingerprint[:12])
    if decision == "rebuild":
        remove_output(path)
    finished = decision == "reuse" and is_complete(manifest)
    fresh = missing_folders(path)  # what this call creates: removed again if the new cache is refused
    if not finished:
        begin(path, identity)
    return finished, fresh


def _split_identity(cfg: Any, split: str, windows: Any, teacher_fp: str, sae_fp: str) -> Any:
    return labels_identity(cfg.labels, layer=cfg.teacher.layer, window=cfg.corpus.window, split=split,
                           n_windows=len(windows), teacher=teacher_fp, sae=sae_fp, windows=windows_digest(windows))


def _cost(cfg: Any, labeler: ConceptLabeler, tokens: int) -> dict[str, Any]:
    from conceptlm.cocomix.costs import label_flops_per_token

    per_token = label_flops_per_token(labeler.teacher, cfg.teacher.layer, n_latents=labeler.n_latents,
                                      k=int(labeler.sae.k), labels=cfg.labels)
    return {"cost": {"tokens": tokens, "flops_per_token": per_token, "flops": per_token * tokens}}


def _label_split(cfg: Any, path: Path, split: str, windows: Any, labeler: ConceptLabeler, spec: CacheSpec, *,
                 teacher_fp: str, sae_fp: str, rank: int = 0, world: int = 1) -> dict[str, Any]:
    """One split's cache with its ``artifact.json``: reused when complete, intact and of the same identity
    (:func:`conceptlm.cocomix.identity.labels_identity`), resumed when unfinished, else refused with one line
    (``pipeline.on_change=refuse``, the default) or recomputed (``rebuild``). The manifest records the identity
    when the cache starts and the files' sha256 when it completes."""
    identity = _split_identity(cfg, split, windows, teacher_fp, sae_fp)
    finished, fresh = _prepare_split(cfg, path, split, identity)
    try:
        summary = write_label_cache(path, windows, labeler, spec, progress=cfg.labels.progress,
                                    desc=f"labels ({split})")
    except LabelCacheError:
        if fresh and not (path / PROGRESS).exists():
            shutil.rmtree(fresh[-1], ignore_errors=True)
        raise
    if not finished:
        write_manifest(path, identity, files=[HEADER, LABELS, MASK, PROGRESS],
                       extra=_cost(cfg, labeler, summary["tokens"]))
    return summary


def _label_split_sharded(cfg: Any, path: Path, split: str, windows: Any, labeler: ConceptLabeler, spec: CacheSpec,
                         *, teacher_fp: str, sae_fp: str, rank: int = 0, world: int = 1) -> dict[str, Any]:
    """:func:`_label_split` for a sharded cache, by every process: rank 0 decides and prepares the folder, each
    process writes its missing shards, rank 0 checks them all and completes the manifest."""
    from conceptlm.core.distributed import all_reduce_sum, barrier

    identity = _split_identity(cfg, split, windows, teacher_fp, sae_fp)

    def prepare() -> bool:
        finished, _ = _prepare_split(cfg, path, split, identity)
        prepare_label_shards(path, cache_header(windows, labeler, spec))
        return finished

    finished = _on_main(prepare, rank)
    start = time.perf_counter()
    failed, summary = None, None
    try:
        summary = write_label_shards(path, windows, labeler, spec, rank=rank, world_size=world,
                                     progress=cfg.labels.progress and rank == 0, desc=f"labels ({split})")
    except BaseException as e:  # noqa: BLE001 - re-raised by _agree, after telling the other ranks
        failed = e
    summary = _agree(failed, summary, f"another rank failed while labelling {path} (see its error)")
    done = all_reduce_sum(torch.tensor([summary["computed_windows"], summary["resumed_from"]], dtype=torch.long))
    barrier()
    seconds = time.perf_counter() - start

    def finish() -> None:
        if finished:  # reused as it is
            return
        files = finish_label_shards(path)
        write_manifest(path, identity, files=files, extra=_cost(cfg, labeler, summary["tokens"]))

    _on_main(finish, rank)
    computed = int(done[0])
    return {**summary, "computed_windows": computed, "resumed_from": int(done[1]), "seconds": seconds,
            "tokens_per_s": computed * (summary["tokens"] // summary["windows"]) / max(seconds, 1e-9)}


def open_labeled_windows(cache_dir: str | Path, windows: Any, *, k_attr: int | None = None,
                         n_latents: int | None = None, verify: bool = True, teacher: str | None = None,
                         sae: str | None = None) -> LabeledWindows:
    """The windows of one split with their cached labels, for a student's Dataset.

    The cache must be complete with its ``artifact.json``; with ``verify`` every file's sha256 is checked against
    it first (one read of the cache: zeroed or flipped label rows are a one-line :class:`DataError` naming the
    file, not a silently different student).

    Args:
        cache_dir: one split's cache folder (``{label_cache_dir}/train``).
        windows: that split's windows (same order as when the cache was written).
        k_attr, n_latents: values the student expects (checked against the cache header when given).
        verify: check the files' checksums and the windows' token hash against the header.
        teacher, sae: the weights fingerprints (:func:`conceptlm.cocomix.identity.weights_fingerprint`) of the
            teacher and the SAE the caller uses now; the header must record the same ones.
    """
    require(cache_dir, kind=LABELS_KIND, verify=verify, what=str(cache_dir))
    expect: dict[str, Any] = {k: v for k, v in (("k_attr", k_attr), ("n_latents", n_latents)) if v is not None}
    if teacher is not None:
        expect["teacher"] = {"sha256": teacher}
    if sae is not None:
        expect["sae"] = {"sha256": sae}
    return LabeledWindows(windows, LabelCache(cache_dir, expect=expect), verify=verify)
