"""Image sources for evaluation (folders, tar archives, webdataset shards) and the FID resize.

A source is one of
- a folder: every image file below it (recursive; hidden files skipped), in sorted path order. A sample's caption
  is the same-name ``.txt`` file beside the image;
- a ``.tar``/``.tar.gz``/``.tgz`` file, a folder holding only ``.tar`` shards, or a brace pattern
  (``shards-{000000..000009}.tar``): members are grouped by webdataset key (the member path up to the first dot
  of its file name), in archive order; a sample's image is its first image member, its caption its ``.txt``.

Samples are numbered in that order; a selection (all, the first N, or N chosen at random with a seed) is a sorted
array of those numbers. :class:`SampleStream` hands a selection to DataLoader workers (worker w of W takes every
W-th selected sample) and maps each through a transform.

The FID resize (:func:`resize_for_inception`) follows clean-fid's "clean" mode (Parmar et al., 2022, "On Aliased
Resizing and Surprising Subtleties in GAN Evaluation"): decode to uint8 RGB, then resize each channel as a float32
image with PIL's antialiased bicubic filter to 299×299, without rounding or clipping the result.
"""

from __future__ import annotations

import io
import os
import tarfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
RESIZE_METHOD = "PIL bicubic (antialiased) per channel in float32 from uint8 RGB to 299x299, no rounding or clipping"


class SourceError(ValueError):
    """A source path that cannot be read as images; the message names it."""


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


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not Path(name).name.startswith(".")


def _is_tar(path: Path) -> bool:
    return path.name.lower().endswith(TAR_SUFFIXES)


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


class TarSource:
    """Samples of tar archives / webdataset shards, grouped by key, in archive order."""

    def __init__(self, tars: list[Path], description: str):
        self.tars = tars
        self.description = description

    def files(self) -> list[Path]:
        return self.tars

    def _groups(self, with_data: bool) -> Iterator[tuple[str, dict[str, bytes | None]]]:
        """Yield (key, {extension: bytes or None}) per webdataset sample; streams each archive once."""
        for tar_path in self.tars:
            key, group = None, {}
            try:
                with tarfile.open(tar_path, "r|*") as archive:
                    for member in archive:
                        if not member.isfile() or Path(member.name).name.startswith("."):
                            continue
                        folder, base = member.name.rpartition("/")[::2]
                        stem, _, ext = base.partition(".")
                        member_key = f"{folder}/{stem}" if folder else stem
                        if member_key != key:
                            if group:
                                yield key, group
                            key, group = member_key, {}
                        wanted = with_data and (ext.lower() == "txt" or _is_image(base))
                        group[ext.lower()] = archive.extractfile(member).read() if wanted else None
            except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
                raise SourceError(f"{tar_path}: unreadable archive ({type(err).__name__}: {err})") from err
            if group:
                yield key, group

    def count(self) -> int:
        return sum(1 for _, group in self._groups(False) if any(_is_image("x." + ext) for ext in group))

    def iter_samples(self, keep: Callable[[int], bool], stop: int | None = None, captions: bool = False):
        """Yield (number, Sample) for each sample whose number ``keep`` accepts, up to ``stop``."""
        index = -1
        for key, group in self._groups(True):
            image_ext = next((ext for ext in group if _is_image("x." + ext)), None)
            if image_ext is None:
                continue
            index += 1
            if stop is not None and index >= stop:
                return
            if keep(index):
                text = group.get("txt")
                caption = text.decode("utf-8").strip() if captions and text is not None else None
                yield index, Sample(f"{key}.{image_ext}", group[image_ext], caption)


def _expand_braces(spec: str) -> list[Path]:
    from braceexpand import braceexpand  # a webdataset dependency

    paths = [Path(p) for p in braceexpand(spec)]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise SourceError(f"{spec}: {len(missing)} of {len(paths)} shards are missing, e.g. {missing[0]}")
    return paths


def open_image_source(spec: str | Path) -> FolderSource | TarSource:
    """Open a folder, tar archive, folder of shards or brace pattern (see module docstring)."""
    spec = str(spec)
    if "{" in spec:
        tars = _expand_braces(spec)
        return TarSource(tars, f"{spec} ({len(tars)} shards)")
    path = Path(spec).expanduser()
    if path.is_file():
        if not _is_tar(path):
            raise SourceError(f"{path}: not a folder, a tar archive ({', '.join(TAR_SUFFIXES)}) or .npz statistics")
        return TarSource([path], f"{path} (tar archive)")
    if not path.is_dir():
        raise SourceError(f"{path}: no such file or folder")
    files = sorted(
        p for p in path.rglob("*") if p.is_file() and not any(s.startswith(".") for s in p.relative_to(path).parts)
    )
    images = [p for p in files if _is_image(p.name)]
    tars = [p for p in files if _is_tar(p)]
    if images and tars:
        raise SourceError(f"{path} holds both images and .tar shards; pass a folder with only one kind")
    if tars:
        return TarSource(tars, f"{path} ({len(tars)} shards)")
    if not images:
        raise SourceError(f"{path}: no images ({', '.join(IMAGE_EXTENSIONS)}) and no .tar shards found")
    return FolderSource(path, images)


def add_selection_arguments(parser, what: str) -> None:
    """The command-line options that choose and read a source's samples (tools/fid.py, tools/clip_score.py)."""
    parser.add_argument("--num-samples", type=int, default=None, help=f"{what} to use; None: all")
    parser.add_argument("--subset", choices=("random", "first"), default="random",
                        help="with --num-samples: a seeded random subset, or the first N in source order")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random subset")
    parser.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="image decoding processes")


def select_samples(total: int | None, num_samples: int | None, subset: str, seed: int) -> np.ndarray | None:
    """Sorted sample numbers to use: None (all), the first N, or N at random (``subset`` 'first'/'random').

    ``total`` is only needed for a random subset.
    """
    if num_samples is None:
        return None
    if num_samples < 1:
        raise ValueError(f"num_samples={num_samples} must be >= 1")
    if subset == "first":
        return np.arange(num_samples)
    if subset != "random":
        raise ValueError(f"subset={subset!r} is not 'first' or 'random'")
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

    def __init__(self, source, selection: np.ndarray | None, transform: Callable[[Sample], object], captions=False):
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


def decode_image(data: bytes) -> Image.Image:
    """Decode image bytes fully (errors surface here, not later)."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def resize_for_inception(image: Image.Image, size: int = 299) -> np.ndarray:
    """The documented FID resize (see module docstring): (3, size, size) float32 on the 0..255 scale."""
    rgb = np.asarray(image.convert("RGB"))  # (H, W, 3) uint8
    channels = [
        np.asarray(Image.fromarray(rgb[:, :, c].astype(np.float32)).resize((size, size), Image.Resampling.BICUBIC))
        for c in range(3)
    ]  # 3 x (size, size) float32
    return np.stack(channels)  # (3, size, size)
