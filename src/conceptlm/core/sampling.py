"""Which examples each step, rank and micro-batch gets: :class:`BatchPlan` (length-bucketed, deterministic,
resumable, rank-sharded) and the step/eval batch functions the trainer consumes. Pure index math over any dataset
with ``__len__``/``__getitem__`` (and ``lengths`` for bucketing)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from conceptlm.core.errors import ConfigError
from conceptlm.core.rng import derive_seed

__all__ = ["BatchPlan", "step_batches", "eval_batches"]


def _epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit generator seed from ``(seed, epoch)``, the same on every platform."""
    return derive_seed("batchplan", seed, epoch)


def _fingerprint(lengths: torch.Tensor) -> str:
    return hashlib.sha256(lengths.numpy().tobytes()).hexdigest()[:16]


def _as_lengths(lengths) -> torch.Tensor:
    """``lengths`` (a list, a tensor, a numpy array or any sequence of ints) as one int64 tensor: 8 bytes per example,
    where a list of Python ints costs ~36."""
    if isinstance(lengths, torch.Tensor):
        return lengths.to(torch.int64).reshape(-1).clone()
    if hasattr(lengths, "__array__"):
        return torch.from_numpy(__import__("numpy").asarray(lengths, dtype="int64").reshape(-1).copy())
    return torch.tensor([int(n) for n in lengths], dtype=torch.int64)


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"must be a positive integer, got {value!r}", field=name)
    return value


class BatchPlan:
    """Which examples each optimizer step, rank and micro-batch gets.

    Per epoch: permute the examples with a ``torch.Generator`` seeded by ``(seed, epoch)`` (identity when
    ``shuffle=False``), drop the last ``len(lengths) % global_batch_size`` of the permutation, cut it into
    mega-chunks of ``global_batch_size * bucket_factor`` examples, sort each chunk by length, cut the chunks into
    global batches and shuffle the batch order with the same generator. Examples in one batch then have similar
    lengths, which keeps padding low.

    Args:
        lengths: token count of each example (e.g. ``dataset.lengths``).
        micro_batch_size: examples per forward pass on one rank.
        grad_accum: micro-batches per optimizer step on one rank.
        world_size: number of ranks.
        rank: this rank (0-based).
        seed: shuffling seed.
        shuffle: shuffle examples and batch order each epoch.
        bucket_factor: global batches per sorting chunk (1 = no bucketing beyond one global batch).

    Attributes:
        global_batch_size: ``micro_batch_size * grad_accum * world_size``.
        steps_per_epoch: ``len(lengths) // global_batch_size``.
    """

    def __init__(self, lengths: Sequence[int], *, micro_batch_size: int, grad_accum: int, world_size: int = 1,
                 rank: int = 0, seed: int = 0, shuffle: bool = True, bucket_factor: int = 50):
        self.micro_batch_size = _positive_int("micro_batch_size", micro_batch_size)
        self.grad_accum = _positive_int("grad_accum", grad_accum)
        self.world_size = _positive_int("world_size", world_size)
        self.bucket_factor = _positive_int("bucket_factor", bucket_factor)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ConfigError(f"must be in [0, {world_size}), got {rank!r}", field="rank")
        self.rank, self.seed, self.shuffle = rank, int(seed), bool(shuffle)
        self.lengths = _as_lengths(lengths)  # int64 tensor: the plan's memory is 8 bytes per example (+ the epoch's)
        self.global_batch_size = self.micro_batch_size * self.grad_accum * self.world_size
        self.steps_per_epoch = len(self.lengths) // self.global_batch_size
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"the dataset has {len(self.lengths)} examples, fewer than one global batch of "
                f"{self.global_batch_size} (micro_batch_size {micro_batch_size} x grad_accum {grad_accum} x "
                f"world_size {world_size}); use a smaller batch or more data")
        self._cache: tuple[int, torch.Tensor] | None = None
        self._fingerprint = _fingerprint(self.lengths)

    def epoch_of(self, step: int) -> int:
        """The 0-based epoch that optimizer step ``step`` falls in."""
        return step // self.steps_per_epoch

    def _epoch_batches(self, epoch: int) -> torch.Tensor:
        """The epoch's global batches as one ``(steps_per_epoch, global_batch_size)`` int64 tensor (no Python object
        per example: the plan's memory stays 16 bytes per example however large the corpus)."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        n, gbs = len(self.lengths), self.global_batch_size
        gen = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
        order = torch.randperm(n, generator=gen) if self.shuffle else torch.arange(n)
        order = order[: self.steps_per_epoch * gbs]
        chunk = gbs * self.bucket_factor
        parts = []
        for c in range(0, len(order), chunk):
            part = order[c:c + chunk]
            # a stable sort by length: ties keep the permuted order (as Python's sorted would)
            parts.append(part[torch.sort(self.lengths[part], stable=True).indices])
        batches = torch.cat(parts).view(self.steps_per_epoch, gbs)
        if self.shuffle:
            batches = batches[torch.randperm(len(batches), generator=gen)]
        self._cache = (epoch, batches)
        return batches

    def global_batch(self, step: int) -> list[int]:
        """Example indices of optimizer step ``step`` (0-based, counting across epochs).

        Depends only on ``(lengths, global_batch_size, seed, shuffle, bucket_factor, step)``, not on how the
        batch is split into ranks and micro-batches.

        Returns:
            ``global_batch_size`` distinct example indices.
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative integer, got {step!r}")
        return self._epoch_batches(self.epoch_of(step))[step % self.steps_per_epoch].tolist()

    def micro_batches(self, step: int) -> list[list[int]]:
        """This rank's ``grad_accum`` micro-batches of ``micro_batch_size`` indices for step ``step``.

        The global batch is sorted by length and cut into ``world_size * grad_accum`` contiguous micro-batches;
        micro-batch ``j`` goes to rank ``j % world_size``, so every rank gets a similar mix of lengths.
        """
        lengths = self.lengths
        batch = sorted(self.global_batch(step), key=lambda i: (int(lengths[i]), i))
        mbs, n_micro = self.micro_batch_size, self.world_size * self.grad_accum
        micros = [batch[j * mbs:(j + 1) * mbs] for j in range(n_micro)]
        return [micros[j] for j in range(self.rank, n_micro, self.world_size)]

    def state_dict(self) -> dict:
        """What determines the batch order (save it with a checkpoint)."""
        return {
            "num_examples": len(self.lengths),
            "lengths_fingerprint": self._fingerprint,
            "global_batch_size": self.global_batch_size,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "bucket_factor": self.bucket_factor,
            "micro_batch_size": self.micro_batch_size,
            "grad_accum": self.grad_accum,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict) -> None:
        """Check that a saved plan gives the same global batches as this one.

        The split of the global batch (``micro_batch_size``, ``grad_accum``, ``world_size``) may change between
        runs; everything that changes which examples a step sees may not.

        Raises:
            ConfigError: naming every setting that differs.
        """
        mine = self.state_dict()
        keys = ("num_examples", "lengths_fingerprint", "global_batch_size", "seed", "shuffle", "bucket_factor")
        diffs = [f"{k}: checkpoint {state.get(k)!r}, now {mine[k]!r}" for k in keys if state.get(k) != mine[k]]
        if diffs:
            raise ConfigError("the batch plan differs from the one in the checkpoint, so resuming would not see "
                              "the same batches (" + "; ".join(diffs) + ")")


def step_batches(dataset, plan, collate_fn: Callable[[list[Any]], Any]) -> Callable[[int], list[Any]]:
    """``step -> this rank's micro-batches`` from a :class:`BatchPlan`."""
    def get(step: int) -> list[Any]:
        return [collate_fn([dataset[i] for i in idx]) for idx in plan.micro_batches(step)]
    return get


def eval_batches(dataset, *, batch_size: int, rank: int, world_size: int,
                 collate_fn: Callable[[list[Any]], Any]) -> Callable[[], Iterator[Any]]:
    """``() -> iterator`` over this rank's eval batches, length-sorted (by ``dataset.lengths`` when it has them) for
    little padding.

    Every rank gets the same number of batches (FSDP needs it): the eval set is cut to a multiple of
    ``world_size`` examples (at most ``world_size - 1`` dropped, none with one process).
    """
    n = len(dataset) - len(dataset) % world_size
    lengths = getattr(dataset, "lengths", None)
    order = sorted(range(n), key=lambda i: lengths[i]) if lengths is not None else list(range(n))
    mine = order[rank::world_size]

    def it() -> Iterator[Any]:
        for s in range(0, len(mine), batch_size):
            yield collate_fn([dataset[i] for i in mine[s:s + batch_size]])
    return it
