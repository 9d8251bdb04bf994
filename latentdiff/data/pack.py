"""Pack an image source (folder or archive, see sources.py) into tar shards with captions and a manifest.

Each sample ``{key}`` (9+ digit running index) gets ``{key}.jpg|png`` (the source's encoded bytes, copied as they
are when the source format is the output format, else re-encoded: JPEG quality 95, or PNG), ``{key}.txt`` (the
caption) and ``{key}.json`` (``class``, ``source`` path, ``width``, ``height``). With ``shuffle`` the samples
are written in the order of a permutation seeded by ``seed`` (class folders would otherwise give single-class
shards); ``max_samples`` keeps the first that many of that order. Every image is fully decoded first unless
``verify=False``; undecodable ones are skipped and listed in the manifest with their reason. The manifest is
written last, after all shards.
"""

from __future__ import annotations

import io
import json
import logging
import random
from collections import Counter
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from latentdiff.data.decode import DecodeError
from latentdiff.data.manifest import Manifest
from latentdiff.data.sources import ImageSource, SourceEntry
from latentdiff.data.writer import ShardWriter, prepare_outdir, remove_stale_shards
from latentdiff.locks import folder_lock

logger = logging.getLogger("latentdiff.data")
IMAGE_FORMATS = {"jpg": "JPEG", "png": "PNG"}


def encode_image(data: bytes, image_format: str, verify: bool = True) -> tuple[bytes, int, int]:
    """``(bytes in image_format, width, height)``: the input bytes themselves when already in that format.

    ``verify`` decodes the whole image even when its bytes are copied (catching truncated files).
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            if img.format == IMAGE_FORMATS[image_format]:
                if verify:
                    img.load()
                return data, width, height
            keep_alpha = image_format == "png" and ("A" in img.getbands() or "transparency" in img.info)
            out = io.BytesIO()
            converted = img.convert("RGBA" if keep_alpha else "RGB")
            converted.save(out, IMAGE_FORMATS[image_format], **({"quality": 95} if image_format == "jpg" else {}))
            return out.getvalue(), width, height
    except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError, ...
        raise DecodeError(f"{type(e).__name__}: {e}") from None


def pack_source(source: ImageSource, outdir: str | Path, *, prefix: str, samples_per_shard: int = 1000,
                image_format: str = "jpg", max_samples: int | None = None, shuffle: bool = True, seed: int = 0,
                verify: bool = True, overwrite: bool = False, command: str = "", progress: bool = True) -> Manifest:
    """Write ``source`` into shards under ``outdir`` and return the manifest (also saved as manifest.json).

    ``outdir`` is locked (:mod:`latentdiff.locks`) while it is written: a second writer raises
    :class:`~latentdiff.locks.FolderLockedError` before touching it."""
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format={image_format!r} is not one of {list(IMAGE_FORMATS)}")
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"max_samples={max_samples} must be >= 1")
    with folder_lock(outdir, "make-shards"):
        return _pack(source, outdir, prefix, samples_per_shard, image_format, max_samples, shuffle, seed, verify,
                     overwrite, command, progress)


def _pack(source: ImageSource, outdir: str | Path, prefix: str, samples_per_shard: int, image_format: str,
          max_samples: int | None, shuffle: bool, seed: int, verify: bool, overwrite: bool, command: str,
          progress: bool) -> Manifest:
    old_shards = prepare_outdir(outdir, overwrite)
    entries: list[SourceEntry] = list(source.entries)
    if shuffle:
        random.Random(seed).shuffle(entries)
    total = len(entries) if max_samples is None else min(max_samples, len(entries))
    skipped = list(source.skipped)
    classes: Counter[str] = Counter()
    with ShardWriter(outdir, prefix, samples_per_shard, overwrite=overwrite) as writer, \
            tqdm(total=total, desc=f"packing {prefix}", unit="img", disable=not progress) as bar:
        written = 0
        for entry in entries:
            if written == total:
                break
            data = source.read(entry)
            try:
                data, width, height = encode_image(data, image_format, verify)
            except DecodeError as e:
                skipped.append({"source": entry.path, "reason": f"cannot decode image: {e}"})
                logger.warning("skipping %s: cannot decode image: %s", entry.path, e)
                continue
            meta = {"class": entry.label, "source": entry.path, "width": width, "height": height}
            writer.write(f"{written:09d}", {image_format: data, "txt": entry.caption.encode("utf-8"),
                                            "json": json.dumps(meta).encode("utf-8")})
            if entry.label is not None:
                classes[entry.label] += 1
            written += 1
            bar.update(1)
    records = writer.records
    remove_stale_shards(outdir, old_shards, records)
    manifest = Manifest(kind="image", source=str(Path(source.path).resolve()), command=command, shards=records,
                        skipped=skipped,
                        extra={"image_format": image_format, "layout": source.layout, "templates": source.templates,
                               "samples_per_shard": samples_per_shard, "shuffle_seed": seed if shuffle else None,
                               "classes": dict(sorted(classes.items()))})
    manifest.save(outdir)
    return manifest

