"""Latent caching: encode the images of image shards once and write latent shards the reader can train on.

    manifest = cache_latents("data/cifar10-train-shards", lambda x: vae.encode(x), "data/cifar10-train-latents",
                             image_size=32)

``encode_fn`` maps images (B, 3, H, W) float32 in [-1, 1] (center crop, no flip) to latents (B, C, h, w); it is
passed in, so the data layer imports no model. Each sample keeps its key and caption: ``{key}.npy`` (the latent,
``dtype``; loaded without pickles), ``{key}.txt``, and ``{key}.json`` (the source json plus ``latent_shape``).
Pointing ``DataConfig.shards`` at the output makes the reader return ``latent`` (B, C, h, w) float32 instead of
``image``; latents are returned as stored (no crop, no flip). Unusable source samples are counted in ``stats``
and listed in the manifest; ``DataError`` is raised when their share passes ``max_error_rate``.
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from latentdiff.data.manifest import Manifest
from latentdiff.data.reader import decode_sample
from latentdiff.data.shards import Segment, iter_segment, resolve_shards, shard_sample_counts
from latentdiff.data.stats import DataStats, Problem
from latentdiff.data.transforms import ImageTransform
from latentdiff.data.writer import ShardWriter, prepare_outdir, remove_stale_shards


def cache_latents(shards: str | Sequence[str], encode_fn: Callable[[torch.Tensor], torch.Tensor],
                  outdir: str | Path, *, image_size: int, batch_size: int = 64, samples_per_shard: int = 1000,
                  prefix: str = "latents", dtype: str = "float16", max_error_rate: float = 0.01,
                  overwrite: bool = False, stats: DataStats | None = None, progress: bool = True) -> Manifest:
    """Encode every image of ``shards`` (in shard order) and write latent shards plus manifest.json to ``outdir``."""
    stats = stats if stats is not None else DataStats()
    paths = resolve_shards(shards)
    counts = shard_sample_counts(paths, stats.add)
    old_shards = prepare_outdir(outdir, overwrite)
    transform = ImageTransform(image_size, crop="center", random_flip=False)
    rng = random.Random(0)  # center crop without flip draws nothing
    pending: list[tuple[str, str, bytes | None, torch.Tensor]] = []  # key, caption, json, image

    def flush(writer: ShardWriter) -> None:
        images = torch.stack([p[3] for p in pending])  # (B, 3, H, W)
        with torch.no_grad():
            latents = encode_fn(images)  # (B, C, h, w)
        if latents.shape[0] != images.shape[0]:
            raise ValueError(f"encode_fn returned {latents.shape[0]} latents for {images.shape[0]} images")
        array = latents.detach().float().cpu().numpy().astype(dtype)
        for (key, caption, meta_bytes, _), latent in zip(pending, array):
            buf = io.BytesIO()
            np.save(buf, latent, allow_pickle=False)
            meta = json.loads(meta_bytes) if meta_bytes else {}
            meta["latent_shape"] = list(latent.shape)
            writer.write(key, {"npy": buf.getvalue(), "txt": caption.encode("utf-8"),
                               "json": json.dumps(meta).encode("utf-8")})
        pending.clear()

    with ShardWriter(outdir, prefix, samples_per_shard, overwrite=overwrite) as writer, \
            tqdm(total=sum(counts), desc="caching latents", unit="img", disable=not progress) as bar:
        for path, count in zip(paths, counts):
            for raw in iter_segment(Segment(path, 0, count, count), stats.add):
                out = decode_sample(raw, transform, rng)
                bar.update(1)
                if isinstance(out, Problem):
                    stats.add(out)
                    continue
                kind, image, caption, key = out
                if kind != "image":
                    raise ValueError(f"{path} key {key} already holds a latent; cache_latents needs image shards")
                stats.add_ok()
                pending.append((key, caption, raw.members.get("json"), image))
                if len(pending) == batch_size:
                    flush(writer)
        if pending:
            flush(writer)
    remove_stale_shards(outdir, old_shards, writer.records)
    source = shards if isinstance(shards, str) else ", ".join(map(str, shards))
    manifest = Manifest(kind="latent", source=source, shards=writer.records,
                        skipped=[asdict(p) for p in stats.problems],
                        extra={"image_size": image_size, "latent_dtype": dtype, "problem_counts": dict(stats.counts)})
    manifest.save(outdir)
    stats.check(max_error_rate, final=True)
    return manifest
