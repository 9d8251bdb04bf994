"""Stable Diffusion VAE: diffusers <-> CompVis (ours) parameter names and configs.

Key correspondence (``i`` = level, ``n`` = number of levels; diffusers stores the decoder levels in reverse):

    diffusers                                        CompVis / latentdiff
    encoder.down_blocks.{i}.resnets.{j}.*            encoder.down.{i}.block.{j}.*   (conv_shortcut -> nin_shortcut)
    encoder.down_blocks.{i}.attentions.{j}.*         encoder.down.{i}.attn.{j}.*
    encoder.down_blocks.{i}.downsamplers.0.conv      encoder.down.{i}.downsample.conv
    decoder.up_blocks.{n-1-i}.resnets.{j}.*          decoder.up.{i}.block.{j}.*
    decoder.up_blocks.{n-1-i}.attentions.{j}.*       decoder.up.{i}.attn.{j}.*
    decoder.up_blocks.{n-1-i}.upsamplers.0.conv      decoder.up.{i}.upsample.conv
    {enc,dec}oder.mid_block.resnets.{0,1}            {enc,dec}oder.mid.block_{1,2}
    {enc,dec}oder.mid_block.attentions.0             {enc,dec}oder.mid.attn_1
    conv_norm_out                                    norm_out
    attention group_norm, to_q, to_k, to_v, to_out.0 norm, q, k, v, proj_out   (Linear (C, C) <-> 1x1 conv (C, C, 1, 1))

Older diffusers folders name the attention projections query, key, value, proj_attn; they are accepted too.
VAEs saved without quant convs (``use_quant_conv=False``, e.g. SD3 and FLUX) get identity 1x1 convs, which compute
exactly the same function.
"""

from __future__ import annotations

import re

import torch

from latentdiff.config import AutoencoderKLConfig

_TOP = {"conv_in": "conv_in", "conv_norm_out": "norm_out", "conv_out": "conv_out"}
_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_ATTN_LEGACY = {"query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}
_SAMPLER = {"conv": "conv"}
_TOP_INV, _RESNET_INV, _ATTN_INV = ({v: k for k, v in t.items()} for t in (_TOP, _RESNET, _ATTN))
_ATTN_PROJECTION_WEIGHT = re.compile(r".+\.(attn_1|attn\.\d+)\.(q|k|v|proj_out)\.weight")  # CompVis names

# diffusers.AutoencoderKL defaults, used for keys a config dict leaves out.
_DIFFUSERS_DEFAULTS = {"in_channels": 3, "out_channels": 3, "block_out_channels": [64], "layers_per_block": 1,
                       "act_fn": "silu", "latent_channels": 4, "norm_num_groups": 32, "scaling_factor": 0.18215,
                       "shift_factor": None, "latents_mean": None, "latents_std": None,
                       "mid_block_add_attention": True}
_DOWN, _ATTN_DOWN = "DownEncoderBlock2D", "AttnDownEncoderBlock2D"
_UP, _ATTN_UP = "UpDecoderBlock2D", "AttnUpDecoderBlock2D"


def _leaf(table: dict[str, str], rest: str, key: str) -> str:
    """Rename ``module.param`` (module may contain dots, e.g. ``to_out.0``) through ``table``."""
    module, _, param = rest.rpartition(".")
    if module not in table or param not in ("weight", "bias"):
        raise ValueError(f"unrecognised autoencoder key {key!r}")
    return f"{table[module]}.{param}"


def _num_levels(sd: dict[str, torch.Tensor], pattern: str) -> int:
    levels = {int(m[1]) for k in sd if (m := re.match(pattern, k))}
    if not levels:
        raise ValueError(f"no keys match {pattern!r}: not an autoencoder state dict")
    return max(levels) + 1


# ---------------------------------------------------------------------------------------------------------------
# diffusers -> CompVis
# ---------------------------------------------------------------------------------------------------------------


def _key_from_diffusers(key: str, n: int) -> str:
    if re.fullmatch(r"(quant_conv|post_quant_conv)\.(weight|bias)", key):
        return key
    if m := re.fullmatch(r"(encoder|decoder)\.(conv_in|conv_norm_out|conv_out)\.(weight|bias)", key):
        return f"{m[1]}.{_TOP[m[2]]}.{m[3]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.([01])\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{_leaf(_RESNET, m[3], key)}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", key):
        return f"{m[1]}.mid.attn_1.{_leaf(_ATTN | _ATTN_LEGACY, m[2], key)}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        kind, table = ("block", _RESNET) if m[2] == "resnets" else ("attn", _ATTN | _ATTN_LEGACY)
        return f"encoder.down.{m[1]}.{kind}.{m[3]}.{_leaf(table, m[4], key)}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.+)", key):
        return f"encoder.down.{m[1]}.downsample.{_leaf(_SAMPLER, m[2], key)}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        kind, table = ("block", _RESNET) if m[2] == "resnets" else ("attn", _ATTN | _ATTN_LEGACY)
        return f"decoder.up.{n - 1 - int(m[1])}.{kind}.{m[3]}.{_leaf(table, m[4], key)}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)", key):
        return f"decoder.up.{n - 1 - int(m[1])}.upsample.{_leaf(_SAMPLER, m[2], key)}"
    raise ValueError(f"unrecognised diffusers autoencoder key {key!r}")


def _is_attn_projection_weight(compvis_key: str) -> bool:
    return _ATTN_PROJECTION_WEIGHT.fullmatch(compvis_key) is not None


def vae_state_dict_from_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers ``AutoencoderKL`` state dict -> CompVis names (loadable into our :class:`AutoencoderKL`).

    Tensors are shared with ``sd`` (views, no copies). Unknown keys raise ``ValueError``.
    """
    n = _num_levels(sd, r"decoder\.up_blocks\.(\d+)\.")
    for required in ("encoder.conv_out.weight", "decoder.conv_in.weight"):
        if required not in sd:
            raise ValueError(f"not a diffusers autoencoder state dict: missing {required!r}")
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        new = _key_from_diffusers(key, n)
        if _is_attn_projection_weight(new) and value.dim() == 2:
            value = value[:, :, None, None]  # Linear (C, C) -> 1x1 conv (C, C, 1, 1)
        out[new] = value
    # use_quant_conv=False / use_post_quant_conv=False: identity 1x1 convs are the same function.
    if "quant_conv.weight" not in out:
        moments = out["encoder.conv_out.weight"]  # (2*z_channels, C, 3, 3)
        out.update(_identity_conv("quant_conv", moments.shape[0], moments))
    if "post_quant_conv.weight" not in out:
        latent_in = out["decoder.conv_in.weight"]  # (C, z_channels, 3, 3)
        out.update(_identity_conv("post_quant_conv", latent_in.shape[1], latent_in))
    return out


def _identity_conv(name: str, channels: int, like: torch.Tensor) -> dict[str, torch.Tensor]:
    eye = torch.eye(channels, dtype=like.dtype, device=like.device)[:, :, None, None]  # (C, C, 1, 1)
    return {f"{name}.weight": eye, f"{name}.bias": torch.zeros(channels, dtype=like.dtype, device=like.device)}


# ---------------------------------------------------------------------------------------------------------------
# CompVis -> diffusers
# ---------------------------------------------------------------------------------------------------------------


def _key_to_diffusers(key: str, n: int) -> str:
    if re.fullmatch(r"(quant_conv|post_quant_conv)\.(weight|bias)", key):
        return key
    if m := re.fullmatch(r"(encoder|decoder)\.(conv_in|norm_out|conv_out)\.(weight|bias)", key):
        return f"{m[1]}.{_TOP_INV[m[2]]}.{m[3]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid\.block_([12])\.(.+)", key):
        return f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.{_leaf(_RESNET_INV, m[3], key)}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid\.attn_1\.(.+)", key):
        return f"{m[1]}.mid_block.attentions.0.{_leaf(_ATTN_INV, m[2], key)}"
    if m := re.fullmatch(r"encoder\.down\.(\d+)\.(block|attn)\.(\d+)\.(.+)", key):
        kind, table = ("resnets", _RESNET_INV) if m[2] == "block" else ("attentions", _ATTN_INV)
        return f"encoder.down_blocks.{m[1]}.{kind}.{m[3]}.{_leaf(table, m[4], key)}"
    if m := re.fullmatch(r"encoder\.down\.(\d+)\.downsample\.(.+)", key):
        return f"encoder.down_blocks.{m[1]}.downsamplers.0.{_leaf(_SAMPLER, m[2], key)}"
    if m := re.fullmatch(r"decoder\.up\.(\d+)\.(block|attn)\.(\d+)\.(.+)", key):
        kind, table = ("resnets", _RESNET_INV) if m[2] == "block" else ("attentions", _ATTN_INV)
        return f"decoder.up_blocks.{n - 1 - int(m[1])}.{kind}.{m[3]}.{_leaf(table, m[4], key)}"
    if m := re.fullmatch(r"decoder\.up\.(\d+)\.upsample\.(.+)", key):
        return f"decoder.up_blocks.{n - 1 - int(m[1])}.upsamplers.0.{_leaf(_SAMPLER, m[2], key)}"
    raise ValueError(f"unrecognised autoencoder key {key!r}")


def vae_state_dict_to_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CompVis (our) autoencoder state dict -> diffusers ``AutoencoderKL`` names (views, no copies)."""
    n = _num_levels(sd, r"decoder\.up\.(\d+)\.")
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if _is_attn_projection_weight(key) and value.dim() == 4:
            value = value[:, :, 0, 0]  # 1x1 conv (C, C, 1, 1) -> Linear (C, C)
        out[_key_to_diffusers(key, n)] = value
    return out


# ---------------------------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------------------------


def autoencoder_config_from_diffusers(config: dict) -> AutoencoderKLConfig:
    """diffusers ``AutoencoderKL`` config (its ``config.json`` as a dict) -> :class:`AutoencoderKLConfig`."""
    c = _DIFFUSERS_DEFAULTS | dict(config)
    if c["act_fn"] != "silu":
        raise ValueError(f"diffusers autoencoder act_fn={c['act_fn']!r} is not supported (only 'silu')")
    if c["latents_mean"] is not None or c["latents_std"] is not None:
        raise ValueError("diffusers autoencoder configs with per-channel latents_mean/latents_std are not supported "
                         "(only the scalar scaling_factor and shift_factor)")
    widths = [int(w) for w in c["block_out_channels"]]
    ch = widths[0]
    if any(w % ch for w in widths):
        raise ValueError(f"block_out_channels={widths} are not all multiples of the first entry {ch}")
    n = len(widths)
    down = list(c.get("down_block_types", [_DOWN] * n))
    up = list(c.get("up_block_types", [_UP] * n))
    if len(down) != n or len(up) != n:
        raise ValueError(f"down_block_types={down} and up_block_types={up} must both have "
                         f"len(block_out_channels)={n} entries")
    for name, types_, allowed in (("down_block_types", down, (_DOWN, _ATTN_DOWN)),
                                  ("up_block_types", up, (_UP, _ATTN_UP))):
        bad = [t for t in types_ if t not in allowed]
        if bad:
            raise ValueError(f"diffusers autoencoder {name} {bad} are not supported (only {list(allowed)})")
    attn_down = [2**i for i, t in enumerate(down) if t == _ATTN_DOWN]
    attn_up = [2**i for i, t in enumerate(reversed(up)) if t == _ATTN_UP]
    if attn_down != attn_up:
        raise ValueError(f"encoder and decoder attention levels differ (down_block_types={down}, "
                         f"up_block_types={up}); latentdiff shares attn_resolutions between them")
    shift = c["shift_factor"]
    return AutoencoderKLConfig(
        in_channels=int(c["in_channels"]), out_channels=int(c["out_channels"]),
        z_channels=int(c["latent_channels"]), embed_dim=int(c["latent_channels"]),
        ch=ch, ch_mult=[w // ch for w in widths], num_res_blocks=int(c["layers_per_block"]),
        attn_resolutions=attn_down, mid_attention=bool(c["mid_block_add_attention"]),
        norm_num_groups=int(c["norm_num_groups"]), scaling_factor=float(c["scaling_factor"]),
        shift_factor=0.0 if shift is None else float(shift))


def autoencoder_config_to_diffusers(cfg: AutoencoderKLConfig) -> dict:
    """:class:`AutoencoderKLConfig` -> keyword arguments of ``diffusers.AutoencoderKL``."""
    if cfg.embed_dim != cfg.z_channels:
        raise ValueError(f"diffusers' AutoencoderKL needs embed_dim == z_channels, got embed_dim={cfg.embed_dim}, "
                         f"z_channels={cfg.z_channels}")
    n = len(cfg.ch_mult)
    attn = set(cfg.attn_resolutions)
    return {
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "down_block_types": [_ATTN_DOWN if 2**i in attn else _DOWN for i in range(n)],
        "up_block_types": [_ATTN_UP if 2**i in attn else _UP for i in reversed(range(n))],
        "block_out_channels": [cfg.ch * m for m in cfg.ch_mult],
        "layers_per_block": cfg.num_res_blocks,
        "act_fn": "silu",
        "latent_channels": cfg.z_channels,
        "norm_num_groups": cfg.norm_num_groups,
        "scaling_factor": cfg.scaling_factor,
        "shift_factor": cfg.shift_factor if cfg.shift_factor != 0.0 else None,
        "mid_block_add_attention": cfg.mid_attention,
    }


def autoencoder_config_from_state_dict(sd: dict[str, torch.Tensor], *, scaling_factor: float = 0.18215,
                                       shift_factor: float = 0.0, norm_num_groups: int = 32,
                                       prefix: str = "") -> AutoencoderKLConfig:
    """Infer the architecture from CompVis weight shapes (keys under ``prefix``, e.g. ``"first_stage_model."``).

    The latent scale/shift and the GroupNorm group count are not recorded in the weights: pass them.
    """
    sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}

    def get(key: str) -> torch.Tensor:
        if key not in sd:
            raise ValueError(f"not a CompVis KL autoencoder state dict: missing {prefix + key!r}")
        return sd[key]

    ch, in_channels = get("encoder.conv_in.weight").shape[:2]
    n = _num_levels(sd, r"encoder\.down\.(\d+)\.")
    widths = [get(f"encoder.down.{i}.block.0.conv2.weight").shape[0] for i in range(n)]
    if any(w % ch for w in widths):
        raise ValueError(f"encoder level widths {widths} are not multiples of encoder.conv_in width {ch}")
    num_res_blocks = sum(1 for k in sd if re.fullmatch(r"encoder\.down\.0\.block\.\d+\.conv1\.weight", k))
    z_channels = get("decoder.conv_in.weight").shape[1]
    embed_dim = get("post_quant_conv.weight").shape[1]
    moments, quant = get("encoder.conv_out.weight").shape[0], get("quant_conv.weight").shape[0]
    if moments != 2 * z_channels or quant != 2 * embed_dim:
        raise ValueError(f"encoder.conv_out / quant_conv have {moments} / {quant} output channels; a KL autoencoder "
                         f"with z_channels={z_channels}, embed_dim={embed_dim} has {2 * z_channels} / {2 * embed_dim}")
    return AutoencoderKLConfig(
        in_channels=int(in_channels), out_channels=int(get("decoder.conv_out.weight").shape[0]),
        z_channels=int(z_channels), embed_dim=int(embed_dim), ch=int(ch), ch_mult=[int(w // ch) for w in widths],
        num_res_blocks=num_res_blocks,
        attn_resolutions=[2**i for i in range(n) if f"encoder.down.{i}.attn.0.q.weight" in sd],
        mid_attention="encoder.mid.attn_1.q.weight" in sd, norm_num_groups=norm_num_groups,
        scaling_factor=scaling_factor, shift_factor=shift_factor)
