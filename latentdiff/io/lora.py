"""LoRA files: kohya / AUTOMATIC1111 and diffusers / PEFT layouts read onto our module names, kohya files written.

Layouts read (one file may hold U-Net and text-encoder LoRAs):

    kohya     lora_unet_{diffusers U-Net module, dots -> _}.lora_down.weight | .lora_up.weight | .alpha
              lora_te_{transformers CLIPTextModel module, dots -> _}...   (lora_te1_ too)
    diffusers unet.{module}.lora_A.weight | .lora_B.weight (PEFT), .lora.down.weight | .lora.up.weight,
              unet.{attention}.processor.to_{q,k,v,out}_lora.down.weight | .up.weight (attention processors),
              text_encoder.{module}.lora_A.weight ..., text_encoder.{module}.lora_linear_layer.down.weight ...,
              text_encoder.{layer}.self_attn.to_{q,k,v,out}_lora.down.weight | .up.weight

Module names are diffusers' (``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``) and transformers'
(``text_model.encoder.layers.0.self_attn.q_proj``); :func:`layer_names` maps them to ours through the same
conversion that loads checkpoints (:mod:`latentdiff.io.convert_unet`, :mod:`latentdiff.io.convert_text`). Without
an alpha, alpha = rank (factor 1), as diffusers does. Every key must land on a layer of the model: the others are
reported by name (:class:`ValueError`), never skipped.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from latentdiff.atomic import atomic_write
from latentdiff.io.checkpoint import CheckpointError, check_finite, read_state_dict
from latentdiff.io.convert_text import openclip_text_to_hf
from latentdiff.io.convert_unet import unet_state_dict_to_diffusers
from latentdiff.models.lora import LoRA, lora_layers, target_layers

COMPONENTS = ("unet", "text_encoder")
KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
_KOHYA = re.compile(r"(lora_unet|lora_te1?)_(.+)\.(lora_down\.weight|lora_up\.weight|alpha)")
_PEFT_SUFFIXES = {"lora_A.weight": "down", "lora_B.weight": "up", "lora.down.weight": "down", "lora.up.weight": "up",
                  "lora_linear_layer.down.weight": "down", "lora_linear_layer.up.weight": "up", "alpha": "alpha"}
_PROCESSOR = re.compile(r"(.+)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight")
_TEXT_ATTENTION = re.compile(r"(.+\.self_attn)\.to_(q|k|v|out)_lora\.(down|up)\.weight")  # older diffusers
SHOWN = 20  # unmatched keys named in an error


@dataclass
class LoRAWeights:
    """One layer's LoRA from a file: ``component`` (unet | text_encoder), ``module`` (our module name in it),
    ``down`` (r, in[, kh, kw]), ``up`` (out, r[, 1, 1]), ``alpha`` (None: the rank), ``keys`` (the file's keys)."""

    component: str
    module: str
    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None
    keys: tuple[str, ...]


def layer_names(unet: torch.nn.Module, text_encoder: torch.nn.Module | None) -> dict[str, dict[str, str]]:
    """For each component, reference module name (diffusers U-Net, transformers CLIPTextModel) -> our module name,
    over the layers LoRA can adapt (:func:`~latentdiff.models.lora.target_layers`)."""
    ours = list(target_layers(unet))
    meta = {f"{n}.weight": torch.empty(1, 1, device="meta") for n in ours}
    theirs = list(unet_state_dict_to_diffusers(meta, unet.cfg))  # same order, renamed
    names = {"unet": {t.removesuffix(".weight"): o for o, t in zip(ours, theirs)}, "text_encoder": {}}
    kind = getattr(getattr(text_encoder, "cfg", None), "type", None)
    for name in target_layers(text_encoder) if kind in ("clip", "openclip") else ():
        if kind == "clip" and name.startswith("transformer.text_model."):
            names["text_encoder"][name.removeprefix("transformer.")] = name
        elif kind == "openclip" and name.startswith("model."):
            try:  # the tower's linear layers (out_proj, c_fc, c_proj); its fused q/k/v is not a layer
                (hf,) = openclip_text_to_hf({name.removeprefix("model.") + ".weight": torch.empty(1, 1)})
            except ValueError:
                continue
            names["text_encoder"][hf.removesuffix(".weight")] = name
    return names


def _source_layer(key: str) -> tuple[str, str, str, str] | None:
    """(layout, component, source module name, part: down | up | alpha) of one file key, or None."""
    if m := _KOHYA.fullmatch(key):
        prefix, flat, suffix = m.groups()
        part = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}[suffix]
        return "kohya", "unet" if prefix == "lora_unet" else "text_encoder", flat, part
    if m := _PROCESSOR.fullmatch(key):
        attention, proj, part = m.groups()
        module = f"{attention}.{proj}.0" if proj == "to_out" else f"{attention}.{proj}"
        component, module = _split_component(module)
        return "diffusers", component, module, part
    if m := _TEXT_ATTENTION.fullmatch(key):
        attention, proj, part = m.groups()
        component, module = _split_component(f"{attention}.{proj}_proj")
        return "diffusers", component, module, part
    for suffix, part in _PEFT_SUFFIXES.items():
        if key.endswith("." + suffix):
            component, module = _split_component(key[: -len(suffix) - 1])
            return "diffusers", component, module, part
    return None


def _split_component(module: str) -> tuple[str, str]:
    for component in COMPONENTS:
        if module.startswith(component + "."):
            return component, module[len(component) + 1:]
    return ("text_encoder" if module.startswith("text_model.") else "unet"), module


def match_lora(tensors: dict[str, torch.Tensor], names: dict[str, dict[str, str]],
               source: str = "the LoRA file") -> list[LoRAWeights]:
    """Group a LoRA file's tensors by layer and map each layer to our module names (``names`` from
    :func:`layer_names`). ValueError naming every key that fits no layer of this model, or whose layer lacks its
    down or up weight."""
    kohya = {c: {theirs.replace(".", "_"): ours for theirs, ours in table.items()} for c, table in names.items()}
    groups: dict[tuple[str, str], dict[str, tuple[str, torch.Tensor]]] = {}
    unmatched = []
    for key, value in tensors.items():
        parsed = _source_layer(key)
        if parsed is None:
            unmatched.append(key)
            continue
        layout, component, module, part = parsed
        ours = (kohya if layout == "kohya" else names)[component].get(module)
        if ours is None:
            unmatched.append(key)
            continue
        groups.setdefault((component, ours), {})[part] = (key, value)
    found = []
    for (component, module), parts in groups.items():
        if "down" not in parts or "up" not in parts:
            unmatched += [key for key, _ in parts.values()]
            continue
        alpha = float(parts["alpha"][1].float().item()) if "alpha" in parts else None
        found.append(LoRAWeights(component, module, parts["down"][1], parts["up"][1], alpha,
                                 tuple(key for key, _ in parts.values())))
    if unmatched:
        unmatched.sort()
        more = f" and {len(unmatched) - SHOWN} more" if len(unmatched) > SHOWN else ""
        raise ValueError(f"{source}: {len(unmatched)} key(s) fit no layer of this model (a LoRA for another "
                         f"architecture, or a layout not supported): {unmatched[:SHOWN]}{more}")
    if not found:
        raise ValueError(f"{source} holds no LoRA weights")
    return found


def read_lora(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a LoRA file (.safetensors, or a pickle read with ``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"LoRA file {path} does not exist")
    try:
        tensors, _ = read_state_dict(path)
        check_finite(tensors, f"LoRA file {path}")
    except CheckpointError as e:
        raise ValueError(str(e)) from None
    return tensors


def lora_hash(path: str | Path) -> str:
    """AUTOMATIC1111's short LoRA hash: the first 12 hex digits of the SHA-256 of a .safetensors file's tensor
    data (the bytes after its header, the "addnet" hash, so editing metadata keeps it), or of a whole other file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if str(path).endswith(".safetensors"):
            (header,) = struct.unpack("<Q", f.read(8))
            f.seek(8 + header)
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()[:12]


def kohya_state_dict(modules: dict[str, torch.nn.Module], adapter: str,
                     names: dict[str, dict[str, str]]) -> dict[str, torch.Tensor]:
    """The kohya-format tensors of LoRA ``adapter`` in ``modules`` (component -> module with LoRA layers):
    ``lora_unet_*`` / ``lora_te_*`` ``.lora_down.weight``, ``.lora_up.weight`` and ``.alpha`` (float32)."""
    out = {}
    for component, module in modules.items():
        to_theirs = {ours: theirs for theirs, ours in names[component].items()}
        for name, layer in lora_layers(module).items():
            if adapter not in layer.adapters:
                continue
            lora: LoRA = layer.adapters[adapter]
            if name not in to_theirs:
                raise ValueError(f"{component} layer {name!r} has no kohya name (only CLIP text encoders and the "
                                 "Stable Diffusion U-Net layout have one)")
            stem = KOHYA_PREFIX[component] + to_theirs[name].replace(".", "_")
            out[f"{stem}.lora_down.weight"] = lora.down.detach().float().cpu().contiguous()
            out[f"{stem}.lora_up.weight"] = lora.up.detach().float().cpu().contiguous()
            out[f"{stem}.alpha"] = torch.tensor(lora.alpha, dtype=torch.float32)
    if not out:
        raise ValueError(f"no LoRA named {adapter!r} to write")
    return out


def save_kohya_lora(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None,
                    overwrite: bool = False) -> Path:
    """Write kohya-format tensors (:func:`kohya_state_dict`) as a .safetensors file, atomically, with kohya's
    ``ss_*`` metadata (``ss_network_module``, ``ss_network_dim``, ``ss_network_alpha``) plus ``metadata``."""
    from safetensors.torch import save as save_bytes

    path = Path(path)
    ranks = {v.shape[0] for k, v in tensors.items() if k.endswith(".lora_down.weight")}
    alphas = {float(v) for k, v in tensors.items() if k.endswith(".alpha")}
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(max(ranks)),
            "ss_network_alpha": f"{max(alphas):g}" if len(alphas) == 1 else "dynamic",
            **{k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}}
    with atomic_write(path, "wb", overwrite=overwrite) as f:
        f.write(save_bytes(tensors, metadata=meta))
    return path
