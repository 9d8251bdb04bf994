"""Check a shard folder against its manifest.json and check every sample.

Examples (from the repository root)::

    latentdiff validate-shards data/cifar10-train-shards
    latentdiff validate-shards data/cifar10-train-shards --no-decode --json report.json

Checks: every listed shard exists with the manifest's size and sha256 and holds the manifest's sample count;
no unlisted ``*.tar`` lies beside them; every sample has an image (or latent) member that decodes and a UTF-8
caption. A folder without manifest.json (e.g. img2dataset output) gets the per-sample checks only. Problems are
counted by kind and the first ones are listed by shard and key. Exit status: 0 clean, 1 problems found, 2 bad
input.
"""

from __future__ import annotations

import argparse
import json

from latentdiff.atomic import atomic_write
from latentdiff.cli.common import NON_NEGATIVE, ArgumentParser, fail
from latentdiff.data.stats import DataStats
from latentdiff.data.validate import validate_shards


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, prog=prog)
    p.add_argument("folder", help="shard folder (with manifest.json, or plain *.tar shards)")
    p.add_argument("--no-decode", action="store_true", help="do not decode images (only structure and captions)")
    p.add_argument("--no-checksums", action="store_true", help="do not recompute sha256 sums")
    p.add_argument("--max-problems", type=NON_NEGATIVE, default=50, help="problems listed (all are counted)")
    p.add_argument("--json", default=None, help="also write the report (counts and listed problems) to this file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
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

