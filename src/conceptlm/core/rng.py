"""Seeded randomness for every purpose, derived from ``(seed, purpose, keys...)`` — one scheme for the whole package.

Every random draw that must be reproducible (the data order of an epoch, the JEPA-loss dropout of a step, the
diffusion noise of an example) gets its own ``torch.Generator`` seeded from a hash of its purpose and keys. Streams
are therefore independent of each other and of the global RNG, the same on every platform, and a resumed run draws
exactly what the uninterrupted one drew.

Two kinds of per-step randomness, both handed to a unit by the trainer through :class:`StepRandomness`:

- **per rank** (``generator(purpose)``): keyed by ``(step, rank, micro-batch)``; different on every rank and
  micro-batch (dropout masks, sampling), but a run with another split of the global batch draws other numbers;
- **per example** (``per_example(purpose, ids, ...)``): keyed by ``(step, example id)``; the noise an example gets
  does not depend on which rank or micro-batch holds it, so 2 processes equal 1 process with the same global batch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

__all__ = ["derive_seed", "derived_generator", "StepRandomness", "EVAL_STEP"]

EVAL_STEP = -1
"""The ``step`` key of evaluation randomness: the same draws at every evaluation, so eval curves are not noisy."""


def derive_seed(purpose: str, seed: int, *keys: int | str) -> int:
    """A 63-bit seed from ``sha256("conceptlm-{purpose}:{seed}:{key1}:...")`` (little-endian, first 8 bytes)."""
    text = ":".join([f"conceptlm-{purpose}", str(seed), *map(str, keys)])
    digest = hashlib.sha256(text.encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def derived_generator(purpose: str, seed: int, *keys: int | str, device: str | torch.device = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with :func:`derive_seed`."""
    return torch.Generator(device=device).manual_seed(derive_seed(purpose, seed, *keys))


@dataclass(frozen=True)
class StepRandomness:
    """The randomness of one micro-batch of one optimizer step (or of evaluation, ``step == EVAL_STEP``).

    Attributes:
        seed: ``train.seed``.
        step: optimizer step (``EVAL_STEP`` during evaluation).
        rank: this process's rank.
        micro: index of the micro-batch within the step on this rank (the eval batch index during evaluation).
        device: where generators live by default.
    """

    seed: int
    step: int
    rank: int = 0
    micro: int = 0
    device: str = "cpu"

    def generator(self, purpose: str, *, device: str | torch.device | None = None) -> torch.Generator:
        """A generator for draws that should differ across ranks and micro-batches (dropout, sampling)."""
        return derived_generator(purpose, self.seed, self.step, self.rank, self.micro,
                                 device=device or self.device)

    def example_generator(self, purpose: str, example_id: int) -> torch.Generator:
        """A CPU generator keyed by ``(step, example_id)`` only: the same on whichever rank holds the example."""
        return derived_generator(purpose, self.seed, self.step, "example", int(example_id))

    def per_example(self, purpose: str, ids: Sequence[int] | torch.Tensor, shape: Sequence[int], *,
                    sampler: Callable[..., torch.Tensor] = torch.randn, device: str | torch.device | None = None,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Stack one draw of ``shape`` per example: ``(len(ids), *shape)``, row i from ``example_generator(ids[i])``.

        ``sampler`` is a torch factory accepting ``(*shape, generator=, dtype=)`` (``torch.randn``, ``torch.rand``).
        Draws happen on the CPU (bit-identical everywhere) and are moved to ``device``.
        """
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        rows = [sampler(*shape, generator=self.example_generator(purpose, i), dtype=dtype) for i in ids]
        out = torch.stack(rows) if rows else torch.empty(0, *shape, dtype=dtype)
        return out.to(device or self.device)
