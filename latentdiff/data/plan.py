"""The epoch plan: which positions of which shards each rank and DataLoader worker reads, and in which batches.

Notation

    N        samples in all shards (per-shard counts from the manifest)
    R, r     world size, this rank
    W, w     DataLoader workers per rank (``max(num_workers, 1)``), a worker
    B        batch size
    L        samples per rank, ``N // R``
    n_b      batches per rank: ``L // B`` (drop_last) or ``ceil(L / B)``

Steps

1. Shard order: the shard list, permuted by ``Random(f"{seed}:shards:{epoch}")`` when shuffling. Concatenated in
   that order the shards form one stream of N positions.
2. Rank split: rank r owns the contiguous positions ``[r L, (r + 1) L)``. The last ``N mod R`` positions of the
   stream are not read this epoch (others next epoch, since the shard order changes); every rank gets exactly
   ``n_b`` batches, so no DDP rank waits for another.
3. Worker split: batch j of the rank (``0 <= j < n_b``) is produced by worker ``j mod W``. Worker w owns a
   contiguous part of the rank's positions, as many as its batches hold, laid out in worker order. With
   drop_last the last ``L mod B`` positions of the rank are not read; without it the last batch is short.
   The DataLoader asks workers in turn, so it returns batches ``0, 1, ..., n_b - 1`` in order.
4. Inside a worker the positions pass a shuffle buffer seeded by ``(seed, epoch, rank, w)`` (see reader.py).

Resampled mode replaces steps 1-3's positions by shards drawn with replacement (weighted by their counts) per
``(seed, epoch, rank, w)``; the batch counts stay those of step 3, so an "epoch" keeps its length.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from latentdiff.data.shards import Segment


@dataclass(frozen=True)
class WorkerPlan:
    worker: int  # worker index in the original (un-resumed) layout
    batch_sizes: tuple[int, ...]  # its batches, in the order it yields them
    segments: tuple[Segment, ...]  # the positions it reads, in order (empty in resampled mode)

    @property
    def num_samples(self) -> int:
        return sum(self.batch_sizes)


@dataclass(frozen=True)
class EpochPlan:
    epoch: int
    rank: int
    world_size: int
    num_workers: int  # W >= 1
    batch_size: int
    num_batches: int  # n_b, the same on every rank
    shards: tuple[str, ...]  # in this epoch's order
    counts: tuple[int, ...]
    workers: tuple[WorkerPlan, ...]
    resampled: bool = False

    @property
    def num_samples(self) -> int:
        """Samples yielded to this rank over the whole epoch."""
        return sum(w.num_samples for w in self.workers)

    def batches_before(self, worker: int, start_batch: int) -> int:
        """How many of ``worker``'s batches come before rank batch ``start_batch``."""
        return max(0, (start_batch - worker + self.num_workers - 1) // self.num_workers)

    def resumed_worker(self, loader_worker: int, start_batch: int) -> int:
        """The original worker a DataLoader worker plays when the loader starts at rank batch ``start_batch``.

        The DataLoader always asks worker 0 first, so the roles rotate: loader worker 0 plays the owner of batch
        ``start_batch``, worker 1 the owner of the next one, and so on.
        """
        return (loader_worker + start_batch) % self.num_workers


def _segments(order: list[int], shards: list[str], counts: list[int], start: int, stop: int) -> tuple[Segment, ...]:
    """Cut positions ``[start, stop)`` of the concatenated stream into per-shard segments."""
    out, offset = [], 0
    for i in order:
        lo, hi = max(start, offset), min(stop, offset + counts[i])
        if lo < hi:
            out.append(Segment(shards[i], lo - offset, hi - offset, counts[i]))
        offset += counts[i]
    return tuple(out)


def plan_epoch(shards: list[str], counts: list[int], *, epoch: int, rank: int = 0, world_size: int = 1,
               num_workers: int = 0, batch_size: int, shuffle: bool = True, drop_last: bool = True,
               resampled: bool = False, seed: int = 0) -> EpochPlan:
    """Plan one epoch for one rank (steps 1-3 of the module docstring)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
    if len(shards) != len(counts):
        raise ValueError(f"{len(shards)} shards but {len(counts)} counts")
    W, B = max(num_workers, 1), batch_size
    order = list(range(len(shards)))
    if shuffle and not resampled:
        random.Random(f"{seed}:shards:{epoch}").shuffle(order)  # step 1
    N = sum(counts)
    L = N // world_size  # step 2
    n_b = L // B if drop_last else -(-L // B)
    sizes = [min(B, L - j * B) for j in range(n_b)]
    workers, offset = [], rank * L
    for w in range(W):  # step 3
        batch_sizes = tuple(sizes[w::W])
        n = sum(batch_sizes)
        segments = () if resampled else _segments(order, shards, counts, offset, offset + n)
        workers.append(WorkerPlan(w, batch_sizes, segments))
        offset += n
    return EpochPlan(epoch=epoch, rank=rank, world_size=world_size, num_workers=W, batch_size=B, num_batches=n_b,
                     shards=tuple(shards[i] for i in order), counts=tuple(counts[i] for i in order),
                     workers=tuple(workers), resampled=resampled)
