"""Tiled VAE decoding and encoding (latentdiff/models/tiling.py) and its switches in the pipeline and txt2img.

References: diffusers' AutoencoderKL.tiled_decode / _tiled_encode on the same weights (equal up to the float32
difference of the two untiled decoders, 1e-5), and our own untiled decode: tiles do not share GroupNorm statistics
or attention, so tiled differs from untiled; on the embedded model's autoencoder (trained weights) the stated
tolerance is a mean |difference| below 0.05 on images in [-1, 1] (measured: 0.041 at tile 64 px, overlap 16 px).
"""

from __future__ import annotations

import pytest
import torch

from latentdiff.models.tiling import AUTO_TILE_ABOVE, VAETiling, check_tiling, tiled_decode, tiled_encode
from tests.tiny import close, fresh_tiny_pipe, jitter

SCALE, SHIFT = 0.5, 0.1


@pytest.fixture(scope="module")
def vaes():
    """(ours, diffusers') AutoencoderKL with the same random weights: 2 levels of 16/32 channels (f = 2)."""
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL

    from latentdiff.config import AutoencoderKLConfig
    from latentdiff.io.convert_vae import autoencoder_config_to_diffusers, vae_state_dict_from_diffusers
    from latentdiff.models.autoencoder_kl import AutoencoderKL

    cfg = AutoencoderKLConfig(ch=16, ch_mult=[1, 2], num_res_blocks=1, norm_num_groups=8, scaling_factor=SCALE,
                              shift_factor=SHIFT)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        theirs = jitter(DiffusersAutoencoderKL(**autoencoder_config_to_diffusers(cfg)), std=0.02, seed=0).eval()
    ours = AutoencoderKL(cfg).eval()
    ours.load_state_dict(vae_state_dict_from_diffusers(theirs.state_dict()), strict=True)
    return ours, theirs


def _diffusers_tiling(vae, tile: int, overlap: int, f: int = 2):
    vae.tile_sample_min_size = tile
    vae.tile_latent_min_size = tile // f
    vae.tile_overlap_factor = overlap / tile


@pytest.mark.parametrize("tile,overlap", [(16, 4), (24, 8), (16, 0), (20, 10)])
@torch.no_grad()
def test_tiled_decode_equals_diffusers(vaes, tile, overlap):
    ours, theirs = vaes
    z = torch.randn(2, 4, 30, 22, generator=torch.Generator().manual_seed(0))  # scaled latents, ragged edge tiles
    _diffusers_tiling(theirs, tile, overlap)
    expected = theirs.tiled_decode(z / SCALE + SHIFT).sample
    got = tiled_decode(ours, z, tile=tile, overlap=overlap)
    assert got.shape == (2, 3, 60, 44)
    close(got, expected, rtol=0, atol=1e-5)
    assert (got - ours.decode(z)).abs().max() > 1e-2  # really tiled: not the untiled result


@pytest.mark.parametrize("tile,overlap", [(16, 4), (24, 8)])
@torch.no_grad()
def test_tiled_encode_equals_diffusers(vaes, tile, overlap):
    ours, theirs = vaes
    x = torch.rand(2, 3, 60, 44, generator=torch.Generator().manual_seed(1)) * 2 - 1
    _diffusers_tiling(theirs, tile, overlap)
    mean = theirs._tiled_encode(x)[:, :4]  # (B, 2C, h, w) moments: the posterior mean is the first C channels
    close(tiled_encode(ours, x, tile=tile, overlap=overlap), (mean - SHIFT) * SCALE, rtol=0, atol=1e-5)


@torch.no_grad()
def test_one_tile_is_untiled_and_blending_reduces_seams(vaes):
    ours, _ = vaes
    z = torch.randn(1, 4, 16, 12, generator=torch.Generator().manual_seed(2))
    assert torch.equal(tiled_decode(ours, z, tile=32), ours.decode(z))  # fits in one tile: decoded whole
    x = torch.rand(1, 3, 32, 24, generator=torch.Generator().manual_seed(3)) * 2 - 1
    assert torch.equal(tiled_encode(ours, x, tile=32), ours.encode(x))
    full = ours.decode(z)
    blended = (tiled_decode(ours, z, tile=16, overlap=8) - full).abs().mean()
    abutted = (tiled_decode(ours, z, tile=16, overlap=0) - full).abs().mean()
    assert blended < abutted


@torch.no_grad()
def test_tiled_close_to_untiled_on_embedded_autoencoder():
    import latentdiff

    ae = latentdiff.load_pipeline().autoencoder  # f = 4, 8 latent channels, trained
    x = torch.nn.functional.interpolate(torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1,
                                        size=(128, 128), mode="bilinear")  # a smooth 128x128 image
    z = ae.encode(x)  # (1, 8, 32, 32)
    full = ae.decode(z)
    tiled = tiled_decode(ae, z, tile=64, overlap=16)  # 3 x 3 tiles of 16 latent pixels
    assert tiled.shape == full.shape == (1, 3, 128, 128)
    assert (tiled - full).abs().mean() < 0.05
    assert (tiled - full).abs().max() > 1e-3  # tiled for real
    z_tiled = tiled_encode(ae, x, tile=64, overlap=32)
    assert (z_tiled - z).abs().mean() < 0.1 * z.abs().mean()


def test_bad_tile_sizes():
    for tile, overlap in [(30, None), (0, None), (-8, None), (True, None), (16.0, None), (16, 16), (16, 20),
                          (16, 2), (16, -4)]:
        with pytest.raises(ValueError, match="tile"):
            check_tiling(tile, overlap, 4)
    assert check_tiling(512, None, 8) == (512, 128)
    assert check_tiling(20, None, 4) == (20, 4)  # a quarter, rounded down to the downsampling
    with pytest.raises(ValueError, match="mode"):
        VAETiling("always")
    z = torch.zeros(1, 3, 8, 8)
    with pytest.raises(ValueError, match="latents must have shape"):
        tiled_decode(fresh_tiny_pipe().autoencoder, z, tile=8)


def test_auto_mode_threshold():
    auto = VAETiling()
    assert not auto.applies(AUTO_TILE_ABOVE, AUTO_TILE_ABOVE) and auto.applies(AUTO_TILE_ABOVE + 8, 64)
    assert VAETiling("on").applies(8, 8) and not VAETiling("off").applies(4096, 4096)


def test_pipeline_switch():
    pipe = fresh_tiny_pipe()  # autoencoder f = 2
    kwargs = dict(steps=2, seed=3, height=32, width=24)
    z, _ = pipe.generate("a cat", output_type="latent", **kwargs)
    assert torch.equal(pipe.generate("a cat", **kwargs)[0], pipe.autoencoder.decode(z))  # auto: small, untiled
    pipe.enable_tiling(tile=16, overlap=4)
    images, _ = pipe.generate("a cat", **kwargs)
    assert torch.equal(images, tiled_decode(pipe.autoencoder, z, tile=16, overlap=4))
    assert not torch.equal(images, pipe.autoencoder.decode(z))
    pipe.disable_tiling()
    assert torch.equal(pipe.generate("a cat", **kwargs)[0], pipe.autoencoder.decode(z))
    with pytest.raises(ValueError, match="multiple of 2"):
        pipe.enable_tiling(tile=15)
    assert pipe.tiling == VAETiling("off")  # a refused setting changes nothing


def test_txt2img_flags(tiny_ldm_file, tmp_path):
    from latentdiff.cli import txt2img

    out = tmp_path / "out"
    base = ["cat", "--ckpt", str(tiny_ldm_file), "--steps", "2", "--seed", "1", "--H", "32", "--W", "32", "--quiet"]
    assert txt2img.main([*base, "--outdir", str(out), "--tiled-decode", "--tile-size", "16"]) == 0
    assert len(list(out.glob("*.png"))) == 1
    for bad in (["--tiled-decode", "--tile-size", "15"], ["--tiled-decode", "--tile-size", "0"], ["--tile-size", "16"]):
        with pytest.raises(SystemExit) as e:
            txt2img.main([*base, "--outdir", str(tmp_path / "bad"), *bad])
        assert e.value.code == 2
    assert not (tmp_path / "bad").exists()
