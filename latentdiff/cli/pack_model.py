"""Pack a trained latentdiff model file for shipping: float16, a name, config defaults, a compact vocabulary.

Examples (from the repository root)::

    latentdiff pack-model runs/cifar10_ldm/model.safetensors latentdiff/assets/default.safetensors \\
        --half --name latentdiff-cifar10-v1.1 --set guidance_scale=5.0 --overwrite
    latentdiff pack-model runs/cifar10_vq_diffusion/model.safetensors latentdiff/assets/default_vq.safetensors \\
        --half --vocabulary data/cifar10-train-shards --name latentdiff-cifar10-vq-v1
    latentdiff pack-model runs/ldm_ft/model.safetensors packed.safetensors \\
        --decoder runs/decoder_ft/model.safetensors
    latentdiff pack-model default candidate.safetensors --half --decoder runs/decoder_ft/model.safetensors

``--half`` stores floating-point weights as float16 (the embedded models are stored so and computed in float32).
``--set KEY=VALUE`` changes a field of the stored model config (dotted, checked like ``latentdiff train``'s
overrides), e.g. the default guidance scale. ``--vocabulary SOURCE`` keeps the token-embedding rows of the tokens
that occur in SOURCE's captions (a text file with one caption per line, or webdataset shards: a folder, a .tar or a
brace pattern, whose ``.txt`` members are read), plus those of the empty caption; every other row is replaced by one
shared row, the mean of the replaced ones. A text encoder trained from scratch on such captions never updates the
other rows (they stay near their random start), and for a 49,408-token CLIP vocabulary they are most of a small
model's file: 12.6 MB of the 41 MB unpacked VQ-Diffusion default (29 MB packed). Prompts made of kept tokens give
exactly the unpacked model's outputs; a SRC packed so keeps its rows unless ``--vocabulary`` is given again. SRC
``default`` / ``default-vq`` names the embedded model files. ``--decoder FILE`` replaces the autoencoder's decoder
(``decoder``, ``post_quant_conv``) by that of FILE, an export of ``latentdiff train`` with
``objective.train_decoder_only=true`` started from SRC (``init_from``); FILE's encoder side must equal SRC's, since the
diffusion model knows only those latents. The output is written atomically; an existing one is replaced only with
--overwrite. Bad input prints one message and exits with status 2.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from latentdiff.cli.common import ArgumentParser, fail


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, prog=prog)
    p.add_argument("src", help="a latentdiff model file (`latentdiff train`'s model.safetensors), or 'default' / "
                               "'default-vq' (the embedded models, e.g. to give one a new decoder)")
    p.add_argument("dst", help="output .safetensors file")
    p.add_argument("--half", action="store_true", help="store floating-point weights as float16")
    p.add_argument("--name", default=None, help="model name stored in the file (shown by txt2img); default: kept")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="change a field of the stored model config, e.g. guidance_scale=5.0 (repeatable)")
    p.add_argument("--vocabulary", default=None, metavar="SOURCE",
                   help="captions file or shards: keep only the token-embedding rows of their tokens")
    p.add_argument("--decoder", default=None, metavar="FILE",
                   help="take the autoencoder's decoder from FILE (a train_decoder_only run's model file)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    return p


def read_captions(source: str) -> list[str]:
    """Captions from a text file (one per line) or from the ``.txt`` members of webdataset shards."""
    from latentdiff.data.shards import iter_shard, resolve_shards

    path = Path(source)
    if path.is_file() and path.suffix not in (".tar", ".tgz", ".gz"):
        from latentdiff.io.text_lines import read_lines

        try:
            return read_lines(path)
        except ValueError as e:
            fail(f"--vocabulary {source}: {e}")
    try:
        shards = resolve_shards(source)
    except (ValueError, OSError) as e:
        fail(f"--vocabulary {source}: {e}")
    problems, captions = [], []
    for shard in shards:
        for _, members in iter_shard(shard, problems.append):
            if "txt" in members:
                captions.append(members["txt"].decode("utf-8", errors="replace").strip())
    if problems:
        fail(f"--vocabulary {source}: {len(problems)} problem(s) reading the shards, e.g. {problems[0]}")
    return captions


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    from latentdiff.assets import EMBEDDED_MODELS
    from latentdiff.config import apply_overrides, model_config_from_dict, to_dict
    from latentdiff.io.checkpoint import CheckpointError, is_model_file, kept_row_ids, load_model_file, save_model_file
    from latentdiff.io.export import half
    from latentdiff.io.pack import swap_decoder, vocabulary_ids

    src, dst = Path(EMBEDDED_MODELS.get(args.src, args.src)), Path(args.dst)
    if not is_model_file(src):
        fail(f"{src} is not a latentdiff model file (`latentdiff train` writes one as model.safetensors)")
    if dst.exists() and not args.overwrite:
        fail(f"{dst} exists; pass --overwrite to replace it")
    try:
        cfg, parts, metadata = load_model_file(src)
        if args.overrides:
            cfg = model_config_from_dict(apply_overrides(to_dict(cfg), args.overrides))
    except (CheckpointError, ValueError, TypeError) as e:
        fail(str(e))
    if args.decoder:
        try:
            swapped = swap_decoder(parts, load_model_file(args.decoder)[1], args.decoder)
        except (CheckpointError, ValueError) as e:
            fail(str(e))
        print(f"decoder of {swapped} taken from {args.decoder}")
    if args.half:
        parts = half(parts)
    keep_rows = None
    if args.vocabulary:
        if "text_encoder" not in parts:
            fail(f"{src} has no text encoder, so --vocabulary has nothing to compact")
        captions = read_captions(args.vocabulary)
        if not captions:
            fail(f"--vocabulary {args.vocabulary}: no captions found")
        ids = vocabulary_ids(cfg.text_encoder, captions)
        keys = [f"text_encoder.{k}" for k in parts["text_encoder"] if k.endswith("token_embedding.weight")]
        keep_rows = {key: ids for key in keys}
        print(f"vocabulary: {len(captions)} captions, {len(set(captions))} distinct, {len(ids)} tokens kept of "
              f"{cfg.text_encoder.vocab_size}")
    else:  # a file packed with --vocabulary before keeps its rows
        keep_rows = kept_row_ids(src) or None
    if args.name:
        metadata = {**metadata, "name": args.name}
    extra = {k: v for k, v in metadata.items() if k not in ("format", "format_version", "config")}
    try:
        save_model_file(dst, cfg, parts, overwrite=args.overwrite, extra_metadata=extra, keep_rows=keep_rows)
    except (OSError, ValueError) as e:
        fail(f"cannot write {dst}: {e}")
    print(f"wrote {dst} ({dst.stat().st_size / 2**20:.1f} MiB; {src} was {src.stat().st_size / 2**20:.1f} MiB)")
    return 0

