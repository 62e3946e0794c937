"""Training a TopK SAE on a frozen teacher's residual stream, on the shared loop.

``train_sae(cfg)``: (train a tiny teacher in ``{run_dir}/teacher`` when ``teacher.path`` is null) -> load the frozen
teacher -> token windows of the corpus -> initialise the SAE (``b_dec`` = mean of the normalized activations of the
first ``sae.init_windows`` training windows, the same on every rank) -> ``fit`` with :class:`SAEUnit` -> the final
SAE in our own format (``sae.safetensors`` + ``sae.json``). The SAE stage is a run of its own in ``{run_dir}/sae``,
like the tiny teacher's in ``{run_dir}/teacher`` and each student's in ``{run_dir}/students/``: its config
(:func:`sae_run_config`), metrics, checkpoints, the final SAE and its ``artifact.json`` are all in that folder. Every
checkpoint also holds the SAE in our format in its ``model/`` folder, and the SAE config as the ``sae_config``
artefact.

Loss (per token, normalized space): ``||x - x_hat||^2 / d_in + aux_coef * ||e - e_hat||^2 / d_in`` (parts ``mse``
and ``auxk``, averaged over tokens). Metrics: ``fvu`` (see :func:`conceptlm.cocomix.sae.fvu_terms`; the reference
is the initialisation mean), ``dead`` (fraction of latents dead at the step), ``l0`` (non-zero activations per
token).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from conceptlm.cocomix.config import SAESection, SAETrainConfig
from conceptlm.cocomix.corpus import build_corpus, collate_windows, corpus_identity
from conceptlm.cocomix.sae import (
    SAE_CONFIG,
    SAE_WEIGHTS,
    TopKSAE,
    auxk_sum,
    fvu_terms,
    l0_terms,
    load_params,
    mse_sum,
    save_sae,
)
from conceptlm.cocomix.teacher import (
    TINY_TEACHER_DIR,
    hidden_at_layer,
    load_teacher,
    teacher_identity,
    teacher_width,
    train_tiny_teacher,
)
from conceptlm.core.config import RunConfig, with_own_length
from conceptlm.core.distributed import all_reduce_sum, barrier
from conceptlm.core.recipe import fit, make_plan
from conceptlm.core.run import run_session
from conceptlm.core.trainer import TrainResult
from conceptlm.core.unit import THROUGHPUT_KEY, TrainUnit

__all__ = ["SAEUnit", "train_sae", "build_sae", "sae_run_config", "SAE_DIR"]

log = logging.getLogger(__name__)

SAE_DIR = "sae"
"""Sub-folder of a run that holds its SAE stage: the SAE run (``config.yaml``, ``metrics.jsonl``, ``checkpoints/``),
the final SAE (``sae.safetensors`` + ``sae.json``) and its ``artifact.json``."""


def build_sae(section: SAESection, d_in: int) -> TopKSAE:
    """An initialised SAE for a ``d_in``-wide residual stream."""
    return TopKSAE(d_in, section.n_latents, section.k, normalize_input=section.normalize_input, eps=section.eps,
                   k_aux=section.aux_k, dead_after_tokens=section.dead_after_tokens, seed=section.seed)


class SAEUnit(TrainUnit):
    """SAE training on activations a frozen teacher computes in ``prepare``.

    Batches: ``{"ids": (B,), "input_ids": (B, T)}``; ``prepare`` adds ``"h"``: ``(B * T, d_in)`` fp32 activations
    after block ``layer`` (no gradients, autocast off: the teacher runs in its own dtype).
    """

    metric_names = ("fvu", "dead", "l0")
    throughput_unit = "tokens"

    def __init__(self, sae: TopKSAE, teacher: nn.Module, layer: int, *, aux_coef: float,
                 reference: torch.Tensor | None = None):
        super().__init__()
        self.sae, self.teacher, self.layer = sae, teacher, layer
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        self.loss_weights = {"mse": 1.0, "auxk": float(aux_coef)}
        ref = torch.zeros(sae.d_in) if reference is None else reference.detach().float().clone()
        self.register_buffer("fvu_reference", ref)

    def frozen_modules(self) -> list[str]:
        return ["teacher"]

    def train(self, mode: bool = True) -> SAEUnit:
        super().train(mode)
        self.teacher.eval()  # the teacher never trains (no dropout)
        return self

    @torch.no_grad()
    def activations(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``(B, T) -> (B * T, d_in)`` fp32 teacher activations after block ``layer``."""
        with torch.autocast(input_ids.device.type, enabled=False):
            h = hidden_at_layer(self.teacher, input_ids, self.layer)
        return h.float().reshape(-1, h.shape[-1])

    def prepare(self, batch: dict) -> dict:
        return {**batch, "h": self.activations(batch["input_ids"])}

    def counts(self, batch: dict) -> dict:
        n = batch["h"].shape[0]
        return {"mse": n, "auxk": n, THROUGHPUT_KEY: n}

    def begin_step(self, step: int) -> None:
        self.sae.commit_firing()  # the previous step's firing (all ranks) decides which latents are dead now
        self.sae.normalize_decoder()

    def forward(self, batch: dict) -> dict:
        sae = self.sae
        out = sae(batch["h"], track=False)
        if self.training:
            fired = sae.fired_latents(out.values, out.indices).detach()
            tokens = torch.tensor([out.values.shape[0]], dtype=torch.long, device=fired.device)
            both = all_reduce_sum(torch.cat([fired, tokens]))  # every rank records the global firing
            sae.record_firing(both[:-1], both[-1])
        dead = sae.dead_mask()
        return {"mse": mse_sum(out), "auxk": auxk_sum(out),
                "fvu": fvu_terms(out.x.detach(), out.x_hat.detach(), self.fvu_reference),
                "dead": (dead.sum(), dead.numel()), "l0": l0_terms(out.values.detach())}

    def export(self, directory: Path, state_dict: dict[str, torch.Tensor], artifacts: dict[str, Any]) -> bool:
        sae = _sae_from_state(self.sae, state_dict)
        save_sae(sae, directory, layer=self.layer, teacher=self.sae.meta.get("teacher"))
        return True


def _sae_from_state(template: TopKSAE, state_dict: dict[str, torch.Tensor]) -> TopKSAE:
    """A CPU copy of the unit's SAE from a (gathered) state dict, decoder rows renormalized."""
    sae = TopKSAE(**template.config(), seed=0)
    load_params(sae, {k[len("sae."):]: v for k, v in state_dict.items()
                      if k.startswith("sae.") and k[len("sae."):] in ("W_enc", "b_enc", "W_dec", "b_dec")},
                source="checkpoint state")
    sae.normalize_decoder()
    sae.meta = dict(template.meta)
    return sae


class _SAEConfigArtifact:
    """Checkpoint artefact ``sae_config/sae.json``: the SAE's configuration and its teacher."""

    def __init__(self, config: dict[str, Any]):
        self.config = config

    def __call__(self, directory: Path) -> None:
        (Path(directory) / "sae.json").write_text(json.dumps(self.config, indent=2) + "\n", encoding="utf-8")


@torch.no_grad()
def _initial_mean(unit: SAEUnit, windows: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Mean normalized activation over ``windows`` (computed in chunks)."""
    total, n = None, 0
    for chunk in windows.split(16):
        x, _, _ = unit.sae.normalize(unit.activations(chunk.to(device)))
        s = x.double().sum(0)
        total = s if total is None else total + s
        n += x.shape[0]
    return (total / n).float()


def sae_run_config(cfg: SAETrainConfig) -> SAETrainConfig:
    """The SAE stage's own run config: the ``corpus``, ``teacher`` and ``sae`` sections and the shared loop's
    sections of ``cfg`` (an :class:`SAETrainConfig` or a whole :class:`~conceptlm.cocomix.config.CocomixConfig`), with
    ``sae.steps`` / ``sae.batch_size`` / ``sae.lr`` (when set) in place of ``train.max_steps`` /
    ``train.micro_batch_size`` / ``optim.lr``, in the run folder ``{cfg.run_dir}/sae``."""
    own = with_own_length(cfg, steps=cfg.sae.steps, batch_size=cfg.sae.batch_size, lr=cfg.sae.lr)
    shared = {f.name: getattr(own, f.name) for f in dataclasses.fields(RunConfig)}
    shared["run"] = dataclasses.replace(own.run, out_dir=str(cfg.run_dir), name=SAE_DIR)
    return SAETrainConfig(**shared, corpus=cfg.corpus, teacher=cfg.teacher, sae=cfg.sae)


def train_sae(cfg: SAETrainConfig, *, command: str | None = None) -> TrainResult:
    """Train the SAE of ``cfg`` (see the module docstring). Returns the loop's result; the SAE run is
    ``{run_dir}/sae`` with an ``artifact.json`` (:func:`conceptlm.cocomix.identity.sae_identity`: the SAE
    settings, the teacher's weights and the training windows by content), recorded when the run starts.

    An SAE of other settings or inputs in ``{run_dir}/sae`` (or one made before the SAE was a run of its own, whose
    checkpoints and metrics lie in ``{run_dir}``) is refused with one line naming the change, before anything is
    written (``pipeline.on_change=rebuild``, when the config has a ``pipeline`` section: the SAE run is removed,
    with an older layout's checkpoints and metrics in ``{run_dir}``, and trained again); the tiny teacher
    (``teacher.path: null``) is checked the same way first.
    """
    from conceptlm.cocomix.costs import sae_train_flops
    from conceptlm.cocomix.identity import on_change_of, run_stage, sae_identity, windows_digest
    from conceptlm.core.artifact import begin, write_manifest

    cfg.validate()
    root = cfg.run_dir
    on_change = on_change_of(cfg)
    cfg = sae_run_config(cfg)
    with run_session(cfg, command) as session:
        info = session.info
        teacher_path = cfg.teacher.path
        if teacher_path is None:
            teacher_path = str(train_tiny_teacher(cfg.corpus, cfg.teacher, root / TINY_TEACHER_DIR, info,
                                                  command=command, progress=cfg.train.progress,
                                                  on_change=on_change))
        teacher, tokenizer = load_teacher(cfg.teacher, path=teacher_path, device=info.device)
        splits = build_corpus(cfg.corpus, tokenizer)
        identity = teacher_identity(teacher_path, cfg.teacher.layer, model=teacher)
        out = cfg.run_dir
        artifact = sae_identity(cfg, identity["fingerprint"], windows_digest(splits.train.windows), info.world_size)
        state = run_stage(out, artifact, on_change=on_change, what=SAE_DIR, remove=info.is_main)
        if state == "rebuild" and info.is_main:  # an older layout's SAE run at the top of the run folder goes too
            _remove_top_level_sae_run(root)
        barrier()
        session.create_run_dir()
        if info.is_main and state != "skip":  # (a finished SAE of the same identity stays marked finished)
            begin(out, artifact)
        d_in = teacher_width(teacher)
        sae = build_sae(cfg.sae, d_in)
        sae.meta = {"layer": cfg.teacher.layer, "teacher": identity}
        unit = SAEUnit(sae, teacher, cfg.teacher.layer, aux_coef=cfg.sae.aux_coef).to(info.device)
        mean = _initial_mean(unit, splits.train.windows[: cfg.sae.init_windows], info.device)
        with torch.no_grad():
            sae.b_dec.copy_(mean)
            unit.fvu_reference.copy_(mean)
        plan = make_plan(cfg, info, splits.train)
        config = {**sae.config(), "layer": cfg.teacher.layer, "teacher": identity}
        result = fit(cfg, info, unit, train_ds=splits.train, eval_ds=splits.val, collate_fn=collate_windows,
                     source_name=corpus_identity(cfg.corpus), plan=plan,
                     artifacts={"sae_config": _SAEConfigArtifact(config), "tokenizer": tokenizer})
        if info.is_main:
            final = _sae_from_state(sae, {f"sae.{k}": v.detach().cpu() for k, v in sae.state_dict().items()})
            save_sae(final, out, layer=cfg.teacher.layer, teacher=identity, in_place=True)
            t = cfg.train
            tokens = t.max_steps * t.micro_batch_size * t.grad_accum * info.world_size * cfg.corpus.window
            cost = sae_train_flops(teacher, cfg.teacher.layer, n_latents=cfg.sae.n_latents, k=cfg.sae.k,
                                   tokens=tokens)
            write_manifest(out, artifact, files=[SAE_WEIGHTS, SAE_CONFIG],
                           extra={"cost": {"train_tokens": tokens, "train_flops": cost}})
            log.info("SAE written to %s (%s)", out, result.last_eval)
        barrier()
        return result


def _remove_top_level_sae_run(root: Path) -> None:
    """For a rebuild: what an SAE run of an older layout wrote at the top of the pipeline's run folder (its
    checkpoints, metrics and TensorBoard; nothing else writes there), under that folder's lock."""
    import shutil

    from conceptlm.core.lock import RunLock

    if not any((root / n).exists() for n in ("checkpoints", "tb", "metrics.jsonl")):
        return
    lock = RunLock(root).acquire()
    try:
        for name in ("checkpoints", "tb"):
            if (root / name).is_dir():
                shutil.rmtree(root / name)
        (root / "metrics.jsonl").unlink(missing_ok=True)
    finally:
        lock.release()
