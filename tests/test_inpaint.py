"""Inpainting: the pipeline's ``mask_image`` against diffusers' StableDiffusionInpaintPipeline for inpainting
(9-channel) and ordinary (4-channel) U-Nets of a tiny random SD 1 checkpoint (tests/sd_helpers.py), the mask's
preprocessing (diffusers' mask processor, AUTOMATIC1111's blur against OpenCV), the samplers' step hook, loading
and converting 9-channel checkpoints, and the txt2img command's ``--mask``/``--mask-blur``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from latentdiff import load_pipeline
from latentdiff.cli import convert as convert_cli
from latentdiff.cli import txt2img
from latentdiff.diffusion.samplers import SAMPLERS, sample
from latentdiff.io.images import png_settings
from latentdiff.pipelines.inpaint import blur_mask, latent_mask, mask_to_tensor
from tests import sd_helpers as H
from tests.test_img2img import SD_SCHEDULE, random_image


def half_mask(size: int = H.IMAGE_SIZE, mode: str = "L") -> Image.Image:
    """White (repaint) on the right half and on a square at the top left, black elsewhere."""
    m = np.zeros((size, size), np.uint8)
    m[:, size // 2:] = 255
    m[: size // 4, : size // 4] = 255
    return Image.fromarray(m).convert(mode)


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """Reference models (an inpainting U-Net and an ordinary one sharing the VAE and text encoder), their single
    files and the pipelines latentdiff loads from them."""
    folder = tmp_path_factory.mktemp("inpaint")
    vae, text = H.diffusers_vae(), H.clip_text_model()
    out = {"vae": vae, "text": text, "dir": folder, "tokenizer": H.clip_tokenizer()}
    for channels in (9, 4):
        unet = H.diffusers_unet(sd2=False, in_channels=channels)
        file = H.save_single_file(folder / f"sd1-{channels}.safetensors",
                                  H.compvis_state(unet, vae, text, sd2=False))
        out[channels] = (unet, file, load_pipeline(file, overrides=H.SD1_OVERRIDES))
    return out


# ---------------------------------------------------------------------------------------------- vs diffusers


def diffusers_inpaint(sd, channels, sampler, strength, image, mask, seed, monkeypatch):
    """diffusers' StableDiffusionInpaintPipeline on the same weights and noise: its first draw from
    Generator().manual_seed(seed) is our x_T (and its re-noising noise), its step noise (patched randn_tensor)
    continues that stream as ours does; latents are the posterior's mode on both sides."""
    from diffusers import StableDiffusionInpaintPipeline
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_inpaint as inpaint_module
    from diffusers.schedulers import scheduling_ddpm, scheduling_euler_ancestral_discrete

    monkeypatch.setattr(inpaint_module, "retrieve_latents", lambda out, generator=None: out.latent_dist.mode())
    step_noise = torch.Generator().manual_seed(seed)
    torch.randn(4, H.LATENT, H.LATENT, generator=step_noise)  # x_T

    def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None):
        return torch.randn(shape, generator=step_noise, dtype=dtype)

    for module in (scheduling_ddpm, scheduling_euler_ancestral_discrete):
        monkeypatch.setattr(module, "randn_tensor", randn_tensor)
    ref = StableDiffusionInpaintPipeline(vae=sd["vae"], text_encoder=sd["text"], tokenizer=sd["tokenizer"],
                                         unet=sd[channels][0], scheduler=H.diffusers_scheduler(sampler, **SD_SCHEDULE),
                                         safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    return ref("a photo of a cat", image=image, mask_image=mask, strength=strength, num_inference_steps=10,
               guidance_scale=7.5, negative_prompt="blurry", generator=torch.Generator().manual_seed(seed),
               output_type="latent").images  # (1, C, h, w)


CASES = [(9, "ddim", 1.0), (9, "ddim", 0.6), (9, "euler_a", 1.0), (9, "euler_a", 0.7), (9, "dpmpp_2m", 0.8),
         (4, "ddim", 1.0), (4, "ddim", 0.6), (4, "euler_a", 1.0), (4, "euler_a", 0.7), (4, "ddpm", 0.5)]


@pytest.mark.parametrize("channels, sampler, strength", CASES)
@torch.no_grad()
def test_matches_diffusers_inpaint_pipeline(sd, channels, sampler, strength, monkeypatch):
    """Latents and images (diffusers' decoding of its latents vs ours) of one run each."""
    seed, image, pipe, vae = 3, random_image(), sd[channels][2], sd["vae"]
    mask = half_mask(20)  # another size than the image: both resize it with Lanczos
    theirs = diffusers_inpaint(sd, channels, sampler, strength, image, mask, seed, monkeypatch)  # (1, C, h, w)
    ours, params = pipe.generate("a photo of a cat", negative_prompt="blurry", init_image=image, mask_image=mask,
                                 strength=strength, steps=10, scale=7.5, seed=seed, sampler=sampler,
                                 output_type="latent")
    latent_diff = float((ours - theirs).abs().max())
    their_image = (vae.decode(theirs / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)  # (1, 3, H, W)
    our_image = ((pipe.autoencoder.decode(ours) + 1) / 2).clamp(0, 1)
    diff = float((our_image - their_image).abs().max())
    print(f"{channels} channels, {sampler}, strength {strength}: max |ours - diffusers| = {latent_diff:.2e} "
          f"(latents), {diff:.2e} (images in [0, 1])")
    assert latent_diff <= 1e-3 and diff <= 1e-3
    text = params[0].to_text()
    assert f"Denoising strength: {strength:g}" in text and "Mask blur: 0" in text


# ---------------------------------------------------------------------------------------------- ordinary models


def latents_of(pipe, image):
    x = torch.from_numpy(np.asarray(image, np.float32) / 127.5 - 1).permute(2, 0, 1)[None]  # (1, 3, H, W)
    return pipe.autoencoder.encode(x)  # (1, C, h, w)


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
@torch.no_grad()
def test_ordinary_model_keeps_the_unmasked_latents(tiny_ldm_pipe, sampler):
    pipe, image, mask = tiny_ldm_pipe, random_image(1), half_mask()
    z = latents_of(pipe, image)  # (1, C, 8, 8)
    keep = latent_mask(mask_to_tensor(mask, 16, 16), 8, 8) == 0  # (1, 1, 8, 8)
    assert 0 < keep.sum() < keep.numel()
    for strength in (1.0, 0.5):
        out, params = pipe.generate(["a cat", "a ship"], init_image=image, mask_image=mask, strength=strength,
                                    steps=8, seed=4, sampler=sampler, output_type="latent")
        kept = keep.expand_as(out)
        assert torch.equal(out[kept], z.expand_as(out)[kept])  # exactly the input's latents
        assert (out - z).abs()[~kept].mean() > 0.05  # the masked ones changed
        assert not torch.equal(out[0], out[1])
    # image i is the same alone as in a batch (its own stream), also for the re-noising of the known region
    alone = pipe.generate("a ship", init_image=image, mask_image=mask, strength=0.5, steps=8, seed=5,
                          sampler=sampler, output_type="latent")[0]
    assert torch.allclose(alone[0], out[1], atol=1e-5)


@torch.no_grad()
def test_mask_blur_is_recorded_and_changes_the_image(tiny_ldm_pipe):
    """The blur comes before the binarisation (as AUTOMATIC1111's with its default mask rounding): a line 2 pixels
    wide fades below 0.5 under a blur of 2 and is no longer repainted; a half-plane's edge stays where it was."""
    pipe, image = tiny_ldm_pipe, random_image(1)
    m = np.zeros((16, 16), np.uint8)
    m[:, 10:] = m[:, 2:4] = 255
    mask = Image.fromarray(m)
    sharp_mask, soft_mask = (latent_mask(mask_to_tensor(mask, 16, 16, blur), 8, 8)[0, 0, 0] for blur in (0, 2))
    assert sharp_mask.tolist() == [0, 1, 0, 0, 0, 1, 1, 1] and soft_mask.tolist() == [0, 0, 0, 0, 0, 1, 1, 1]
    kw = dict(init_image=image, mask_image=mask, steps=4, seed=1, sampler="ddim")
    sharp, p0 = pipe.generate("a cat", **kw)
    soft, p1 = pipe.generate("a cat", mask_blur=2, **kw)
    assert "Mask blur: 0" in p0[0].to_text() and "Mask blur: 2" in p1[0].to_text()
    assert not torch.equal(sharp, soft)
    plain = pipe.generate("a cat", init_image=image, steps=4, seed=1)[1][0].to_text()
    assert "Mask blur" not in plain  # img2img records no mask


def test_bad_mask_input_is_a_value_error(tiny_ldm_pipe):
    pipe, image = tiny_ldm_pipe, random_image(1)
    with pytest.raises(ValueError, match="mask_image needs init_image"):
        pipe.generate("a cat", mask_image=half_mask(), steps=2)
    with pytest.raises(ValueError, match="must be a PIL image"):
        pipe.generate("a cat", init_image=image, mask_image=np.zeros((16, 16)), steps=2)
    with pytest.raises(ValueError, match="cannot be converted to greyscale"):
        pipe.generate("a cat", init_image=image, mask_image=Image.new("LAB", (16, 16)), steps=2)
    for bad in (-1, float("nan"), True):
        with pytest.raises(ValueError, match="mask_blur"):
            pipe.generate("a cat", init_image=image, mask_image=half_mask(), mask_blur=bad, steps=2)


# ---------------------------------------------------------------------------------------------- the mask


def test_mask_follows_diffusers_mask_processor():
    from diffusers.image_processor import VaeImageProcessor

    processor = VaeImageProcessor(vae_scale_factor=2, do_normalize=False, do_binarize=True,
                                  do_convert_grayscale=True)
    rng = np.random.default_rng(0)
    for mask in (half_mask(20, "RGB"), Image.fromarray(rng.integers(0, 256, (13, 22), dtype=np.uint8)),
                 half_mask(16, "1"), half_mask(24, "P")):
        ours = mask_to_tensor(mask, 16, 24)
        theirs = processor.preprocess(mask, height=16, width=24)
        assert ours.shape == (1, 1, 16, 24) and torch.equal(ours, theirs)


def test_mask_blur_matches_opencv():
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(1)
    arr = (rng.random((21, 30)) > 0.6).astype(np.uint8) * 255
    for radius in (1, 2.5, 4, 12):  # 12: a kernel wider than the mask
        k = 2 * int(2.5 * radius + 0.5) + 1
        got = np.asarray(blur_mask(Image.fromarray(arr), radius)).astype(int)
        exact = np.round(cv2.GaussianBlur(arr.astype(np.float64), (k, 1), radius))  # rounded after each pass
        exact = np.round(cv2.GaussianBlur(exact, (1, k), radius))
        assert np.array_equal(got, exact)
        eight_bit = cv2.GaussianBlur(cv2.GaussianBlur(arr, (k, 1), radius), (1, k), radius)  # A1111's call
        assert np.abs(got - eight_bit).max() <= 2  # OpenCV blurs 8-bit images in fixed point
    assert blur_mask(Image.fromarray(arr), 0) is not None


# ---------------------------------------------------------------------------------------------- the step hook


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_step_hook_sees_the_vp_sample_and_an_identity_hook_changes_nothing(tiny_ldm_pipe, sampler):
    schedule = tiny_ldm_pipe.schedule
    x_T = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))

    def model(x, t):
        return 0.1 * x + 0.01 * t.float()[:, None, None, None].sin()

    def run(hook=None, **kw):
        seen = []

        def callback(i, n, x_t, x0):
            seen.append(x_t.clone())

        out = sample(model, schedule, x_T, sampler, steps=6, generator=torch.Generator().manual_seed(1),
                     callback=callback, step_hook=hook, **kw)
        return out, seen

    plain, seen = run()
    hooked = []
    same, _ = run(lambda i, x: hooked.append((i, x.clone())) or x)
    assert torch.equal(plain, same) or torch.allclose(plain, same, atol=1e-6)  # euler_a: x·s/s round trip
    assert [i for i, _ in hooked] == list(range(6))
    assert all(torch.allclose(x, s, atol=1e-6) for (_, x), s in zip(hooked, seen))  # the callback's x_t
    # a hook that pins the sample pins the output
    pinned, _ = run(lambda i, x: torch.zeros_like(x) if i == 5 else x)
    assert torch.equal(pinned, torch.zeros_like(pinned))
    started, _ = run(lambda i, x: x, start_step=2)
    assert started.shape == x_T.shape


# ---------------------------------------------------------------------------------------------- checkpoints


@torch.no_grad()
def test_nine_channel_single_file_and_diffusers_folder_load_and_convert(sd, tmp_path):
    from diffusers import StableDiffusionInpaintPipeline

    unet, file, pipe = sd[9]
    assert pipe.config.unet.in_channels == 9 and pipe.unet.input_blocks[0][0].weight.shape[1] == 9
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 9, H.LATENT, H.LATENT, generator=g), torch.randn(2, 77, H.TEXT_WIDTH, generator=g)
    t = torch.tensor([10, 700])
    want = unet(x, t, encoder_hidden_states=ctx).sample
    assert (pipe.unet(x, t, ctx) - want).abs().max() <= 1e-4
    # a diffusers folder written by diffusers
    folder = H.save_diffusers_folder(tmp_path / "ref", unet, sd["vae"], sd["text"])
    assert (load_pipeline(folder).unet(x, t, ctx) - want).abs().max() <= 1e-4
    # single file -> latentdiff -> diffusers folder (diffusers' inpainting pipeline loads it) -> single file
    mid, out, back = tmp_path / "mid.safetensors", tmp_path / "out", tmp_path / "back.safetensors"
    assert convert_cli.main([str(file), str(mid), "--to", "latentdiff", "--set", "unet.num_heads=8"]) == 0
    assert load_pipeline(mid).config.unet.in_channels == 9
    assert convert_cli.main([str(mid), str(out), "--to", "diffusers"]) == 0
    assert H.read_json(out / "unet" / "config.json")["in_channels"] == 9
    dp = StableDiffusionInpaintPipeline.from_pretrained(str(out), local_files_only=True)
    assert torch.equal(dp.unet(x, t, encoder_hidden_states=ctx).sample, want)
    assert convert_cli.main([str(out), str(back), "--to", "sd"]) == 0
    assert load_pipeline(back, overrides=H.SD1_OVERRIDES).config.unet.in_channels == 9


@torch.no_grad()
def test_nine_channel_model_makes_images_without_a_mask(sd):
    """Text-to-image and img2img on an inpainting U-Net: everything is repainted (mask 1, grey masked image)."""
    pipe = sd[9][2]
    images, _ = pipe.generate("a cat", steps=3, seed=0, height=H.IMAGE_SIZE, width=H.IMAGE_SIZE)
    assert images.shape == (1, 3, H.IMAGE_SIZE, H.IMAGE_SIZE) and torch.isfinite(images).all()
    images, params = pipe.generate("a cat", init_image=random_image(), strength=0.5, steps=4, seed=0)
    assert torch.isfinite(images).all() and "Mask blur" not in params[0].to_text()


# ---------------------------------------------------------------------------------------------- command line


def write_inputs(tmp_path, mask_size=16):
    src, mask = tmp_path / "in.png", tmp_path / "mask.png"
    random_image(2).save(src)
    half_mask(mask_size).save(mask)
    return src, mask


def test_cli_inpaints_and_from_png_asks_for_the_mask(tiny_ldm_file, tmp_path, capsys):
    src, mask = write_inputs(tmp_path, mask_size=24)
    out = tmp_path / "out"
    assert txt2img.main(["a cat", "--ckpt", str(tiny_ldm_file), "--init-image", str(src), "--mask", str(mask),
                         "--mask-blur", "2", "--steps", "4", "--seed", "1", "--n_samples", "2", "--no-grid",
                         "--outdir", str(out), "--quiet"]) == 0
    assert "--mask 24x24 resized to 16x16" in capsys.readouterr().err
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 2
    settings = png_settings(pngs[0])
    assert settings["mask_blur"] == 2 and settings["strength"] == 1
    # --from-png needs the mask again, and then regenerates the image bit for bit
    with pytest.raises(SystemExit) as e:
        txt2img.main(["--from-png", str(pngs[0]), "--ckpt", str(tiny_ldm_file), "--init-image", str(src),
                      "--outdir", str(tmp_path / "again"), "--quiet"])
    assert e.value.code == 2 and "--mask" in capsys.readouterr().err
    again = tmp_path / "again"
    assert txt2img.main(["--from-png", str(pngs[0]), "--ckpt", str(tiny_ldm_file), "--init-image", str(src),
                         "--mask", str(mask), "--outdir", str(again), "--quiet"]) == 0
    (redone,) = again.glob("*.png")
    assert np.array_equal(np.asarray(Image.open(redone)), np.asarray(Image.open(pngs[0])))
    assert Image.open(redone).info["parameters"] == Image.open(pngs[0]).info["parameters"]


@pytest.mark.parametrize("case, message", [
    ("no-init", "--mask applies only with --init-image"),
    ("unreadable", "--mask"),
    ("blur-no-mask", "--mask-blur applies only with --mask"),
    ("negative-blur", "argument --mask-blur: -1 must be >= 0"),
])
def test_cli_bad_mask_input_exits_2(tiny_ldm_file, tmp_path, capsys, case, message):
    src, mask = write_inputs(tmp_path)
    args = {"no-init": ["--mask", str(mask)],
            "unreadable": ["--init-image", str(src), "--mask", str(tmp_path / "in.txt")],
            "blur-no-mask": ["--init-image", str(src), "--mask-blur", "4"],
            "negative-blur": ["--init-image", str(src), "--mask", str(mask), "--mask-blur", "-1"]}[case]
    (tmp_path / "in.txt").write_text("not an image")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        txt2img.main(["a cat", "--ckpt", str(tiny_ldm_file), *args, "--steps", "2", "--outdir", str(out), "--quiet"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err.splitlines()[-1] and "Traceback" not in err  # argparse's usage, then one error
    assert not out.exists() or not list(out.glob("*.png"))
