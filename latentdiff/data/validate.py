"""Check a shard folder: shards against ``manifest.json`` (presence, size, sha256, sample count) and every sample
(an image or latent member that decodes, a UTF-8 caption).

    stats = validate_shards("data/cifar10-train-shards")
    print(stats.summary())          # stats.ok is True when nothing was found

Problems are those of stats.py plus ``missing_shard`` (listed, not on disk), ``unlisted_shard`` (a ``.tar`` on
disk that the manifest does not list), ``size_mismatch`` and ``checksum_mismatch``. Without a manifest the
folder's ``*.tar`` files are checked sample by sample only.
"""

from __future__ import annotations

import os
from pathlib import Path

from tqdm import tqdm

from latentdiff.data.decode import DecodeError, decode_array, decode_image
from latentdiff.data.manifest import load_manifest, sha256_file
from latentdiff.data.shards import LATENT_EXT, iter_shard, payload_ext
from latentdiff.data.stats import DataStats, Problem


def check_sample(shard: str, key: str, members: dict[str, bytes], decode: bool = True) -> Problem | None:
    """The problem of one sample, or ``None`` if it is usable."""
    ext = payload_ext(members)
    if ext is None:
        return Problem("missing_image", shard, key, f"members: {sorted(members)}")
    if "txt" not in members:
        return Problem("missing_caption", shard, key)
    try:
        members["txt"].decode("utf-8")
        if decode:
            (decode_array if ext == LATENT_EXT else decode_image)(members[ext])
    except (DecodeError, UnicodeDecodeError) as e:
        return Problem("decode_error", shard, key, f"{ext}: {e}")
    return None


def _check_shard(path: str, expected: int | None, stats: DataStats, decode: bool) -> None:
    shard_problems: list[Problem] = []
    n = 0
    for key, members in iter_shard(path, shard_problems.append):
        problem = check_sample(path, key, members, decode)
        if problem is None:
            stats.add_ok()
        else:
            stats.add(problem)
        n += 1
    for problem in shard_problems:
        stats.add(problem)
    if n == 0 and not shard_problems:
        stats.add(Problem("empty_shard", path))
    if expected is None:
        return
    if n < expected:
        if not shard_problems:
            stats.add(Problem("short_shard", path, None, f"holds {n} samples, the manifest says {expected}"))
        for i in range(n, expected):
            stats.add(Problem("missing_sample", path, None, f"position {i}"), log=i == n)
    elif n > expected:
        stats.add(Problem("extra_samples", path, None, f"holds {n} samples, the manifest says {expected}"))


def validate_shards(folder: str | Path, decode: bool = True, checksums: bool = True, stats: DataStats | None = None,
                    progress: bool = False) -> DataStats:
    """Validate the shards of ``folder``; return the counts and first problems (nothing is raised for them)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{str(folder)!r} is not a folder")
    stats = stats if stats is not None else DataStats()
    manifest = load_manifest(folder)
    on_disk = sorted(p.name for p in folder.glob("*.tar"))
    if manifest is None:
        expected = {name: None for name in on_disk}
        if not expected:
            raise ValueError(f"{str(folder)!r} holds neither manifest.json nor *.tar shards")
    else:
        expected = {s.name: s for s in manifest.shards}
        for name in on_disk:
            if name not in expected:
                stats.add(Problem("unlisted_shard", str(folder / name)))
    for name, record in tqdm(expected.items(), desc="validating", unit="shard", disable=not progress):
        path = str(folder / name)
        if not os.path.isfile(path):
            stats.add(Problem("missing_shard", path))
            for i in range(record.samples):
                stats.add(Problem("missing_sample", path, None, f"position {i}"), log=False)
            continue
        if record is not None:
            size = os.path.getsize(path)
            if size != record.bytes:
                stats.add(Problem("size_mismatch", path, None, f"{size} bytes, the manifest says {record.bytes}"))
            elif checksums and sha256_file(path) != record.sha256:
                stats.add(Problem("checksum_mismatch", path, None, "sha256 differs from the manifest"))
        _check_shard(path, None if record is None else record.samples, stats, decode)
    return stats

