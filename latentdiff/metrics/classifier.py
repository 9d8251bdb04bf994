"""A small CIFAR-10 classifier: the offline text-alignment judge of the text-to-image benchmark.

    data = load_labelled_shards("data/cifar10-train-shards")           # uint8 images, labels, class names
    clf = train_classifier(data, TrainSettings(epochs=2.5))
    evaluate_classifier(clf, load_labelled_shards("data/cifar10-test-shards"))   # {"accuracy": ..., "per_class": ...}
    save_classifier(clf, "classifier.safetensors")
    clf = load_classifier("classifier.safetensors")
    probs = clf.predict(images)        # images (B, 3, H, W) in [-1, 1], any size (resized to 32x32) -> (B, K)

Network (after Keller Jordan's airbench, "94% on CIFAR-10 in 3.29 seconds", 2024, scaled down for CPUs):

    whiten   2x2 conv, 3 -> 24, frozen filters: the 12 eigenvectors of the training patches' covariance scaled
             by 1/sqrt(eigenvalue + eps), with their negatives (so GELU keeps both signs); trainable bias
    block k  conv3x3 -> maxpool2 -> BN -> GELU -> (+ residual: conv3x3 -> BN -> GELU), widths ``widths[k]``
             (``block="plain"``: airbench's conv3x3 -> maxpool2 -> BN -> GELU -> conv3x3 -> BN -> GELU)
    head     global max pool -> linear, times ``logit_scale`` (airbench94: 1/9)

Training: SGD with Nesterov momentum under a one-cycle learning rate (Smith & Topin 2019), label smoothing,
random translation by up to 2 px (reflect padding) and horizontal flips; evaluation averages the logits of the
image and its mirror (``tta=2``: airbench's test-time augmentation, also 1-px translations).
latentdiff.metrics.classifier_airbench trains with airbench94's full recipe (``latentdiff train-classifier
--preset airbench94``). The file is a ``.safetensors`` whose metadata holds the architecture and the class names
in label order, so loading needs no flags.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from latentdiff.atomic import atomic_write
from latentdiff.data.decode import DecodeError, decode_image
from latentdiff.data.manifest import load_manifest
from latentdiff.data.shards import image_ext, iter_shard, resolve_shards
from latentdiff.io.checkpoint import CheckpointError, check_finite, load_into, read_safetensors

FORMAT_NAME = "latentdiff-classifier"
FORMAT_VERSION = "1"
WHITEN_EPS = 5e-4
BLOCKS = ("residual", "plain")


@dataclass
class LabelledImages:
    """Images as uint8 (N, 3, H, W), integer labels (N,) indexing ``class_names``."""

    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.labels)


def _conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.GELU())


class _Block(nn.Module):
    """conv3x3 -> maxpool2 -> BN -> GELU, then conv3x3 -> BN -> GELU, added (``residual``) or not (halves H, W)."""

    def __init__(self, c_in: int, c_out: int, residual: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(c_out)
        self.residual = _conv_bn(c_out, c_out)
        self.add = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.norm(F.max_pool2d(self.conv(x), 2)))  # (B, c_out, H/2, W/2)
        return x + self.residual(x) if self.add else self.residual(x)


class CifarClassifier(nn.Module):
    """``forward(x (B, 3, S, S) in [-1, 1]) -> logits (B, K)``; ``predict`` takes any size and averages flips."""

    def __init__(self, class_names: list[str], widths: tuple[int, ...] = (16, 32, 64), image_size: int = 32,
                 block: str = "residual", logit_scale: float = 1.0, tta: int = 1):
        super().__init__()
        if block not in BLOCKS or tta not in (1, 2) or not (math.isfinite(logit_scale) and logit_scale > 0):
            raise ValueError(f"block={block!r} must be one of {BLOCKS}, tta={tta} 1 or 2, logit_scale={logit_scale} "
                             "a positive number")
        if len(class_names) < 2 or len(set(class_names)) != len(class_names):
            raise ValueError(f"class_names must hold at least two distinct names, got {class_names}")
        if not widths or any(w <= 0 for w in widths) or image_size - 1 < 2 ** len(widths):
            raise ValueError(f"widths={widths} / image_size={image_size}: need positive widths and "
                             f"image_size > 2**len(widths) (each block halves the size)")
        self.class_names = list(class_names)
        self.widths = tuple(int(w) for w in widths)
        self.image_size = image_size
        self.block, self.logit_scale, self.tta = block, float(logit_scale), int(tta)
        self.register_buffer("mean", torch.zeros(1, 3, 1, 1))
        self.register_buffer("std", torch.ones(1, 3, 1, 1))
        self.whiten = nn.Conv2d(3, 24, 2)
        self.whiten.weight.requires_grad_(False)
        chans = (24, *self.widths)
        self.blocks = nn.Sequential(*[_Block(a, b, block == "residual") for a, b in zip(chans[:-1], chans[1:])])
        self.head = nn.Linear(self.widths[-1], len(class_names), bias=False)

    @property
    def config(self) -> dict:
        out = {"class_names": self.class_names, "widths": list(self.widths), "image_size": self.image_size}
        if (self.block, self.logit_scale, self.tta) != ("residual", 1.0, 1):  # files of the first version lack them
            out.update(block=self.block, logit_scale=self.logit_scale, tta=self.tta)
        return out

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Activations for x (B, 3, S, S) in [-1, 1]: after the whitening layer (GELU), then after each block."""
        out = [F.gelu(self.whiten((x - self.mean) / self.std))]  # (B, 24, S-1, S-1)
        for block in self.blocks:
            out.append(block(out[-1]))  # (B, widths[k], h_k, w_k)
        return out

    def resized(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 3, S, S), bilinear and antialiased; unchanged at the classifier's size."""
        S = self.image_size
        if images.shape[-2:] == (S, S):
            return images
        return F.interpolate(images, size=(S, S), mode="bilinear", antialias=True, align_corners=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)[-1].amax(dim=(2, 3))  # (B, widths[-1])
        return self.head(x) * self.logit_scale if self.logit_scale != 1.0 else self.head(x)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, flip: bool = True) -> torch.Tensor:
        """Class probabilities (B, K) for images (B, 3, H, W) in [-1, 1] (bilinear, antialiased resize). ``flip``:
        logits averaged with the mirror's; with ``tta == 2`` also (airbench94) logits = ½ ℓ(x) + ¼ ℓ(x shifted
        1 px up-left) + ¼ ℓ(x shifted 1 px down-right), reflect padding, ℓ the mirror-averaged logits."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected RGB images (B, 3, H, W), got shape {tuple(images.shape)}")
        p = next(self.parameters())
        x = self.resized(images.to(device=p.device, dtype=p.dtype))  # (B, 3, S, S)
        S = self.image_size
        logits = self._mirrored(x, flip)
        if flip and self.tta == 2:
            padded = F.pad(x, (1, 1, 1, 1), mode="reflect")  # (B, 3, S + 2, S + 2)
            shifted = (self._mirrored(padded[:, :, :S, :S], flip) + self._mirrored(padded[:, :, 2:, 2:], flip)) / 2
            logits = (logits + shifted) / 2
        return logits.float().softmax(dim=1)  # (B, K)

    def _mirrored(self, x: torch.Tensor, flip: bool) -> torch.Tensor:
        return (self(x) + self(x.flip(3))) / 2 if flip else self(x)


@torch.no_grad()
def init_whitening(model: CifarClassifier, images: torch.Tensor) -> None:
    """Set the input normalisation and the frozen 2x2 whitening filters from training images (uint8)."""
    x = images.float().div(127.5).sub(1.0)  # (N, 3, H, W) in [-1, 1]
    model.mean.copy_(x.mean(dim=(0, 2, 3)).view(1, 3, 1, 1))
    model.std.copy_(x.std(dim=(0, 2, 3)).view(1, 3, 1, 1))
    x = (x - model.mean) / model.std
    patches = F.unfold(x.double(), kernel_size=2).transpose(1, 2).reshape(-1, 12)  # (N * P, 12)
    patches = patches - patches.mean(dim=0)
    cov = patches.T @ patches / len(patches)  # (12, 12)
    eigenvalues, eigenvectors = torch.linalg.eigh(cov)
    filters = (eigenvectors / (eigenvalues + WHITEN_EPS).sqrt()).T.reshape(12, 3, 2, 2)
    model.whiten.weight.copy_(torch.cat([filters, -filters]).float())  # (24, 3, 2, 2)
    model.whiten.bias.zero_()


def _sample_label(members: dict[str, bytes], where: str, names: dict[str, int] | None) -> str:
    if "json" not in members:
        raise ValueError(f"{where}: no .json member with the class label")
    try:
        label = json.loads(members["json"].decode("utf-8"))["class"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{where}: the .json member has no readable 'class': {e}") from None
    if names is not None and label not in names:
        raise ValueError(f"{where}: class {label!r} is not one of {sorted(names)}")
    return str(label)


def load_labelled_shards(spec: str, class_names: list[str] | None = None, limit: int | None = None,
                         progress: bool = False) -> LabelledImages:
    """Decode every image of a shard set with its ``{key}.json`` ``class`` (all images the same size).

    Class order: ``class_names`` if given, else the shard folder's manifest ``classes``, else sorted names.
    Raises ``ValueError`` for unreadable samples, missing labels or mixed sizes.
    """
    paths = resolve_shards(spec)
    if class_names is None and Path(spec).is_dir():
        manifest = load_manifest(spec)
        classes = (manifest.extra.get("classes") if manifest else None) or None
        class_names = sorted(classes) if classes else None
    index = {n: i for i, n in enumerate(class_names)} if class_names else None
    images, labels = [], []
    problems = []
    with tqdm(desc=f"reading {spec}", unit="img", disable=not progress, mininterval=2.0) as bar:
        for path in paths:
            for key, members in iter_shard(path, problems.append):
                where = f"{path} key {key}"
                ext = image_ext(members)
                if ext is None:
                    raise ValueError(f"{where}: no image member")
                try:
                    img = np.asarray(decode_image(members[ext]), dtype=np.uint8)  # (H, W, 3)
                except DecodeError as e:
                    raise ValueError(f"{where}: {e}") from None
                if images and img.shape != images[0].shape:
                    raise ValueError(f"{where}: image size {img.shape[:2]} differs from {images[0].shape[:2]}")
                images.append(img)
                labels.append(_sample_label(members, where, index))
                bar.update()
                if limit is not None and len(images) >= limit:
                    break
            if limit is not None and len(images) >= limit:
                break
    if problems:
        raise ValueError("unreadable shards: " + "; ".join(map(str, problems[:5])))
    if not images:
        raise ValueError(f"no samples in {spec!r}")
    names = class_names or sorted(set(labels))
    index = {n: i for i, n in enumerate(names)}
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()  # (N, 3, H, W) uint8
    return LabelledImages(x, torch.tensor([index[n] for n in labels]), list(names))


def augment(x: torch.Tensor, generator: torch.Generator, pad: int = 2, flip: bool = True) -> torch.Tensor:
    """Random translation by up to ``pad`` px (reflect padding) and (``flip``) horizontal flip of a batch
    (B, 3, H, W); ``generator`` is a CPU generator, ``x`` on any device."""
    B, C, H, W = x.shape
    if flip:
        flips = (torch.rand(B, generator=generator) < 0.5).to(x.device)
        x = torch.where(flips.view(B, 1, 1, 1), x.flip(3), x)
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")  # (B, C, H + 2p, W + 2p)
    dy, dx = torch.randint(0, 2 * pad + 1, (2, B), generator=generator)
    out = torch.empty_like(x)
    for oy in range(2 * pad + 1):
        for ox in range(2 * pad + 1):
            sel = ((dy == oy) & (dx == ox)).nonzero().flatten()
            if len(sel):
                out[sel] = padded[sel, :, oy:oy + H, ox:ox + W]
    return out


@dataclass
class TrainSettings:
    epochs: float = 2.5  # fractions allowed: the schedule runs ceil(epochs * steps per epoch) steps
    batch_size: int = 128
    lr: float = 0.15
    momentum: float = 0.85
    weight_decay: float = 5e-4
    label_smoothing: float = 0.2
    widths: tuple[int, ...] = (16, 32, 64)
    seed: int = 0

    def __post_init__(self):
        if self.epochs <= 0 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError(f"epochs={self.epochs}, batch_size={self.batch_size}, lr={self.lr} must be positive")


def train_classifier(data: LabelledImages, settings: TrainSettings, progress: bool = True) -> CifarClassifier:
    """Train a :class:`CifarClassifier` on ``data`` (uint8 images of the network's input size)."""
    torch.manual_seed(settings.seed)
    N, C, H, W = data.images.shape
    model = CifarClassifier(data.class_names, settings.widths, image_size=H)
    init_whitening(model, data.images[:5000])
    steps_per_epoch = math.ceil(N / settings.batch_size)
    total = math.ceil(settings.epochs * steps_per_epoch)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=settings.lr,
                                momentum=settings.momentum, nesterov=True, weight_decay=settings.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=settings.lr, total_steps=total,
                                                   pct_start=0.25, anneal_strategy="linear")
    generator = torch.Generator().manual_seed(settings.seed)
    model.train()
    with tqdm(total=total, unit="step", desc="training classifier", disable=not progress, mininterval=5.0) as bar:
        for step in range(total):
            i = step % steps_per_epoch
            if i == 0:
                order = torch.randperm(N, generator=generator)
            idx = order[i * settings.batch_size:(i + 1) * settings.batch_size]
            x = augment(data.images[idx].float().div(127.5).sub(1.0), generator)  # (b, 3, H, W)
            loss = F.cross_entropy(model(x), data.labels[idx], label_smoothing=settings.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return model.eval()


def accuracy_report(predicted: torch.Tensor, labels: torch.Tensor, class_names: list[str]) -> dict:
    """``{"accuracy", "per_class": {name: accuracy or None}, "count": {name: n}}`` for label tensors (N,)."""
    correct = predicted.cpu() == labels.cpu()
    per_class, count = {}, {}
    for i, name in enumerate(class_names):
        mask = labels.cpu() == i
        count[name] = int(mask.sum())
        per_class[name] = float(correct[mask].float().mean()) if count[name] else None
    return {"accuracy": float(correct.float().mean()) if len(correct) else None, "per_class": per_class,
            "count": count}


@torch.no_grad()
def evaluate_classifier(model: CifarClassifier, data: LabelledImages, batch_size: int = 500,
                        progress: bool = False) -> dict:
    """Accuracy (overall and per class) of ``model`` on labelled uint8 images (flip-averaged)."""
    if data.class_names != model.class_names:
        raise ValueError(f"the data's classes {data.class_names} differ from the model's {model.class_names}")
    model.eval()
    preds = []
    for i in tqdm(range(0, len(data), batch_size), desc="evaluating", disable=not progress, mininterval=5.0):
        x = data.images[i:i + batch_size].float().div(127.5).sub(1.0)  # (b, 3, H, W)
        preds.append(model.predict(x).argmax(dim=1).cpu())
    return accuracy_report(torch.cat(preds), data.labels, data.class_names)


@torch.no_grad()
def round_to_half(model: CifarClassifier) -> CifarClassifier:
    """Round every floating-point weight and statistic to float16 and back, in place: the network a file saved with
    ``half=True`` loads as (so that its measured accuracy is the file's)."""
    for t in model.state_dict().values():
        if t.is_floating_point():
            t.copy_(t.half().float())
    return model


def save_classifier(model: CifarClassifier, path: str | Path, metadata: dict | None = None,
                    overwrite: bool = False, half: bool = False) -> Path:
    """Write weights + architecture + class names (+ ``metadata`` values as JSON) to ``.safetensors``, atomically;
    ``half``: floating-point tensors as float16 (half the file; loaded back as float32)."""
    from safetensors.torch import save as safetensors_bytes

    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if half:
        tensors = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}
    meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "config": json.dumps(model.config)}
    meta.update({k: json.dumps(v) for k, v in (metadata or {}).items()})
    path = Path(path)
    with atomic_write(path, "wb", overwrite=overwrite) as f:
        f.write(safetensors_bytes(tensors, metadata=meta))
    return path


def load_classifier(path: str | Path, device: str | torch.device = "cpu") -> CifarClassifier:
    """Load a file written by :func:`save_classifier` (safetensors only); ``CheckpointError`` when it is not one."""
    tensors, metadata = read_safetensors(path)
    if metadata.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path} is not a latentdiff classifier file (metadata format "
                              f"{metadata.get('format')!r}, expected {FORMAT_NAME!r})")
    try:
        cfg = json.loads(metadata["config"])
        model = CifarClassifier(cfg["class_names"], tuple(cfg["widths"]), int(cfg["image_size"]), cfg.get("block",
                                "residual"), float(cfg.get("logit_scale", 1.0)), int(cfg.get("tta", 1)))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: the classifier config stored in the file is invalid: {e}") from None
    check_finite(tensors, str(path))
    load_into(model, tensors, "classifier")
    return model.to(device).eval()


def classifier_metadata(path: str | Path) -> dict:
    """The JSON metadata values stored beside the weights (training settings, test accuracy, ...)."""
    _, metadata = read_safetensors(path)
    out = {}
    for k, v in metadata.items():
        try:
            out[k] = json.loads(v)
        except ValueError:
            out[k] = v
    return out
