"""THE training loop, shared by every method.

It owns: AdamW, the LR schedule, gradient accumulation with token-weighted normalisation across micro-batches and
ranks, clipping, bf16 autocast on CUDA, periodic evaluation, metrics (``metrics.jsonl`` + TensorBoard), progress bar,
atomic checkpoints and exact resumption, and a clean stop on a non-finite loss. A method only supplies a
:class:`~conceptlm.core.unit.TrainUnit` and functions that return batches.

Normalisation. For every loss part ``k`` the unit returns ``sum_k`` over its items and ``counts`` says how many
items. Before the forward passes of a step, the trainer sums the counts over this rank's micro-batches and all-reduces
them to ``N_k``. Each micro-batch then back-propagates ``world_size * sum_k w_k * sum_k(micro) / N_k`` (DDP/FSDP
average gradients over ranks, hence the ``world_size``). The accumulated gradient is exactly the gradient of
``sum_k w_k * mean_k`` over the whole global batch.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from conceptlm.core import checkpoint as ckpt_lib
from conceptlm.core.config import BaseRunConfig, config_to_dict
from conceptlm.core.distributed import DistInfo, all_reduce_sum, barrier, wrap_model
from conceptlm.core.errors import ConfigError, NonFiniteLossError
from conceptlm.core.metrics import MetricLogger
from conceptlm.core.schedule import build_scheduler
from conceptlm.core.unit import TOKENS_KEY, TrainUnit

__all__ = ["Trainer", "TrainResult", "to_device", "resolve_strategy", "autocast_context"]

log = logging.getLogger(__name__)


def to_device(batch: Any, device: torch.device) -> Any:
    """Move tensors in a (nested) dict/list batch to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    if hasattr(batch, "to"):  # batch objects (e.g. JEPA's SeparateBatch / PackedBatch) move themselves
        return batch.to(device)
    return batch


def resolve_strategy(strategy: str, world_size: int) -> str:
    if strategy == "auto":
        return "ddp" if world_size > 1 else "none"
    return strategy


def autocast_context(precision: str, device: torch.device):
    """bf16 autocast on CUDA for ``auto``; explicit ``bf16`` anywhere; fp32 otherwise."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if use_bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass
class TrainResult:
    step: int
    run_dir: Path
    last_train: dict[str, float]
    last_eval: dict[str, float]
    checkpoint: Path | None


class Trainer:
    """Run a unit's training loop.

    Args:
        unit: the method's unit (unwrapped, on CPU or device).
        cfg: the run config (sections run/optim/schedule/train/dist are used).
        info: rank/world/device from ``init_distributed``.
        train_batches: ``step -> list of this rank's micro-batches`` for that optimizer step (pure function of the
            step, so resuming needs no data-loader state).
        eval_batches: ``() -> iterable of this rank's eval batches`` (same number on every rank), or None.
        tokenizer: saved with every checkpoint.
        data_state: data-order description stored in checkpoints and checked on resume.
        on_eval: optional ``(step) -> dict`` of extra eval metrics (e.g. generation accuracy) run on all ranks.
    """

    def __init__(self, unit: TrainUnit, cfg: BaseRunConfig, info: DistInfo, *,
                 train_batches: Callable[[int], list[Any]], eval_batches: Callable[[], Iterable[Any]] | None = None,
                 tokenizer=None, data_state: dict | None = None,
                 on_eval: Callable[[int], dict[str, float]] | None = None):
        self.unit, self.cfg, self.info = unit, cfg, info
        self.train_batches, self.eval_batches = train_batches, eval_batches
        self.tokenizer, self.data_state, self.on_eval = tokenizer, data_state or {}, on_eval
        self.run_dir = cfg.run_dir
        self.strategy = resolve_strategy(cfg.dist.strategy, info.world_size)
        self.step = 0

    # ------------------------------------------------------------------------------------------------ setup
    def _resume_checkpoint(self) -> Path | None:
        resume = self.cfg.run.resume
        if resume == "never":
            if ckpt_lib.find_latest_checkpoint(self.run_dir) is not None:
                raise ConfigError(f"{self.run_dir} already holds checkpoints: set run.resume=auto to continue "
                                  "it, or choose another run.name", field="run.resume")
            return None
        if resume == "auto":
            return ckpt_lib.find_latest_checkpoint(self.run_dir)
        path = Path(resume)
        if not (path / "trainer_state.pt").is_file():
            raise ConfigError(f"{path} is not a checkpoint directory (no trainer_state.pt)", field="run.resume")
        return path

    def _build_optimizer(self, module: torch.nn.Module) -> torch.optim.Optimizer:
        o = self.cfg.optim
        params = [p for p in module.parameters() if p.requires_grad]
        if not params:
            raise RuntimeError("the unit has no trainable parameters")
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps)

    def _no_sync(self, module, last: bool):
        if last:
            return contextlib.nullcontext()
        if hasattr(module, "no_sync"):  # DDP
            return module.no_sync()
        if self.strategy == "fsdp":
            return _FsdpNoSync(module)
        return contextlib.nullcontext()

    # ------------------------------------------------------------------------------------------------ loop
    def fit(self) -> TrainResult:
        cfg, info = self.cfg, self.info
        tcfg = cfg.train
        resume_from = self._resume_checkpoint()
        if resume_from is not None:
            ckpt_lib.load_model_weights(self.unit, resume_from)
        self.unit.to(info.device)
        model = wrap_model(self.unit, self.strategy, info, find_unused_parameters=cfg.dist.find_unused_parameters,
                           shard_modules=_decoder_layers(self.unit.hf_model) if self.strategy == "fsdp" else None)
        self.model = model
        optimizer = self._build_optimizer(model)
        scheduler = build_scheduler(optimizer, kind=cfg.schedule.kind, warmup_steps=cfg.schedule.warmup_steps,
                                    max_steps=tcfg.max_steps, min_lr_ratio=cfg.schedule.min_lr_ratio)
        if resume_from is not None:
            self._load_state(resume_from, model, optimizer, scheduler)
        logger = MetricLogger(self.run_dir, enabled=info.is_main,
                              resume_step=self.step if resume_from is not None else None)
        if info.is_main:
            msg = f"resumed from {resume_from} at step {self.step}" if resume_from else "starting from scratch"
            log.info("%s: %s", self.run_dir, msg)

        parts = sorted(self.unit.loss_weights)
        weights = self.unit.loss_weights
        world = info.world_size
        last_train: dict[str, float] = {}
        last_eval: dict[str, float] = {}
        window: dict[str, float] = {}
        window_steps, window_tokens, window_t0 = 0, 0.0, time.perf_counter()
        last_ckpt = resume_from
        bar = tqdm(total=tcfg.max_steps, initial=self.step, disable=not (info.is_main and tcfg.progress),
                   desc=cfg.run.name, dynamic_ncols=True)
        model.train()
        try:
            while self.step < tcfg.max_steps:
                self.unit.begin_step(self.step)
                micro = self.train_batches(self.step)
                counts = torch.zeros(len(parts) + 1, dtype=torch.float64)
                for b in micro:
                    c = self.unit.counts(b)
                    for i, k in enumerate(parts):
                        counts[i] += c.get(k, 0)
                    counts[-1] += c.get(TOKENS_KEY, 0)
                all_reduce_sum(counts)
                n = {k: counts[i].item() for i, k in enumerate(parts)}
                part_sums = [torch.zeros((), dtype=torch.float64, device=info.device) for _ in parts]
                for j, b in enumerate(micro):
                    b = to_device(b, info.device)
                    with self._no_sync(model, last=j == len(micro) - 1):
                        with autocast_context(tcfg.precision, info.device):
                            out = model(b)
                        loss = sum(weights[k] * out[k].float() / n[k] for k in parts if n[k] > 0 and k in out)
                        if isinstance(loss, torch.Tensor):
                            (loss * world).backward()
                    for i, k in enumerate(parts):
                        if k in out:
                            part_sums[i] += out[k].detach().double()
                sums = torch.stack(part_sums).cpu()  # one host sync per step, not per micro-batch
                all_reduce_sum(sums)
                means = {k: (sums[i].item() / n[k]) if n[k] > 0 else float("nan") for i, k in enumerate(parts)}
                total = sum(weights[k] * means[k] for k in parts if n[k] > 0)
                if not math.isfinite(total):
                    raise NonFiniteLossError(
                        f"non-finite loss {total} at step {self.step} (parts: {means}); the run stopped before the "
                        f"update, last good checkpoint: {last_ckpt or 'none'}")
                clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
                grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None],
                                                           clip)
                grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
                if not math.isfinite(grad_norm):
                    raise NonFiniteLossError(
                        f"non-finite gradient norm at step {self.step}; the run stopped before the update, last "
                        f"good checkpoint: {last_ckpt or 'none'}")
                lr = optimizer.param_groups[0]["lr"]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                self.step += 1
                bar.update(1)

                window_steps += 1
                window_tokens += counts[-1].item()
                for k, v in {"loss": total, **{k: means[k] for k in parts if n[k] > 0}}.items():
                    window[k] = window.get(k, 0.0) + v
                window["grad_norm"] = window.get("grad_norm", 0.0) + grad_norm
                if self.step % tcfg.log_every == 0 or self.step == tcfg.max_steps:
                    dt = time.perf_counter() - window_t0
                    row = {k: v / window_steps for k, v in window.items()}
                    row["lr"] = lr
                    if window_tokens:
                        row["tokens_per_s"] = window_tokens / max(dt, 1e-9)
                    last_train = logger.log(self.step, "train", row)
                    bar.set_postfix(loss=f"{row['loss']:.4f}")
                    window, window_steps, window_tokens, window_t0 = {}, 0, 0.0, time.perf_counter()

                at_end = self.step == tcfg.max_steps
                if (tcfg.eval_every and self.step % tcfg.eval_every == 0) or at_end:
                    last_eval = self.evaluate()
                    if self.on_eval is not None and at_end:
                        last_eval.update(self.on_eval(self.step))
                    if last_eval:
                        logger.log(self.step, "eval", last_eval)
                if (tcfg.save_every and self.step % tcfg.save_every == 0) or at_end:
                    last_ckpt = self.save(model, optimizer, scheduler)
        finally:
            bar.close()
            logger.close()
        return TrainResult(step=self.step, run_dir=self.run_dir, last_train=last_train, last_eval=last_eval,
                           checkpoint=last_ckpt)

    # ------------------------------------------------------------------------------------------------ eval
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean of every loss part over the eval set (all ranks), and the weighted total as ``loss``."""
        if self.eval_batches is None:
            return {}
        # DDP: call the plain unit (replicated weights, no collectives inside forward); FSDP: the sharded module.
        module = self.model if self.strategy == "fsdp" else self.unit
        parts = sorted(self.unit.loss_weights)
        loss_sums = [torch.zeros((), dtype=torch.float64, device=self.info.device) for _ in parts]
        counts = [0] * len(parts)
        was_training = module.training
        module.eval()
        for b in self.eval_batches():
            c = self.unit.counts(b)
            with autocast_context(self.cfg.train.precision, self.info.device):
                out = module(to_device(b, self.info.device))
            for i, k in enumerate(parts):
                if k in out and c.get(k, 0) > 0:
                    loss_sums[i] += out[k].double()
                    counts[i] += c[k]
        module.train(was_training)
        acc = torch.cat([torch.stack(loss_sums).cpu(), torch.tensor(counts, dtype=torch.float64)])
        all_reduce_sum(acc)
        res = {k: acc[i].item() / acc[len(parts) + i].item() for i, k in enumerate(parts) if acc[len(parts) + i] > 0}
        if res:
            res["loss"] = sum(self.unit.loss_weights[k] * v for k, v in res.items())
        return res

    # ------------------------------------------------------------------------------------------------ state
    def save(self, model, optimizer, scheduler) -> Path | None:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_sd = get_model_state_dict(model, options=opts)
        optim_sd = get_optimizer_state_dict(model, optimizer, options=opts)
        path = None
        if self.info.is_main:
            state = {"step": self.step, "optimizer": optim_sd, "scheduler": scheduler.state_dict(),
                     "rng": ckpt_lib.rng_state(), "data": self.data_state, "world_size": self.info.world_size}
            import yaml

            path = ckpt_lib.save_checkpoint(
                self.run_dir, self.step, hf_model=self.unit.hf_model, tokenizer=self.tokenizer,
                model_state={k: v.detach().cpu() for k, v in model_sd.items()}, trainer_state=state,
                config_yaml=yaml.safe_dump(config_to_dict(self.cfg), sort_keys=False),
                keep=self.cfg.train.keep_checkpoints)
        barrier()
        return path or ckpt_lib.find_latest_checkpoint(self.run_dir)

    def _load_state(self, ckpt: Path, model, optimizer, scheduler) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        state = ckpt_lib.load_trainer_state(ckpt)
        if state.get("data") != self.data_state:
            raise ConfigError(f"{ckpt}: the data order differs from the checkpoint's ({state.get('data')} vs "
                              f"{self.data_state}); resume with the same data, batch sizes and seed",
                              field="run.resume")
        set_optimizer_state_dict(model, optimizer, state["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
        scheduler.load_state_dict(state["scheduler"])
        ckpt_lib.set_rng_state(state["rng"])
        self.step = int(state["step"])


class _FsdpNoSync:
    """Skip FSDP2's gradient reduce-scatter on non-final micro-batches."""

    def __init__(self, module):
        self.module = module

    def __enter__(self):
        self.module.set_requires_gradient_sync(False)

    def __exit__(self, *exc):
        self.module.set_requires_gradient_sync(True)


def _decoder_layers(hf_model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated decoder blocks of an HF causal LM (FSDP shards each one as a unit)."""
    layers = []
    for m in hf_model.modules():
        if isinstance(m, torch.nn.ModuleList) and len(m) > 0 and all(type(x) is type(m[0]) for x in m):
            if any(p.numel() for p in m[0].parameters()):
                layers = list(m)
                break
    return layers
