"""Check a shard folder against its manifest.json and check every sample.

Examples (from the repository root)::

    python tools/validate_shards.py data/cifar10-train-shards
    python tools/validate_shards.py data/cifar10-train-shards --no-decode --json report.json

Checks: every listed shard exists with the manifest's size and sha256 and holds the manifest's sample count;
no unlisted ``*.tar`` lies beside them; every sample has an image (or latent) member that decodes and a UTF-8
caption. A folder without manifest.json (e.g. img2dataset output) gets the per-sample checks only. Problems are
counted by kind and the first ones are listed by shard and key. Exit status: 0 clean, 1 problems found, 2 bad
input.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from latentdiff.atomic import atomic_write  # noqa: E402
from latentdiff.cli import ArgumentParser, fail  # noqa: E402
from latentdiff.data.stats import DataStats  # noqa: E402
from latentdiff.data.validate import validate_shards  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__)
    p.add_argument("folder", help="shard folder (with manifest.json, or plain *.tar shards)")
    p.add_argument("--no-decode", action="store_true", help="do not decode images (only structure and captions)")
    p.add_argument("--no-checksums", action="store_true", help="do not recompute sha256 sums")
    p.add_argument("--max-problems", type=int, default=50, help="problems listed (all are counted)")
    p.add_argument("--json", default=None, help="also write the report (counts and listed problems) to this file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    stats = DataStats(max_problems=args.max_problems, max_logged=0)
    try:
        validate_shards(args.folder, decode=not args.no_decode, checksums=not args.no_checksums, stats=stats,
                        progress=not args.quiet)
    except ValueError as e:
        fail(str(e))
    for problem in stats.problems:
        print(problem)
    counts = ", ".join(f"{k}={v}" for k, v in sorted(stats.counts.items())) or "no problems"
    print(f"{args.folder}: {stats.samples_ok} good samples; {counts}")
    if args.json:
        with atomic_write(args.json, mode="w") as f:
            json.dump(stats.to_dict(), f, indent=1)
    return 0 if stats.ok else 1


if __name__ == "__main__":
    sys.exit(main())
