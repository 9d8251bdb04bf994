"""Fréchet Inception Distance between image sources and saved statistics.

    features = inception_features(device="cuda")          # weights found or obtained on first use
    a = StatisticsSource("samples/", features)            # opened and checked: nothing computed yet
    b = StatisticsSource("cifar10-test.tar.gz", features, cache_dir=DEFAULT_CACHE_DIR)
    if a.needs_features or b.needs_features:
        features.load()                                   # weights problems surface here, before any progress bar
    score = fid(a.statistics().stats, b.statistics().stats)

(``source_statistics(spec, features, ...)`` opens and computes in one call.)

Pipeline per source: select samples (latentdiff.data.image_sources), decode to uint8 RGB, resize to 299×299 with
the documented method (``RESIZE_METHOD``, latentdiff.metrics.inception), scale to [0, 1], extract pool3 features,
accumulate mean and covariance in float64 (latentdiff.metrics.frechet.RunningMoments). Unreadable images are
skipped, counted and named.

Statistics files are ``.npz`` with ``mu`` (D,), ``sigma`` (D, D), ``count`` and ``meta`` (a JSON string: source,
selection, resize method, feature extractor, ...); pytorch-fid's files (``mu``, ``sigma`` only) are read too. The
automatic cache stores a source's statistics under a key hashed from its path, the size and mtime of every file it
reads, the selection, the resize method and the feature extractor, so any change recomputes.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from latentdiff.atomic import atomic_write
from latentdiff.data.decode import decode_image
from latentdiff.data.image_sources import (
    FolderSource,
    Sample,
    SampleStream,
    SourceError,
    TarSource,
    check_selection,
    open_image_source,
    select_samples,
    selection_text,
)
from latentdiff.metrics.frechet import RunningMoments, frechet_distance
from latentdiff.metrics.inception import FEATURE_EXTRACTOR, RESIZE_METHOD, load_inception, resize_for_inception
from latentdiff.metrics.inception_weights import Announce, announce_on_stderr, resolve_inception_weights
from latentdiff.version import __version__

# $XDG_CACHE_HOME/latentdiff/fid (XDG base directories; ~/.cache when unset or empty)
DEFAULT_CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "latentdiff" / "fid"
_CACHE_FORMAT = 1  # bump when the statistics computation changes


class StatisticsError(ValueError):
    """A statistics file that cannot be read, or two that cannot be compared."""


@dataclass
class FeatureStatistics:
    """Mean (D,) and covariance (D, D) of a feature set, its size and how it was made."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int
    meta: dict = field(default_factory=dict)

    def save(self, path: str | Path, overwrite: bool = True) -> None:
        """Write an .npz file atomically (``overwrite=False``: refuse an existing file, FileExistsError)."""
        with atomic_write(path, mode="wb", overwrite=overwrite) as f:
            np.savez(f, mu=self.mu, sigma=self.sigma, count=np.int64(self.count), meta=np.array(json.dumps(self.meta)))

    @classmethod
    def load(cls, path: str | Path) -> FeatureStatistics:
        """Read our .npz files or pytorch-fid's (``mu``/``sigma`` only: count -1, empty meta)."""
        if not Path(path).is_file():
            raise StatisticsError(f"{path}: no such statistics file")
        try:
            with np.load(path, allow_pickle=False) as data:
                mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
                count = int(data["count"]) if "count" in data else -1
                meta = json.loads(str(data["meta"])) if "meta" in data else {}
        except (OSError, ValueError, KeyError, EOFError, TypeError, AttributeError, zipfile.BadZipFile) as err:
            raise StatisticsError(f"{path}: not a statistics file with mu and sigma ({err})") from err
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise StatisticsError(f"{path}: mu {mu.shape} and sigma {sigma.shape} do not fit together")
        return cls(mu, sigma, count, meta)


class Features:
    """A feature extractor, loaded on first use (or by :meth:`load`), and the name its statistics record.

    The loader returns the model, (B, 3, 299, 299) float RGB in [0, 1] -> (B, D), and a description of its
    weights. The name alone keys the cache, so cached statistics need no model (nor its weights).
    """

    def __init__(self, name: str, load: Callable[[], tuple[Callable[[torch.Tensor], torch.Tensor], str]]):
        self.name, self._load = name, load
        self._model, self.weights = None, ""

    def load(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """Load the model now (if not yet loaded) and return it."""
        if self._model is None:
            self._model, self.weights = self._load()
        return self._model

    @property
    def model(self) -> Callable[[torch.Tensor], torch.Tensor]:
        return self.load()


def inception_features(
    weights: str | Path | None = None,
    device: str | torch.device = "cpu",
    announce: Announce | None = announce_on_stderr,
) -> Features:
    """The FID feature extractor; on load its weights file is resolved (``weights``, the hub cache, or obtained on
    first use and said through ``announce``) and the network built on ``device``."""
    return Features(FEATURE_EXTRACTOR, lambda: load_inception(resolve_inception_weights(weights, announce), device))


@dataclass
class SourceStatistics:
    """Statistics of one source, where they came from, and the images that could not be read."""

    stats: FeatureStatistics
    origin: str
    failures: list[tuple[str, str]] = field(default_factory=list)


def _inception_input(sample: Sample) -> tuple[str, torch.Tensor | None, str | None]:
    if sample.image is None:
        return sample.name, None, sample.error
    try:
        pixels = resize_for_inception(decode_image(sample.image))  # (3, 299, 299) on the 0..255 scale
    except Exception as err:  # decoders raise OSError, ValueError, SyntaxError, DecompressionBombError...
        return sample.name, None, f"{type(err).__name__}: {err}"
    return sample.name, torch.from_numpy(pixels / np.float32(255.0)), None


def _collate(items):
    good = [pixels for _, pixels, _ in items if pixels is not None]
    failures = [(name, error) for name, pixels, error in items if pixels is None]
    return (torch.stack(good) if good else None), failures  # (B, 3, 299, 299)


def compute_statistics(
    source,
    features: Features,
    *,
    num_samples: int | None = None,
    subset: str = "random",
    seed: int = 0,
    batch_size: int = 50,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> SourceStatistics:
    """Feature statistics of an opened image source (see latentdiff.data.image_sources)."""
    model = features.load()  # before the progress bar: weights problems must not follow a bar
    needs_total = isinstance(source, FolderSource) or (num_samples is not None and subset == "random")
    total = source.count() if needs_total else None
    selection = select_samples(total, num_samples, subset, seed)
    expected = len(selection) if selection is not None else total
    loader = DataLoader(
        SampleStream(source, selection, _inception_input),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_collate,
    )
    moments, failures = None, []
    with tqdm(total=expected, unit="img", disable=not progress, desc="features", mininterval=5.0) as bar:
        for images, failed in loader:
            failures += failed
            if images is not None:
                with torch.no_grad():
                    batch = model(images.to(device)).double().cpu().numpy()  # (B, D)
                if moments is None:
                    moments = RunningMoments(batch.shape[1])
                moments.update(batch)
            bar.update(len(failed) + (0 if images is None else len(images)))
    used = 0 if moments is None else moments.count
    if used < 2:
        raise SourceError(f"{source.description}: {used} readable images ({len(failures)} unreadable); need >= 2")
    meta = {
        "source": source.description,
        "count": used,
        "unreadable": len(failures),
        "selection": selection_text(selection, total, subset, seed),
        "resize": RESIZE_METHOD,
        "feature_extractor": features.name,
        "weights": features.weights,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "latentdiff": __version__,
    }
    return SourceStatistics(FeatureStatistics(moments.mean, moments.covariance(), used, meta), "computed", failures)


def cache_key(source, features_name: str, num_samples: int | None, subset: str, seed: int) -> str:
    """Hash of the source's files (path, size, mtime), the selection, the resize and the feature extractor."""
    h = hashlib.sha256()
    settings = {
        "format": _CACHE_FORMAT,
        "source": source.description,
        "num_samples": num_samples,
        "subset": subset if num_samples is not None else None,
        "seed": seed if num_samples is not None and subset == "random" else None,
        "resize": RESIZE_METHOD,
        "features": features_name,
    }
    h.update(json.dumps(settings, sort_keys=True).encode())
    for path in source.files():
        st = path.stat()
        h.update(f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:32]


class StatisticsSource:
    """A source spec opened and checked before anything is computed (``SourceError``/``StatisticsError`` now).

    An ``.npz`` file is read, and with ``cache_dir`` a cached result is found, here; otherwise the image source is
    opened and :meth:`statistics` computes (and caches) its statistics. ``needs_features`` says whether that
    will need the feature extractor, so that a caller can load it before any computing starts.
    """

    def __init__(
        self,
        spec: str | Path,
        features: Features,
        *,
        cache_dir: str | Path | None = None,
        num_samples: int | None = None,
        subset: str = "random",
        seed: int = 0,
    ):
        check_selection(num_samples, subset)
        self.features = features
        self.selection = {"num_samples": num_samples, "subset": subset, "seed": seed}
        self.source: FolderSource | TarSource | None = None
        self.cache_path: Path | None = None
        self.ready: SourceStatistics | None = None
        if str(spec).endswith(".npz"):
            self.ready = SourceStatistics(FeatureStatistics.load(spec), f"statistics file {spec}")
            return
        self.source = open_image_source(spec)
        if cache_dir is not None:
            key = cache_key(self.source, features.name, num_samples, subset, seed)
            self.cache_path = Path(cache_dir).expanduser() / f"{key}.npz"
            if self.cache_path.is_file():
                self.ready = SourceStatistics(FeatureStatistics.load(self.cache_path), f"cache {self.cache_path}")

    @property
    def needs_features(self) -> bool:
        return self.ready is None

    def statistics(self, **compute_kwargs) -> SourceStatistics:
        """The statistics: read when opened, else computed (``compute_kwargs``: see :func:`compute_statistics`)."""
        if self.ready is not None:
            return self.ready
        result = compute_statistics(self.source, self.features, **self.selection, **compute_kwargs)
        if self.cache_path is not None:
            result.stats.save(self.cache_path)
            result.origin = f"computed, cached in {self.cache_path}"
        return result


def source_statistics(
    spec: str | Path,
    features: Features,
    *,
    cache_dir: str | Path | None = None,
    num_samples: int | None = None,
    subset: str = "random",
    seed: int = 0,
    **compute_kwargs,
) -> SourceStatistics:
    """Statistics of a source spec in one call: :class:`StatisticsSource` opened, then its statistics."""
    opened = StatisticsSource(spec, features, cache_dir=cache_dir, num_samples=num_samples, subset=subset, seed=seed)
    return opened.statistics(**compute_kwargs)


def check_compatible(a: FeatureStatistics, b: FeatureStatistics) -> list[str]:
    """Raise if the two were made with different resize methods or feature extractors; return warnings."""
    if a.mu.shape != b.mu.shape:
        raise StatisticsError(f"feature dimensions differ: {a.mu.shape[0]} vs {b.mu.shape[0]}")
    warnings = []
    for key in ("resize", "feature_extractor"):
        va, vb = a.meta.get(key), b.meta.get(key)
        if va is not None and vb is not None and va != vb:
            raise StatisticsError(f"statistics differ in {key}: {va!r} vs {vb!r}")
        if va is None or vb is None:
            warnings.append(f"a statistics file records no {key}; cannot check that both sides match")
    return warnings


def fid(a: FeatureStatistics, b: FeatureStatistics) -> float:
    """FID of two statistics (after :func:`check_compatible`)."""
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)
