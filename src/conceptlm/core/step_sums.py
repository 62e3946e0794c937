"""What a training step and an evaluation share: batches moved to the device, the autocast context, and the
device-side sums of loss parts and ``(sum, count)`` metrics (one host sync per reduction).

Used by :mod:`conceptlm.core.trainer` (micro-batches of a step) and :mod:`conceptlm.core.evaluation` (eval batches).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from conceptlm.core.distributed import all_reduce_sum

__all__ = ["to_device", "autocast_context", "count_vector", "SumAccumulator"]


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


def autocast_context(precision: str, device: torch.device):
    """bf16 autocast on CUDA for ``auto``; explicit ``bf16`` anywhere; fp32 otherwise."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if use_bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def count_vector(counts: dict[str, Any], keys: list[str], device: torch.device) -> torch.Tensor:
    """``counts[k]`` for each key (0 when absent) as one float64 vector on ``device`` (ints or tensors)."""
    return torch.stack([torch.as_tensor(counts.get(k, 0), dtype=torch.float64).to(device).reshape(())
                        for k in keys])


class SumAccumulator:
    """Device-side sums of loss parts and ``(sum, count)`` metrics over micro-batches; one host sync to reduce."""

    def __init__(self, parts: list[str], metrics: list[str], device: torch.device):
        self.parts, self.metrics = parts, metrics
        n = len(parts) + 2 * len(metrics)
        self.values = torch.zeros(n, dtype=torch.float64, device=device)
        self.index = {k: i for i, k in enumerate(parts)}
        for j, m in enumerate(metrics):
            self.index[m] = len(parts) + 2 * j

    def add(self, out: dict[str, Any], owner: str) -> None:
        for k, v in out.items():
            if k not in self.index:
                raise ValueError(f"{owner} returned {k!r}, which is neither a loss part {self.parts} nor a declared "
                                 f"metric (add it to {owner}.metric_names)")
            i = self.index[k]
            if k in self.parts:
                self.values[i] += v.detach().double()
            else:
                s, c = v
                self.values[i] += (s.detach().double() if isinstance(s, torch.Tensor) else float(s))
                self.values[i + 1] += (c.detach().double() if isinstance(c, torch.Tensor) else float(c))

    def reduce(self) -> dict[str, float]:
        v = all_reduce_sum(self.values.cpu()).tolist()
        out = {k: v[i] for k, i in self.index.items() if k in self.parts}
        for m in self.metrics:
            i = self.index[m]
            out[m] = (v[i], v[i + 1])
        return out

    def metric_means(self, sums: dict[str, Any]) -> dict[str, float]:
        return {m: sums[m][0] / sums[m][1] for m in self.metrics if sums[m][1] > 0}
