"""Text-to-image benchmark: generate images from captions, then FID, CLIP score and CIFAR-10 class accuracy.

    prompts = class_prompts(CIFAR10_CLASSES, 1000)                 # "a photo of a cat", ... cycling over classes
    judges = Judges(features=..., reference=..., classifier=load_classifier(path), clip=load_clip(...))
    result = run_benchmark(pipe, prompts, BenchmarkSettings(sampler="ddim", steps=25, scale=3.0), "out/", judges)
    write_results("out/", result)                                  # out/results.json + a row in out/results.md

Images are written as PNGs (with their generation parameters) to ``outdir/images``; FID and CLIP score are
measured on those files, so what is scored is exactly what was saved (8-bit RGB). Class accuracy is the accuracy of
a CIFAR-10 classifier (latentdiff.metrics.classifier) on the same 8-bit images, for captions naming exactly one
class: an offline measure of how well images follow their captions.

Sample i uses caption i mod K and seed ``seed + i``, so any image can be regenerated alone from its PNG, and a
benchmark can be split into runs of samples ``start``, ..., ``start + N − 1`` whose image folders merge (PNG i is
named ``i``).
"""

from __future__ import annotations

import datetime
import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from latentdiff.assets import CIFAR10_CLASSIFIER
from latentdiff.atomic import atomic_write
from latentdiff.data.captions import fill_template
from latentdiff.data.image_sources import open_image_source
from latentdiff.io.images import save_png_new, to_pil
from latentdiff.io.text_lines import read_lines
from latentdiff.metrics.classifier import CifarClassifier, accuracy_report
from latentdiff.metrics.fid import (
    DEFAULT_CACHE_DIR,
    Features,
    SourceStatistics,
    check_compatible,
    fid,
    inception_features,
    source_statistics,
)
from latentdiff.metrics.inception import RESIZE_METHOD, InceptionWeightsError
from latentdiff.metrics.saved_latents import decode_batch, load_saved, save_batch
from latentdiff.version import __version__

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
DEFAULT_CLASSIFIER = CIFAR10_CLASSIFIER
CLASS_TEMPLATE = "a photo of a {}"  # the template of the CIFAR-10 training captions (article fixed per class)


@dataclass
class Prompts:
    """Captions, one per image, and the class index each names (None: names no single class)."""

    captions: list[str]
    labels: list[int | None]
    class_names: list[str]
    source: str


def caption_label(caption: str, class_names: list[str]) -> int | None:
    """The index of the one class named in ``caption`` (whole words, any case), else None."""
    found = [i for i, name in enumerate(class_names) if re.search(rf"\b{re.escape(name)}s?\b", caption, re.I)]
    return found[0] if len(found) == 1 else None


def class_prompts(class_names, num_samples: int, template: str = CLASS_TEMPLATE, start: int = 0) -> Prompts:
    """``num_samples`` class captions cycling evenly over ``class_names``: samples start, ..., start + N − 1,
    sample i of class i mod K."""
    names = list(class_names)
    indices = range(start, start + num_samples)
    captions = [fill_template(template, names[i % len(names)]) for i in indices]
    return Prompts(captions, [i % len(names) for i in indices], names, f"classes ({template!r})")


def file_prompts(path: str | Path, num_samples: int, class_names=CIFAR10_CLASSES, start: int = 0) -> Prompts:
    """Captions from a text file (one per line, blank lines skipped), cycled: samples start, ..., start + N − 1,
    sample i with line i mod (number of lines)."""
    try:
        lines = read_lines(path)
    except ValueError as e:
        raise ValueError(f"captions file {path}: {e}") from None
    if not lines:
        raise ValueError(f"captions file {path} holds no caption")
    captions = [lines[i % len(lines)] for i in range(start, start + num_samples)]
    names = list(class_names)
    return Prompts(captions, [caption_label(c, names) for c in captions], names, f"file {path}")


@dataclass
class BenchmarkSettings:
    sampler: str = "ddim"
    steps: int = 25
    scale: float | None = None  # None: the model's default guidance scale
    seed: int = 0
    eta: float = 0.0
    start: int = 0  # index of the first sample: one benchmark split over runs, each writing its own indices
    batch_size: int = 50
    negative_prompt: str = ""
    truncation: float | None = None  # VQ-Diffusion only; None: the model's truncation_rate
    guidance_interval: tuple[float, float] | None = None  # latent diffusion only: guide σ in (lo, hi]; None: all
    save_latents: str | None = None  # a folder to keep the sampled latents in (metrics.saved_latents)
    from_latents: str | None = None  # decode the latents saved in this folder instead of sampling


@dataclass
class Judges:
    """The measuring instruments, loaded once (a sweep shares them); a ``None`` one is skipped with its note."""

    features: Features | None = None
    reference: SourceStatistics | None = None
    classifier: CifarClassifier | None = None
    clip: tuple | None = None  # (model, preprocess, tokenizer, description) from metrics.clip_score.load_clip
    notes: dict[str, str] = field(default_factory=dict)
    fid_batch_size: int = 50
    num_workers: int = 0


def load_judges(reference: str | None, classifier: str | Path | None, clip: dict | None = None,
                inception_weights: str | Path | None = None, reference_samples: int | None = None,
                cache_dir: str | Path | None = DEFAULT_CACHE_DIR, device="cpu", fid_batch_size: int = 50,
                num_workers: int = 0, progress: bool = True) -> Judges:
    """Load the instruments. FID needs ``reference`` (an .npz or an image source, whose statistics are cached) and
    Inception weights; ``classifier``: a file, or None for the embedded one if present; ``clip``: keyword arguments
    of ``load_clip`` (model_name, pretrained, weights), or None for no CLIP score. Absent weights that were not
    asked for by path are skipped with a note; bad files raise ``ValueError``/``RuntimeError``. The reference
    statistics, the slow part, come last."""
    from latentdiff.metrics.classifier import load_classifier
    from latentdiff.metrics.clip_score import ClipWeightsError, load_clip

    judges = Judges(fid_batch_size=fid_batch_size, num_workers=num_workers)
    if classifier is None and DEFAULT_CLASSIFIER.is_file():
        classifier = DEFAULT_CLASSIFIER
    if classifier is None:
        judges.notes["classifier"] = f"no classifier given and {DEFAULT_CLASSIFIER} is absent"
    else:
        judges.classifier = load_classifier(classifier, device=device)
        judges.notes["classifier_path"] = str(classifier)
    if clip is None:
        judges.notes["clip"] = "not asked for"
    else:
        try:
            judges.clip = load_clip(**clip, device=device)
        except ClipWeightsError as e:
            if clip.get("weights") is not None:
                raise
            judges.notes["clip"] = str(e)
    if reference is None:
        judges.notes["fid"] = "no reference given"
    else:
        try:
            features = inception_features(inception_weights, device)
            features.load()  # weights found or obtained now (said on stderr), before any progress bar
            judges.features = features
        except InceptionWeightsError as e:
            if inception_weights is not None:
                raise
            judges.notes["fid"] = f"no Inception weights ({str(e).splitlines()[0]})"
        if judges.features is not None:
            judges.reference = source_statistics(reference, judges.features, cache_dir=cache_dir,
                                                 num_samples=reference_samples, batch_size=fid_batch_size,
                                                 num_workers=num_workers, device=device, progress=progress)
            judges.notes["reference"] = f"{reference} ({judges.reference.origin})"
    return judges


def quantize(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images -> the [-1, 1] values of their 8-bit PNGs."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1


def generate_images(pipe, prompts: Prompts, settings: BenchmarkSettings, folder: str | Path,
                    classifier: CifarClassifier | None = None, progress: bool = True) -> dict:
    """Generate one PNG per caption into ``folder``; classify each if a classifier is given. With
    ``settings.from_latents`` the images are the saved latents decoded by ``pipe``'s decoder, not sampled.

    Returns ``{"paths", "predictions" (N,) or None, "seconds", "saved" (the SavedLatents read, or None)}``.
    """
    N = len(prompts.captions)
    paths, predictions = [], []
    saved = load_saved(settings.from_latents) if settings.from_latents else None
    if saved:
        saved.check(pipe, settings.start, prompts.captions)
    start = time.time()
    desc = "decoding" if saved else f"{settings.sampler} {settings.steps} steps"
    with tqdm(total=N, unit="img", desc=desc, disable=not progress) as bar:
        for first in range(0, N, settings.batch_size):
            batch = prompts.captions[first:first + settings.batch_size]
            images, texts = (decode_batch(pipe, saved, settings.start + first, len(batch)) if saved
                             else _sample_batch(pipe, batch, settings, first))
            finite = torch.isfinite(images).flatten(1).all(1).tolist()
            bad = [settings.start + first + j for j, ok in enumerate(finite) if not ok]
            if bad:  # a NaN image would be scored as a black one: stop instead
                raise ValueError(f"images {bad} have NaN or inf pixels even decoded in float32; the evaluation stops "
                                 "(try --precision fp32 or bf16)")
            images = quantize(images)
            for im, text in zip(to_pil(images), texts):
                paths.append(save_png_new(im, folder, text, first_index=settings.start))
            if classifier is not None:
                predictions.append(classifier.predict(images).argmax(dim=1).cpu())
            bar.update(len(batch))
    return {"paths": paths, "predictions": torch.cat(predictions) if predictions else None,
            "seconds": time.time() - start, "saved": saved}


def _sample_batch(pipe, captions: list[str], settings: BenchmarkSettings, first: int):
    """(images, PNG texts) of captions[first:...] sampled; their latents saved when asked."""
    extra = {} if settings.truncation is None else {"truncation": settings.truncation}
    if settings.guidance_interval is not None:
        extra["guidance_interval"] = settings.guidance_interval
    latents, params = pipe.generate(captions, negative_prompt=settings.negative_prompt or None,
                                    steps=settings.steps, scale=settings.scale, sampler=settings.sampler,
                                    seed=settings.seed + settings.start + first, eta=settings.eta,
                                    output_type="latent", **extra)
    texts = [p.to_text() for p in params]
    if settings.save_latents:
        save_batch(settings.save_latents, settings.start + first, pipe, latents, texts, _sampling(pipe, settings))
    return pipe.decode_output(latents), texts  # (b, 3, H, W)


def _sampling(pipe, settings: BenchmarkSettings) -> dict:
    """The sampling settings with the model's defaults filled in (scale, truncation, guidance interval)."""
    scale = pipe.default_scale if settings.scale is None else settings.scale
    truncation = settings.truncation
    if truncation is None and pipe.config.type == "vq_diffusion":
        truncation = pipe.config.truncation_rate
    interval = settings.guidance_interval
    if interval is None and pipe.config.type == "latent_diffusion":
        interval = pipe.config.guidance_interval  # the model's own (None: every step)
    return {**asdict(settings), "scale": scale, "truncation": truncation,
            "guidance_interval": None if interval is None else list(interval)}


def class_accuracy(prompts: Prompts, predictions: torch.Tensor, classifier: CifarClassifier) -> dict:
    """Overall and per-class accuracy on the images whose caption names one class, plus the confusion matrix."""
    if list(classifier.class_names) != prompts.class_names:
        raise ValueError(f"the classifier's classes {classifier.class_names} are not the captions' "
                         f"{prompts.class_names}")
    keep = [i for i, label in enumerate(prompts.labels) if label is not None]
    if not keep:
        return {"skipped": "no caption names exactly one class"}
    labels = torch.tensor([prompts.labels[i] for i in keep])
    predicted = predictions[keep]
    K = len(prompts.class_names)
    confusion = torch.zeros(K, K, dtype=torch.long)
    confusion.index_put_((labels, predicted), torch.ones_like(labels), accumulate=True)
    report = accuracy_report(predicted, labels, prompts.class_names)
    return {**report, "images": len(keep), "confusion": confusion.tolist(), "chance": 1 / K}


def folder_fid(folder: str | Path, judges: Judges, device, progress: bool = True) -> dict:
    """FID of the images in ``folder`` against ``judges.reference``."""
    start = time.time()
    generated = source_statistics(folder, judges.features, batch_size=judges.fid_batch_size,
                                  num_workers=judges.num_workers, device=device, progress=progress)
    reference = judges.reference.stats
    warnings = check_compatible(generated.stats, reference)
    return {"value": fid(generated.stats, reference), "generated_count": generated.stats.count,
            "unreadable": len(generated.failures), "reference_count": reference.count,
            "reference_source": reference.meta.get("source", ""), "reference_origin": judges.reference.origin,
            "resize": RESIZE_METHOD, "feature_extractor": judges.features.name,
            "inception_weights": judges.features.weights, "warnings": warnings, "seconds": time.time() - start}


def folder_clip_score(folder: str | Path, judges: Judges, progress: bool = True) -> dict:
    """Mean CLIP score of the PNGs in ``folder`` and their captions (read from the PNGs' parameters)."""
    from latentdiff.metrics.clip_score import score_source

    start = time.time()
    model, preprocess, tokenizer, description = judges.clip
    scores, failures, _ = score_source(open_image_source(folder), model, preprocess, tokenizer,
                                       num_workers=judges.num_workers, progress=progress)
    return {"value": float(scores.mean()), "std": float(scores.std()) if len(scores) > 1 else 0.0,
            "pairs": len(scores), "skipped_pairs": len(failures), "model": description,
            "seconds": time.time() - start}


def run_benchmark(pipe, prompts: Prompts, settings: BenchmarkSettings, outdir: str | Path, judges: Judges,
                  device="cpu", checkpoint: str = "", progress: bool = True) -> dict:
    """Generate ``len(prompts.captions)`` images into ``outdir/images`` and measure them; returns the results."""
    start = time.time()
    folder = Path(outdir) / "images"
    if folder.is_dir() and any(folder.glob("*.png")):
        raise FileExistsError(f"{folder} already holds images; choose a new output folder")
    gen = generate_images(pipe, prompts, settings, folder, judges.classifier, progress)
    result = {"checkpoint": checkpoint, "model": pipe.name, **_sampling(pipe, settings)}
    if gen["saved"]:  # decoded: the sampling settings are those of the run that saved the latents
        keep = ("batch_size", "start", "save_latents", "from_latents")
        result.update({k: v for k, v in gen["saved"].settings.items() if k in result and k not in keep},
                      sampled_by=sorted(gen["saved"].models))
    result.update(num_samples=len(prompts.captions), captions=prompts.source, images=str(folder),
                  image_size=list(_image_size(gen["paths"][0])), generation_seconds=gen["seconds"])
    result["fid"] = (folder_fid(folder, judges, device, progress) if judges.features and judges.reference
                     else {"skipped": judges.notes.get("fid", "no reference")})
    result["clip_score"] = (folder_clip_score(folder, judges, progress) if judges.clip
                            else {"skipped": judges.notes.get("clip", "no CLIP model")})
    if judges.classifier is not None:
        result["class_accuracy"] = {**class_accuracy(prompts, gen["predictions"], judges.classifier),
                                    "classifier": judges.notes.get("classifier_path", "")}
    else:
        result["class_accuracy"] = {"skipped": judges.notes.get("classifier", "no classifier")}
    result.update(wall_seconds=time.time() - start, notes=dict(judges.notes),
                  created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  latentdiff=__version__)
    return result


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as im:
        return im.size


def _fmt(section: dict, key: str = "value", spec: str = ".2f") -> str:
    value = section.get(key)
    return "–" if value is None else format(value, spec)


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


MD_HEADER = ("| date | checkpoint | sampler | steps | scale | seed | N | FID | CLIP score | class acc. | wall (s) |\n"
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n")


def markdown_row(result: dict) -> str:
    acc = result["class_accuracy"].get("accuracy")
    return (f"| {result['created'][:10]} | {Path(result['checkpoint']).name or result['model']} | {result['sampler']}"
            f" | {result['steps']} | {result['scale']:g} | {result['seed']} | {result['num_samples']}"
            f" | {_fmt(result['fid'])} | {_fmt(result['clip_score'])}"
            f" | {_pct(acc)} | {result['wall_seconds']:.0f} |\n")


def write_results(outdir: str | Path, result: dict) -> tuple[Path, Path]:
    """Write ``outdir/results.json`` and append a row to ``outdir/results.md`` (both atomically)."""
    outdir = Path(outdir)
    json_path, md_path = outdir / "results.json", outdir / "results.md"
    with atomic_write(json_path, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    old = md_path.read_text(encoding="utf-8") if md_path.is_file() else MD_HEADER
    with atomic_write(md_path, "w") as f:
        f.write(old + markdown_row(result))
    return json_path, md_path


def sweep_markdown(results: list[dict]) -> str:
    """A Markdown table of a sampler sweep: one row per (sampler, steps)."""
    lines = ["| sampler | steps | FID | class acc. | s / image |", "|---|---:|---:|---:|---:|"]
    for r in results:
        acc = r["class_accuracy"].get("accuracy")
        lines.append(f"| {r['sampler']} | {r['steps']} | {_fmt(r['fid'])} | {_pct(acc)} | "
                     f"{r['generation_seconds'] / r['num_samples']:.3f} |")
    return "\n".join(lines) + "\n"


def plot_sweep(results: list[dict], path: str | Path, title: str = "") -> Path:
    """PNG with FID vs steps and class accuracy vs steps, one line per sampler (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for sampler in dict.fromkeys(r["sampler"] for r in results):
        rows = sorted((r for r in results if r["sampler"] == sampler), key=lambda r: r["steps"])
        steps = [r["steps"] for r in rows]
        axes[0].plot(steps, [r["fid"].get("value", float("nan")) for r in rows], marker="o", label=sampler)
        acc = [r["class_accuracy"].get("accuracy") for r in rows]
        axes[1].plot(steps, [float("nan") if a is None else 100 * a for a in acc], marker="o", label=sampler)
    for ax, label in zip(axes, ("FID (lower is better)", "class accuracy % (higher is better)")):
        ax.set_xscale("log")
        ax.set_xlabel("sampling steps")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)
    return Path(path)
