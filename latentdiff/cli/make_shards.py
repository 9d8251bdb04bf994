"""Pack images with captions into webdataset tar shards (img2dataset layout) plus a manifest.json.

Examples (from the repository root)::

    latentdiff make-shards PATH/TO/cifar10-train.tar.gz data/cifar10-train-shards
    latentdiff make-shards PATH/TO/cifar10-test.tar.gz data/cifar10-test-shards
    latentdiff make-shards photos/ data/photos --samples-per-shard 5000 --image-format png
    latentdiff make-shards imagenet/train data/in1k --class-map classes.json \\
        --caption-template "a photo of a {}" --caption-template "a picture of a {}"
    latentdiff make-shards cifar10-test.tar.gz /tmp/tiny --max-samples 20 --overwrite --validate

SOURCE is a folder or a .tar/.tar.gz/.tgz/.tar.bz2/.tar.xz archive holding either class folders
(``<class>/<image>``: the caption is a template filled with the class name, "a photo of an airplane") or images
with same-name .txt captions. OUTDIR receives ``{prefix}-000000.tar``, ... with members ``{key}.jpg|png``,
``{key}.txt`` and ``{key}.json`` (class, source path, width, height), then ``manifest.json`` (per-shard sample
count, bytes, sha256; skipped inputs with reasons). Source bytes are copied unchanged when their format is the
output format. Samples are shuffled (``--seed``) so that shards mix classes. A non-empty OUTDIR is refused unless
``--overwrite``. Exit status: 0 done, 1 ``--validate`` found problems, 2 bad input.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from latentdiff.cli.common import POSITIVE, SEED, ArgumentParser, fail
from latentdiff.data.captions import parse_class_map
from latentdiff.data.pack import IMAGE_FORMATS, pack_source
from latentdiff.data.sources import LAYOUTS, ImageSource, SourceError
from latentdiff.data.validate import validate_shards

_ARCHIVE_SUFFIXES = (".tar.gz", ".tar.bz2", ".tar.xz", ".tgz", ".tar")


def default_prefix(source: str) -> str:
    name = Path(source.rstrip("/")).name
    for suffix in _ARCHIVE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, prog=prog)
    p.add_argument("source", help="image folder or tar archive (class folders, or images with .txt captions)")
    p.add_argument("outdir", help="output folder for the shards and manifest.json")
    p.add_argument("--samples-per-shard", type=POSITIVE, default=1000, help="samples per tar shard")
    p.add_argument("--caption-template", action="append", default=None,
                   help="caption template for class folders, '{}' is the class name (repeat the flag for several; "
                        "each image gets one, fixed by its path); default: 'a photo of a {}'")
    p.add_argument("--image-format", default="jpg", choices=sorted(IMAGE_FORMATS),
                   help="image format in the shards (sources in another format are re-encoded)")
    p.add_argument("--max-samples", type=POSITIVE, default=None, help="write at most this many samples")
    p.add_argument("--class-map", default=None,
                   help="rename class folders in captions: a JSON file {folder: name} or 'folder=name,...'")
    p.add_argument("--layout", default="auto", choices=LAYOUTS,
                   help="caption source: class folders, .txt files, or auto (.txt files if the source has any)")
    p.add_argument("--prefix", default=None, help="shard file prefix; default: the source's name without suffix")
    p.add_argument("--seed", type=SEED, default=0, help="seed of the sample order permutation")
    p.add_argument("--no-shuffle", action="store_true", help="write samples in sorted source order")
    p.add_argument("--no-verify", action="store_true",
                   help="do not fully decode images that are copied unchanged (faster; corrupt ones get through)")
    p.add_argument("--overwrite", action="store_true", help="replace the shards of a non-empty OUTDIR")
    p.add_argument("--validate", action="store_true", help="validate the written shards against the manifest")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    if args.samples_per_shard < 1:
        fail(f"--samples-per-shard {args.samples_per_shard} must be >= 1")
    if args.max_samples is not None and args.max_samples < 1:
        fail(f"--max-samples {args.max_samples} must be >= 1")
    try:
        class_map = parse_class_map(args.class_map) if args.class_map else None
    except ValueError as e:
        fail(str(e))
    start = time.perf_counter()
    try:
        with ImageSource(args.source, templates=args.caption_template, layout=args.layout,
                         class_map=class_map) as source:
            if not source.entries:
                fail(f"source {args.source!r} has no usable image ({len(source.skipped)} skipped, e.g. "
                     f"{source.skipped[0]['source']}: {source.skipped[0]['reason']})")
            manifest = pack_source(source, args.outdir, prefix=args.prefix or default_prefix(args.source),
                                   samples_per_shard=args.samples_per_shard, image_format=args.image_format,
                                   max_samples=args.max_samples, shuffle=not args.no_shuffle, seed=args.seed,
                                   verify=not args.no_verify, overwrite=args.overwrite,
                                   command=shlex.join(["latentdiff", "make-shards", *argv]),
                                   progress=not args.quiet)
    except (SourceError, OSError, ValueError) as e:  # OSError: existing OUTDIR, unreadable files, a full disk
        from latentdiff.cli.main import resource_error_message

        resource = resource_error_message(e, "make-shards")  # a full disk is not bad input: exit 1
        fail(resource or str(e), code=1 if resource else 2)
    print(f"wrote {manifest.total_samples} samples in {len(manifest.shards)} shards to {args.outdir} "
          f"({len(manifest.skipped)} inputs skipped) in {time.perf_counter() - start:.1f} s")
    for item in manifest.skipped[:10]:
        print(f"  skipped {item['source']}: {item['reason']}", file=sys.stderr)
    if args.validate:
        stats = validate_shards(args.outdir, progress=not args.quiet)
        print(f"validation: {stats.summary()}")
        return 0 if stats.ok else 1
    return 0

