"""The frozen teacher whose hidden states the SAE reads: loading one, training a tiny one, and reading the
residual stream after one block without running the blocks above it.

``TeacherSection.path`` may be

- an HF model folder, a ``.gguf`` file or a named offline model (``smollm2-135m``), see
  :func:`conceptlm.core.hf.load_causal_lm`;
- a conceptlm checkpoint folder (``runs/<name>/checkpoints/step_N``) or run folder (``runs/<name>``, its newest
  checkpoint), whose HF export is in ``model/``;
- ``null``: a tiny ``LlamaForCausalLM`` (or another tiny HF arch) trained from scratch on the corpus by
  :func:`train_tiny_teacher`, with a BPE tokenizer trained on the corpus's training documents.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from conceptlm.cocomix.config import CorpusSection, TeacherSection, TinyTeacherConfig
from conceptlm.cocomix.corpus import (
    build_corpus,
    collate_windows,
    corpus_identity,
    is_shard_corpus,
    load_documents,
    shard_tokenizer,
    split_documents,
)
from conceptlm.core import checkpoint as ckpt_lib
from conceptlm.core import hf
from conceptlm.core.config import OptimSection, RunSection, ScheduleSection, TrainSection
from conceptlm.core.distributed import DistInfo
from conceptlm.core.errors import CheckpointError, ConfigError
from conceptlm.core.lock import RunLock
from conceptlm.core.recipe import fit, make_plan
from conceptlm.core.run import create_run_dir
from conceptlm.core.tokenizer import train_bpe_tokenizer
from conceptlm.core.unit import THROUGHPUT_KEY
from conceptlm.lm.unit import HFModelUnit

__all__ = ["NextTokenUnit", "resolve_teacher_path", "load_teacher",
           "train_tiny_teacher", "teacher_blocks", "hidden_at_layer", "teacher_identity", "teacher_width",
           "TINY_TEACHER_DIR"]

log = logging.getLogger(__name__)

TINY_TEACHER_DIR = "teacher"
"""Sub-folder of a run that holds its tiny teacher's own run (checkpoints, tokenizer)."""


# ----------------------------------------------------------------------------------------------- loading
def resolve_teacher_path(path: str | Path) -> str:
    """The loadable model location of ``path``: a conceptlm checkpoint's or run's ``model/`` export, else ``path``
    unchanged (an HF folder, ``.gguf`` file or named model for :func:`conceptlm.core.hf.load_causal_lm`)."""
    p = Path(path)
    if p.is_dir() and (p / ckpt_lib.MANIFEST).is_file():
        problem = ckpt_lib.verify_checkpoint(p)
        if problem is not None:
            raise CheckpointError(f"{p}: damaged checkpoint ({problem})")
        return _export_of(p)
    if p.is_dir() and (p / "checkpoints").is_dir() and not (p / "config.json").is_file():
        latest = ckpt_lib.find_latest_checkpoint(p)
        if latest is None:
            raise ConfigError(f"{p} is a run folder without checkpoints", field="teacher.path")
        return _export_of(latest)
    return str(path)


def _export_of(ckpt: Path) -> str:
    model = ckpt / "model"
    if not (model / "config.json").is_file():
        raise ConfigError(f"{ckpt} has no Hugging Face export in model/ (config.json); pass an HF model folder",
                          field="teacher.path")
    return str(model)


def load_teacher(section: TeacherSection, *, path: str | Path | None = None,
                 device: str | torch.device = "cpu") -> tuple[nn.Module, Any]:
    """``(model, tokenizer)``: frozen (``requires_grad=False``), eval mode, fp32, on ``device``.

    Args:
        path: overrides ``section.path`` (e.g. the export :func:`train_tiny_teacher` returned).

    Raises:
        ConfigError: no path (a tiny teacher must be trained first), or ``section.layer`` is not a block.
        ModelPathError / CheckpointError: the model cannot be found or read (one line).
    """
    where = path if path is not None else section.path
    if where is None:
        raise ConfigError("no teacher path: set teacher.path, or train the tiny teacher (train_tiny_teacher) and "
                          "pass its export", field="teacher.path")
    resolved = resolve_teacher_path(where)
    model = hf.load_causal_lm(resolved, dtype=torch.float32)
    tokenizer = hf.load_tokenizer(resolved)
    n = len(teacher_blocks(model))
    if not 0 <= section.layer < n:
        raise ConfigError(f"{section.layer} is not a block of the teacher at {resolved} ({n} blocks)",
                          field="teacher.layer")
    model.requires_grad_(False)
    return model.float().eval().to(device), tokenizer


def teacher_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of an HF causal LM (``model.layers`` for Llama-style, ``transformer.h`` for GPT-2)."""
    base = hf.backbone(model)
    for name in ("layers", "h", "blocks"):
        blocks = getattr(base, name, None)
        if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
            return blocks
    raise TypeError(f"{type(base).__name__}: cannot find its list of decoder blocks (layers / h / blocks)")


def teacher_width(model: nn.Module) -> int:
    """Width of the residual stream (``hidden_size`` / ``n_embd``)."""
    cfg = model.config
    for name in ("hidden_size", "n_embd", "d_model"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ValueError(f"{type(cfg).__name__} has no hidden_size / n_embd")


class _Stop(Exception):
    def __init__(self, value: torch.Tensor):
        super().__init__()
        self.value = value


def hidden_at_layer(model: nn.Module, input_ids: torch.Tensor, layer: int,
                    attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The residual stream after block ``layer``: ``(B, T) -> (B, T, D)``.

    Equals ``model(input_ids, output_hidden_states=True).hidden_states[layer + 1]`` for every block but the last
    (for the last block HF reports the stream after the final norm; this returns the block's own output). The
    blocks above ``layer``, the final norm and the LM head are not run: a forward hook on block ``layer`` stops
    the pass. Gradients flow as usual when enabled.
    """
    blocks = teacher_blocks(model)
    if not 0 <= layer < len(blocks):
        raise ValueError(f"layer {layer} is not a block (the model has {len(blocks)})")

    def stop(_module, _args, output):
        raise _Stop(output[0] if isinstance(output, tuple) else output)

    handle = blocks[layer].register_forward_hook(stop)
    try:
        hf.backbone(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _Stop as s:
        return s.value
    finally:
        handle.remove()
    raise RuntimeError(f"block {layer} did not run")  # pragma: no cover - the hook always fires


def teacher_identity(path: str | Path, layer: int, model: nn.Module | None = None) -> dict[str, Any]:
    """A JSON-able identity of a teacher (written into ``sae.json``): where it was loaded from (information only),
    its architecture, width, depth, the SAE layer and ``fingerprint``, the sha256 of its weights by content
    (:func:`conceptlm.cocomix.identity.weights_fingerprint` of the fp32 model :func:`load_teacher` returns), so a
    re-initialised teacher of the same shape is another teacher.

    Args:
        model: the teacher already loaded from ``path`` (by :func:`load_teacher`); loaded here when None.
    """
    from conceptlm.cocomix.identity import weights_fingerprint

    resolved = resolve_teacher_path(path)
    if model is None:
        model = hf.load_causal_lm(resolved, dtype=torch.float32)
    cfg = model.config
    return {"path": str(path), "model_dir": str(resolved), "model_type": getattr(cfg, "model_type", None),
            "hidden_size": teacher_width(model), "num_layers": len(teacher_blocks(model)), "layer": layer,
            "fingerprint": weights_fingerprint(model)}


# ----------------------------------------------------------------------------------------------- tiny teacher
class NextTokenUnit(HFModelUnit):
    """Next-token prediction on token windows (``nll``: summed cross-entropy over ``B * (T - 1)`` targets)."""

    throughput_unit = "tokens"

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.loss_weights = {"nll": 1.0}

    def counts(self, batch: dict) -> dict:
        b, t = batch["input_ids"].shape
        return {"nll": b * (t - 1), THROUGHPUT_KEY: b * t}

    def forward(self, batch: dict) -> dict:
        ids = batch["input_ids"]
        loss, _ = hf.causal_lm_loss_sum(self.model, ids, ids)
        return {"nll": loss}


def _tiny_config(corpus: CorpusSection, teacher: TeacherSection, out_dir: Path,
                 progress: bool) -> TinyTeacherConfig:
    cfg = TinyTeacherConfig(
        run=RunSection(name=out_dir.name, out_dir=str(out_dir.parent), resume="auto"),
        optim=OptimSection(lr=teacher.lr, weight_decay=teacher.weight_decay),
        schedule=ScheduleSection(kind="cosine", warmup_steps=teacher.warmup_steps, min_lr_ratio=0.1),
        train=TrainSection(max_steps=teacher.steps, micro_batch_size=teacher.batch_size, seed=teacher.seed,
                           eval_every=0, save_every=teacher.save_every, log_every=max(1, teacher.steps // 10),
                           keep_checkpoints=1, progress=progress, precision="fp32"),
        corpus=corpus, teacher=teacher)
    cfg.validate()
    return cfg


def _tokenizer(out_dir: Path, train_docs: list[str], vocab_size: int, *, on_change: str = "refuse"):
    """The tiny teacher's tokenizer in ``out_dir/tokenizer``: reloaded when its ``artifact.json`` says it was
    trained on these training documents with this vocabulary size; else trained (a tokenizer of other documents or
    of an older version is refused, or replaced with ``on_change="rebuild"``)."""
    from conceptlm.cocomix.identity import ON_CHANGE_OPTION, tokenizer_identity
    from conceptlm.core.artifact import decide, write_manifest
    from conceptlm.core.io import atomic_dir

    where = out_dir / "tokenizer"
    identity = tokenizer_identity(train_docs, vocab_size)
    if decide(where, identity, on_change=on_change, what=f"{out_dir.name}/tokenizer",  # type: ignore[arg-type]
              option=ON_CHANGE_OPTION) == "reuse":
        return hf.load_tokenizer(where)
    tok = train_bpe_tokenizer(train_docs, vocab_size=vocab_size)
    with atomic_dir(where) as tmp:
        tok.save_pretrained(str(tmp))
        write_manifest(tmp, identity)
    return hf.load_tokenizer(where)


def train_tiny_teacher(corpus: CorpusSection, teacher: TeacherSection, out_dir: str | Path, info: DistInfo, *,
                       command: str | None = None, progress: bool = True, on_change: str = "refuse") -> Path:
    """Train (or finish, or reuse) a tiny HF causal LM on the corpus windows with next-token prediction.

    The run lives in ``out_dir`` (checkpoints, metrics, config, ``tokenizer/``) with an ``artifact.json``
    (:func:`conceptlm.cocomix.identity.tiny_teacher_identity`: the teacher settings, the window and the documents
    by content), recorded when the run starts and completed with the export's files at the end. A finished run of
    the same identity is reused; an unfinished one resumes from its newest intact checkpoint; one of other
    settings or documents is refused with one line naming the change (``on_change="refuse"``) or trained again
    from scratch (``"rebuild"``). Its tokenizer is a BPE trained on the corpus's training documents
    (``teacher.vocab_size``), or the tokenizer of a token-shard corpus.

    Args:
        info: the process's :class:`DistInfo` (from the caller's run session).

    Returns:
        The HF export (``checkpoints/step_N/model``) of the final step; it loads with ``from_pretrained``.

    Raises:
        StaleArtifactError: ``out_dir`` holds a teacher of other settings or documents and ``on_change="refuse"``.
    """
    from conceptlm.cocomix.costs import train_flops
    from conceptlm.cocomix.identity import run_stage, tiny_teacher_identity
    from conceptlm.core.artifact import begin, read_manifest, write_manifest
    from conceptlm.core.distributed import barrier

    out_dir = Path(out_dir)
    shards = is_shard_corpus(corpus)  # token shards bring their tokenizer and split (no documents in memory)
    documents = None if shards else split_documents(load_documents(corpus), corpus.val_fraction, corpus.seed)
    identity = tiny_teacher_identity(corpus, teacher, documents, info.world_size)
    state = run_stage(out_dir, identity, on_change=on_change, what=out_dir.name, remove=info.is_main)
    if state == "skip":
        log.info("%s: reused (tiny teacher %s)", out_dir.name, identity.fingerprint[:12])
        return out_dir / read_manifest(out_dir)["export"]
    barrier()  # rank 0 has removed a teacher being rebuilt
    cfg = _tiny_config(corpus, teacher, out_dir, progress)
    lock = RunLock(cfg.run_dir)
    try:
        create_run_dir(cfg, info, command=command, lock=lock)
        if info.is_main:
            begin(out_dir, identity)
            if not shards:
                tokenizer = _tokenizer(out_dir, documents[0], teacher.vocab_size, on_change=on_change)
        barrier()
        if shards:
            tokenizer = shard_tokenizer(corpus)
        elif not info.is_main:
            tokenizer = _tokenizer(out_dir, documents[0], teacher.vocab_size, on_change=on_change)
        splits = build_corpus(corpus, tokenizer, documents=documents)
        model = hf.build_tiny_model(teacher.arch, len(tokenizer), hidden_size=teacher.hidden_size,
                                    num_layers=teacher.num_layers, num_heads=teacher.num_heads,
                                    max_position_embeddings=max(corpus.window, 16),
                                    pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                                    eos_token_id=tokenizer.eos_token_id, seed=teacher.seed)
        unit = NextTokenUnit(model)
        plan = make_plan(cfg, info, splits.train)
        res = fit(cfg, info, unit, train_ds=splits.train, eval_ds=splits.val, collate_fn=collate_windows,
                  source_name=corpus_identity(corpus), artifacts={"tokenizer": tokenizer}, plan=plan)
        if res.checkpoint is None:
            raise RuntimeError(f"the tiny teacher in {out_dir} wrote no checkpoint")
        export = Path(res.checkpoint) / "model"
        if info.is_main:
            files = [p.relative_to(out_dir).as_posix() for p in sorted(export.rglob("*")) if p.is_file()]
            files += [p.relative_to(out_dir).as_posix() for p in sorted((out_dir / "tokenizer").rglob("*"))
                      if p.is_file() and p.name != "artifact.json"]
            tokens = teacher.steps * teacher.batch_size * corpus.window * info.world_size
            write_manifest(out_dir, identity, files=files,
                           extra={"export": export.relative_to(out_dir).as_posix(),
                                  "cost": {"train_tokens": tokens, "train_flops": train_flops(model, tokens)}})
            log.info("tiny teacher: step %d, %s", res.step, res.last_eval)
    finally:
        lock.release()
    return export
