"""LPIPS perceptual distance (Zhang et al., 2018, "The Unreasonable Effectiveness of Deep Features", Eq. 1),
VGG16 variant, as used by the LDM/taming autoencoder losses, and the same distance on the features of a
latentdiff CIFAR classifier (:class:`ClassifierFeatureDistance`) for machines without VGG16's weights.

d(x, x̂) = Σ_l mean_hw ‖ w_l ⊙ (ŷ_l − ŷ̂_l) ‖²,  ŷ_l = unit-normalised (over channels) VGG16 activations at
relu1_2, relu2_2, relu3_3, relu4_3, relu5_3, and w_l learned per-channel weights (1x1 convolutions, no bias).

Weights are never downloaded here. Two local files are needed:

- VGG16 ImageNet weights in torchvision's layout (``features.N.weight``), by default torchvision's cache file
  ``<torch.hub.get_dir()>/checkpoints/vgg16-397923af.pth``;
- the LPIPS linear layers (``lin{l}.model.1.weight``), by default the ``weights/v0.1/vgg.pth`` shipped inside the
  ``lpips`` package when it is installed (taming's ``vgg.pth`` has the same keys).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

from latentdiff.io.checkpoint import read_state_dict
from latentdiff.metrics.classifier import CifarClassifier, load_classifier

CHANNELS = (64, 128, 256, 512, 512)
SLICES = (4, 9, 16, 23, 30)  # ends of the relu1_2 ... relu5_3 blocks in torchvision's vgg16().features
VGG_FILE = "vgg16-397923af.pth"


def _vgg16_features() -> nn.Sequential:
    """torchvision's VGG16 convolutional trunk up to relu5_3 (same indices, so its weights load by name)."""
    layers: list[nn.Module] = []
    c_in = 3
    for block, (c_out, convs) in enumerate(zip(CHANNELS, (2, 2, 3, 3, 3))):
        if block:
            layers.append(nn.MaxPool2d(2, 2))
        for _ in range(convs):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(inplace=False)]
            c_in = c_out
    return nn.Sequential(*layers)


class LPIPS(nn.Module):
    """LPIPS-VGG distance, (B, 3, H, W) pairs in [-1, 1] -> (B,). Frozen; random weights unless loaded."""

    def __init__(self):
        super().__init__()
        self.features = _vgg16_features()
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in CHANNELS)
        # Input normalisation of the LPIPS release ("ScalingLayer"): inputs in [-1, 1] to ImageNet statistics.
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_files(cls, lpips_weights: str | None = None, vgg_weights: str | None = None) -> LPIPS:
        """Load both weight files (see the module docstring); a clear ``ValueError`` when one is not on disk."""
        vgg_path = Path(vgg_weights) if vgg_weights else Path(torch.hub.get_dir()) / "checkpoints" / VGG_FILE
        lin_path = Path(lpips_weights) if lpips_weights else _packaged_lpips_weights()
        hint = ("the perceptual (LPIPS) loss needs local weights and nothing is downloaded: put torchvision's "
                f"{VGG_FILE} at {vgg_path} or set objective.vgg_weights, and the LPIPS 'vgg.pth' (from the lpips "
                "package) in objective.lpips_weights — or set objective.perceptual_weight=0")
        for path in (vgg_path, lin_path):
            if path is None or not path.is_file():
                raise ValueError(f"{path or 'LPIPS linear-layer weights'} not found; {hint}")
        model = cls()
        vgg, _ = read_state_dict(vgg_path)
        model.features.load_state_dict({k[len("features."):]: v for k, v in vgg.items()
                                        if k.startswith("features.") and int(k.split(".")[1]) < SLICES[-1]})
        lins, _ = read_state_dict(lin_path)
        model.lins.load_state_dict({f"{i}.weight": lins[f"lin{i}.model.1.weight"] for i in range(len(CHANNELS))})
        return model

    def train(self, mode: bool = True):
        return super().train(False)  # always frozen

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        fx, fy = self._features(x), self._features(y)
        return sum(lin(_squared_unit_difference(a, b)).mean(dim=(1, 2, 3)) for lin, a, b in zip(self.lins, fx, fy))

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Activations (B, C_l, H_l, W_l) at relu1_2 ... relu5_3 for x (B, 3, H, W) in [-1, 1]."""
        h, out, start = x.sub(self.shift).div(self.scale), [], 0
        for end in SLICES:
            h = self.features[start:end](h)
            out.append(h)
            start = end
        return out


class ClassifierFeatureDistance(nn.Module):
    """LPIPS's Eq. 1 with every w_l = 1 (the paper's untrained "baseline" weighting) on the activations of a
    latentdiff CIFAR classifier (``tools/train_classifier.py``) instead of VGG16: after its whitening layer and after
    each of its blocks (airbench94's on 32-px images: 31², 15², 7², 3²). (B, 3, H, W) pairs in [-1, 1] -> (B,).
    Frozen. Use a classifier other than the one that judges class accuracy, or that score is no longer independent."""

    def __init__(self, classifier: CifarClassifier):
        super().__init__()
        self.classifier = classifier
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_file(cls, path: str) -> ClassifierFeatureDistance:
        if not Path(path).is_file():
            raise ValueError(f"objective.perceptual_classifier={path!r} not found (a file written by "
                             "tools/train_classifier.py)")
        return cls(load_classifier(path))

    def train(self, mode: bool = True):
        return super().train(False)  # always frozen (batch norms in eval mode)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        c = self.classifier
        fx, fy = c.features(c.resized(x)), c.features(c.resized(y))
        return sum(_squared_unit_difference(a, b).sum(dim=1).mean(dim=(1, 2)) for a, b in zip(fx, fy))


# Both distances run the two images through the network separately, not as one concatenated batch: the weights are
# frozen, so the real image (which needs no gradient) builds no autograd graph and backward covers only the other.
def _squared_unit_difference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Features (B, C, H, W) of the two images of B pairs -> their squared difference after unit-normalising each
    position's channel vector."""
    return (a / (a.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            - b / (b.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)).pow(2)


def _packaged_lpips_weights() -> Path | None:
    spec = importlib.util.find_spec("lpips")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / "weights" / "v0.1" / "vgg.pth"
