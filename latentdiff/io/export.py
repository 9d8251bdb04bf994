"""Write Stable Diffusion checkpoints: the original single-file layout and diffusers folders, and convert between
them and latentdiff's own model file.

Everything works on ``(config, parts)``: a :class:`~latentdiff.config.LatentDiffusionConfig` and the state dicts
``{"unet", "autoencoder", "text_encoder"}`` in latentdiff's (= CompVis) names, as the loaders in
:mod:`latentdiff.io.stable_diffusion` and :func:`~latentdiff.io.checkpoint.load_model_file` return them; no
network is built, so converting needs about the checkpoint's size in RAM.

    convert_checkpoint("v1-5.safetensors", "sd15-diffusers", to="diffusers")
    convert_checkpoint("sd15-diffusers", "sd15.safetensors", to="latentdiff", half=True)

Single file (``.safetensors``): ``model.diffusion_model.*``, ``first_stage_model.*`` and ``cond_stage_model.*``:
``transformer.text_model.*`` for OpenAI CLIP (SD 1.x), ``model.*`` for an OpenCLIP tower (SD 2.x). A transformers
tower with ``gelu`` (diffusers' SD 2 folders: OpenCLIP without its last block) is written as SD 2's OpenCLIP
tower, with a zero placeholder for the missing last block and an identity ``text_projection``: SD 2 runs the
blocks before the last one and never uses the projection, so the conditioning is exact. Only one U-Net is
written (EMA or not, as chosen when reading); schedule buffers, ``logit_scale`` and EMA bookkeeping are not.

diffusers folder: ``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/`` (transformers ``CLIPTextModel``; a
tower read at its penultimate layer is written without its last block, so that ``last_hidden_state`` is that
layer, as in diffusers' SD 2 folders), ``tokenizer/`` (``CLIPTokenizer`` files generated from open_clip's BPE
vocabulary) and ``scheduler/scheduler_config.json`` (``DDIMScheduler``).

Writes are atomic (a file: temp file + rename; a folder: built beside the target, then renamed into place) and
never replace an existing target unless ``overwrite=True``.
"""

from __future__ import annotations

import gzip
import json
import warnings
from dataclasses import replace
from pathlib import Path

import torch

from latentdiff.atomic import atomic_folder, atomic_write
from latentdiff.config import LatentDiffusionConfig, TextEncoderConfig
from latentdiff.io.checkpoint import CheckpointError, load_model_file, save_model_file
from latentdiff.io.convert_text import hf_text_to_openclip, openclip_text_to_hf
from latentdiff.io.convert_unet import unet_config_to_diffusers, unet_state_dict_to_diffusers
from latentdiff.io.convert_vae import autoencoder_config_to_diffusers, vae_state_dict_to_diffusers
from latentdiff.io.formats import FORMATS, detect_format
from latentdiff.io.safetensors_stream import write_safetensors
from latentdiff.io.stable_diffusion import (
    SD1_TEXT_PREFIX,
    SD2_TEXT_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    Parts,
    read_stable_diffusion,
)
from latentdiff.models.tokenizer import END_TOKEN, START_TOKEN, default_pad_token

SAFETENSORS_METADATA = {"format": "pt"}  # what transformers / diffusers expect in their .safetensors files


def _warn(message: str) -> None:
    warnings.warn(message, UserWarning, stacklevel=3)


def half(parts: Parts) -> Parts:
    """Floating tensors in float16 (others as they are)."""
    return {name: {k: v.half() if v.is_floating_point() else v for k, v in sd.items()} for name, sd in parts.items()}


# -- original single-file layout ------------------------------------------------------------------------------------

def _text_kind(t: TextEncoderConfig) -> str:
    """How a text encoder is written: 'sd1' (OpenAI CLIP in transformers' layout) or 'sd2' (OpenCLIP)."""
    if t.type == "trainable":
        raise ValueError("the trainable text encoder has no Stable Diffusion / diffusers equivalent; only clip and "
                         "openclip text encoders can be exported")
    return "sd1" if t.type == "clip" and t.act == "quick_gelu" else "sd2"


def _placeholder_block(openclip: dict[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
    """A zero residual block ``index`` shaped like block 0 (never run by SD 2, which stops before the last)."""
    prefix = "transformer.resblocks.0."
    return {f"transformer.resblocks.{index}.{k[len(prefix):]}": torch.zeros_like(v)
            for k, v in openclip.items() if k.startswith(prefix)}


def sd_text_state(t: TextEncoderConfig, text: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The text encoder under ``cond_stage_model.`` as SD 1.x / 2.x single files hold it."""
    if _text_kind(t) == "sd1":
        if t.layer != "last":
            _warn("SD 1.x single files always condition on CLIP's last layer; layer='penultimate' is not recorded")
        out = {"cond_stage_model." + k: v for k, v in text.items()}
        out[SD1_TEXT_PREFIX + "text_model.embeddings.position_ids"] = torch.arange(t.context_length)[None]
        return out
    if t.type == "openclip":
        if t.layer != "penultimate" or t.act != "gelu":
            _warn(f"SD 2.x single files use OpenCLIP's penultimate layer with gelu; layer={t.layer!r}, "
                  f"act={t.act!r} are not recorded")
        return {"cond_stage_model." + k: v for k, v in text.items()}
    # clip + gelu: an OpenCLIP tower in transformers' layout
    tower = hf_text_to_openclip({k.removeprefix("transformer."): v for k, v in text.items()})
    if t.layer == "last":  # SD 2 stops before the last block: append one so that the stored blocks all run
        tower.update(_placeholder_block(tower, t.layers))
    tower.setdefault("text_projection", torch.eye(t.width, dtype=tower["positional_embedding"].dtype))
    return {SD2_TEXT_PREFIX + k: v for k, v in tower.items()}


def sd_state_dict(cfg: LatentDiffusionConfig, parts: Parts) -> dict[str, torch.Tensor]:
    """The original (CompVis) single-file layout of a model."""
    state = {UNET_PREFIX + k: v for k, v in parts["unet"].items()}
    state.update({VAE_PREFIX + k: v for k, v in parts["autoencoder"].items()})
    state.update(sd_text_state(cfg.text_encoder, parts["text_encoder"]))
    return state


def save_sd_single_file(path: str | Path, cfg: LatentDiffusionConfig, parts: Parts, overwrite: bool = False) -> Path:
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: Stable Diffusion single files are written as .safetensors only")
    state = sd_state_dict(cfg, parts)
    with atomic_write(path, "wb", overwrite=overwrite) as f:
        write_safetensors(f, state, SAFETENSORS_METADATA)
    return path


# -- diffusers folders ----------------------------------------------------------------------------------------------

def hf_text_encoder(t: TextEncoderConfig, text: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(config.json dict, weights)`` of a transformers ``CLIPTextModel`` computing the same conditioning."""
    from latentdiff.models.text_clip import clip_text_config

    _text_kind(t)
    if t.type == "clip":
        sd = {k.removeprefix("transformer."): v for k, v in text.items()}
    else:
        sd = openclip_text_to_hf({k.removeprefix("model."): v for k, v in text.items()})
    layers = t.layers
    if t.layer == "penultimate":  # final_layer_norm(hidden[-2]) == last_hidden_state without the last block
        layers -= 1
        last = f"text_model.encoder.layers.{layers}."
        sd = {k: v for k, v in sd.items() if not k.startswith(last)}
    config = clip_text_config(replace(t, type="clip", layers=layers, layer="last")).to_dict()
    config["architectures"] = ["CLIPTextModel"]
    return config, sd


def clip_tokenizer_files(pad_token: int, context_length: int) -> dict[str, str]:
    """``CLIPTokenizer`` files (vocab.json, merges.txt, configs) from the BPE vocabulary shipped in open_clip."""
    from open_clip.tokenizer import SimpleTokenizer, default_bpe

    vocab = dict(SimpleTokenizer().encoder)
    vocab["<|startoftext|>"] = vocab.pop("<start_of_text>")
    vocab["<|endoftext|>"] = vocab.pop("<end_of_text>")
    if vocab["<|startoftext|>"] != START_TOKEN or vocab["<|endoftext|>"] != END_TOKEN:
        raise RuntimeError("open_clip's BPE vocabulary does not have CLIP's special token ids")
    # CLIP's merges: the file's first line is a version header, then the 49152 - 256 - 2 merges in use
    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1: 49152 - 256 - 2 + 1]
    id_to_token = {i: tok for tok, i in vocab.items()}
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": id_to_token[pad_token]}
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": context_length, "do_lower_case": True,
              "errors": "replace", "add_prefix_space": False, **special}
    return {"vocab.json": json.dumps(vocab, ensure_ascii=False), "merges.txt": "#version: 0.2\n" + "\n".join(merges),
            "tokenizer_config.json": json.dumps(config, indent=2), "special_tokens_map.json": json.dumps(special)}


def scheduler_config(cfg: LatentDiffusionConfig) -> dict:
    """diffusers ``DDIMScheduler`` settings of the model's schedule (Stable Diffusion's: no clipping, and the last
    step ends at ᾱ_0, not 1, as CompVis' DDIM sampler does)."""
    s = cfg.schedule
    names = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
    return {"_class_name": "DDIMScheduler", "beta_schedule": names[s.beta_schedule], "beta_start": s.beta_start,
            "beta_end": s.beta_end, "num_train_timesteps": s.num_timesteps, "prediction_type": s.prediction_type,
            "timestep_spacing": s.timestep_spacing, "steps_offset": s.steps_offset, "clip_sample": False,
            "set_alpha_to_one": False, "trained_betas": None, "rescale_betas_zero_snr": s.rescale_betas_zero_snr}


MODEL_INDEX = {"_class_name": "StableDiffusionPipeline", "feature_extractor": [None, None],
               "requires_safety_checker": False, "safety_checker": [None, None],
               "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
               "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
               "vae": ["diffusers", "AutoencoderKL"]}


def diffusers_files(cfg: LatentDiffusionConfig, parts: Parts) -> dict[str, dict | str | dict[str, torch.Tensor]]:
    """Relative path -> content (JSON dict, text, or tensors for ``.safetensors``) of a diffusers folder."""
    text_json, text = hf_text_encoder(cfg.text_encoder, parts["text_encoder"])
    unet_json = {"_class_name": "UNet2DConditionModel", **unet_config_to_diffusers(cfg.unet),
                 "sample_size": cfg.image_size // cfg.autoencoder.downsample_factor}
    vae_json = {"_class_name": "AutoencoderKL", **autoencoder_config_to_diffusers(cfg.autoencoder),
                "sample_size": cfg.image_size}
    index = MODEL_INDEX
    if cfg.unet.in_channels == 2 * cfg.autoencoder.embed_dim + 1:  # an inpainting U-Net (mask, masked latents)
        # diffusers loads these with its inpainting pipeline, which reads the folder's format version (it refuses
        # the 4-channel inpainting folders of diffusers <= 0.5.1)
        index = {**MODEL_INDEX, "_class_name": "StableDiffusionInpaintPipeline", "_diffusers_version": "0.30.0"}
    files: dict = {
        "model_index.json": index,
        "unet/config.json": unet_json,
        "unet/diffusion_pytorch_model.safetensors": unet_state_dict_to_diffusers(parts["unet"], cfg.unet),
        "vae/config.json": vae_json,
        "vae/diffusion_pytorch_model.safetensors": vae_state_dict_to_diffusers(parts["autoencoder"]),
        "text_encoder/config.json": text_json,
        "text_encoder/model.safetensors": text,
        "scheduler/scheduler_config.json": scheduler_config(cfg),
    }
    tokenizer = clip_tokenizer_files(default_pad_token(cfg.text_encoder), cfg.text_encoder.context_length)
    files.update({f"tokenizer/{name}": content for name, content in tokenizer.items()})
    return files


def save_diffusers_folder(folder: str | Path, cfg: LatentDiffusionConfig, parts: Parts,
                          overwrite: bool = False) -> Path:
    """Write a diffusers ``StableDiffusionPipeline`` folder (see the module docstring)."""
    files = diffusers_files(cfg, parts)
    with atomic_folder(folder, overwrite) as tmp:
        for rel, content in files.items():
            with atomic_write(tmp / rel, "wb") as f:
                if rel.endswith(".safetensors"):
                    write_safetensors(f, content, SAFETENSORS_METADATA)
                else:
                    text = content if isinstance(content, str) else json.dumps(content, indent=2, sort_keys=True)
                    f.write(text.encode("utf-8"))
    return Path(folder)


# -- conversion -----------------------------------------------------------------------------------------------------

def read_checkpoint(path: str | Path, fmt: str = "auto", prediction_type: str | None = None,
                    use_ema: bool | None = None, overrides: list[str] = ()) -> tuple[LatentDiffusionConfig, Parts]:
    """``(config, parts)`` of a checkpoint in any supported format (``fmt``: auto | sd | diffusers | latentdiff)."""
    found = detect_format(path)
    if fmt != "auto" and fmt != found:
        raise CheckpointError(f"{path} was given as format {fmt!r} but looks like {found!r}")
    if found != "latentdiff":
        return read_stable_diffusion(path, prediction_type, use_ema, overrides)
    if use_ema or prediction_type or overrides:
        raise CheckpointError(f"{path} is a latentdiff model file: EMA choice, prediction type and overrides apply "
                              f"to Stable Diffusion checkpoints only")
    cfg, parts, _ = load_model_file(path)
    if not isinstance(cfg, LatentDiffusionConfig):
        raise CheckpointError(f"{path} holds a {cfg.type!r} model; only latent_diffusion models can be converted")
    return cfg, {k: parts[k] for k in ("unet", "autoencoder", "text_encoder")}


def convert_checkpoint(src: str | Path, dst: str | Path, to: str, fmt: str = "auto", half_precision: bool = False,
                       use_ema: bool | None = None, overwrite: bool = False, prediction_type: str | None = None,
                       overrides: list[str] = ()) -> Path:
    """Read ``src`` (any format) and write it to ``dst`` as ``to``: sd | diffusers | latentdiff."""
    src, dst = Path(src), Path(dst)
    if to not in FORMATS:
        raise ValueError(f"to={to!r} is not one of {list(FORMATS)}")
    if to != "diffusers" and dst.suffix != ".safetensors":
        raise ValueError(f"{dst}: the {to} format is written as a .safetensors file")
    if dst.exists() and dst.resolve() == src.resolve():
        raise ValueError(f"{dst} is the source itself")
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} exists; refusing to overwrite it (pass --overwrite)")
    cfg, parts = read_checkpoint(src, fmt, prediction_type, use_ema, overrides)
    if half_precision:
        parts = half(parts)
    if to == "sd":
        return save_sd_single_file(dst, cfg, parts, overwrite)
    if to == "diffusers":
        return save_diffusers_folder(dst, cfg, parts, overwrite)
    return save_model_file(dst, cfg, parts, overwrite=overwrite, extra_metadata={"name": dst.stem})
