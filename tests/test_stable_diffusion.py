"""Stable Diffusion checkpoints: single files and diffusers folders against diffusers / transformers / open_clip.

Tiny SD-like models with random weights are built with the reference libraries (tests/sd_helpers.py), saved in
each format, loaded with latentdiff and compared (CPU, float32). Models are built once per module.
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from latentdiff import load_pipeline
from latentdiff.assets import SD_CONFIGS_DIR
from latentdiff.cli import convert as convert_cli
from latentdiff.io.checkpoint import CheckpointError
from latentdiff.io.stable_diffusion import read_stable_diffusion
from tests import sd_helpers as H
from tests.tiny import Evil

PROMPTS = ["a photo of a cat", ""]

convert = convert_cli.main


def unet_inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, H.LATENT, H.LATENT, generator=g)
    return x, torch.tensor([10, 700]), torch.randn(2, 77, H.TEXT_WIDTH, generator=g)


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


@pytest.fixture(scope="module")
def vae():
    return H.diffusers_vae()


def single_file_case(folder, vae, sd2: bool, text, **load_kwargs) -> SimpleNamespace:
    """A reference U-Net (SD 1 or SD 2 shaped) with ``vae`` and ``text``, written as a CompVis single file and
    loaded by latentdiff."""
    unet = H.diffusers_unet(sd2=sd2)
    state = H.compvis_state(unet, vae, text, sd2=sd2)
    file = H.save_single_file(folder / f"sd{1 + sd2}.safetensors", state)
    return SimpleNamespace(dir=folder, unet=unet, state=state, file=file, pipe=load_pipeline(file, **load_kwargs))


@pytest.fixture(scope="module")
def sd1(tmp_path_factory, vae):
    text = H.clip_text_model()
    case = single_file_case(tmp_path_factory.mktemp("sd1"), vae, False, text, overrides=H.SD1_OVERRIDES)
    case.text = text
    return case


@pytest.fixture(scope="module")
def sd2(tmp_path_factory, vae):
    tower = H.openclip_text_tower()
    case = single_file_case(tmp_path_factory.mktemp("sd2"), vae, True, tower, prediction_type="epsilon",
                            overrides=H.SD2_OVERRIDES)
    case.tower = tower
    return case


# ---------------------------------------------------------------------------------------------- numerics


@torch.no_grad()
def test_sd1_unet_matches_diffusers(sd1):
    x, t, ctx = unet_inputs()
    assert max_diff(sd1.pipe.unet(x, t, ctx), sd1.unet(x, t, encoder_hidden_states=ctx).sample) <= 1e-4
    assert sd1.pipe.config.unet.num_heads == 8 and not sd1.pipe.config.unet.use_linear_in_transformer


@torch.no_grad()
def test_sd2_unet_linear_projection_head_width_matches_diffusers(sd2):
    cfg = sd2.pipe.config.unet
    assert cfg.use_linear_in_transformer and cfg.num_head_channels == 8 and cfg.num_heads is None
    x, t, ctx = unet_inputs()
    assert max_diff(sd2.pipe.unet(x, t, ctx), sd2.unet(x, t, encoder_hidden_states=ctx).sample) <= 1e-4


@torch.no_grad()
def test_vae_encode_decode_matches_diffusers(sd1, vae):
    x = torch.rand(2, 3, H.IMAGE_SIZE, H.IMAGE_SIZE, generator=torch.Generator().manual_seed(1)) * 2 - 1
    scale = vae.config.scaling_factor
    z = sd1.pipe.autoencoder.encode(x)
    assert max_diff(z, vae.encode(x).latent_dist.mode() * scale) <= 1e-4
    assert max_diff(sd1.pipe.autoencoder.decode(z), vae.decode(z / scale).sample) <= 1e-4


@torch.no_grad()
def test_clip_text_encoder_matches_transformers(sd1):
    ids = H.clip_tokenizer()(PROMPTS, padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert torch.equal(sd1.pipe.text_encoder.tokenize(PROMPTS), ids)
    assert max_diff(sd1.pipe.text_encoder.encode(PROMPTS), sd1.text(ids).last_hidden_state) <= 1e-5


@torch.no_grad()
def test_openclip_text_encoder_matches_open_clip(sd2):
    import open_clip

    ids = open_clip.tokenize(PROMPTS)
    te = sd2.pipe.text_encoder
    assert te.cfg.type == "openclip" and te.cfg.layer == "penultimate" and te.cfg.act == "gelu"
    assert torch.equal(te.tokenize(PROMPTS), ids)
    assert max_diff(te.encode(PROMPTS), H.openclip_penultimate(sd2.tower, ids)) <= 1e-5


@torch.no_grad()
def test_ddim_guided_generation_matches_diffusers_pipeline(sd1, vae):
    # latentdiff's DDIM ends the chain at ᾱ = 1 (DDIMScheduler set_alpha_to_one=True); the SD release configs use
    # ᾱ_0 (set_alpha_to_one=False), which moves the last step by ~1e-3 on these tiny models.
    ref = H.diffusers_pipeline(sd1.unet, vae, sd1.text, H.ddim_scheduler(set_alpha_to_one=True))
    ref.set_progress_bar_config(disable=True)
    ours, _ = sd1.pipe.generate("a photo of a cat", negative_prompt="blurry", steps=10, scale=7.5, seed=3,
                                height=H.IMAGE_SIZE, width=H.IMAGE_SIZE)
    latents = torch.randn(1, 4, H.LATENT, H.LATENT, generator=torch.Generator().manual_seed(3))  # ours: seed + i
    theirs = ref("a photo of a cat", negative_prompt="blurry", num_inference_steps=10, guidance_scale=7.5,
                 height=H.IMAGE_SIZE, width=H.IMAGE_SIZE, latents=latents, output_type="pt").images
    assert max_diff(((ours + 1) / 2).clamp(0, 1), theirs) <= 1e-3


def test_compvis_layout_matches_diffusers_single_file_converters(sd1, sd2, vae):
    """The original layout (helpers and export) read back by diffusers' own CompVis -> diffusers converters."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    from latentdiff.io.export import sd_state_dict
    from latentdiff.io.stable_diffusion import read_single_file

    for case, state in ((sd1, sd1.state), (sd2, sd2.state)):
        ref = case.unet.state_dict()
        got = convert_ldm_unet_checkpoint(state, dict(case.unet.config))
        assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
        exported = sd_state_dict(case.pipe.config, read_single_file(case.file)[1])
        got = convert_ldm_unet_checkpoint(exported, dict(case.unet.config))
        assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    got, ref = convert_ldm_vae_checkpoint(sd1.state, dict(vae.config)), vae.state_dict()
    assert got.keys() == ref.keys() and all(torch.equal(got[k].reshape(ref[k].shape), ref[k]) for k in ref)


def test_bundled_family_configs_have_released_sizes():
    from latentdiff.config import load_config
    from latentdiff.models.autoencoder_kl import AutoencoderKL
    from latentdiff.models.unet import UNetModel

    def count(module):
        return sum(p.numel() for p in module.parameters())

    for name, unet_params in (("sd15", 859_520_964), ("sd2_base", 865_910_724), ("sd2_768_v", 865_910_724)):
        cfg = load_config(SD_CONFIGS_DIR / f"{name}.yaml")
        with torch.device("meta"):
            assert (count(UNetModel(cfg.unet)), count(AutoencoderKL(cfg.autoencoder))) == (unet_params, 83_653_863)


# ---------------------------------------------------------------------------------------------- loading rules


def test_mixed_precision_file_loads_in_the_unets_dtype(sd1):
    state = {k: v.half() if k.startswith("model.diffusion_model.") else v for k, v in sd1.state.items()}
    pipe = load_pipeline(H.save_single_file(sd1.dir / "mixed.safetensors", state), overrides=H.SD1_OVERRIDES)
    assert {p.dtype for m in pipe.modules().values() for p in m.parameters()} == {torch.float16}


def test_ema_weights_chosen_by_default_and_refusable(sd1, vae):
    ema = H.diffusers_unet(sd2=False, seed=7)
    file = H.save_single_file(sd1.dir / "ema.safetensors", H.compvis_state(sd1.unet, vae, sd1.text, False, ema))
    key = "input_blocks.1.1.proj_in.weight"
    raw = sd1.state["model.diffusion_model." + key]
    ema_value = H.compvis_state(ema, vae, sd1.text, False)["model.diffusion_model." + key]
    assert torch.equal(read_stable_diffusion(file, overrides=H.SD1_OVERRIDES)[1]["unet"][key], ema_value)
    assert torch.equal(read_stable_diffusion(file, use_ema=False, overrides=H.SD1_OVERRIDES)[1]["unet"][key], raw)
    with pytest.raises(CheckpointError, match="EMA"):
        read_stable_diffusion(sd1.file, use_ema=True, overrides=H.SD1_OVERRIDES)


@torch.no_grad()
def test_ckpt_with_tensors_loads_like_safetensors(sd2):
    file = H.save_single_file(sd2.dir / "sd2.ckpt", sd2.state)
    pipe = load_pipeline(file, prediction_type="epsilon", overrides=H.SD2_OVERRIDES)
    x, t, ctx = unet_inputs()
    assert torch.equal(pipe.unet(x, t, ctx), sd2.pipe.unet(x, t, ctx))
    assert torch.equal(pipe.text_encoder.encode(PROMPTS), sd2.pipe.text_encoder.encode(PROMPTS))


def test_malicious_ckpt_refused_and_never_executed(sd1):
    marker = sd1.dir / "pwned"
    path = sd1.dir / "evil.ckpt"
    torch.save({"state_dict": dict(sd1.state), "callback": Evil(str(marker))}, path)
    with pytest.raises(CheckpointError, match="refuses for safety"):
        load_pipeline(path)
    assert not marker.exists()


def test_truncated_safetensors_refused(sd1):
    path = sd1.dir / "truncated.safetensors"
    path.write_bytes(sd1.file.read_bytes()[:-4096])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_pipeline(path)


def test_nan_weights_refused(sd1):
    state = dict(sd1.state)
    key = "model.diffusion_model.middle_block.0.in_layers.2.weight"
    state[key] = state[key].clone()
    state[key][0, 0, 0, 0] = float("nan")
    path = H.save_single_file(sd1.dir / "nan.safetensors", state)
    with pytest.raises(CheckpointError, match=r"NaN.*middle_block\.0\.in_layers\.2\.weight"):
        load_pipeline(path, overrides=H.SD1_OVERRIDES)


def test_wrong_shape_reported_by_name(sd1):
    state = dict(sd1.state)
    state["model.diffusion_model.input_blocks.1.0.emb_layers.1.weight"] = torch.zeros(32, 100)
    path = H.save_single_file(sd1.dir / "shape.safetensors", state)
    with pytest.raises(CheckpointError, match=r"input_blocks\.1\.0\.emb_layers\.1\.weight: file \(32, 100\)"):
        load_pipeline(path, overrides=H.SD1_OVERRIDES)


def _messages(record) -> str:
    return " | ".join(str(w.message) for w in record)


def test_ambiguous_choices_warned_and_silenced_when_given(sd1, sd2):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        cfg, _ = read_stable_diffusion(sd2.file, overrides=H.SD2_OVERRIDES)
    assert "v_prediction" in _messages(record) and cfg.schedule.prediction_type == "epsilon"
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        cfg, _ = read_stable_diffusion(sd2.file, prediction_type="v_prediction", overrides=H.SD2_OVERRIDES)
        sd1_cfg, _ = read_stable_diffusion(sd1.file, overrides=H.SD1_OVERRIDES)
    assert "prediction" not in _messages(record) and "head layout" not in _messages(record)
    assert cfg.schedule.prediction_type == "v_prediction" and cfg.image_size == 768  # the 768-v family config
    assert sd1_cfg.schedule.prediction_type == "epsilon"
    with pytest.warns(UserWarning, match="head layout"):  # a non-released U-Net size without a head layout
        read_stable_diffusion(sd1.file)


@torch.no_grad()
def test_diffusers_folder_written_by_diffusers_loads(sd1, vae):
    folder = H.save_diffusers_folder(sd1.dir / "diffusers-ref", sd1.unet, vae, sd1.text)
    pipe = load_pipeline(folder)
    assert pipe.config.schedule.steps_offset == 1 and pipe.config.image_size == H.IMAGE_SIZE
    x, t, ctx = unet_inputs()
    assert max_diff(pipe.unet(x, t, ctx), sd1.unet(x, t, encoder_hidden_states=ctx).sample) <= 1e-4
    assert max_diff(pipe.text_encoder.encode(PROMPTS), sd1.pipe.text_encoder.encode(PROMPTS)) <= 1e-6


# ---------------------------------------------------------------------------------------------- conversion


def test_convert_sd_latentdiff_sd_round_trip(sd1):
    mid, out = sd1.dir / "rt-latentdiff.safetensors", sd1.dir / "rt-sd.safetensors"
    assert convert([str(sd1.file), str(mid), "--to", "latentdiff", "--set", "unet.num_heads=8"]) == 0
    assert convert([str(mid), str(out), "--to", "sd"]) == 0
    back = load_file(str(out))
    assert back.keys() == sd1.state.keys()
    assert all(torch.equal(back[k], sd1.state[k]) for k in back)


@torch.no_grad()
def test_convert_diffusers_latentdiff_diffusers_loads_in_diffusers(sd1, vae):
    from diffusers import StableDiffusionPipeline

    source = sd1.dir / "diffusers-ref"
    if not source.exists():
        H.save_diffusers_folder(source, sd1.unet, vae, sd1.text)
    mid, out = sd1.dir / "dl.safetensors", sd1.dir / "diffusers-out"
    assert convert([str(source), str(mid), "--to", "latentdiff"]) == 0
    assert convert([str(mid), str(out), "--to", "diffusers"]) == 0
    dp = StableDiffusionPipeline.from_pretrained(str(out), local_files_only=True)
    x, t, ctx = unet_inputs()
    assert torch.equal(dp.unet(x, t, encoder_hidden_states=ctx).sample,
                       sd1.unet(x, t, encoder_hidden_states=ctx).sample)
    img = torch.rand(1, 3, H.IMAGE_SIZE, H.IMAGE_SIZE) * 2 - 1
    assert torch.equal(dp.vae.decode(dp.vae.encode(img).latent_dist.mode()).sample,
                       vae.decode(vae.encode(img).latent_dist.mode()).sample)
    ids = dp.tokenizer(PROMPTS, padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert torch.equal(ids, sd1.pipe.text_encoder.tokenize(PROMPTS))
    assert torch.equal(dp.text_encoder(ids).last_hidden_state, sd1.text(ids).last_hidden_state)
    sched = dp.scheduler.config
    assert (sched.beta_schedule, sched.steps_offset, sched.prediction_type) == ("scaled_linear", 1, "epsilon")


@torch.no_grad()
def test_sd2_to_diffusers_and_back(sd2):
    """SD 2 single file -> diffusers folder (text tower without its last block, gelu, pad '!') -> single file."""
    from diffusers import StableDiffusionPipeline

    folder, back = sd2.dir / "sd2-diffusers", sd2.dir / "sd2-back.safetensors"
    assert convert([str(sd2.file), str(folder), "--to", "diffusers", "--prediction-type", "v_prediction",
                    "--set", "unet.num_head_channels=8"]) == 0
    text_cfg = H.read_json(folder / "text_encoder" / "config.json")
    assert (text_cfg["num_hidden_layers"], text_cfg["hidden_act"]) == (2, "gelu")
    dp = StableDiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    assert dp.scheduler.config.prediction_type == "v_prediction"
    ids = dp.tokenizer(PROMPTS, padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert torch.equal(ids, sd2.pipe.text_encoder.tokenize(PROMPTS))  # pad token 0 ('!') as open_clip
    reference = H.openclip_penultimate(sd2.tower, ids)
    assert max_diff(dp.text_encoder(ids).last_hidden_state, reference) <= 1e-5
    x, t, ctx = unet_inputs()
    assert max_diff(dp.unet(x, t, encoder_hidden_states=ctx).sample, sd2.unet(x, t, encoder_hidden_states=ctx).sample) \
        <= 1e-5
    assert convert([str(folder), str(back), "--to", "sd"]) == 0
    pipe = load_pipeline(back, prediction_type="v_prediction", overrides=H.SD2_OVERRIDES)
    assert pipe.text_encoder.cfg.type == "openclip" and pipe.text_encoder.cfg.layers == 3
    assert max_diff(pipe.text_encoder.encode(PROMPTS), reference) <= 1e-5


def test_convert_half_keeps_fp16_and_cli_errors(sd1, capsys):
    out = sd1.dir / "half.safetensors"
    assert convert([str(sd1.file), str(out), "--to", "sd", "--half", "--set", "unet.num_heads=8"]) == 0
    assert all(v.dtype == torch.float16 for k, v in load_file(str(out)).items() if not k.endswith("position_ids"))
    pipe = load_pipeline(out, overrides=H.SD1_OVERRIDES)
    assert {p.dtype for m in pipe.modules().values() for p in m.parameters()} == {torch.float16}
    before = out.read_bytes()
    for argv, message in (([str(sd1.file), str(out), "--to", "sd"], "refusing to overwrite"),
                          ([str(sd1.dir / "missing.ckpt"), str(sd1.dir / "x.safetensors"), "--to", "sd"],
                           "does not exist"),
                          ([str(sd1.file), str(sd1.dir / "y.safetensors"), "--to", "sd", "--from", "diffusers"],
                           "looks like 'sd'"),
                          ([str(sd1.file), str(sd1.dir / "y.safetensors"), "--to", "latentdiff", "--ema"], "EMA")):
        with pytest.raises(SystemExit) as exit_info:
            convert(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert out.read_bytes() == before
    assert not any(p.name.startswith(".tmp-") for p in sd1.dir.iterdir())
