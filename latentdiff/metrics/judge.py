"""Class accuracy of saved images by a CIFAR-10 classifier (the "judge"), the classes read from their captions.

    report = judge_folder("eval/default", load_classifier("judge.safetensors"))   # an eval-t2i output or a folder
    report["accuracy"], report["per_class"], report["confusion"]

``latentdiff judge`` (latentdiff/cli/judge.py) runs it over folders: old evaluations scored by a new judge without
generating the images again.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from latentdiff.io.images import parse_parameters
from latentdiff.metrics.classifier import CifarClassifier
from latentdiff.metrics.t2i import Prompts, caption_label, class_accuracy


def judge_folder(folder: str | Path, classifier: CifarClassifier, labels: str = "prompt", batch_size: int = 500,
                 progress: bool = True) -> dict:
    """Class accuracy of the PNGs in ``folder`` (or ``folder/images``, an eval-t2i output) by ``classifier``.

    ``labels="prompt"``: each image's class is the one its caption names (the first line of its ``parameters``
    text, as txt2img and eval-t2i write it); images whose caption names no single class are counted and skipped.
    ``labels="index"``: image ``i.png`` (or ``i-stem.png``) shows class i mod K (eval-t2i's class captions, for PNGs
    without parameters). Returns :func:`class_accuracy`'s report plus ``folder``, ``files`` and ``unlabelled``.
    """
    if labels not in ("prompt", "index"):
        raise ValueError(f"labels={labels!r} must be 'prompt' or 'index'")
    folder = Path(folder)
    if (folder / "images").is_dir():
        folder = folder / "images"
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder")
    files = sorted(folder.glob("*.png"))
    if not files:
        raise ValueError(f"{folder} holds no .png images")
    names = list(classifier.class_names)
    captions, targets, predictions = [], [], []
    with tqdm(total=len(files), unit="img", desc=f"judging {folder}", disable=not progress, mininterval=5.0) as bar:
        for first in range(0, len(files), batch_size):
            pixels = []
            for path in files[first:first + batch_size]:
                try:
                    with Image.open(path) as im:
                        text = im.info.get("parameters")
                        pixels.append(torch.frombuffer(bytearray(im.convert("RGB").tobytes()), dtype=torch.uint8)
                                      .view(im.height, im.width, 3))
                except OSError as e:  # PIL's UnidentifiedImageError, a truncated file, ...
                    raise ValueError(f"{path} is not a readable image: {e}") from None
                if labels == "index":
                    index = path.stem.split("-")[0]  # NNNNN.png or NNNNN-stem.png (save_png_new)
                    if not index.isdigit():
                        raise ValueError(f"{path}: labels by index need images named by it (00012.png)")
                    captions.append(names[int(index) % len(names)])
                    targets.append(int(index) % len(names))
                else:
                    caption = parse_parameters(text)["prompt"] if text else ""
                    captions.append(caption)
                    targets.append(caption_label(caption, names))
            if len({tuple(x.shape) for x in pixels}) > 1:
                raise ValueError(f"{folder}: the images differ in size")
            x = torch.stack(pixels).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)  # (b, 3, H, W) in [-1, 1]
            predictions.append(classifier.predict(x).argmax(dim=1).cpu())
            bar.update(len(pixels))
    report = class_accuracy(Prompts(captions, targets, names, str(folder)), torch.cat(predictions), classifier)
    return {"folder": str(folder), "files": len(files), "unlabelled": sum(t is None for t in targets), **report}
