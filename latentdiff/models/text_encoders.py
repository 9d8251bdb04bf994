"""Build the text encoder a config names: ``trainable`` (ours), ``clip`` (transformers) or ``openclip``."""

from __future__ import annotations

from latentdiff.config import TextEncoderConfig
from latentdiff.models.text import TextEncoder, TrainableTextEncoder
from latentdiff.models.text_clip import CLIPTextEncoder, OpenCLIPTextEncoder
from latentdiff.models.tokenizer import default_pad_token

TEXT_ENCODERS: dict[str, type[TextEncoder]] = {"trainable": TrainableTextEncoder, "clip": CLIPTextEncoder,
                                               "openclip": OpenCLIPTextEncoder}


def build_text_encoder(cfg: TextEncoderConfig, pad_token: int | None = None) -> TextEncoder:
    """Build the encoder named by ``cfg.type``; ``pad_token=None`` picks :func:`default_pad_token`."""
    pad = default_pad_token(cfg) if pad_token is None else pad_token
    if cfg.type not in TEXT_ENCODERS:
        raise ValueError(f"text_encoder.type={cfg.type!r} is not one of {sorted(TEXT_ENCODERS)}")
    return TEXT_ENCODERS[cfg.type](cfg, pad)
