"""THE training loop, shared by every method.

It owns: AdamW, the LR schedule, gradient accumulation with count-weighted normalisation across micro-batches and
ranks, clipping, bf16 autocast on CUDA, periodic evaluation, metrics (``metrics.jsonl`` + TensorBoard), progress bar,
atomic native checkpoints and exact resumption, and a clean stop on a non-finite loss. A method only supplies a
:class:`~conceptlm.core.unit.TrainUnit` (any ``nn.Module``) and functions that return batches.

Normalisation. For every loss part ``k`` the unit returns ``sum_k`` over its items and ``counts`` says how many
items. Before the forward passes of a step, the trainer sums the counts over this rank's micro-batches and all-reduces
them to ``N_k``. Each micro-batch then back-propagates ``world_size * sum_k w_k * sum_k(micro) / N_k`` (DDP/FSDP
average gradients over ranks, hence the ``world_size``). The accumulated gradient is exactly the gradient of
``sum_k w_k * mean_k`` over the whole global batch. Metrics ``(sum, count)`` are reduced the same way.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from conceptlm.core import checkpoint as ckpt_lib
from conceptlm.core import sharded_checkpoint as sharded_lib
from conceptlm.core.config import OptimSection, RunConfig, config_to_dict
from conceptlm.core.distributed import DistInfo, all_reduce_sum, barrier, wrap_model
from conceptlm.core.errors import CheckpointError, ConfigError, NonFiniteLossError
from conceptlm.core.evaluation import evaluate_unit
from conceptlm.core.metrics import MetricLogger
from conceptlm.core.progress import progress_bar
from conceptlm.core.resume import check_config_changes
from conceptlm.core.rng import EVAL_STEP, StepRandomness
from conceptlm.core.run import resume_checkpoint, take_resume_plan
from conceptlm.core.schedule import build_scheduler
from conceptlm.core.step_sums import SumAccumulator, autocast_context, count_vector, to_device
from conceptlm.core.unit import THROUGHPUT_KEY, TrainUnit

__all__ = ["Trainer", "TrainResult", "resolve_strategy", "build_optimizer"]

log = logging.getLogger(__name__)


def resolve_strategy(strategy: str, world_size: int) -> str:
    if strategy == "auto":
        return "ddp" if world_size > 1 else "none"
    return strategy


def build_optimizer(module: torch.nn.Module, optim: OptimSection) -> torch.optim.Optimizer:
    """The loop's AdamW: weight decay on matrices and embeddings (``ndim >= 2``), none on biases and norms."""
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError("the unit has no trainable parameters")
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps)


@dataclass
class TrainResult:
    step: int
    run_dir: Path
    last_train: dict[str, float]
    last_eval: dict[str, float]
    checkpoint: Path | None


@dataclass
class _Window:
    """Sums of per-step values between two log rows."""

    sums: dict[str, float] = field(default_factory=dict)
    steps: int = 0
    items: float = 0.0
    t0: float = field(default_factory=time.perf_counter)

    def add(self, values: dict[str, float], items: float) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.steps += 1
        self.items += items


class Trainer:
    """Run a unit's training loop.

    Args:
        unit: the method's unit (unwrapped, on CPU or device).
        cfg: the run config (sections run/optim/schedule/train/dist are used).
        info: rank/world/device from ``init_distributed``.
        train_batches: ``step -> list of this rank's micro-batches`` for that optimizer step (pure function of the
            step, so resuming needs no data-loader state).
        eval_batches: ``() -> iterable of this rank's eval batches`` (same number on every rank), or None.
        artifacts: ``{name: object with save_pretrained(dir) or callable(dir)}`` saved with every checkpoint
            (e.g. ``{"tokenizer": tok}``) and handed to ``unit.export``.
        data_state: data-order description stored in checkpoints and checked on resume.
        on_eval: optional ``(step) -> dict`` of extra eval metrics (e.g. generation accuracy), run on all ranks at
            every evaluation.
    """

    def __init__(self, unit: TrainUnit, cfg: RunConfig, info: DistInfo, *,
                 train_batches: Callable[[int], list[Any]], eval_batches: Callable[[], Iterable[Any]] | None = None,
                 artifacts: dict[str, Any] | None = None, data_state: dict | None = None,
                 on_eval: Callable[[int], dict[str, float]] | None = None):
        self.unit, self.cfg, self.info = unit, cfg, info
        self.train_batches, self.eval_batches = train_batches, eval_batches
        self.artifacts = dict(artifacts or {})
        self.data_state, self.on_eval = data_state or {}, on_eval
        self.run_dir = cfg.run_dir
        self.strategy = resolve_strategy(cfg.dist.strategy, info.world_size)
        self.step = 0
        # global items (the unit's throughput_unit) trained on so far; None after resuming a checkpoint that did
        # not record it (then it is not logged rather than logged wrong)
        self.items_seen: float | None = 0.0
        self.parts = sorted(unit.loss_weights)
        self.metric_names = sorted(getattr(unit, "metric_names", ()))
        self._check_names()

    def _check_names(self) -> None:
        clash = {THROUGHPUT_KEY, "loss", "lr", "grad_norm"} & (set(self.parts) | set(self.metric_names))
        if clash:
            raise ValueError(f"{type(self.unit).__name__}: loss part / metric names {sorted(clash)} are reserved")
        both = set(self.parts) & set(self.metric_names)
        if both:
            raise ValueError(f"{type(self.unit).__name__}: {sorted(both)} is both a loss part and a metric")

    # ------------------------------------------------------------------------------------------------ setup
    def _check_frozen(self) -> None:
        names = dict(self.unit.named_modules())
        for name in self.unit.frozen_modules():
            if name not in names:
                raise ValueError(f"{type(self.unit).__name__}.frozen_modules(): no sub-module named {name!r}")
            trainable = [n for n, p in names[name].named_parameters() if p.requires_grad]
            if trainable:
                raise ValueError(f"{type(self.unit).__name__}: frozen module {name!r} has trainable parameter "
                                 f"{trainable[0]!r} (call requires_grad_(False) on it)")

    def _frozen_params(self) -> set[torch.nn.Parameter]:
        named = dict(self.unit.named_modules())
        return {p for n in self.unit.frozen_modules() for p in named[n].parameters()}

    def _build_optimizer(self, module: torch.nn.Module) -> torch.optim.Optimizer:
        return build_optimizer(module, self.cfg.optim)

    def _no_sync(self, module, last: bool):
        if last:
            return contextlib.nullcontext()
        if hasattr(module, "no_sync"):  # DDP
            return module.no_sync()
        if self.strategy == "fsdp":
            return _FsdpNoSync(module)
        return contextlib.nullcontext()

    def _rng(self, step: int, micro: int) -> StepRandomness:
        return StepRandomness(seed=self.cfg.train.seed, step=step, rank=self.info.rank, micro=micro,
                              device=str(self.info.device))

    # ------------------------------------------------------------------------------------------------ loop
    def fit(self) -> TrainResult:
        cfg, info, tcfg = self.cfg, self.info, self.cfg.train
        self._check_frozen()
        plan = take_resume_plan(self.run_dir)  # decided (and the config checked) when the run folder was set up
        if plan is not None:
            resume_from, changes = plan.checkpoint, plan.changes
        else:  # a trainer used without a run session (tests, benchmarks): the same policy, decided here
            resume_from = resume_checkpoint(cfg)
            changes = check_config_changes(cfg, resume_from) if resume_from is not None else {}
        self.ckpt_keys = ckpt_lib.checkpoint_keys(self.unit)
        fsdp = self.strategy == "fsdp"
        # a sharded checkpoint is loaded into the sharded model (after wrapping, no rank gathers it); otherwise the
        # whole weights into the unwrapped unit, as before (a sharded checkpoint read whole on every rank)
        if resume_from is not None and not (fsdp and ckpt_lib.is_sharded(resume_from)):
            ckpt_lib.load_unit_state(self.unit, resume_from)
        self.unit.to(info.device)
        model = wrap_model(self.unit, self.strategy, info, find_unused_parameters=cfg.dist.find_unused_parameters,
                           shard_modules=self.unit.fsdp_units() if fsdp else None,
                           ignored_params=self._frozen_params() if fsdp else None)
        self.model = model
        optimizer = self._build_optimizer(model)
        scheduler = build_scheduler(optimizer, kind=cfg.schedule.kind, warmup_steps=cfg.schedule.warmup_steps,
                                    max_steps=tcfg.max_steps, min_lr_ratio=cfg.schedule.min_lr_ratio)
        if resume_from is not None:
            self._load_state(resume_from, model, optimizer, scheduler, apply_changes=bool(changes))
        if plan is not None:  # the resume is accepted: only now does the run folder's config.yaml change
            plan.accept(self.run_dir, info)
        trackers = []
        if info.is_main and cfg.run.trackers:
            from conceptlm.core.trackers import open_trackers

            trackers = open_trackers(cfg.run.trackers, self.run_dir, project=cfg.run.tracker_project,
                                     run_name=cfg.run.name, config=config_to_dict(cfg),
                                     resume=resume_from is not None)
        logger = MetricLogger(self.run_dir, enabled=info.is_main, trackers=trackers,
                              resume_step=self.step if resume_from is not None else None)
        if info.is_main:
            msg = f"resumed from {resume_from} at step {self.step}" if resume_from else "starting from scratch"
            log.info("%s: %s", self.run_dir, msg)

        last_train: dict[str, float] = {}
        last_eval: dict[str, float] = {}
        window = _Window()
        last_ckpt = resume_from
        bar = progress_bar(total=tcfg.max_steps, initial=self.step, enabled=info.is_main and tcfg.progress,
                           desc=cfg.run.name, unit="step", dynamic_ncols=True)
        model.train()
        try:
            while self.step < tcfg.max_steps:
                values, items = self._train_step(model, optimizer, scheduler, last_ckpt)
                self.step += 1
                if self.items_seen is not None:
                    self.items_seen += items
                bar.update(1)
                window.add(values, items)
                if self.step % tcfg.log_every == 0 or self.step == tcfg.max_steps:
                    last_train = logger.log(self.step, "train", self._window_row(window, values["lr"]))
                    bar.set_postfix(loss=f"{last_train['loss']:.4f}")
                    window = _Window()
                at_end = self.step == tcfg.max_steps
                if (tcfg.eval_every and self.step % tcfg.eval_every == 0) or at_end:
                    last_eval = self.evaluate()
                    if self.on_eval is not None:
                        last_eval.update(self.on_eval(self.step))
                    if last_eval:
                        logger.log(self.step, "eval", {**last_eval, **self._seen()})
                if (tcfg.save_every and self.step % tcfg.save_every == 0) or at_end:
                    last_ckpt = self.save(model, optimizer, scheduler)
            if (resume_from is not None and last_ckpt == resume_from and self.step == tcfg.max_steps
                    and ckpt_lib.is_sharded(resume_from) != (cfg.dist.checkpoint == "sharded")):
                # resumed at its last step from a checkpoint of the other layout: write it in this run's layout
                # (e.g. a sharded checkpoint as a full one with its model/ export, on one process)
                last_ckpt = self.save(model, optimizer, scheduler)
        finally:
            bar.close()
            logger.close()
        return TrainResult(step=self.step, run_dir=self.run_dir, last_train=last_train, last_eval=last_eval,
                           checkpoint=last_ckpt)

    def _train_step(self, model, optimizer, scheduler, last_ckpt) -> tuple[dict[str, float], float]:
        """One optimizer step over this rank's micro-batches; returns the step's logged values and item count."""
        cfg, info, unit, parts = self.cfg, self.info, self.unit, self.parts
        unit.begin_step(self.step)
        micro, per_batch = [], []
        for j, b in enumerate(self.train_batches(self.step)):
            unit.step_rng = self._rng(self.step, j)
            b = to_device(b, info.device)
            with torch.no_grad(), autocast_context(cfg.train.precision, info.device):
                b = unit.prepare(b)
            per_batch.append(count_vector(unit.counts(b), [*parts, THROUGHPUT_KEY], info.device))
            micro.append(b)
        # counts may be device tensors: one transfer for all micro-batches, not one sync each
        counts = torch.stack(per_batch).sum(0).cpu() if per_batch else torch.zeros(len(parts) + 1,
                                                                                   dtype=torch.float64)
        all_reduce_sum(counts)
        n = {k: counts[i].item() for i, k in enumerate(parts)}
        acc = SumAccumulator(parts, self.metric_names, info.device)
        world = info.world_size
        for j, b in enumerate(micro):
            unit.step_rng = self._rng(self.step, j)
            with self._no_sync(model, last=j == len(micro) - 1):
                with autocast_context(cfg.train.precision, info.device):
                    out = model(b)
                loss = sum(unit.loss_weights[k] * out[k].float() / n[k] for k in parts if n[k] > 0 and k in out)
                if isinstance(loss, torch.Tensor):
                    (loss * world).backward()
            acc.add(out, self._unit_name())
        unit.step_rng = None
        sums = acc.reduce()  # one host sync per step, not per micro-batch
        means = {k: (sums[k] / n[k]) if n[k] > 0 else float("nan") for k in parts}
        total = sum(unit.loss_weights[k] * means[k] for k in parts if n[k] > 0)
        if not math.isfinite(total):
            raise NonFiniteLossError(
                f"non-finite loss {total} at step {self.step} (parts: {means}); the run stopped before the "
                f"update, last good checkpoint: {last_ckpt or 'none'}")
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], clip)
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        if not math.isfinite(grad_norm):
            raise NonFiniteLossError(
                f"non-finite gradient norm at step {self.step}; the run stopped before the update, last good "
                f"checkpoint: {last_ckpt or 'none'}")
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        values = {"loss": total, **{k: means[k] for k in parts if n[k] > 0}, **acc.metric_means(sums),
                  "grad_norm": grad_norm, "lr": lr}
        return values, counts[-1].item()

    def _unit_name(self) -> str:
        return type(self.unit).__name__

    def _seen(self) -> dict[str, float]:
        """``{"<unit>_seen": items trained on so far}`` (e.g. ``tokens_seen``), for curves against data."""
        return {} if self.items_seen is None else {f"{self.unit.throughput_unit}_seen": self.items_seen}

    def _window_row(self, window: _Window, lr: float) -> dict[str, float]:
        row = {k: v / window.steps for k, v in window.sums.items() if k != "lr"}
        row["lr"] = lr
        row.update(self._seen())
        if window.items:
            row[f"{self.unit.throughput_unit}_per_s"] = window.items / max(time.perf_counter() - window.t0, 1e-9)
        return row

    # ------------------------------------------------------------------------------------------------ eval
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean of every loss part and metric over the eval set (all ranks), and the weighted total as ``loss``
        (:func:`~conceptlm.core.evaluation.evaluate_unit`, the path the recipes' evaluations share).

        The unit's randomness during evaluation is keyed by the eval batch index only (``step = EVAL_STEP``), so
        every evaluation draws the same numbers.
        """

        if self.eval_batches is None:
            return {}
        # DDP: call the plain unit (replicated weights, no collectives inside forward); FSDP: the sharded module.
        module = self.model if self.strategy == "fsdp" else self.unit
        sums = evaluate_unit(self.unit, self.eval_batches(), device=self.info.device,
                             precision=self.cfg.train.precision, parts=self.parts, metric_names=self.metric_names,
                             module=module, rng=lambda j: self._rng(EVAL_STEP, j))
        return sums.means(self.unit.loss_weights)

    # ------------------------------------------------------------------------------------------------ state
    def save(self, model, optimizer, scheduler) -> Path | None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        if self.cfg.dist.checkpoint == "sharded":
            return self._save_sharded(model, optimizer, scheduler)
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_sd = get_model_state_dict(model, options=opts)
        optim_sd = get_optimizer_state_dict(model, optimizer, options=opts)
        path = None
        if self.info.is_main:
            full = {k: v.detach().cpu() for k, v in model_sd.items()}
            state = {"step": self.step, "optimizer": optim_sd, "scheduler": scheduler.state_dict(),
                     "rng": ckpt_lib.rng_state(), "data": self.data_state, "world_size": self.info.world_size,
                     "items_seen": self.items_seen}
            path = ckpt_lib.save_checkpoint(
                self.run_dir, self.step, unit_state={k: full[k] for k in self.ckpt_keys if k in full},
                trainer_state=state, config_yaml=yaml.safe_dump(config_to_dict(self.cfg), sort_keys=False),
                artifacts=self.artifacts, export=lambda d: self.unit.export(d, full, self.artifacts),
                keep=self.cfg.train.keep_checkpoints)
        barrier()
        return path or ckpt_lib.find_latest_checkpoint(self.run_dir)

    def _sharded_state(self, model, optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
        """This rank's shards of the checkpointed model tensors and of the optimizer state (DTensors under FSDP2,
        nothing gathered), flat as a sharded checkpoint holds them, and the optimizer's param_groups."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        model_sd = get_model_state_dict(model)
        optim_sd = get_optimizer_state_dict(model, optimizer)
        keys = set(self.ckpt_keys)
        return (sharded_lib.sharded_tensors({k: v for k, v in model_sd.items() if k in keys}, optim_sd["state"]),
                optim_sd["param_groups"])

    def _save_sharded(self, model, optimizer, scheduler) -> Path:
        tensors, param_groups = self._sharded_state(model, optimizer)
        state = {"step": self.step, "optimizer_param_groups": param_groups, "scheduler": scheduler.state_dict(),
                 "rng": ckpt_lib.rng_state(), "data": self.data_state, "world_size": self.info.world_size,
                 "items_seen": self.items_seen}
        return sharded_lib.save_sharded_checkpoint(
            self.run_dir, self.step, tensors=tensors, trainer_state=state,
            config_yaml=yaml.safe_dump(config_to_dict(self.cfg), sort_keys=False), artifacts=self.artifacts,
            keep=self.cfg.train.keep_checkpoints)

    def _load_sharded(self, ckpt: Path, state: dict, model, optimizer) -> None:
        """Model and optimizer state of a sharded checkpoint: under FSDP2 each rank loads its own shards (DCP
        reshards when the world size changed); otherwise the optimizer state is read whole (the weights were loaded
        into the unwrapped unit already)."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        if self.strategy != "fsdp":
            optim = sharded_lib.split_sharded(sharded_lib.read_sharded(ckpt, "optim."))[1]
            full = {"state": optim, "param_groups": state["optimizer_param_groups"]}
            set_optimizer_state_dict(model, optimizer, full, options=StateDictOptions(full_state_dict=True))
            return
        tensors, _ = self._sharded_state(model, optimizer)
        sharded_lib.load_sharded(ckpt, tensors)
        model_sd, optim = sharded_lib.split_sharded(tensors)
        set_model_state_dict(model, model_sd, options=StateDictOptions(strict=False))
        set_optimizer_state_dict(model, optimizer, {"state": optim, "param_groups": state["optimizer_param_groups"]})

    def _load_state(self, ckpt: Path, model, optimizer, scheduler, *, apply_changes: bool) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        try:
            state = ckpt_lib.load_trainer_state(ckpt)
        except Exception as e:  # noqa: BLE001 - verified before, so this is an unexpected, foreign file
            raise CheckpointError(f"{ckpt}/trainer_state.pt: cannot be read ({type(e).__name__}: {e})") from None
        if state.get("data") != self.data_state:
            raise ConfigError(f"{ckpt}: the data order differs from the checkpoint's ({state.get('data')} vs "
                              f"{self.data_state}); resume with the same data, batch sizes and seed",
                              field="run.resume")
        if ckpt_lib.is_sharded(ckpt):
            self._load_sharded(ckpt, state, model, optimizer)
        else:
            set_optimizer_state_dict(model, optimizer, state["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
        scheduler.load_state_dict(state["scheduler"])
        if apply_changes:  # run.resume_changes=apply: optimizer hyper-parameters of the new config from now on
            o = self.cfg.optim
            scheduler.base_lrs = [o.lr for _ in optimizer.param_groups]
            for g, wd in zip(optimizer.param_groups, (o.weight_decay, 0.0)):
                g.update(initial_lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=wd)
            for g, lam in zip(optimizer.param_groups, scheduler.lr_lambdas):
                g["lr"] = o.lr * lam(scheduler.last_epoch)
        # a sharded checkpoint holds every rank's RNG: each rank takes its own when the world size is the same
        same_world = state.get("world_size") == self.info.world_size
        own = sharded_lib.load_rank_rng(ckpt, self.info.rank) if same_world else None
        ckpt_lib.set_rng_state(own if own is not None else state["rng"])
        self.step = int(state["step"])
        self.items_seen = state.get("items_seen")


class _FsdpNoSync:
    """Skip FSDP2's gradient reduce-scatter on non-final micro-batches."""

    def __init__(self, module):
        self.module = module

    def __enter__(self):
        self.module.set_requires_gradient_sync(False)

    def __exit__(self, *exc):
        self.module.set_requires_gradient_sync(True)
