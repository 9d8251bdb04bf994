"""Tiny random Stable-Diffusion-like models built with the reference libraries (diffusers, transformers,
open_clip) and saved in each checkpoint format, for tests/test_stable_diffusion.py.

Shapes follow SD 1.x / 2.x at a tiny scale: a 3-level U-Net (attention on the first two levels, two res blocks
per level, 8 heads for SD 1 / head width 8 with linear projections for SD 2), a 2-level VAE, a CLIP-shaped text
tower of width 64 (one head: latentdiff infers text heads as width / 64, as for every released tower) over the
full 49,408-token vocabulary with 77 positions.

The original (CompVis) single-file layout is written with latentdiff's converters in the to-CompVis direction;
tests check it independently against diffusers' own single-file converters (CompVis -> diffusers).
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import torch

from tests.tiny import jitter

TEXT_WIDTH = 64
IMAGE_SIZE = 16  # pixels; VAE factor 2, U-Net factor 4
LATENT = IMAGE_SIZE // 2
SD1_OVERRIDES = ["unet.num_heads=8"]
SD2_OVERRIDES = ["unet.num_head_channels=8"]


def diffusers_unet(sd2: bool, seed: int = 0, in_channels: int = 4):
    """A diffusers U-Net shaped like SD 1 or SD 2's; ``in_channels=9`` makes an inpainting U-Net (latents, mask and
    masked-image latents)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=LATENT, in_channels=in_channels, out_channels=4, block_out_channels=(32, 64, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_WIDTH, norm_num_groups=32,
        attention_head_dim=[4, 8, 8] if sd2 else 8,  # heads per block (diffusers' naming): width 8 / 8 heads
        use_linear_projection=sd2)
    return jitter(unet, std=0.02, seed=seed).eval()  # no weight keeps a trivial init


def diffusers_vae(seed: int = 1):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        latent_channels=4, norm_num_groups=32, sample_size=IMAGE_SIZE)
    return jitter(vae, std=0.02, seed=seed).eval()


def clip_text_model(seed: int = 2):
    """transformers CLIPTextModel shaped like SD 1's CLIP ViT-L/14 text tower (quick_gelu)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=TEXT_WIDTH, intermediate_size=4 * TEXT_WIDTH,
                         num_hidden_layers=2, num_attention_heads=1, max_position_embeddings=77,
                         hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407)
    return jitter(CLIPTextModel(cfg), std=0.02, seed=seed).eval()


def openclip_text_tower(seed: int = 3):
    """open_clip text tower shaped like SD 2's OpenCLIP ViT-H/14 (gelu; SD 2 uses its penultimate layer)."""
    from open_clip.model import CLIPTextCfg, _build_text_tower

    torch.manual_seed(seed)
    tower = _build_text_tower(TEXT_WIDTH, CLIPTextCfg(context_length=77, vocab_size=49408, width=TEXT_WIDTH,
                                                      heads=1, layers=3))
    return jitter(tower, std=0.02, seed=seed).eval()


def openclip_penultimate(tower, ids: torch.Tensor) -> torch.Tensor:
    """SD 2's conditioning from open_clip's own API: ln_final of the second-to-last block's output."""
    out = tower.forward_intermediates(ids, indices=[len(tower.transformer.resblocks) - 2],
                                      normalize_intermediates=True, intermediates_only=True, output_fmt="NLC")
    return out["text_intermediates"][0]


# ---------------------------------------------------------------------------------------------- CompVis layout


def compvis_state(unet, vae, text, sd2: bool, ema_unet=None) -> dict[str, torch.Tensor]:
    """The original single-file layout of these reference models (plus ``model_ema.*`` from ``ema_unet``)."""
    from latentdiff.io.convert_unet import unet_config_from_diffusers, unet_state_dict_from_diffusers
    from latentdiff.io.convert_vae import vae_state_dict_from_diffusers

    cfg = unet_config_from_diffusers(dict(unet.config))

    def compvis_unet(model):
        return unet_state_dict_from_diffusers({k: v.clone() for k, v in model.state_dict().items()}, cfg)

    state = {"model.diffusion_model." + k: v for k, v in compvis_unet(unet).items()}
    state.update({"first_stage_model." + k: v.clone() for k, v in
                  vae_state_dict_from_diffusers(vae.state_dict()).items()})
    if sd2:  # FrozenOpenCLIPEmbedder: the open_clip CLIP model without its visual tower
        state.update({"cond_stage_model.model." + k: v.clone() for k, v in text.state_dict().items()})
        state["cond_stage_model.model.logit_scale"] = torch.tensor(4.6052)
    else:  # FrozenCLIPEmbedder: transformers' CLIPTextModel, 4.x key names
        state.update({"cond_stage_model.transformer.text_model." + k.removeprefix("text_model."): v.clone()
                      for k, v in text.state_dict().items()})
        state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    if ema_unet is not None:
        state.update({"model_ema." + ("diffusion_model." + k).replace(".", ""): v
                      for k, v in compvis_unet(ema_unet).items()})
        state["model_ema.decay"] = torch.tensor(0.9999)
        state["model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int32)
    return {k: v.contiguous() for k, v in state.items()}


def save_single_file(path: Path, state: dict[str, torch.Tensor]) -> Path:
    """``.safetensors`` or a Lightning-style ``.ckpt`` (``{"state_dict": ..., "global_step": ...}``)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save({"state_dict": state, "global_step": 1000, "epoch": 3}, path)
    return path


# ---------------------------------------------------------------------------------------------- diffusers folders


def clip_tokenizer(pad_token: str = "<|endoftext|>"):
    """transformers' CLIPTokenizer built offline from the BPE vocabulary shipped inside open_clip."""
    from open_clip.tokenizer import SimpleTokenizer, default_bpe
    from transformers import CLIPTokenizer

    vocab = dict(SimpleTokenizer().encoder)
    vocab["<|startoftext|>"] = vocab.pop("<start_of_text>")
    vocab["<|endoftext|>"] = vocab.pop("<end_of_text>")
    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1: 49152 - 256 - 2 + 1]
    return CLIPTokenizer(vocab=vocab, merges=[tuple(line.split()) for line in lines], pad_token=pad_token,
                         model_max_length=77)


def diffusers_scheduler(sampler: str, karras: bool = False, **config):
    """The diffusers scheduler that latentdiff's ``sampler`` reproduces, built with scheduler ``config``
    (``karras``: Karras sigmas, DPM-Solver++ only)."""
    import diffusers

    if sampler == "ddpm":
        return diffusers.DDPMScheduler(**config, clip_sample=False, variance_type="fixed_small")
    if sampler == "ddim":
        return diffusers.DDIMScheduler(**config, clip_sample=False, set_alpha_to_one=True)
    if sampler == "dpmpp_2m":
        return diffusers.DPMSolverMultistepScheduler(**config, solver_order=2, algorithm_type="dpmsolver++",
                                                     solver_type="midpoint", lower_order_final=True,
                                                     final_sigmas_type="zero", use_karras_sigmas=karras)
    return diffusers.EulerAncestralDiscreteScheduler(**config)


def ddim_scheduler(prediction_type: str = "epsilon", set_alpha_to_one: bool = False):
    """Stable Diffusion's scheduler settings (v1-inference / v2-inference yaml) as a diffusers DDIMScheduler."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                         clip_sample=False, set_alpha_to_one=set_alpha_to_one, steps_offset=1,
                         timestep_spacing="leading", prediction_type=prediction_type)


def diffusers_pipeline(unet, vae, text_encoder, scheduler, pad_token: str = "<|endoftext|>"):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(pad_token),
                                   unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def save_diffusers_folder(folder: Path, unet, vae, text_encoder, prediction_type: str = "epsilon",
                          pad_token: str = "<|endoftext|>") -> Path:
    """A diffusers Stable Diffusion folder written by diffusers itself."""
    pipe = diffusers_pipeline(unet, vae, text_encoder, ddim_scheduler(prediction_type), pad_token)
    pipe.save_pretrained(str(folder))
    return Path(folder)


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
