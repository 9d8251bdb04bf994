"""VQ-Diffusion: diffusers <-> latentdiff parameter names and configs.

Transformer (diffusers' discrete ``Transformer2DModel``, ``norm_type="ada_norm"``) -> :class:`VQDiffusionTransformer`:

    diffusers                                          latentdiff
    latent_image_embedding.emb                         code_embed
    latent_image_embedding.{height,width}_emb          {height,width}_embed
    transformer_blocks.{i}.norm{1,2}.emb / .linear     blocks.{i}.norm{1,2}.time_embed / .proj
    transformer_blocks.{i}.attn{1,2}.to_{q,k,v}        blocks.{i}.attn{1,2}.to_{q,k,v}
    transformer_blocks.{i}.attn{1,2}.to_out.0          blocks.{i}.attn{1,2}.to_out
    transformer_blocks.{i}.norm3                       blocks.{i}.norm3
    transformer_blocks.{i}.ff.net.0.proj / ff.net.2    blocks.{i}.ff.proj_in / ff.proj_out
    norm_out, out                                      norm_out, to_logits
    LearnedClassifierFreeSamplingEmbeddings.embeddings null_context

VQ autoencoder (diffusers ``VQModel`` with ``norm_type="group"``) -> :class:`VQAutoencoder`: encoder, decoder and
quant convs as the KL autoencoder (latentdiff/io/convert_vae.py), ``quantize.embedding.weight`` unchanged.
"""

from __future__ import annotations

import re

import torch

from latentdiff.config import VQModelConfig, VQTransformerConfig
from latentdiff.io.convert_vae import autoencoder_config_from_diffusers, vae_state_dict_from_diffusers

_TOP = {"latent_image_embedding.emb": "code_embed", "latent_image_embedding.height_emb": "height_embed",
        "latent_image_embedding.width_emb": "width_embed", "norm_out": "norm_out", "out": "to_logits"}
_BLOCK = {"norm1.emb": "norm1.time_embed", "norm1.linear": "norm1.proj",
          "norm2.emb": "norm2.time_embed", "norm2.linear": "norm2.proj", "norm3": "norm3",
          "ff.net.0.proj": "ff.proj_in", "ff.net.2": "ff.proj_out"}
_BLOCK |= {f"attn{a}.to_{p}": f"attn{a}.to_{p}" for a in (1, 2) for p in "qkv"}
_BLOCK |= {f"attn{a}.to_out.0": f"attn{a}.to_out" for a in (1, 2)}
_TOP_INV = {v: k for k, v in _TOP.items()}
_BLOCK_INV = {v: k for k, v in _BLOCK.items()}
_ACTIVATIONS = {"geglu-approximate": "gelu_sigmoid", "gelu": "gelu", "gelu-approximate": "gelu_tanh"}
_ACTIVATIONS_INV = {v: k for k, v in _ACTIVATIONS.items()}
# diffusers.VQModel defaults, for keys a config dict leaves out.
_VQ_DEFAULTS = {"in_channels": 3, "out_channels": 3, "block_out_channels": [64], "layers_per_block": 1,
                "act_fn": "silu", "latent_channels": 3, "num_vq_embeddings": 256, "norm_num_groups": 32,
                "vq_embed_dim": None, "norm_type": "group", "mid_block_add_attention": True}
_VQ_ONLY = ("num_vq_embeddings", "vq_embed_dim", "norm_type", "lookup_from_codebook", "force_upcast", "sample_size",
            "scaling_factor")  # VQModel keys that the KL autoencoder's config reader does not know


def _rename(key: str, top: dict[str, str], block: dict[str, str], block_in: str, block_out: str) -> str:
    module, _, param = key.rpartition(".")
    if module in top:
        return f"{top[module]}.{param}"
    if (m := re.fullmatch(rf"{re.escape(block_in)}\.(\d+)\.(.+)", module)) and m[2] in block:
        return f"{block_out}.{m[1]}.{block[m[2]]}.{param}"
    raise ValueError(f"unrecognised VQ-Diffusion transformer key {key!r}")


def transformer_state_dict_from_diffusers(sd: dict[str, torch.Tensor],
                                          null_context: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """diffusers ``Transformer2DModel`` (discrete) state dict -> :class:`VQDiffusionTransformer` (views, no copies).

    ``null_context``: ``LearnedClassifierFreeSamplingEmbeddings.embeddings`` (L, D), for a transformer built with
    ``learned_null_context=True``.
    """
    if "latent_image_embedding.emb.weight" not in sd:
        raise ValueError("not a discrete (VQ-Diffusion) Transformer2DModel state dict: "
                         "missing 'latent_image_embedding.emb.weight'")
    out = {_rename(k, _TOP, _BLOCK, "transformer_blocks", "blocks"): v for k, v in sd.items()}
    if null_context is not None:
        out["null_context"] = null_context
    return out


def transformer_state_dict_to_diffusers(
        sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """:class:`VQDiffusionTransformer` state dict -> (diffusers ``Transformer2DModel`` state dict, null context)."""
    rest = {k: v for k, v in sd.items() if k != "null_context"}
    return {_rename(k, _TOP_INV, _BLOCK_INV, "blocks", "transformer_blocks"): v for k, v in rest.items()}, \
        sd.get("null_context")


def transformer_config_from_diffusers(config: dict, learned_embeddings_config: dict | None = None,
                                      context_length: int = 77) -> VQTransformerConfig:
    """diffusers ``Transformer2DModel`` config (discrete input) -> :class:`VQTransformerConfig`.

    ``learned_embeddings_config``: the ``LearnedClassifierFreeSamplingEmbeddings`` config (``learnable``,
    ``hidden_size``, ``length``); without it, or when not learnable, the transformer gets no ``null_context``.
    """
    c = dict(config)
    if c.get("num_vector_embeds") is None:
        raise ValueError("diffusers Transformer2DModel config has no num_vector_embeds: not a VQ-Diffusion model")
    norm_type = c.get("norm_type", "layer_norm")
    if norm_type not in ("ada_norm", "layer_norm") or c.get("num_embeds_ada_norm") is None:
        raise ValueError(f"only norm_type='ada_norm' with num_embeds_ada_norm is supported, got norm_type="
                         f"{norm_type!r}, num_embeds_ada_norm={c.get('num_embeds_ada_norm')!r}")
    activation = c.get("activation_fn", "geglu")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation_fn={activation!r} is not supported (one of {sorted(_ACTIVATIONS)})")
    for flag in ("only_cross_attention", "double_self_attention", "upcast_attention"):
        if c.get(flag):
            raise ValueError(f"diffusers Transformer2DModel {flag}=True is not supported")
    if c.get("norm_elementwise_affine", True) is False:
        raise ValueError("diffusers Transformer2DModel norm_elementwise_affine=False is not supported")
    heads, head_dim = int(c.get("num_attention_heads", 16)), int(c.get("attention_head_dim", 88))
    learned = learned_embeddings_config or {}
    learnable = bool(learned.get("learnable", False))
    if learnable and learned.get("hidden_size") != c.get("cross_attention_dim"):
        raise ValueError(f"learned null embedding width {learned.get('hidden_size')!r} differs from "
                         f"cross_attention_dim={c.get('cross_attention_dim')!r}")
    return VQTransformerConfig(
        num_codes=int(c["num_vector_embeds"]) - 1, latent_size=int(c["sample_size"]), dim=heads * head_dim,
        heads=heads, depth=int(c.get("num_layers", 1)), context_dim=int(c["cross_attention_dim"]),
        context_length=int(learned["length"]) if learnable else context_length,
        num_timesteps=int(c["num_embeds_ada_norm"]), ff_activation=_ACTIVATIONS[activation],
        attention_bias=bool(c.get("attention_bias", False)), learned_null_context=learnable,
        dropout=float(c.get("dropout", 0.0)))


def transformer_config_to_diffusers(cfg: VQTransformerConfig) -> dict:
    """:class:`VQTransformerConfig` -> keyword arguments of diffusers' ``Transformer2DModel``."""
    if cfg.ff_mult != 4:
        raise ValueError(f"diffusers' Transformer2DModel has a fixed feed-forward multiplier 4, got {cfg.ff_mult}")
    return {"num_attention_heads": cfg.heads, "attention_head_dim": cfg.dim // cfg.heads,
            "num_layers": cfg.depth, "dropout": cfg.dropout, "cross_attention_dim": cfg.context_dim,
            "attention_bias": cfg.attention_bias, "sample_size": cfg.latent_size,
            "num_vector_embeds": cfg.num_codes + 1, "activation_fn": _ACTIVATIONS_INV[cfg.ff_activation],
            "num_embeds_ada_norm": cfg.num_timesteps, "norm_type": "ada_norm"}


def vq_model_state_dict_from_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers ``VQModel`` state dict -> :class:`VQAutoencoder` (views, no copies)."""
    if "quantize.embedding.weight" not in sd:
        raise ValueError("not a diffusers VQModel state dict: missing 'quantize.embedding.weight'")
    rest = {k: v for k, v in sd.items() if not k.startswith("quantize.")}
    unknown = sorted(set(sd) - set(rest) - {"quantize.embedding.weight"})
    if unknown:
        raise ValueError(f"unrecognised diffusers VQModel keys {unknown}")
    return vae_state_dict_from_diffusers(rest) | {"quantize.embedding.weight": sd["quantize.embedding.weight"]}


def vq_model_config_from_diffusers(config: dict) -> VQModelConfig:
    """diffusers ``VQModel`` config -> :class:`VQModelConfig` (``norm_type="group"`` only)."""
    c = _VQ_DEFAULTS | dict(config)
    if c["norm_type"] != "group":
        raise ValueError(f"diffusers VQModel norm_type={c['norm_type']!r} is not supported (only 'group')")
    stack = autoencoder_config_from_diffusers({k: v for k, v in c.items() if k not in _VQ_ONLY})
    embed_dim = c["vq_embed_dim"] if c["vq_embed_dim"] is not None else c["latent_channels"]
    return VQModelConfig(
        in_channels=stack.in_channels, out_channels=stack.out_channels, ch=stack.ch, ch_mult=stack.ch_mult,
        num_res_blocks=stack.num_res_blocks, attn_resolutions=stack.attn_resolutions,
        mid_attention=stack.mid_attention, z_channels=stack.z_channels, embed_dim=int(embed_dim),
        num_codes=int(c["num_vq_embeddings"]), norm_num_groups=stack.norm_num_groups)
