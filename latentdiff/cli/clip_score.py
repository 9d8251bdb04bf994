"""CLIP score of image–caption pairs: 100 · max(cos(image, caption), 0), averaged (torchmetrics' definition).

A source is a folder of images with same-name .txt captions (or PNGs whose ``parameters`` text chunk starts with
the prompt), a .tar archive or webdataset shards ({key}.jpg + {key}.txt), or a brace pattern of shards.

    latentdiff clip-score samples/
    latentdiff clip-score 'shards/val-{000000..000003}.tar' --num-samples 5000 --device cuda
    latentdiff clip-score samples/ --model ViT-B-32 --weights open_clip_model.safetensors
    latentdiff clip-score samples/ --model ViT-L-14 --pretrained openai --allow-download

Weights are never downloaded unless --allow-download is given: without a cached copy or --weights the tool stops
with exit code 2 and says so. See docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from latentdiff.cli.common import BATCH, ArgumentParser, report_error
from latentdiff.data.image_sources import add_selection_arguments  # no hub imports


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, prog=prog)
    p.add_argument("source", help="folder, .tar archive, folder of shards or brace pattern of image-caption pairs")
    p.add_argument("--model", default="ViT-B-32", help="open_clip model name")
    p.add_argument("--pretrained", default="laion2b_s34b_b79k", help="open_clip pretrained tag (from the local cache)")
    p.add_argument("--weights", type=Path, default=None, help="local weights file (.safetensors/.bin)")
    p.add_argument("--allow-download", action="store_true", help="download --pretrained weights if not cached")
    add_selection_arguments(p, "pairs")
    p.add_argument("--batch-size", type=BATCH, default=64, help="pairs per batch")
    p.add_argument("--device", default=None, help="torch device; None: cuda if available, else cpu")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    if not args.allow_download:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # read when huggingface_hub is imported (by open_clip)

    import torch

    from latentdiff.data.image_sources import SourceError, error_message, open_image_source
    from latentdiff.metrics.clip_score import ClipWeightsError, load_clip, score_source

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        if args.batch_size < 1 or args.num_workers < 0:
            raise ValueError("--batch-size must be >= 1 and --num-workers >= 0")
        source = open_image_source(args.source)
        model, preprocess, tokenizer, description = load_clip(
            args.model, args.pretrained, args.weights, device, args.allow_download
        )
        scores, failures, selection = score_source(
            source,
            model,
            preprocess,
            tokenizer,
            num_samples=args.num_samples,
            subset=args.subset,
            seed=args.seed,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            progress=not args.no_progress,
        )
    except (SourceError, ClipWeightsError, ValueError) as err:
        return report_error(error_message(err))
    if failures:
        print(f"warning: {len(failures)} samples skipped (unreadable or without caption)", file=sys.stderr)
        for name, reason in failures[:5]:
            print(f"  {name}: {reason}", file=sys.stderr)
    scores = scores.double()
    print(f"CLIP score: {scores.mean().item():.4f} (std {scores.std(unbiased=False).item():.4f})")
    print(f"  source: {source.description}; {len(scores)} pairs scored ({selection}), {len(failures)} skipped")
    print(f"  model: {description}")
    print("  definition: mean over pairs of 100 * max(cos(image_emb, text_emb), 0)")
    return 0

