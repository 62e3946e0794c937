"""Process-group setup and rank helpers. All rank logic of the project lives here.

The same entry point runs as one process (``conceptlm sft train ...``) or under ``torchrun --nproc_per_node=N``:
``init_distributed`` reads the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK) and picks NCCL on CUDA, gloo on
CPU. Models are wrapped with DDP, or sharded with FSDP2 (``fully_shard``) for large models.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "init_distributed", "cleanup_distributed", "is_main", "get_rank", "get_world_size",
           "all_reduce_sum", "barrier", "print0", "wrap_model"]


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | None = None) -> DistInfo:
    """Initialise the process group when launched by torchrun (WORLD_SIZE > 1); otherwise a 1-process setup.

    Args:
        device: "cpu", "cuda" or None (CUDA when available).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def cleanup_distributed() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def get_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return get_rank() == 0


def print0(*args, **kwargs) -> None:
    """print on rank 0 only."""
    if is_main():
        print(*args, **kwargs, flush=True)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (in place, returned for chaining); no-op with one process."""
    if dist.is_initialized():
        if t.device.type == "cpu" and dist.get_backend() == "nccl":  # NCCL reduces CUDA tensors only
            t.copy_(all_reduce_sum(t.to(f"cuda:{torch.cuda.current_device()}")).cpu())
            return t
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def wrap_model(module: torch.nn.Module, strategy: str, info: DistInfo, *, find_unused_parameters: bool = False,
               shard_modules: list[torch.nn.Module] | None = None,
               ignored_params: set[torch.nn.Parameter] | None = None) -> torch.nn.Module:
    """Wrap ``module`` for multi-process training.

    Args:
        strategy: "none" | "ddp" | "fsdp" ("auto" must be resolved by the caller).
        shard_modules: for FSDP, the sub-modules to shard individually (e.g. decoder layers); the root is
            sharded last.
        ignored_params: for FSDP, parameters left unsharded and unmanaged (frozen modules such as a teacher).

    Returns:
        The module to call for forward/backward. With one process it is ``module`` itself.
    """
    if info.world_size == 1 and strategy != "fsdp":
        return module
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [info.device.index] if info.device.type == "cuda" else None
        return DDP(module, device_ids=ids, find_unused_parameters=find_unused_parameters)
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        if not dist.is_initialized():
            raise RuntimeError("dist.strategy=fsdp needs a process group: launch with torchrun")
        ignored = ignored_params or None
        for sub in shard_modules or []:
            fully_shard(sub, ignored_params=ignored)
        fully_shard(module, ignored_params=ignored)
        return module
    if strategy == "none":
        raise RuntimeError(
            f"dist.strategy=none but WORLD_SIZE={info.world_size}: use ddp/fsdp, or launch a single process")
    raise ValueError(f"unknown dist.strategy {strategy!r}")
