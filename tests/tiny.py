"""Tiny model configs and shards shared by tests (seconds on a CPU)."""

import io
from pathlib import Path

import numpy as np
from PIL import Image

from latentdiff.config import model_config_from_dict
from latentdiff.data.writer import ShardWriter


def make_shards(folder: Path, n: int, size: int = 16) -> Path:
    """``n`` random PNGs captioned "a photo of thing {i % 4}", 8 per shard."""
    rng = np.random.default_rng(0)
    with ShardWriter(folder, prefix="tiny", samples_per_shard=8) as writer:
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8)).save(buf, format="PNG")
            writer.write(f"{i:09d}", {"png": buf.getvalue(), "txt": f"a photo of thing {i % 4}".encode()})
    return folder


def tiny_ldm_config(**overrides):
    data = {
        "image_size": 16,
        "guidance_scale": 3.0,
        "unet": {"model_channels": 32, "channel_mult": [1, 2], "attention_resolutions": [2], "num_heads": 2,
                 "context_dim": 32, "norm_num_groups": 8},
        "autoencoder": {"ch": 16, "ch_mult": [1, 2], "num_res_blocks": 1, "norm_num_groups": 8},
        "text_encoder": {"width": 32, "layers": 1, "heads": 2, "context_length": 16},
        "schedule": {"num_timesteps": 100},
    }
    data.update(overrides)
    return model_config_from_dict(data)
