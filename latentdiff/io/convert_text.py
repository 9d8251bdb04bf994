"""Text encoder weights: OpenCLIP <-> transformers key conversion, and configs read from weights or HF configs.

OpenCLIP text tower keys (SD 2.x single files, under ``cond_stage_model.model.``) and transformers
``CLIPTextModel`` keys (SD 1.x single files under ``cond_stage_model.transformer.``, diffusers ``text_encoder/``):

    token_embedding.weight                      text_model.embeddings.token_embedding.weight
    positional_embedding                        text_model.embeddings.position_embedding.weight
    transformer.resblocks.{i}.ln_1.*            text_model.encoder.layers.{i}.layer_norm1.*
    transformer.resblocks.{i}.attn.in_proj_*    text_model.encoder.layers.{i}.self_attn.{q,k,v}_proj.*  (fused qkv)
    transformer.resblocks.{i}.attn.out_proj.*   text_model.encoder.layers.{i}.self_attn.out_proj.*
    transformer.resblocks.{i}.ln_2.*            text_model.encoder.layers.{i}.layer_norm2.*
    transformer.resblocks.{i}.mlp.c_fc.*        text_model.encoder.layers.{i}.mlp.fc1.*
    transformer.resblocks.{i}.mlp.c_proj.*      text_model.encoder.layers.{i}.mlp.fc2.*
    ln_final.*                                  text_model.final_layer_norm.*
    text_projection (W, D)                      text_projection.weight (D, W)  (CLIPTextModelWithProjection)

An OpenCLIP tower converted to transformers needs ``hidden_act="gelu"`` (OpenAI CLIP uses quick_gelu).
diffusers' Stable Diffusion 2 folders store the tower so, without its last block (23 of 24): their
``last_hidden_state`` is SD 2's penultimate output, so :func:`text_config_from_hf` maps them to
``type="clip", layers=23, layer="last"``.
"""

from __future__ import annotations

import re

import torch

from latentdiff.config import TextEncoderConfig

# per-block renames OpenCLIP -> transformers (the fused in_proj is split separately)
_BLOCK = {
    "ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
}
_TOP = {
    "token_embedding.weight": "embeddings.token_embedding.weight",
    "positional_embedding": "embeddings.position_embedding.weight",
    "ln_final.weight": "final_layer_norm.weight", "ln_final.bias": "final_layer_norm.bias",
}
_OPENCLIP_BLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)")
_OPENCLIP_FUSED = re.compile(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)")
_HF_BLOCK = re.compile(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")
_HF_QKV = re.compile(r"self_attn\.([qkv])_proj")
_NOT_WEIGHTS = ("logit_scale", "attn_mask", "embeddings.position_ids")  # buffers and CLIP's contrastive scale


def openclip_text_to_hf(sd: dict[str, torch.Tensor], with_projection: bool = False) -> dict[str, torch.Tensor]:
    """OpenCLIP text tower state dict -> transformers ``CLIPTextModel`` keys (``text_model.*``).

    ``with_projection`` also writes ``text_projection.weight`` (``CLIPTextModelWithProjection``); otherwise the
    projection, which the U-Net never sees, is dropped. Unknown keys are errors.
    """
    hf: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in sd.items():
        fused = _OPENCLIP_FUSED.fullmatch(key)
        block = _OPENCLIP_BLOCK.fullmatch(key)
        if fused:
            i, kind = fused.groups()
            for name, part in zip("qkv", value.chunk(3, dim=0)):  # in_proj stacks [W_q; W_k; W_v]: (3W, W)
                hf[f"text_model.encoder.layers.{i}.self_attn.{name}_proj.{kind}"] = part.clone()
        elif block and block.group(2) in _BLOCK:
            i, module, kind = block.groups()
            hf[f"text_model.encoder.layers.{i}.{_BLOCK[module]}.{kind}"] = value
        elif key in _TOP:
            hf[f"text_model.{_TOP[key]}"] = value
        elif key == "text_projection":
            if with_projection:
                hf["text_projection.weight"] = value.t().contiguous()  # x @ P (W, D) == Linear weight P^T (D, W)
        elif not key.endswith(_NOT_WEIGHTS):
            unknown.append(key)
    if unknown:
        raise ValueError(f"not OpenCLIP text tower keys: {sorted(unknown)[:8]}")
    return hf


def hf_text_to_openclip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers ``CLIPTextModel`` state dict (keys with or without ``text_model.``) -> OpenCLIP tower keys.

    ``text_projection.weight`` (``CLIPTextModelWithProjection``), when present, becomes ``text_projection``.
    Unknown keys are errors.
    """
    top = {hf: oc for oc, hf in _TOP.items()}
    block = {hf: oc for oc, hf in _BLOCK.items()}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in sd.items():
        name = key.removeprefix("text_model.")
        match = _HF_BLOCK.fullmatch(name)
        if match and _HF_QKV.fullmatch(match.group(2)):
            i, module, kind = match.groups()
            qkv.setdefault((i, kind), {})[module[len("self_attn.")]] = value
        elif match and match.group(2) in block:
            i, module, kind = match.groups()
            out[f"transformer.resblocks.{i}.{block[module]}.{kind}"] = value
        elif name in top:
            out[top[name]] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.t().contiguous()
        elif not key.endswith(_NOT_WEIGHTS):
            unknown.append(key)
    if unknown:
        raise ValueError(f"not transformers CLIPTextModel keys: {sorted(unknown)[:8]}")
    for (i, kind), parts in qkv.items():
        if sorted(parts) != ["k", "q", "v"]:
            raise ValueError(f"layer {i}: self_attn {kind} needs q_proj, k_proj and v_proj, found {sorted(parts)}")
        out[f"transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def text_state_dict_from_single_file(sd: dict[str, torch.Tensor],
                                     prefix: str = "cond_stage_model.") -> dict[str, torch.Tensor]:
    """The text encoder's part of a Stable Diffusion single file, with keys as our encoders name them.

    SD 1.x ``cond_stage_model.transformer.text_model.*`` -> ``transformer.text_model.*`` (type ``clip``), SD 2.x
    ``cond_stage_model.model.*`` -> ``model.*`` (type ``openclip``). Non-weights are dropped: ``position_ids`` (a
    buffer transformers no longer saves) and OpenCLIP's ``logit_scale`` / ``attn_mask``.
    """
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix) and not k.endswith(_NOT_WEIGHTS)}


def text_config_from_hf(config_dict: dict, **overrides) -> TextEncoderConfig:
    """A ``clip`` TextEncoderConfig from a transformers ``CLIPTextConfig`` dict (or a ``CLIPConfig`` dict with
    ``text_config``), e.g. a diffusers ``text_encoder/config.json``. ``overrides`` set other fields
    (``pretrained=...``, ``layer=...``). Missing keys take ``CLIPTextConfig``'s defaults."""
    c = config_dict.get("text_config", config_dict)
    width = c.get("hidden_size", 512)
    fields = dict(
        type="clip", width=width, layers=c.get("num_hidden_layers", 12), heads=c.get("num_attention_heads", 8),
        mlp_ratio=c.get("intermediate_size", 2048) / width, context_length=c.get("max_position_embeddings", 77),
        vocab_size=c.get("vocab_size", 49408), act=c.get("hidden_act", "quick_gelu"), layer="last")
    return TextEncoderConfig(**{**fields, **overrides})


def _find(sd: dict[str, torch.Tensor], suffix: str, kind: str) -> tuple[str, torch.Tensor]:
    """(prefix, tensor) of the one key ending in ``suffix``."""
    hits = [k for k in sd if k == suffix or k.endswith("." + suffix)]
    if len(hits) != 1:
        raise ValueError(f"cannot read a {kind} text encoder config: expected one key ending in {suffix!r}, "
                         f"found {hits[:4]}")
    return hits[0][: -len(suffix)], sd[hits[0]]


def _count(sd: dict[str, torch.Tensor], prefix: str) -> int:
    """Number of numbered blocks ``{prefix}{i}.*``."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(m.group(1)) for k in sd if (m := pattern.match(k))}
    return max(indices) + 1 if indices else 0


def text_config_from_state_dict(sd: dict[str, torch.Tensor], kind: str, **overrides) -> TextEncoderConfig:
    """Infer a TextEncoderConfig of type ``kind`` (clip | openclip | trainable) from weights.

    Keys may carry any prefix (``transformer.text_model.``, ``model.``, ``cond_stage_model.model.``...). Width,
    layers, vocabulary, context and MLP ratio are read off the tensors. Heads are not in the weights: they are
    guessed as width / 64 (every released CLIP and OpenCLIP text tower), else 1. Defaults: ``clip`` is OpenAI CLIP
    (quick_gelu, last layer, SD 1.x), ``openclip`` is SD 2.x (gelu, penultimate), ``trainable`` gelu, last.
    ``overrides`` replace any field (``heads=``, ``act=``, ``layer=``...).
    """
    if kind == "clip":
        prefix, emb = _find(sd, "embeddings.token_embedding.weight", kind)
        base = prefix + "encoder.layers."
        context = _find(sd, "embeddings.position_embedding.weight", kind)[1].shape[0]
        fc1 = sd.get(base + "0.mlp.fc1.weight")
        defaults = dict(act="quick_gelu", layer="last")
    elif kind == "openclip":
        prefix, emb = _find(sd, "token_embedding.weight", kind)
        base = prefix + "transformer.resblocks."
        context = _find(sd, "positional_embedding", kind)[1].shape[0]
        fc1 = sd.get(base + "0.mlp.c_fc.weight")
        defaults = dict(act="gelu", layer="penultimate")
    elif kind == "trainable":
        prefix, emb = _find(sd, "token_embedding.weight", kind)
        base = prefix + "blocks."
        context = _find(sd, "positional_embedding", kind)[1].shape[0]
        fc1 = sd.get(base + "0.mlp.0.weight")
        defaults = dict(act="gelu", layer="last")
    else:
        raise ValueError(f"kind={kind!r} is not one of ['clip', 'openclip', 'trainable']")
    vocab, width = emb.shape
    layers = _count(sd, base)
    if layers == 0 or fc1 is None:
        raise ValueError(f"cannot read a {kind} text encoder config: no blocks under {base!r}")
    fields = dict(type=kind, width=width, layers=layers, heads=width // 64 if width % 64 == 0 else 1,
                  mlp_ratio=fc1.shape[0] / width, context_length=context, vocab_size=vocab, **defaults)
    return TextEncoderConfig(**{**fields, **overrides})
