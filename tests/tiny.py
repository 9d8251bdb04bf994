"""Helpers shared by tests: tiny model configs and shards (seconds on a CPU), random weights, paths, a numeric check
and a malicious pickle payload. Session-wide fixtures built from these live in tests/conftest.py."""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from latentdiff.config import model_config_from_dict
from latentdiff.data.writer import ShardWriter

if TYPE_CHECKING:  # torch is imported where it is used, so that conftest.py (which imports this) stays cheap
    import torch

ROOT = Path(__file__).resolve().parents[1]  # the repository
CONFIGS = ROOT / "configs"  # the training configs (train_tiny_*.yaml)


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
    """A latent-diffusion config of 16x16 images. A dict override of a section updates that section only:
    ``tiny_ldm_config(unet={"model_channels": 16})`` changes the U-Net width and keeps the rest."""
    data = {
        "image_size": 16,
        "guidance_scale": 3.0,
        "unet": {"model_channels": 32, "channel_mult": [1, 2], "attention_resolutions": [2], "num_heads": 2,
                 "context_dim": 32, "norm_num_groups": 8},
        "autoencoder": {"ch": 16, "ch_mult": [1, 2], "num_res_blocks": 1, "norm_num_groups": 8},
        "text_encoder": {"width": 32, "layers": 1, "heads": 2, "context_length": 16},
        "schedule": {"num_timesteps": 100},
    }
    for key, value in overrides.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) and isinstance(data.get(key), dict) else value
    return model_config_from_dict(data)


def random_weights(module: torch.nn.Module, std: float, seed: int = 0) -> torch.nn.Module:
    """Replace every parameter by N(0, std²) noise (the default init zeroes some output layers, which would hide
    errors in a comparison). The module's train/eval mode is left as it was."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


def jitter(module: torch.nn.Module, std: float, seed: int = 0) -> torch.nn.Module:
    """Add N(0, std²) noise to every parameter (norm scales and biases too) so no weight keeps a trivial init.
    The module's train/eval mode is left as it was."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return module


def close(actual, expected, rtol=1.3e-6, atol=1e-5, msg=""):
    """Elementwise |actual - expected| <= atol + rtol·|expected|, in float64 (numpy's check)."""
    np.testing.assert_allclose(np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64),
                               rtol=rtol, atol=atol, err_msg=msg)


class Evil:
    """Unpickling this would create the file ``path``: a stand-in for arbitrary code execution."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def fresh_tiny_pipe():
    """A new tiny latent-diffusion pipeline (tiny_ldm_config, named "tiny") with jittered U-Net and autoencoder
    weights, for tests that change it (compile, tiling); the global RNG state is left as it was."""
    import torch

    from latentdiff.pipelines import LatentDiffusionPipeline

    with torch.random.fork_rng():
        torch.manual_seed(0)
        pipe = LatentDiffusionPipeline.from_config(tiny_ldm_config(), name="tiny")
    jitter(pipe.unet, std=0.05, seed=1)
    jitter(pipe.autoencoder, std=0.02, seed=2)
    return pipe
