"""Stable Diffusion U-Net: CompVis (``openaimodel``, our layout) <-> diffusers ``UNet2DConditionModel``.

Configs:  :func:`unet_config_from_diffusers`, :func:`unet_config_to_diffusers`, and
:func:`unet_config_from_state_dict` (read the architecture off CompVis-layout weight shapes).
Weights:  :func:`unet_state_dict_from_diffusers`, :func:`unet_state_dict_to_diffusers`, and
:func:`extract_unet_state_dict` (the ``model.diffusion_model.*`` part of an SD single-file checkpoint).

Heads. diffusers' ``attention_head_dim`` is, for these models, the number of heads per block (a historical
misnomer, diffusers issue #2011): SD 1.x has ``attention_head_dim=8`` = 8 heads at every level, which is our
``num_heads=8``; SD 2.x has ``attention_head_dim=[5, 10, 20, 20]`` with ``block_out_channels=[320, 640, 1280,
1280]``, i.e. heads of constant width 64, which is our ``num_head_channels=64``.

Module correspondence (R = num_res_blocks, n = len(channel_mult), b = block index in diffusers' order):

    time_embed.0 / .2                     time_embedding.linear_1 / linear_2
    input_blocks.0.0                      conv_in
    input_blocks.{1+b(R+1)+r}.0 / .1      down_blocks.{b}.resnets.{r} / attentions.{r}
    input_blocks.{(b+1)(R+1)}.0.op        down_blocks.{b}.downsamplers.0.conv
    middle_block.0 / .1 / .2              mid_block.resnets.0 / attentions.0 / resnets.1
    output_blocks.{b(R+1)+r}.0 / .1       up_blocks.{b}.resnets.{r} / attentions.{r}
    output_blocks.{b(R+1)+R}.{1|2}.conv   up_blocks.{b}.upsamplers.0.conv (2 when the block has attention)
    out.0 / out.2                         conv_norm_out / conv_out
    ResBlock in_layers.0/.2, emb_layers.1, out_layers.0/.3, skip_connection
                                          norm1, conv1, time_emb_proj, norm2, conv2, conv_shortcut

Transformer internals (norm, proj_in, transformer_blocks.*, proj_out) have the same names on both sides.
``proj_in``/``proj_out`` weights are reshaped to the target's projection kind: (out, in, 1, 1) for 1x1
convolutions, (out, in) for linear layers.
"""

from __future__ import annotations

import re

import torch

from latentdiff.config import UNetConfig

COMPVIS_UNET_PREFIX = "model.diffusion_model."

_RESNET_NAMES = [("in_layers.0.", "norm1."), ("in_layers.2.", "conv1."), ("emb_layers.1.", "time_emb_proj."),
                 ("out_layers.0.", "norm2."), ("out_layers.3.", "conv2."), ("skip_connection.", "conv_shortcut.")]

# diffusers UNet2DConditionModel options this layout has no counterpart for, with the value they must have.
_DIFFUSERS_DEFAULTS = {
    "center_input_sample": False, "flip_sin_to_cos": True, "freq_shift": 0, "only_cross_attention": False,
    "downsample_padding": 1, "mid_block_scale_factor": 1, "act_fn": "silu", "norm_eps": 1e-5,
    "mid_block_type": "UNetMidBlock2DCrossAttn", "encoder_hid_dim": None, "encoder_hid_dim_type": None,
    "num_attention_heads": None, "dual_cross_attention": False, "class_embed_type": None,
    "addition_embed_type": None, "num_class_embeds": None, "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0, "time_embedding_type": "positional",
    "time_embedding_dim": None, "time_embedding_act_fn": None, "timestep_post_act": None,
    "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3, "attention_type": "default",
    "reverse_transformer_layers_per_block": None, "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
}


def _uniform(name: str, value, n: int):
    """A per-block diffusers option that must be one value for all blocks (int or list of equal ints)."""
    if isinstance(value, (list, tuple)):
        if len(value) != n or len(set(value)) != 1:
            raise ValueError(f"diffusers {name}={list(value)} must have {n} equal entries for this U-Net layout")
        return value[0]
    return value


def unet_config_from_diffusers(config: dict) -> UNetConfig:
    """UNetConfig from a diffusers ``UNet2DConditionModel.config`` (or its ``config.json`` as a dict)."""
    for key, default in _DIFFUSERS_DEFAULTS.items():
        value = config.get(key, default)
        if key == "only_cross_attention" and isinstance(value, (list, tuple)):
            value = any(value)
        if value != default:
            raise ValueError(f"diffusers U-Net option {key}={config[key]!r} is not supported (need {default!r})")
    channels = list(config.get("block_out_channels", (320, 640, 1280, 1280)))
    n = len(channels)
    down = list(config.get("down_block_types", ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)))
    up = list(config.get("up_block_types", ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3))
    known = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
    if len(down) != n or any(d not in known for d in down):
        raise ValueError(f"diffusers down_block_types={down} must be {n} of {sorted(known)}")
    attends = [known[d] for d in down]
    expected_up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attends)]
    if up != expected_up:
        raise ValueError(f"diffusers up_block_types={up} must mirror down_block_types, i.e. {expected_up}")
    model_channels = channels[0]
    if any(c % model_channels for c in channels):
        raise ValueError(f"diffusers block_out_channels={channels} must be multiples of the first entry")

    heads = config.get("attention_head_dim", 8)  # = heads per block, see the module docstring
    heads = list(heads) if isinstance(heads, (list, tuple)) else [heads] * n
    attn_levels = [i for i in range(n) if attends[i]] + [n - 1]  # the middle block attends at the last width
    if len({heads[i] for i in attn_levels}) == 1:
        head_kwargs = {"num_heads": heads[n - 1], "num_head_channels": None}
    elif len({channels[i] // heads[i] for i in attn_levels}) == 1:
        head_kwargs = {"num_heads": None, "num_head_channels": channels[n - 1] // heads[n - 1]}
    else:
        raise ValueError(f"diffusers attention_head_dim={heads} (heads per block) gives neither a constant head "
                         f"count nor a constant head width for block_out_channels={channels}")
    context_dim = _uniform("cross_attention_dim", config.get("cross_attention_dim", 1280), n)
    return UNetConfig(
        in_channels=config.get("in_channels", 4),
        out_channels=config.get("out_channels", 4),
        model_channels=model_channels,
        channel_mult=[c // model_channels for c in channels],
        num_res_blocks=_uniform("layers_per_block", config.get("layers_per_block", 2), n),
        attention_resolutions=[2**i for i in reversed(range(n)) if attends[i]],  # [4, 2, 1] as in SD's configs
        transformer_depth=_uniform("transformer_layers_per_block", config.get("transformer_layers_per_block", 1), n),
        context_dim=context_dim,
        use_linear_in_transformer=bool(config.get("use_linear_projection", False)),
        norm_num_groups=config.get("norm_num_groups", 32),
        dropout=float(config.get("dropout", 0.0)),
        **head_kwargs,
    )


def unet_config_to_diffusers(cfg: UNetConfig) -> dict:
    """Keyword arguments for diffusers ``UNet2DConditionModel`` with the same architecture as ``cfg``."""
    if cfg.patch_size != 1:
        raise ValueError(f"unet.patch_size={cfg.patch_size}: diffusers' UNet2DConditionModel has no patchified "
                         f"input, so this U-Net has no diffusers equivalent")
    n = len(cfg.channel_mult)
    channels = [cfg.model_channels * m for m in cfg.channel_mult]
    attends = [2**i in cfg.attention_resolutions for i in range(n)]
    for c in {channels[i] for i in range(n) if attends[i]} | {channels[-1]}:  # transformer widths
        if c % (cfg.num_heads or cfg.num_head_channels):
            raise ValueError(f"transformer width {c} is not divisible by num_heads={cfg.num_heads} / "
                             f"num_head_channels={cfg.num_head_channels}")
    if cfg.num_heads is not None:
        heads = cfg.num_heads
    else:  # constant head width -> head count per block; non-attention blocks get any valid count
        heads = [max(c // cfg.num_head_channels, 1) for c in channels]
    return {
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attends],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attends)],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "block_out_channels": channels,
        "layers_per_block": cfg.num_res_blocks,
        "attention_head_dim": heads,
        "cross_attention_dim": cfg.context_dim,
        "use_linear_projection": cfg.use_linear_in_transformer,
        "transformer_layers_per_block": cfg.transformer_depth,
        "norm_num_groups": cfg.norm_num_groups,
        "norm_eps": 1e-5,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "dropout": cfg.dropout,
    }


def _module_map(cfg: UNetConfig) -> dict[str, str]:
    """CompVis module prefix -> diffusers module prefix, every prefix ending with '.'."""
    R = cfg.num_res_blocks
    n = len(cfg.channel_mult)
    pairs = {"time_embed.0.": "time_embedding.linear_1.", "time_embed.2.": "time_embedding.linear_2.",
             "input_blocks.0.0.": "conv_in.", "out.0.": "conv_norm_out.", "out.2.": "conv_out."}

    def resnet(ours: str, theirs: str) -> None:
        pairs.update({ours + a: theirs + b for a, b in _RESNET_NAMES})

    for b in range(n):
        attends = 2**b in cfg.attention_resolutions
        for r in range(R):
            i = 1 + b * (R + 1) + r
            resnet(f"input_blocks.{i}.0.", f"down_blocks.{b}.resnets.{r}.")
            if attends:
                pairs[f"input_blocks.{i}.1."] = f"down_blocks.{b}.attentions.{r}."
        if b < n - 1:
            pairs[f"input_blocks.{(b + 1) * (R + 1)}.0.op."] = f"down_blocks.{b}.downsamplers.0.conv."
    resnet("middle_block.0.", "mid_block.resnets.0.")
    pairs["middle_block.1."] = "mid_block.attentions.0."
    resnet("middle_block.2.", "mid_block.resnets.1.")
    for b in range(n):
        level = n - 1 - b
        attends = 2**level in cfg.attention_resolutions
        for r in range(R + 1):
            i = b * (R + 1) + r
            resnet(f"output_blocks.{i}.0.", f"up_blocks.{b}.resnets.{r}.")
            if attends:
                pairs[f"output_blocks.{i}.1."] = f"up_blocks.{b}.attentions.{r}."
        if level > 0:
            pairs[f"output_blocks.{b * (R + 1) + R}.{2 if attends else 1}.conv."] = f"up_blocks.{b}.upsamplers.0.conv."
    return pairs


def _rename(sd: dict[str, torch.Tensor], prefixes: dict[str, str], linear_proj: bool,
            source: str) -> dict[str, torch.Tensor]:
    """Rename keys by their longest matching module prefix; reshape proj_in/proj_out weights."""
    by_length = sorted(prefixes, key=len, reverse=True)
    out, unknown = {}, []
    for key, value in sd.items():
        match = next((p for p in by_length if key.startswith(p)), None)
        if match is None:
            unknown.append(key)
            continue
        new_key = prefixes[match] + key[len(match):]
        if re.search(r"\.proj_(in|out)\.weight$", new_key):
            value = value.flatten(1) if linear_proj else value.reshape(*value.shape[:2], 1, 1)
        out[new_key] = value
    if unknown:
        raise ValueError(f"{len(unknown)} {source} U-Net key(s) do not fit this config, e.g. {unknown[:5]}")
    return out


def unet_state_dict_from_diffusers(sd: dict[str, torch.Tensor], cfg: UNetConfig) -> dict[str, torch.Tensor]:
    """diffusers ``UNet2DConditionModel`` state dict -> CompVis names (for :class:`UNetModel` with ``cfg``)."""
    to_ours = {theirs: ours for ours, theirs in _module_map(cfg).items()}
    return _rename(sd, to_ours, cfg.use_linear_in_transformer, "diffusers")


def unet_state_dict_to_diffusers(sd: dict[str, torch.Tensor], cfg: UNetConfig) -> dict[str, torch.Tensor]:
    """CompVis-named state dict -> diffusers ``UNet2DConditionModel(**unet_config_to_diffusers(cfg))`` names."""
    return _rename(sd, _module_map(cfg), cfg.use_linear_in_transformer, "CompVis")


def extract_unet_state_dict(checkpoint: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The U-Net of a Stable Diffusion single-file checkpoint: ``model.diffusion_model.*`` with the prefix
    stripped. A dict that already has bare U-Net keys is returned as is."""
    if "time_embed.0.weight" in checkpoint:
        return checkpoint
    n = len(COMPVIS_UNET_PREFIX)
    sd = {k[n:]: v for k, v in checkpoint.items() if k.startswith(COMPVIS_UNET_PREFIX)}
    if not sd:
        raise ValueError(f"no U-Net weights found: no key starts with {COMPVIS_UNET_PREFIX!r} "
                         "and there is no 'time_embed.0.weight'")
    return sd


def unet_config_from_state_dict(sd: dict[str, torch.Tensor], num_heads: int | None = None,
                                num_head_channels: int | None = None, norm_num_groups: int = 32) -> UNetConfig:
    """Infer the U-Net architecture from CompVis-layout weight shapes (prefixed or not).

    Channels, channel multipliers, residual blocks per level, attention levels, transformer depth, context
    width and linear-vs-conv projections are read off the weights. The head layout is not in the weights: pass
    ``num_heads`` or ``num_head_channels``; by default SD 1.x (context 768) gets ``num_heads=8`` and SD 2.x
    (context 1024) ``num_head_channels=64``. GroupNorm's group count is not in the weights either.
    """
    sd = extract_unet_state_dict(sd)
    try:
        model_channels = sd["time_embed.0.weight"].shape[1]
        in_channels = sd["input_blocks.0.0.weight"].shape[1]
        out_channels = sd["out.2.weight"].shape[0]
        mid = "middle_block.1."
        context_dim = sd[mid + "transformer_blocks.0.attn2.to_k.weight"].shape[1]
        use_linear = sd[mid + "proj_in.weight"].dim() == 2
    except KeyError as e:
        raise ValueError(f"not a Stable Diffusion U-Net state dict: missing {e.args[0]!r}") from None
    n_inputs = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("input_blocks."))
    ops = sorted(int(k.split(".")[1]) for k in sd if re.match(r"input_blocks\.\d+\.0\.op\.weight$", k))
    # n levels with R res blocks give 1 + nR + (n - 1) input blocks, the first Downsample at index R + 1.
    R = ops[0] - 1 if ops else n_inputs - 1
    n = len(ops) + 1
    if n_inputs != 1 + n * R + n - 1:
        raise ValueError(f"cannot read the U-Net layout: {n_inputs} input blocks with Downsample at {ops}")
    first_res = [f"input_blocks.{1 + level * (R + 1)}." for level in range(n)]
    channel_mult = [sd[p + "0.in_layers.2.weight"].shape[0] // model_channels for p in first_res]
    attention_resolutions = [2**level for level in reversed(range(n)) if first_res[level] + "1.proj_in.weight" in sd]
    depth = len({k.split(".")[3] for k in sd if k.startswith(mid + "transformer_blocks.")})
    if num_heads is None and num_head_channels is None:
        defaults = {768: (8, None), 1024: (None, 64)}
        if context_dim not in defaults:
            raise ValueError(f"context width {context_dim} has no Stable Diffusion default head layout: "
                             "pass num_heads or num_head_channels")
        num_heads, num_head_channels = defaults[context_dim]
    return UNetConfig(in_channels=in_channels, out_channels=out_channels, model_channels=model_channels,
                      channel_mult=channel_mult, num_res_blocks=R, attention_resolutions=attention_resolutions,
                      num_heads=num_heads, num_head_channels=num_head_channels, transformer_depth=depth,
                      context_dim=context_dim, use_linear_in_transformer=use_linear, norm_num_groups=norm_num_groups)
