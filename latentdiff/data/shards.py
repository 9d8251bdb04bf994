"""Reading tar shards in the img2dataset / webdataset layout: finding them, counting them, grouping members.

A shard is a tar whose members ``{key}.{ext}`` are grouped by key (the member path up to the first dot of its
file name, as webdataset does): ``000000123.jpg``, ``000000123.txt``, ``000000123.json``. Members of one sample
are consecutive. A *position* is the index of a sample (key group) inside its shard. :func:`iter_shard` is the one
place that groups tar members: training, validation, the classifier and evaluation
(:mod:`latentdiff.data.image_sources`) all read archives through it.

``resolve_shards`` turns a spec into paths: a folder (its ``manifest.json`` order, else its ``*.tar`` sorted), a
brace pattern (``data/{000000..000049}.tar``), a glob (``data/*.tar``) or one file.
``shard_sample_counts`` takes per-shard counts from the folder's ``manifest.json``, else from img2dataset's
``{shard}_stats.json`` (``successes``), else by scanning the tar headers (clean scans are cached per process).
"""

from __future__ import annotations

import glob
import json
import os
import tarfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from braceexpand import braceexpand

from latentdiff.data.decode import IMAGE_EXTS
from latentdiff.data.manifest import load_manifest
from latentdiff.data.stats import Problem

Report = Callable[[Problem], None]
_SCANNED: dict[tuple[str, int, int], int] = {}  # (path, size, mtime_ns) -> sample count of a clean scan
LATENT_EXT = "npy"
READ_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error)


@dataclass
class RawSample:
    """One position of a shard: its members' bytes by extension, or none when the shard did not deliver it."""

    shard: str
    index: int  # position in the shard
    key: str | None = None
    members: dict[str, bytes] = field(default_factory=dict)
    missing: str = ""  # for an undelivered position: why (the shard problem kind)


@dataclass(frozen=True)
class Segment:
    """Positions ``[start, stop)`` of a shard that holds ``expected`` samples according to its count."""

    shard: str
    start: int
    stop: int
    expected: int


def split_key(name: str) -> tuple[str, str] | None:
    """``dir/000012.seg.png`` -> (``dir/000012``, ``seg.png``); ``None`` for a name without extension."""
    folder, base = os.path.split(name)
    if "." not in base or base.startswith("."):
        return None
    stem, ext = base.split(".", 1)
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def image_ext(members: dict[str, bytes]) -> str | None:
    """The extension of a sample's image member (the first of ``IMAGE_EXTS`` it has), ``None`` if it has none."""
    return next((e for e in IMAGE_EXTS if e in members), None)


def payload_ext(members: dict[str, bytes]) -> str | None:
    """The extension of a sample's image (or latent) member, ``None`` if it has neither."""
    return image_ext(members) or (LATENT_EXT if LATENT_EXT in members else None)


def resolve_shards(spec: str | Sequence[str]) -> list[str]:
    """Shard paths for a folder, brace pattern, glob, file, or a list of these (``ValueError`` if none)."""
    if not isinstance(spec, str):
        paths = [p for s in spec for p in resolve_shards(s)]
        if not paths:
            raise ValueError("no shards given")
        return paths
    spec = spec.strip()
    if not spec:
        raise ValueError("no shards given (the shard spec is empty)")
    if Path(spec).is_dir():
        manifest = load_manifest(spec)
        if manifest is not None:
            paths = [str(Path(spec) / s.name) for s in manifest.shards]
        else:
            paths = sorted(glob.glob(os.path.join(glob.escape(spec), "*.tar")))
    elif "{" in spec:
        paths = [p for pattern in braceexpand(spec) for p in (sorted(glob.glob(pattern)) if glob.has_magic(pattern)
                                                              else [pattern])]
    elif glob.has_magic(spec):
        paths = sorted(glob.glob(spec))
    elif Path(spec).is_file():
        paths = [spec]
    else:
        raise ValueError(f"shard spec {spec!r} is neither a folder, a pattern nor an existing file")
    if not paths:
        raise ValueError(f"no shards match {spec!r}")
    return paths


def _tar_ends_cleanly(path: str, offset: int) -> bool:
    """An uncompressed tar must end with two zero blocks after its last member; a cut file does not."""
    if not path.endswith(".tar"):
        return True  # compressed: the decompressor reports truncation itself
    with open(path, "rb") as f:
        f.seek(offset)
        tail = f.read(1024)
    return len(tail) == 1024 and not any(tail)


def iter_shard(path: str, report: Report) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield ``(key, {ext: bytes})`` for each complete sample of a shard, in tar order.

    A shard that cannot be opened reports ``unreadable_shard``; one that ends inside a member or header
    reports ``truncated_shard`` and its last, incomplete sample is not yielded.
    """
    try:
        tf = tarfile.open(path, "r|*")
    except READ_ERRORS as e:
        report(Problem("unreadable_shard", path, None, str(e)))
        return
    key, members, n = None, {}, 0
    try:
        for member in tf:
            parts = split_key(member.name) if member.isfile() else None
            if parts is None:
                continue
            if parts[0] != key and key is not None:
                yield key, members
                members, n = {}, n + 1
            key = parts[0]
            members[parts[1]] = tf.extractfile(member).read()
        clean = _tar_ends_cleanly(path, tf.offset)
    except READ_ERRORS as e:
        report(Problem("truncated_shard", path, key, f"after {n} complete samples: {e}"))
        return
    finally:
        tf.close()
    if not clean:
        report(Problem("truncated_shard", path, key, f"after {n} complete samples: the tar has no end blocks"))
    elif key is not None:
        yield key, members


def iter_segment(seg: Segment, report: Report) -> Iterator[RawSample]:
    """Yield one :class:`RawSample` per position of ``seg``; positions the shard lacks come back empty."""
    problems: list[Problem] = []
    n = 0
    for key, members in iter_shard(seg.shard, problems.append):
        if n >= seg.start:
            yield RawSample(seg.shard, n, key, members)
        n += 1
        if n >= seg.stop:
            break  # before reading the next member: a problem after the segment is not this segment's
    for p in problems:
        report(p)
    if n < seg.stop:
        if not problems:
            problems.append(Problem("short_shard", seg.shard, None,
                                    f"holds {n} samples, its count says {seg.expected}"))
            report(problems[0])
        for i in range(max(n, seg.start), seg.stop):
            yield RawSample(seg.shard, i, missing=problems[0].kind)


def count_samples(path: str, report: Report) -> int:
    """Number of complete samples in a shard, from its tar headers (no member data is read)."""
    try:
        tf = tarfile.open(path, "r:*")
    except READ_ERRORS as e:
        report(Problem("unreadable_shard", path, None, str(e)))
        return 0
    keys, last_complete = 0, 0
    key = None
    try:
        for member in tf:
            parts = split_key(member.name) if member.isfile() else None
            if parts is not None and parts[0] != key:
                key, keys = parts[0], keys + 1
        last_complete = keys
        if not _tar_ends_cleanly(path, tf.offset):
            report(Problem("truncated_shard", path, key, "the tar has no end blocks"))
            last_complete = max(keys - 1, 0)
    except READ_ERRORS as e:
        report(Problem("truncated_shard", path, key, str(e)))
        last_complete = max(keys - 1, 0)
    finally:
        tf.close()
    return last_complete


def _scanned_count(path: str, report: Report) -> int:
    try:
        st = os.stat(path)
    except OSError as e:
        report(Problem("unreadable_shard", path, None, str(e)))
        return 0
    ident = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if ident not in _SCANNED:
        problems: list[Problem] = []
        count = count_samples(path, problems.append)
        for p in problems:
            report(p)
        if problems:
            return count
        _SCANNED[ident] = count
    return _SCANNED[ident]


def shard_sample_counts(paths: Sequence[str], report: Report) -> list[int]:
    """Per-shard sample counts: manifest, else img2dataset ``_stats.json``, else a header scan."""
    manifests: dict[str, dict[str, int]] = {}
    counts = []
    for path in paths:
        folder, name = os.path.split(path)
        if folder not in manifests:
            manifest = load_manifest(folder or ".")
            manifests[folder] = {} if manifest is None else {s.name: s.samples for s in manifest.shards}
        if name in manifests[folder]:
            counts.append(manifests[folder][name])
            continue
        stats_path = os.path.join(folder, name.split(".", 1)[0] + "_stats.json")
        if os.path.isfile(stats_path):
            try:
                counts.append(int(json.loads(Path(stats_path).read_text())["successes"]))
                continue
            except (OSError, ValueError, KeyError, TypeError):
                pass  # fall back to scanning the tar
        counts.append(_scanned_count(path, report))
    return counts
