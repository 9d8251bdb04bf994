"""Reading image sources sample by sample: folders, tar archives and webdataset shards (FID, CLIP score).

A source is one of
- a folder: every image file below it (recursive; hidden files and folders skipped), in sorted path order. A
  sample's caption is the same-name ``.txt`` file beside the image;
- a tar archive (``.tar``, ``.tar.gz``, ``.tgz``, ``.tar.bz2``, ``.tar.xz``), a folder holding only archives (shards),
  or a brace pattern (``shards-{000000..000009}.tar``): members are grouped by webdataset key by
  :func:`latentdiff.data.shards.iter_shard`, in archive order; a sample's image is its member with an image
  extension (:data:`latentdiff.data.decode.IMAGE_EXTS`), its caption its ``.txt`` member.

:func:`open_image_source` checks a source (it exists, holds images, its archives open) without reading its
images, so that a command can open all its sources before computing anything.

Samples are numbered in that order; a selection (all, the first N, or N chosen at random with a seed) is a sorted
array of those numbers. :class:`SampleStream` hands a selection to DataLoader workers (worker w of W takes every
W-th selected sample) and maps each through a transform.
"""

from __future__ import annotations

import argparse
import os
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from braceexpand import braceexpand
from torch.utils.data import IterableDataset, get_worker_info

from latentdiff.argtypes import POSITIVE, SEED, WORKERS
from latentdiff.data.decode import IMAGE_EXTS, is_image_name
from latentdiff.data.shards import READ_ERRORS, image_ext, iter_shard
from latentdiff.data.stats import Problem

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
SUBSETS = ("random", "first")


class SourceError(ValueError):
    """A source that cannot be read as images (missing, unreadable, no images, bad options); the message names it."""


def error_message(err: BaseException) -> str:
    """One-line message of an error, also when a DataLoader worker raised it (the wrapper adds a traceback)."""
    lines = [line for line in str(err).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Caught ") and "DataLoader worker" in lines[0]:
        return lines[-1].split(": ", 1)[-1]  # the worker's "SourceError: <message>" line
    return str(err)


@dataclass
class Sample:
    """One sample: its name, encoded image bytes (None if unreadable: see ``error``) and caption (if asked)."""

    name: str
    image: bytes | None
    caption: str | None = None
    error: str | None = None


def is_archive(path: str | Path) -> bool:
    """Whether a file name ends in one of :data:`TAR_SUFFIXES` (any case)."""
    return Path(path).name.lower().endswith(TAR_SUFFIXES)


def list_files(root: str | Path) -> list[Path]:
    """Every file below ``root`` (recursive, following folder links), hidden files and folders skipped, sorted."""
    found = []
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [Path(folder) / name for name in files if not name.startswith(".")]
    return sorted(found)


class FolderSource:
    """Image files below a folder, in sorted path order; captions from same-name .txt files."""

    def __init__(self, root: Path, paths: list[Path]):
        self.root, self.paths = root, paths
        self.description = f"{root} (folder, {len(paths)} images)"

    def files(self) -> list[Path]:
        return self.paths

    def count(self) -> int:
        return len(self.paths)

    def iter_samples(self, keep: Callable[[int], bool], stop: int | None = None, captions: bool = False):
        """Yield (number, Sample) for each sample whose number ``keep`` accepts, up to ``stop``."""
        for index, path in enumerate(self.paths[:stop]):
            if not keep(index):
                continue
            name = str(path.relative_to(self.root))
            try:
                image = path.read_bytes()
            except OSError as err:
                yield index, Sample(name, None, error=f"{type(err).__name__}: {err}")
                continue
            caption_path = path.with_suffix(".txt")
            caption = caption_path.read_text(encoding="utf-8").strip() if captions and caption_path.is_file() else None
            yield index, Sample(name, image, caption)


def _unreadable(problem: Problem) -> None:
    """``iter_shard``'s report: an evaluation source must be read whole, so any shard problem stops it."""
    raise SourceError(f"{problem.shard}: unreadable archive ({problem.kind.replace('_', ' ')}: {problem.detail})")


class TarSource:
    """Samples of tar archives / webdataset shards that hold an image, grouped by key, in archive order."""

    def __init__(self, tars: list[Path], description: str):
        self.tars = tars
        self.description = description

    def files(self) -> list[Path]:
        return self.tars

    def _images(self) -> Iterator[tuple[str, str, dict[str, bytes]]]:
        """Yield (key, image extension, members) per sample with an image; streams each archive once."""
        for tar in self.tars:
            for key, members in iter_shard(str(tar), _unreadable):
                ext = image_ext(members)
                if ext is not None:
                    yield key, ext, members

    def count(self) -> int:
        return sum(1 for _ in self._images())

    def iter_samples(self, keep: Callable[[int], bool], stop: int | None = None, captions: bool = False):
        """Yield (number, Sample) for each sample whose number ``keep`` accepts, up to ``stop``."""
        for index, (key, ext, members) in enumerate(self._images()):
            if stop is not None and index >= stop:
                return
            if keep(index):
                text = members.get("txt")
                caption = text.decode("utf-8").strip() if captions and text is not None else None
                yield index, Sample(f"{key}.{ext}", members[ext], caption)


def _check_archive(path: Path) -> None:
    """Open an archive and read its first header: a file that is not a tar fails here, before any computing."""
    try:
        with tarfile.open(path, "r|*") as archive:
            archive.next()
    except READ_ERRORS as err:
        raise SourceError(f"{path}: unreadable archive ({type(err).__name__}: {err})") from err


def _tar_source(tars: list[Path], description: str) -> TarSource:
    for tar in tars:
        _check_archive(tar)
    return TarSource(tars, description)


def open_image_source(spec: str | Path) -> FolderSource | TarSource:
    """Open a folder, tar archive, folder of shards or brace pattern (see module docstring); ``SourceError`` if
    it is missing, holds no images or an archive does not open."""
    spec = str(spec)
    if "{" in spec:
        tars = [Path(p) for p in braceexpand(spec)]
        missing = [p for p in tars if not p.is_file()]
        if missing:
            raise SourceError(f"{spec}: {len(missing)} of {len(tars)} shards are missing, e.g. {missing[0]}")
        return _tar_source(tars, f"{spec} ({len(tars)} shards)")
    path = Path(spec).expanduser()
    if path.is_file():
        if not is_archive(path):
            raise SourceError(f"{path}: not a folder, a tar archive ({', '.join(TAR_SUFFIXES)}) or .npz statistics")
        return _tar_source([path], f"{path} (tar archive)")
    if not path.is_dir():
        raise SourceError(f"{path}: no such file or folder")
    files = list_files(path)
    images = [p for p in files if is_image_name(p.name)]
    tars = [p for p in files if is_archive(p)]
    if images and tars:
        raise SourceError(f"{path} holds both images and tar shards; pass a folder with only one kind")
    if tars:
        return _tar_source(tars, f"{path} ({len(tars)} shards)")
    if not images:
        raise SourceError(f"{path}: no images ({', '.join(IMAGE_EXTS)}) and no tar shards found")
    return FolderSource(path, images)


def add_selection_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    """The command-line options that choose and read a source's samples (``latentdiff fid``, ``clip_score``)."""
    parser.add_argument("--num-samples", type=POSITIVE, default=None, help=f"{what} to use; None: all")
    parser.add_argument("--subset", choices=SUBSETS, default="random",
                        help="with --num-samples: a seeded random subset, or the first N in source order")
    parser.add_argument("--seed", type=SEED, default=0, help="seed of the random subset")
    parser.add_argument("--num-workers", type=WORKERS, default=min(8, os.cpu_count() or 1),
                        help="image decoding processes")


def check_selection(num_samples: int | None, subset: str) -> None:
    """Raise ``ValueError`` for a bad ``num_samples`` or ``subset``, before any sample is read."""
    if num_samples is not None and num_samples < 1:
        raise ValueError(f"num_samples={num_samples} must be >= 1")
    if subset not in SUBSETS:
        raise ValueError(f"subset={subset!r} is not one of {list(SUBSETS)}")


def select_samples(total: int | None, num_samples: int | None, subset: str, seed: int) -> np.ndarray | None:
    """Sorted sample numbers to use: None (all), the first N, or N at random (``subset`` 'first'/'random').

    ``total`` is only needed for a random subset.
    """
    check_selection(num_samples, subset)
    if num_samples is None:
        return None
    if subset == "first":
        return np.arange(num_samples)
    if num_samples >= total:
        return None
    return np.sort(np.random.default_rng(seed).choice(total, size=num_samples, replace=False))


def selection_text(selection: np.ndarray | None, total: int | None, subset: str, seed: int) -> str:
    """How a selection was made, for reports and statistics metadata."""
    if selection is None:
        return "all"
    if subset == "first":
        return f"first {len(selection)}"
    return f"random {len(selection)} of {total} (seed {seed})"


class SampleStream(IterableDataset):
    """The selected samples of a source, split among DataLoader workers, each mapped through ``transform``."""

    def __init__(self, source: FolderSource | TarSource, selection: np.ndarray | None,
                 transform: Callable[[Sample], object], captions: bool = False):
        self.source, self.selection, self.transform, self.captions = source, selection, transform, captions

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if self.selection is None:
            stop = None

            def keep(index: int) -> bool:
                return index % workers == worker
        else:
            rank = {int(index): r for r, index in enumerate(self.selection)}  # sample number -> position
            stop = int(self.selection[-1]) + 1

            def keep(index: int) -> bool:
                return index in rank and rank[index] % workers == worker

        for _, sample in self.source.iter_samples(keep, stop, self.captions):
            yield self.transform(sample)
