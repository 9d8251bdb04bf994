"""Pretrained CLIP text encoders: transformers' ``CLIPTextModel`` (Stable Diffusion 1.x) and the OpenCLIP text
tower (Stable Diffusion 2.x), behind the :class:`~latentdiff.models.text.TextEncoder` interface.

Parameter names match Stable Diffusion single files once their ``cond_stage_model.`` prefix is stripped:

    clip      transformer.text_model.{embeddings, encoder.layers.i, final_layer_norm}.*   (SD 1.x)
    openclip  model.{token_embedding, positional_embedding, transformer.resblocks.i, ln_final, text_projection}

``cfg.pretrained=None`` builds random weights of the configured shape (tests, or weights loaded afterwards).
Otherwise ``clip`` takes a hub id or a local ``CLIPTextModel`` folder, ``openclip`` an open_clip tag of
``cfg.openclip_model`` (e.g. ``laion2b_s32b_b79k`` for ViT-H-14) or a local checkpoint file. Weights that are neither
local nor cached raise a ``RuntimeError`` telling how to give a local path when offline mode is set
(``HF_HUB_OFFLINE=1``: no network access at all), when the server cannot be reached (a 3 s probe instead of the hub
client's minute of retries) or when the download fails.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlsplit

import torch
import torch.nn as nn

from latentdiff.config import TextEncoderConfig
from latentdiff.models.text import TextEncoder

_TRUE = ("1", "true", "yes", "on")
_CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
# open_clip checkpoint names inside a folder, preferred first (as open_clip's own loader orders them)
_OPENCLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin",
                   "model.safetensors", "pytorch_model.bin")


def offline() -> bool:
    """True when HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE is set now (read at call time, not at import)."""
    if any(os.environ.get(k, "").strip().lower() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _is_local(name: str) -> bool:
    """A filesystem path rather than a hub id ('org/name') or an open_clip tag."""
    return (Path(name).expanduser().exists() or name.startswith(("/", ".", "~")) or name.count("/") > 1
            or "\\" in name or name.endswith(_CHECKPOINT_SUFFIXES))


_LOCAL_HINT = {
    "clip": "a CLIPTextModel folder with config.json and model.safetensors, e.g. a diffusers model's text_encoder/",
    "openclip": "an open_clip checkpoint file such as open_clip_model.safetensors",
}


def _not_loadable(what: str, name: str, why: str) -> RuntimeError:
    return RuntimeError(
        f"could not load {what} weights text_encoder.pretrained={name!r}: they are not a local path nor in the "
        f"local cache, and {why}. Download them on a machine with network access and set text_encoder.pretrained "
        f"to the local path ({what}: {_LOCAL_HINT[what]}).")


def _cause(e: Exception) -> str:
    first = str(e).splitlines()[0] if str(e) else ""
    return f"the download failed ({type(e).__name__}: {first})"


def _unreachable(url: str, timeout: float = 3.0) -> str | None:
    """Why weights cannot be downloaded from ``url`` now (offline mode, or no TCP connection within ``timeout``
    seconds), or None. The probe lets a machine without network fail in seconds instead of after the hub client's
    retries; it is skipped behind a proxy, which a direct connection would not use."""
    if offline():
        return "offline mode is set (HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE)"
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY")):
        return None
    parts = urlsplit(url)
    port = parts.port or (80 if parts.scheme == "http" else 443)
    try:
        socket.create_connection((parts.hostname, port), timeout).close()
    except OSError as e:
        return f"{parts.hostname} cannot be reached ({e})"
    return None


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """safetensors, or torch.load(weights_only=True); unwraps {'state_dict': ...} and DDP's 'module.' prefix."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path))
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
        sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
    if not isinstance(sd, dict):
        raise ValueError(f"{path} does not hold a state dict (found {type(sd).__name__})")
    return {k.removeprefix("module."): v for k, v in sd.items()}


# --------------------------------------------------------------------------------------------------------------
# transformers CLIPTextModel (Stable Diffusion 1.x)
# --------------------------------------------------------------------------------------------------------------


def clip_text_config(cfg: TextEncoderConfig):
    """Our config as a transformers ``CLIPTextConfig``."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.width, intermediate_size=int(cfg.mlp_ratio * cfg.width),
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, max_position_embeddings=cfg.context_length,
        hidden_act=cfg.act, layer_norm_eps=1e-5, bos_token_id=49406, eos_token_id=49407)


def _load_clip_text_model(name: str):
    """CLIPTextModel.from_pretrained from a local folder, the cache, or (when online) the hub."""
    from transformers import CLIPTextModel

    if _is_local(name):
        path = Path(name).expanduser()
        if not path.is_dir():
            problem = "is not a folder" if path.exists() else "does not exist"
            raise ValueError(f"text_encoder.pretrained={name!r} {problem}; expected {_LOCAL_HINT['clip']}")
        try:
            return CLIPTextModel.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise ValueError(f"text_encoder.pretrained={name!r} is not a CLIPTextModel folder: {e}") from e
    try:
        return CLIPTextModel.from_pretrained(name, local_files_only=True)
    except OSError:
        pass  # not cached: download below
    from huggingface_hub import constants

    why = _unreachable(constants.ENDPOINT)
    if why:
        raise _not_loadable("clip", name, why)
    try:
        return CLIPTextModel.from_pretrained(name)
    except Exception as e:  # network errors, missing repo, HTTP errors: all reported the same way
        raise _not_loadable("clip", name, _cause(e)) from e


class _TextModelHolder(nn.Module):
    """Holds the text model as ``.text_model`` so keys read ``transformer.text_model.*`` (SD 1.x) with every
    transformers version: before 5.0 ``CLIPTextModel`` nests its layers in ``.text_model``, from 5.0 it does not."""

    def __init__(self, text_model: nn.Module):
        super().__init__()
        self.text_model = text_model


class CLIPTextEncoder(TextEncoder):
    """transformers ``CLIPTextModel``; ``last`` = last_hidden_state, ``penultimate`` = final_layer_norm of the
    second-to-last hidden state (what diffusers' SD 2 text encoders compute). ``clip_skip`` N > 1 with ``last`` is
    final_layer_norm(hidden_states[-N]), as AUTOMATIC1111 computes it ("Clip skip"); with ``penultimate``
    hidden_states[-N - 1]."""

    def __init__(self, cfg: TextEncoderConfig, pad_token: int):
        super().__init__(cfg, pad_token)
        from transformers import CLIPTextModel

        wanted = clip_text_config(cfg)
        if cfg.pretrained is None:
            model = CLIPTextModel(wanted)
        else:
            model = _load_clip_text_model(cfg.pretrained).float()
            _check_same(cfg, wanted, model.config, cfg.pretrained)
        self.transformer = _TextModelHolder(getattr(model, "text_model", model))

    def forward(self, tokens: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
        """tokens (B, L) -> hidden states (B, L, width)."""
        self._check_tokens(tokens)
        skipped = self.blocks_skipped(clip_skip)
        text_model = self.transformer.text_model
        if skipped == 0:
            return text_model(input_ids=tokens).last_hidden_state  # (B, L, W)
        hidden = text_model(input_ids=tokens, output_hidden_states=True).hidden_states  # (embeddings, layer 1..N)
        return text_model.final_layer_norm(hidden[-1 - skipped])  # (B, L, W)


def _check_same(cfg: TextEncoderConfig, wanted, found, source: str) -> None:
    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "max_position_embeddings",
            "vocab_size", "hidden_act")
    diffs = [f"{k}: config {getattr(wanted, k)!r}, weights {getattr(found, k)!r}" for k in keys
             if getattr(wanted, k) != getattr(found, k)]
    if diffs:
        raise ValueError(f"text_encoder config (width={cfg.width}, layers={cfg.layers}, heads={cfg.heads}, "
                         f"act={cfg.act}) does not match the weights in {source!r}: {'; '.join(diffs)}. "
                         "latentdiff.io.convert_text.text_config_from_hf builds a matching config.")


# --------------------------------------------------------------------------------------------------------------
# OpenCLIP text tower (Stable Diffusion 2.x)
# --------------------------------------------------------------------------------------------------------------

_TOWER_FIELDS = ("context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio")


def _named_text_cfg(cfg: TextEncoderConfig) -> tuple[dict, bool, int]:
    """(text_cfg, quick_gelu, embed_dim) of open_clip model ``cfg.openclip_model``, checked against ``cfg``, whose
    ``pretrained`` must be one of that model's tags."""
    import open_clip

    model_cfg = open_clip.get_model_config(cfg.openclip_model)
    if model_cfg is None:
        raise ValueError(f"text_encoder.openclip_model={cfg.openclip_model!r} is not an open_clip model "
                         "(see open_clip.list_models())")
    if not open_clip.pretrained.get_pretrained_cfg(cfg.openclip_model, cfg.pretrained):
        tags = open_clip.pretrained.list_pretrained_tags_by_model(cfg.openclip_model)
        raise ValueError(f"text_encoder.pretrained={cfg.pretrained!r} is neither a local path nor an open_clip tag "
                         f"of {cfg.openclip_model!r} (tags: {tags})")
    text_cfg = dict(model_cfg["text_cfg"])
    if text_cfg.get("hf_model_name"):
        raise ValueError(f"open_clip model {cfg.openclip_model!r} has a Hugging Face text tower, not supported")
    quick_gelu = bool(model_cfg.get("quick_gelu", False))
    found = {"mlp_ratio": 4.0, "context_length": 77, "vocab_size": 49408, **text_cfg,
             "act": "quick_gelu" if quick_gelu else "gelu"}
    diffs = [f"{k}: config {getattr(cfg, k)!r}, {cfg.openclip_model} {found[k]!r}" for k in (*_TOWER_FIELDS, "act")
             if getattr(cfg, k) != found[k]]
    if diffs:
        raise ValueError(f"text_encoder config does not match open_clip model {cfg.openclip_model!r}: "
                         + "; ".join(diffs))
    return text_cfg, quick_gelu, model_cfg["embed_dim"]


def _cached_openclip_file(pcfg: dict) -> str | None:
    """The local copy of an open_clip pretrained entry, without touching the network (or None)."""
    if "file" in pcfg:  # an entry registered with a local file
        return pcfg["file"]
    hub = pcfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import hf_hub_download

        repo, filename = os.path.split(hub)
        filename = filename or "open_clip_pytorch_model.bin"
        names = [filename]  # open_clip prefers a .safetensors twin of a pickled file
        if filename == "open_clip_pytorch_model.bin":
            names.insert(0, "open_clip_model.safetensors")
        elif filename.endswith((".bin", ".pth")):
            names.insert(0, filename[:-4] + ".safetensors")
        for candidate in names:
            try:
                return hf_hub_download(repo, candidate, local_files_only=True)
            except Exception:  # LocalEntryNotFoundError and friends: try the next name
                continue
    url = pcfg.get("url", "")
    if url:
        path = Path("~/.cache/clip").expanduser() / os.path.basename(url)
        if path.is_file():
            return str(path)
    return None


def _openclip_checkpoint(cfg: TextEncoderConfig) -> Path:
    """Resolve ``cfg.pretrained`` (local file or folder, or open_clip tag) to a local checkpoint file."""
    name = cfg.pretrained
    if _is_local(name):
        path = Path(name).expanduser()
        if path.is_dir():
            found = [path / f for f in _OPENCLIP_FILES if (path / f).is_file()]
            if not found:
                raise ValueError(f"text_encoder.pretrained={name!r} holds none of {list(_OPENCLIP_FILES)}")
            return found[0]
        if not path.is_file():
            raise ValueError(f"text_encoder.pretrained={name!r} does not exist; expected {_LOCAL_HINT['openclip']}")
        return path
    from open_clip import pretrained

    pcfg = pretrained.get_pretrained_cfg(cfg.openclip_model, name)  # a known tag: see _named_text_cfg
    local = _cached_openclip_file(pcfg)
    if local is None:
        from huggingface_hub import constants

        why = _unreachable(constants.ENDPOINT if pcfg.get("hf_hub") else pcfg.get("url", ""))
        if why:
            raise _not_loadable("openclip", name, why)
        try:
            local = pretrained.download_pretrained(pcfg)
        except Exception as e:  # network errors, HTTP errors, checksum mismatch
            raise _not_loadable("openclip", name, _cause(e)) from e
    return Path(local)


class OpenCLIPTextEncoder(TextEncoder):
    """The OpenCLIP text tower (``self.model``: token_embedding, positional_embedding, transformer, ln_final,
    text_projection, attn_mask). ``penultimate`` runs every residual block but the last, then ln_final, as Stable
    Diffusion 2's FrozenOpenCLIPEmbedder does; ``last`` is ln_final of the full stack; ``clip_skip`` N leaves out
    N - 1 more blocks.

    ``pretrained=None`` builds the tower from ``cfg`` (width/layers/heads/...; the defaults of a ViT-H-14 config
    give ViT-H-14's tower). With an open_clip tag the tower of ``cfg.openclip_model`` is built, checked against
    ``cfg``, and its weights loaded; a local checkpoint file is loaded into the tower built from ``cfg``.
    """

    def __init__(self, cfg: TextEncoderConfig, pad_token: int):
        super().__init__(cfg, pad_token)
        from open_clip.model import CLIPTextCfg, _build_text_tower

        if cfg.pretrained is not None and not _is_local(cfg.pretrained):
            text_cfg, quick_gelu, embed_dim = _named_text_cfg(cfg)
        else:
            text_cfg = {k: getattr(cfg, k) for k in _TOWER_FIELDS}
            quick_gelu, embed_dim = cfg.act == "quick_gelu", cfg.width
        checkpoint = None if cfg.pretrained is None else _openclip_checkpoint(cfg)  # fail before building
        self.model = _build_text_tower(embed_dim, CLIPTextCfg(**text_cfg), quick_gelu=quick_gelu)
        if checkpoint is not None:
            self._load(checkpoint)

    def _load(self, path: Path) -> None:
        sd = _load_state_dict(path)
        if "text.token_embedding.weight" in sd:  # CustomTextCLIP checkpoints nest the tower under 'text.'
            sd = {k.removeprefix("text."): v for k, v in sd.items()}
        own = self.model.state_dict()
        tower = {k: v for k, v in sd.items() if k in own}
        missing = sorted(set(own) - set(tower))
        if missing:
            raise ValueError(f"{path} is not an open_clip checkpoint with this text tower: missing {missing[:5]}")
        shapes = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}"
                  for k, v in tower.items() if v.shape != own[k].shape]
        if shapes:
            raise ValueError(f"{path} does not fit text_encoder (width={self.cfg.width}, layers={self.cfg.layers}): "
                             f"{'; '.join(shapes[:5])}")
        self.model.load_state_dict(tower)

    def forward(self, tokens: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
        """tokens (B, L) -> hidden states (B, L, width)."""
        self._check_tokens(tokens)
        skipped = self.blocks_skipped(clip_skip)
        B, L = tokens.shape
        m = self.model
        x = m.token_embedding(tokens) + m.positional_embedding[:L]  # (B, L, W)
        mask = m.attn_mask[:L, :L].to(x.dtype)  # (L, L) additive, -inf above the diagonal
        blocks = m.transformer.resblocks
        blocks = blocks[:len(blocks) - skipped]
        batch_first = getattr(m.transformer, "batch_first", False)  # older open_clip runs (L, B, W)
        if not batch_first:
            x = x.transpose(0, 1)  # (L, B, W)
        for block in blocks:
            x = block(x, attn_mask=mask)
        if not batch_first:
            x = x.transpose(0, 1)  # (B, L, W)
        return m.ln_final(x)  # (B, L, W)
