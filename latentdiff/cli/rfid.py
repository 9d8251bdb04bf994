"""Reconstruction floor of autoencoders: rFID, PSNR and codebook use of decode(encode(x)) on real images.

    latentdiff rfid default default-vq --images PATH/TO/cifar10-test.tar.gz --out results/rfid.json
    latentdiff rfid runs/gpu/cifar10_autoencoder/model.safetensors --images PATH/TO/cifar10-test.tar.gz \\
        --reference cifar10-test-inception.npz --out results/rfid_ae.json
    latentdiff rfid default --images PATH/TO/cifar10-test.tar.gz --fid-samples 1000 --baseline --out rfid-1k.json
    latentdiff rfid default-vq --images PATH/TO/cifar10-test.tar.gz --no-fid --out psnr_vq.json

MODEL: "default", "default-vq" (the embedded models), a latentdiff model file (a pipeline's, or an autoencoder
run's model.safetensors), or any checkpoint txt2img reads; its KL autoencoder decodes the posterior mode, its VQ
autoencoder the nearest codes. Every selected image (--num-samples, --subset, --seed) is reconstructed and scored by
PSNR (and, for VQ, codebook usage and perplexity); rFID compares the Inception statistics of the reconstructions
(all of them, or --fid-samples chosen at random with --seed) with the reference: by default the statistics of the
selected real images themselves (computed here), else --reference (a source, cached like `latentdiff fid`'s
reference, or an .npz from `latentdiff fid --save-stats`). FID of few images is biased upward; with --reference,
--baseline adds the FID of the real images rFID uses, the value an exact reconstruction would get. A latent
model's FID cannot beat its autoencoder's rFID.

Writes --out (JSON) and the same name with .md (a Markdown table), atomically, never over existing files unless
--overwrite. Models, images, reference and Inception weights are all opened before any computing: bad input gives
one message on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from latentdiff.cli.common import BATCH, POSITIVE, ArgumentParser, report_error, report_paths, resolve_device_dtype
from latentdiff.data.image_sources import add_selection_arguments


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    from latentdiff.metrics.fid import DEFAULT_CACHE_DIR

    p = ArgumentParser(description=__doc__, prog=prog)
    p.add_argument("models", nargs="+", metavar="MODEL", help="models whose autoencoders to score (one row each)")
    p.add_argument("--images", required=True, help="real images: folder, tar archive or shards (all one size)")
    p.add_argument("--reference", default=None,
                   help="FID reference: a source or .npz statistics (default: the selected real images)")
    add_selection_arguments(p, "images to reconstruct")
    p.add_argument("--fid-samples", type=POSITIVE, default=None,
                   help="reconstructions scored by rFID, a random subset (--seed) of the selected images; None: all")
    p.add_argument("--no-fid", action="store_true", help="PSNR and codebook use only (no Inception network)")
    p.add_argument("--baseline", action="store_true",
                   help="with --reference: also the FID of the real images rFID uses (the FID-N bias floor)")
    p.add_argument("--out", required=True, help="results .json (the Markdown table goes beside it as .md)")
    p.add_argument("--overwrite", action="store_true", help="replace --out and its .md")
    p.add_argument("--batch-size", type=BATCH, default=100, help="images per autoencoder batch")
    p.add_argument("--fid-batch-size", type=BATCH, default=50, help="images per Inception batch")
    p.add_argument("--device", default="auto", help="torch device (auto: cuda if available, else cpu)")
    p.add_argument("--inception-weights", type=Path, default=None, help="local Inception weights (.pth/.safetensors)")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR, help="cache of reference statistics")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the statistics cache")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _finite(value):
    """JSON has no inf/nan: an exact reconstruction's PSNR is written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return value


def markdown(results: dict) -> str:
    """The results as a Markdown table, one row per model, with the settings below it."""
    n = results["fid_images"]
    head = ["model", "autoencoder", "latent", "parameters", f"PSNR (dB, {results['images']} images)"]
    head += [] if n is None else [f"rFID-{n}"]
    head += ["codebook usage", "perplexity"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in results["models"]:
        book = row.get("codebook")
        cells = [f"`{row['model']}`", row["kind"].upper(), row["latent"], f"{row['parameters'] / 1e6:.2f} M",
                 "inf" if row["psnr"] is None else f"{row['psnr']:.2f}"]
        cells += [] if n is None else [f"{row['rfid']:.2f}"]
        cells += [f"{book['codes_used']}/{book['num_codes']}", f"{book['perplexity']:.1f}"] if book else ["-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Images: {results['images_source']}, {results['selection']} ({results['images']})."]
    if n is not None:
        lines.append(f"rFID: {n} reconstructions ({results['fid_selection']}) against {results['reference']}.")
    if results.get("baseline_fid") is not None:
        lines.append(f"Baseline: FID of the same {n} real images against the reference: {results['baseline_fid']:.2f}.")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> None:
    """Open every input, then reconstruct, score and write (``args.argv``: the command line, for the record)."""
    from latentdiff.atomic import atomic_write
    from latentdiff.data.image_sources import open_image_source
    from latentdiff.metrics.fid import StatisticsSource, check_compatible, fid, inception_features
    from latentdiff.metrics.reconstruction import (
        codebook_report,
        fid_subset,
        image_statistics,
        load_autoencoder,
        psnr_report,
        read_images,
        reconstruct_all,
    )

    out, md_path = report_paths(args.out, args.overwrite)
    if args.no_fid and (args.baseline or args.fid_samples or args.reference):
        raise ValueError("--no-fid computes no FID: drop --baseline, --fid-samples and --reference")
    if args.baseline and not args.reference:
        raise ValueError("--baseline needs --reference (without it the reference is the real images themselves)")
    device, _ = resolve_device_dtype(args.device, "fp32")
    start = time.time()
    autoencoders = [load_autoencoder(m, device) for m in args.models]
    open_image_source(args.images)  # checked now; read below
    progress = not args.no_progress
    reference = features = None
    if not args.no_fid:
        features = inception_features(args.inception_weights, device)
        if args.reference:
            reference = StatisticsSource(args.reference, features, cache_dir=None if args.no_cache else args.cache_dir)
        features.load()  # weights problems now, before any progress bar
    images = read_images(args.images, args.num_samples, args.subset, args.seed, progress)
    N, _, H, W = images.pixels.shape
    chosen = fid_subset(N, args.fid_samples, args.seed)
    results = {"images_source": images.description, "selection": images.selection, "images": N,
               "image_size": [H, W], "fid_images": None if args.no_fid else len(chosen), "models": []}
    if reference is not None:
        ref = reference.statistics(batch_size=args.fid_batch_size, num_workers=args.num_workers, device=device,
                                   progress=progress).stats
        results["reference"] = f"{ref.meta.get('source', args.reference)} ({ref.count} images)"
    elif not args.no_fid:
        ref = image_statistics(images.pixels, features, "real images", args.fid_batch_size, device, progress)
        results["reference"] = f"the {N} selected real images"
    if not args.no_fid:
        results["fid_selection"] = "all" if len(chosen) == N else f"random {len(chosen)} of {N} (seed {args.seed})"
        if args.baseline:
            real = image_statistics(images.pixels[chosen], features, "real images", args.fid_batch_size, device,
                                    progress)
            check_compatible(real, ref)
            results["baseline_fid"] = fid(real, ref)
    for ae in autoencoders:
        recon, codes = reconstruct_all(ae, images.pixels, args.batch_size, progress)
        row = {"model": ae.name, "file": ae.source, "kind": ae.kind, "latent": ae.latent_shape(H),
               "parameters": ae.num_parameters, **psnr_report(images.pixels, recon)}
        if codes is not None:
            row["codebook"] = codebook_report(codes, ae.network.cfg.num_codes)
        if not args.no_fid:
            stats = image_statistics(recon[chosen], features, f"reconstructions ({ae.name})", args.fid_batch_size,
                                     device, progress)
            check_compatible(stats, ref)
            row["rfid"] = fid(stats, ref)
        results["models"].append(_finite(row))
        scores = ", ".join(f"{k} {row[k]:.3f}" for k in ("psnr", "rfid") if k in row and row[k] is not None)
        print(f"{ae.name}: {scores}", flush=True)
    results["seconds"] = round(time.time() - start, 1)
    results["command"] = " ".join(["latentdiff rfid", *args.argv])
    table = markdown(results)
    with atomic_write(out, "w", overwrite=args.overwrite) as f:
        f.write(json.dumps(results, indent=2) + "\n")
    with atomic_write(md_path, "w", overwrite=args.overwrite) as f:
        f.write(table)
    print(table + f"wrote {out} and {md_path} ({results['seconds']:.0f} s)")


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(prog).parse_args(argv)
    args.argv = argv
    from latentdiff.data.image_sources import SourceError, error_message
    from latentdiff.metrics.inception import InceptionWeightsError

    try:
        run(args)
    except (SourceError, InceptionWeightsError, FileExistsError, ValueError) as err:
        return report_error(error_message(err))
    return 0
