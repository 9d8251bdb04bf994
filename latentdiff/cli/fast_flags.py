"""The txt2img flags of the fast paths (latentdiff/pipelines/fast.py): --tiled-decode, --tile-size, --compile,
--compile-mode, --deepcache, --deepcache-branch.

Nothing here imports torch, so that ``latentdiff txt2img --help`` stays cheap.
"""

from __future__ import annotations

import argparse

from latentdiff.cli.common import NON_NEGATIVE, POSITIVE, fail

DEFAULT_TILE = 512  # pixels; latentdiff.models.tiling.DEFAULT_TILE (not imported: that would import torch)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # fast.COMPILE_MODES
DEFAULT_BRANCH = 1  # FastPathMixin.enable_deepcache's default branch


def add_fast_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tiled-decode", action="store_true",
                   help="decode (and encode --init-image) in overlapping tiles blended together: large images in "
                        "bounded memory (latent-diffusion models; without it, tiles are used above 1024 pixels a side)")
    p.add_argument("--tile-size", type=POSITIVE, default=None, metavar="N",
                   help=f"tile side in pixels for --tiled-decode, a multiple of the autoencoder's downsampling "
                        f"(default {DEFAULT_TILE}; tiles overlap by a quarter of it)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the U-Net and the VAE decoder (latent-diffusion models); the first call of "
                        "each prints its compile time; where compiling fails, eager with one warning line")
    p.add_argument("--compile-mode", default=None, choices=COMPILE_MODES,
                   help="torch.compile mode for --compile (default: default)")
    p.add_argument("--deepcache", type=POSITIVE, default=None, metavar="N",
                   help="DeepCache step caching (latent-diffusion models): the whole U-Net every N steps, only its "
                        "shallow part (reusing the cached deep features) in between; faster, approximate; 1 = off")
    p.add_argument("--deepcache-branch", type=NON_NEGATIVE, default=None, metavar="K",
                   help=f"skip branch whose deeper features --deepcache reuses (default {DEFAULT_BRANCH}; 0 is the "
                        f"shallowest and fastest, up to the U-Net's input block count - 1)")


def apply_fast_arguments(pipe, args: argparse.Namespace) -> None:
    """Switch the loaded pipeline's fast paths on as the flags say; bad values: fail() (exit 2)."""
    if args.tile_size is not None and not args.tiled_decode:
        fail("--tile-size applies only with --tiled-decode")
    if args.tiled_decode:
        if pipe.config.type == "vq_diffusion":
            fail("--tiled-decode applies to latent-diffusion models only")
        try:
            pipe.enable_tiling(tile=DEFAULT_TILE if args.tile_size is None else args.tile_size)
        except ValueError as e:
            fail(f"--tile-size: {e}")
    if args.compile_mode is not None and not args.compile:
        fail("--compile-mode applies only with --compile")
    if args.compile:
        if pipe.config.type == "vq_diffusion":
            fail("--compile applies to latent-diffusion models only")
        pipe.compile(mode=args.compile_mode or "default", verbose=True)
    if args.deepcache_branch is not None and args.deepcache is None:
        fail("--deepcache-branch applies only with --deepcache")
    if args.deepcache is not None:
        if pipe.config.type == "vq_diffusion":
            fail("--deepcache applies to latent-diffusion models only")
        try:
            pipe.enable_deepcache(args.deepcache, DEFAULT_BRANCH if args.deepcache_branch is None
                                  else args.deepcache_branch)
        except ValueError as e:
            fail(f"--deepcache-branch: {e}")
