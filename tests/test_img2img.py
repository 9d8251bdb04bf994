"""img2img: samplers that start part-way (``start_step``), the pipeline's ``init_image``/``strength`` against
diffusers' StableDiffusionImg2ImgPipeline on a tiny random SD 1 checkpoint (tests/sd_helpers.py), and the
txt2img command's ``--init-image``/``--strength``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from latentdiff import load_pipeline
from latentdiff.cli import txt2img
from latentdiff.config import ScheduleConfig
from latentdiff.diffusion.samplers import SAMPLERS, noise_to_step, sample
from latentdiff.diffusion.schedule import DiffusionSchedule
from latentdiff.pipelines import parse_parameters
from latentdiff.pipelines.init_image import start_step
from tests import sd_helpers as H

SD_SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                   steps_offset=1, timestep_spacing="leading")


def random_image(seed: int = 0, size: int = H.IMAGE_SIZE) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    unet, vae, text = H.diffusers_unet(sd2=False), H.diffusers_vae(), H.clip_text_model()
    file = H.save_single_file(tmp_path_factory.mktemp("img2img") / "sd1.safetensors",
                              H.compvis_state(unet, vae, text, sd2=False))
    return unet, vae, text, load_pipeline(file, overrides=H.SD1_OVERRIDES)


# ---------------------------------------------------------------------------------------------- vs diffusers


@pytest.mark.parametrize("sampler, strength", [("ddim", 0.6), ("ddim", 1.0), ("ddpm", 0.5), ("dpmpp_2m", 0.75),
                                               ("euler_a", 0.7), ("euler_a", 1.0)])
@torch.no_grad()
def test_matches_diffusers_img2img_pipeline(sd, sampler, strength, monkeypatch):
    """Same weights, scheduler, image, strength and noise: diffusers draws the added noise first from its
    generator (the posterior's mode is used on both sides, not a sample) and its step noise from a second
    generator that continues ours: Generator().manual_seed(seed) draws our x_T, then our step noise."""
    from diffusers import StableDiffusionImg2ImgPipeline
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as img2img_module
    from diffusers.schedulers import scheduling_ddpm, scheduling_euler_ancestral_discrete

    unet, vae, text, pipe = sd
    seed, image = 3, random_image()
    monkeypatch.setattr(img2img_module, "retrieve_latents", lambda out, generator=None: out.latent_dist.mode())
    step_noise = torch.Generator().manual_seed(seed)
    f = pipe.config.autoencoder.downsample_factor
    torch.randn(pipe.config.autoencoder.embed_dim, H.IMAGE_SIZE // f, H.IMAGE_SIZE // f, generator=step_noise)  # x_T

    def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None):
        return torch.randn(shape, generator=step_noise, dtype=dtype)

    for module in (scheduling_ddpm, scheduling_euler_ancestral_discrete):
        monkeypatch.setattr(module, "randn_tensor", randn_tensor)
    ref = StableDiffusionImg2ImgPipeline(vae=vae, text_encoder=text, tokenizer=H.clip_tokenizer(), unet=unet,
                                         scheduler=H.diffusers_scheduler(sampler, **SD_SCHEDULE), safety_checker=None,
                                         feature_extractor=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    theirs = ref("a photo of a cat", image=image, strength=strength, num_inference_steps=10, guidance_scale=7.5,
                 negative_prompt="blurry", generator=torch.Generator().manual_seed(seed), output_type="np").images
    ours, params = pipe.generate("a photo of a cat", negative_prompt="blurry", init_image=image, strength=strength,
                                 steps=10, scale=7.5, seed=seed, sampler=sampler)
    ours = ((ours + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).numpy()  # (1, H, W, 3) in [0, 1]
    diff = float(np.abs(ours - theirs).max())
    print(f"{sampler}: max |ours - diffusers| = {diff:.2e}")
    assert diff <= 1e-3
    assert params[0].denoising_strength == strength and f"Denoising strength: {strength:g}" in params[0].to_text()


# ---------------------------------------------------------------------------------------------- behaviour


def test_start_step_follows_diffusers_get_timesteps():
    assert [start_step(10, s) for s in (1.0, 0.75, 0.5, 0.1)] == [0, 3, 5, 9]
    assert start_step(25, 0.75) == 7 and start_step(3, 0.7) == 1  # int(2.1) = 2 steps run
    for bad in (0, -0.5, 1.5, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="strength"):
            start_step(10, bad)
    with pytest.raises(ValueError, match="runs no sampling step"):
        start_step(10, 0.05)


def test_noise_to_step_is_q_sample_at_the_runs_noise_level(tiny_ldm_pipe):
    schedule = tiny_ldm_pipe.schedule
    x0, eps = torch.ones(1, 2), torch.full((1, 2), 2.0)
    ac = schedule.alphas_cumprod_float64
    t = 100 // 10 * 3  # leading spacing, offset 0: step 6 of 10 is t = 30
    want = ac[t] ** 0.5 * 1.0 + (1 - ac[t]) ** 0.5 * 2.0
    for sampler in ("ddpm", "ddim", "euler_a"):
        got = noise_to_step(x0, eps, schedule, sampler, steps=10, start_step=6)
        assert torch.allclose(got, torch.full_like(got, want), atol=1e-6)
    with pytest.raises(ValueError, match="start_step"):
        noise_to_step(x0, eps, schedule, "ddim", steps=10, start_step=10)
    with pytest.raises(ValueError, match="start_step"):
        sample(lambda x, t: x, schedule, x0, "ddim", steps=10, start_step=-1)


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
@torch.no_grad()
def test_every_sampler(tiny_ldm_pipe, sampler):
    pipe, image = tiny_ldm_pipe, random_image(1)
    kw = dict(steps=20, seed=4, sampler=sampler)

    def run(strength, **extra):
        return pipe.generate(["a cat", "a ship"], init_image=image, strength=strength, **kw, **extra)[0]

    txt2img = pipe.generate(["a cat", "a ship"], **kw)[0]
    assert not torch.equal(run(1.0), txt2img)  # strength 1 still starts from the noised image, as diffusers does
    # Closeness is measured on latents: this random autoencoder decodes everything to much the same picture.
    x = torch.from_numpy(np.asarray(image, np.float32) / 127.5 - 1).permute(2, 0, 1)[None]  # (1, 3, H, W)
    z = pipe.autoencoder.encode(x)  # (1, C, h, w)
    d_light, d_heavy, d_full = ((run(s, output_type="latent") - z).abs().mean().item() for s in (0.1, 0.8, 1.0))
    assert d_light < 0.25 * d_full and d_light < d_heavy < d_full
    light = run(0.1)
    assert torch.equal(light, run(0.1))  # the same seed reproduces
    # image i (its own random stream from seed + i) comes out the same alone, with every sampler
    second = pipe.generate("a ship", init_image=image, strength=0.1, **dict(kw, seed=5))[0]
    assert torch.allclose(second[0], light[1], atol=1e-5)


def test_vq_diffusion_refuses_init_image():
    from latentdiff.pipelines import VQDiffusionPipeline
    from tests.test_vq_pipeline import tiny_vq_config

    pipe = VQDiffusionPipeline.from_config(tiny_vq_config())
    with pytest.raises(ValueError, match="img2img needs a latent-diffusion model"):
        pipe.generate("a cat", init_image=random_image(), steps=2)


# ---------------------------------------------------------------------------------------------- command line


def test_cli_init_image_writes_pngs_with_denoising_strength(tiny_ldm_file, tmp_path, capsys):
    src = tmp_path / "in.png"
    random_image(2, size=20).save(src)
    out = tmp_path / "out"
    assert txt2img.main(["a cat", "--ckpt", str(tiny_ldm_file), "--init-image", str(src), "--strength", "0.5",
                         "--steps", "4", "--seed", "1", "--n_samples", "3", "--batch-size", "2", "--no-grid",
                         "--outdir", str(out), "--quiet"]) == 0
    assert "resized to 16x16" in capsys.readouterr().err
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 3 and Image.open(pngs[0]).size == (16, 16)
    params = [parse_parameters(Image.open(p).info["parameters"]) for p in pngs]
    assert [p["Denoising strength"] for p in params] == ["0.5"] * 3 and [p["Seed"] for p in params] == ["1", "2", "3"]


@pytest.mark.parametrize("args, message", [
    (["--strength", "0"], "argument --strength: 0 must be > 0"),
    (["--strength", "1.5"], "argument --strength: 1.5 must be <= 1"),
    (["--strength", "nan"], "argument --strength: 'nan' is not a finite number"),
    (["--strength", "0.1", "--steps", "2"], "runs no sampling step"),
    (["BAD"], "not a readable image"),
    (["NOIMAGE"], "--strength applies only with --init-image"),
])
def test_cli_bad_img2img_input_exits_2(tiny_ldm_file, tmp_path, capsys, args, message):
    src = tmp_path / "in.png"
    random_image(2).save(src)
    image_args = ["--init-image", str(src)]
    if args == ["BAD"]:  # a file that is not an image
        (tmp_path / "in.txt").write_text("not an image")
        image_args, args = ["--init-image", str(tmp_path / "in.txt")], []
    elif args == ["NOIMAGE"]:
        image_args, args = [], ["--strength", "0.5"]
    out = tmp_path / "out"
    steps = [] if "--steps" in args else ["--steps", "4"]
    with pytest.raises(SystemExit) as e:
        txt2img.main(["a cat", "--ckpt", str(tiny_ldm_file), *image_args, *args, *steps, "--outdir", str(out),
                      "--quiet"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err.splitlines()[-1] and "Traceback" not in err  # argparse's usage, then one error
    assert not out.exists() or not list(out.glob("*.png"))


def test_euler_a_run_from_step_0_takes_a_noised_sample_not_pure_noise():
    """With trailing spacing Euler ancestral scales pure noise by σ_0 (diffusers' init_noise_sigma), but a noised
    sample x_{t_0} (img2img at strength 1) by √(σ_0² + 1): its first model input is then x_{t_0} itself."""
    schedule = DiffusionSchedule.from_config(ScheduleConfig(num_timesteps=100))
    x_T = torch.randn(1, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    seen = []

    def model(x, t):
        seen.append(x.clone())
        return torch.zeros_like(x)

    for start in (None, 0):
        sample(model, schedule, x_T, "euler_a", steps=5, timestep_spacing="trailing", start_step=start)
    pure, noised = seen[0], seen[5]
    assert torch.allclose(noised, x_T, atol=1e-6)
    sigma0 = ((1 - schedule.alphas_cumprod_float64[99]) / schedule.alphas_cumprod_float64[99]) ** 0.5
    assert torch.allclose(pure, x_T * sigma0 / (sigma0**2 + 1) ** 0.5, atol=1e-6)
