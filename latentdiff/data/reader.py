"""Training reader for tar shards: deterministic, split by rank and worker, exactly resumable.

    loader = make_dataloader(cfg.data, rank=rank, world_size=world_size, epoch=epoch, start_index=position)
    for batch in loader:        # batch["image"]: (B, 3, H, W) float32 in [-1, 1]; batch["caption"], batch["key"]
        ...
        position = loader.position   # store (epoch, position) in the checkpoint

Batches are dicts ``image`` (B, 3, H, W) float32 in [-1, 1] (or ``latent`` (B, C, h, w) float32 for latent shards
written by :func:`latentdiff.data.latents.cache_latents`), ``caption`` list[str] (``""`` where caption dropout
fired), ``key`` list[str]. Every batch has ``batch_size`` samples (the last one may be shorter only when
``drop_last=False``).

Order (details in plan.py): shards are permuted per ``(seed, epoch)``; rank r reads a contiguous ``N // R``
positions of the concatenated shards; each DataLoader worker reads a contiguous part of those and passes it
through a shuffle buffer seeded by ``(seed, epoch, rank, worker)``; worker ``j mod W`` produces the rank's batch
j. Crop offsets, flips and caption dropout use a generator seeded by ``(seed, epoch, rank, worker, position)``.
Every rank yields the same number of batches per epoch (``loader.batches_per_epoch``): the ``N mod R`` positions
left over by the rank split, and with ``drop_last`` the ``(N // R) mod B`` left over per rank, are not read
that epoch; which positions these are changes with the shard order each epoch. With ``resampled=True`` each
worker draws shards with replacement (weighted by their sample counts) instead, for multi-node runs where
splitting shards is impractical; samples are then not disjoint across ranks, but epochs keep the same length.

Resume contract
    The position inside an epoch is ``start_index``: the number of samples this rank has received in the epoch,
    i.e. batches received x ``batch_size``, the same on every rank; ``loader.position`` gives it after each
    batch (the batch just yielded included). ``make_dataloader(cfg, rank, world_size, epoch=e, start_index=s)``
    yields exactly the batches an uninterrupted loader of epoch e yields after its first ``s // batch_size``
    batches: same keys, order, crops, flips and dropped captions. This holds as long as the shards, ``cfg``
    (seed, batch_size, num_workers, shuffle, shuffle_buffer, drop_last, resampled, transforms) and world_size are
    those of the interrupted run; ``loader.order_fingerprint`` summarises them, store it beside the position
    and compare on resume. ``s`` must be a multiple of ``batch_size`` (or the epoch's sample count, which gives
    an empty loader: move on to epoch e + 1 with ``start_index=0``). Skipped samples are read but not decoded.

Errors (see stats.py): a sample that cannot be used (corrupt image, missing caption or image, a position its
shard did not deliver) is counted in ``loader.stats`` with its shard and key, logged, and replaced in its batch
by a repeat of a good sample of the same batch (so shapes stay fixed and ranks stay in step). ``DataError`` is
raised when the error rate passes ``cfg.max_error_rate`` (after 100 samples, and at the end of the epoch).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
from collections.abc import Iterable, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from latentdiff.config import DataConfig
from latentdiff.data.decode import DecodeError
from latentdiff.data.plan import EpochPlan, WorkerPlan, plan_epoch
from latentdiff.data.shards import (
    LATENT_EXT,
    RawSample,
    Segment,
    iter_segment,
    payload_ext,
    resolve_shards,
    shard_sample_counts,
)
from latentdiff.data.stats import DataError, DataStats, Problem
from latentdiff.data.transforms import ImageTransform, latent_tensor


def shuffle_buffer(items: Iterable, size: int, rng: random.Random) -> Iterator:
    """Approximate shuffle: keep ``size`` items, emit a random one as each new item comes in."""
    if size <= 1:
        yield from items
        return
    buffer = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = rng.randrange(size)
        yield buffer[i]
        buffer[i] = item
    rng.shuffle(buffer)
    yield from buffer


def decode_sample(raw: RawSample, transform: ImageTransform, rng: random.Random,
                  caption_dropout: float = 0.0) -> tuple[str, torch.Tensor, str, str] | Problem:
    """``(kind, tensor, caption, key)`` for a usable sample (kind ``image`` or ``latent``), else its Problem."""
    if raw.missing:
        return Problem("missing_sample", raw.shard, None, f"position {raw.index}: {raw.missing}")
    ext = payload_ext(raw.members)
    if ext is None:
        return Problem("missing_image", raw.shard, raw.key, f"members: {sorted(raw.members)}")
    if "txt" not in raw.members:
        return Problem("missing_caption", raw.shard, raw.key)
    try:
        caption = raw.members["txt"].decode("utf-8").strip()
        if ext == LATENT_EXT:
            kind, x = "latent", latent_tensor(raw.members[ext])
        else:
            kind, x = "image", transform(raw.members[ext], rng)
    except (DecodeError, UnicodeDecodeError) as e:
        return Problem("decode_error", raw.shard, raw.key, f"{ext}: {e}")
    if caption_dropout > 0 and rng.random() < caption_dropout:
        caption = ""
    return kind, x, caption, raw.key


class ShardDataset(IterableDataset):
    """The batches of one rank for one epoch (an :class:`EpochPlan`), starting at rank batch ``start_batch``.

    Use it with ``DataLoader(dataset, batch_size=None, num_workers=cfg.num_workers)`` (what
    :class:`ShardLoader` does): it yields collated batches, each with a ``_stats`` entry (good-sample count and
    problems) for the main process to add up.
    """

    def __init__(self, cfg: DataConfig, plan: EpochPlan, start_batch: int = 0):
        self.cfg = cfg
        self.plan = plan
        self.start_batch = start_batch
        self.transform = ImageTransform(cfg.image_size, cfg.crop, cfg.random_flip)
        self._pending: list[Problem] = []

    def _tag(self, what: str, worker: int) -> str:
        return f"{self.cfg.seed}:{what}:{self.plan.epoch}:{self.plan.rank}:{worker}"

    def _raw_stream(self, wp: WorkerPlan) -> Iterator[RawSample]:
        if not self.plan.resampled:
            return itertools.chain.from_iterable(iter_segment(s, self._pending.append) for s in wp.segments)
        rng = random.Random(self._tag("resample", wp.worker))
        shards, counts = self.plan.shards, self.plan.counts

        def draws():
            while True:
                i = rng.choices(range(len(shards)), weights=counts)[0]
                yield from iter_segment(Segment(shards[i], 0, counts[i], counts[i]), self._pending.append)

        return draws()

    def _collate(self, raws: list[RawSample], first: int, worker: int) -> dict:
        good, problems = [], []
        for i, raw in enumerate(raws):
            rng = random.Random(f"{self._tag('sample', worker)}:{first + i}")
            out = decode_sample(raw, self.transform, rng, self.cfg.caption_dropout)
            (problems if isinstance(out, Problem) else good).append(out)
        problems, self._pending = self._pending + problems, []
        if not good:
            raise DataError(f"no usable sample in a batch of {len(raws)}: " + "; ".join(map(str, problems[:5])))
        kinds = {g[0] for g in good}
        if len(kinds) > 1:
            raise DataError(f"a batch mixes image and latent samples (keys {[g[3] for g in good][:5]}...)")
        filled = [good[i % len(good)] for i in range(len(raws))]  # failed samples -> repeats of good ones
        return {kinds.pop(): torch.stack([g[1] for g in filled]), "caption": [g[2] for g in filled],
                "key": [g[3] for g in filled], "_stats": {"ok": len(good), "problems": problems}}

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        loader_worker, n_workers = (0, 1) if info is None else (info.id, info.num_workers)
        if n_workers != self.plan.num_workers:
            raise ValueError(f"the plan is for {self.plan.num_workers} workers but the DataLoader has {n_workers}")
        wp = self.plan.workers[self.plan.resumed_worker(loader_worker, self.start_batch)]
        skip = self.plan.batches_before(wp.worker, self.start_batch)
        self._pending = []
        stream = self._raw_stream(wp)
        if self.cfg.shuffle:
            stream = shuffle_buffer(stream, self.cfg.shuffle_buffer, random.Random(self._tag("buffer", wp.worker)))
        position = sum(wp.batch_sizes[:skip])
        stream = itertools.islice(stream, position, None)  # resume: read, do not decode
        for size in wp.batch_sizes[skip:]:
            yield self._collate(list(itertools.islice(stream, size)), position, wp.worker)
            position += size


class ShardLoader:
    """One epoch of batches for one rank; see the module docstring for order, resume and errors."""

    def __init__(self, cfg: DataConfig, rank: int = 0, world_size: int = 1, epoch: int = 0, start_index: int = 0,
                 stats: DataStats | None = None, pin_memory: bool = False):
        self.cfg = cfg
        self.stats = stats if stats is not None else DataStats()
        self.pin_memory = pin_memory
        paths = resolve_shards(cfg.shards)
        counts = shard_sample_counts(paths, self.stats.add)
        for path, count in zip(paths, counts):
            if count == 0:
                self.stats.add(Problem("empty_shard", path))
        self.plan = plan_epoch(paths, counts, epoch=epoch, rank=rank, world_size=world_size,
                               num_workers=cfg.num_workers, batch_size=cfg.batch_size, shuffle=cfg.shuffle,
                               drop_last=cfg.drop_last, resampled=cfg.resampled, seed=cfg.seed)
        total = self.plan.num_samples
        if not (0 <= start_index <= total and (start_index % cfg.batch_size == 0 or start_index == total)):
            raise ValueError(f"start_index={start_index} must be a multiple of batch_size={cfg.batch_size} "
                             f"in [0, {total}] (samples per rank in epoch {epoch})")
        self.start_index = start_index
        self.position = start_index
        self.dataset = ShardDataset(cfg, self.plan, start_batch=-(-start_index // cfg.batch_size))
        identity = {"shards": [os.path.basename(p) for p in paths], "counts": counts, "world_size": world_size,
                    **{k: getattr(cfg, k) for k in ("seed", "batch_size", "num_workers", "shuffle", "shuffle_buffer",
                                                    "drop_last", "resampled", "image_size", "crop", "random_flip",
                                                    "caption_dropout")}}
        self.order_fingerprint = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def batches_per_epoch(self) -> int:
        return self.plan.num_batches

    @property
    def samples_per_epoch(self) -> int:
        """Samples this rank receives over the whole epoch."""
        return self.plan.num_samples

    def __len__(self) -> int:
        """Batches this loader yields (from ``start_index`` to the end of the epoch)."""
        return self.plan.num_batches - self.dataset.start_batch

    def __iter__(self) -> Iterator[dict]:
        # Its own generator (only the workers' unused base seed; sample randomness comes from the seeded tags
        # above) keeps the loader off the global torch RNG, so a resumed run's noise matches an uninterrupted one.
        generator = torch.Generator().manual_seed(self.cfg.seed)
        loader = DataLoader(self.dataset, batch_size=None, num_workers=self.cfg.num_workers,
                            pin_memory=self.pin_memory, generator=generator)
        self.position = self.start_index
        for batch in loader:
            info = batch.pop("_stats")
            self.stats.add_ok(info["ok"])
            for problem in info["problems"]:
                self.stats.add(problem)
            self.stats.check(self.cfg.max_error_rate)
            self.position += len(batch["key"])
            yield batch
        self.stats.check(self.cfg.max_error_rate, final=True)


def make_dataloader(cfg: DataConfig, rank: int = 0, world_size: int = 1, epoch: int = 0, start_index: int = 0,
                    stats: DataStats | None = None, pin_memory: bool = False) -> ShardLoader:
    """The batches of ``epoch`` for ``rank`` of ``world_size``, from sample ``start_index`` of this rank's epoch."""
    return ShardLoader(cfg, rank=rank, world_size=world_size, epoch=epoch, start_index=start_index, stats=stats,
                       pin_memory=pin_memory)
