"""Class accuracy of generated images by a CIFAR-10 classifier (the "judge"), folder by folder.

    latentdiff judge eval/default-ddim25 eval/new-ddim25
    latentdiff judge outputs/txt2img --classifier judge.safetensors --out results/judge.json
    latentdiff judge eval/old/images --labels index --classifier latentdiff/assets/cifar10_classifier.safetensors

FOLDER: a folder of PNGs, or an eval-t2i output folder (its images/ are read). Each image's class is the one its
caption names (the prompt stored in the PNG's generation parameters, as txt2img and eval-t2i write them: "a photo of
a cat" is a cat); images whose caption names no single class are counted and skipped. --labels index instead takes
image i.png as class i mod 10 (eval-t2i's class captions) for PNGs without parameters. Use it to score the same
images by another judge, e.g. old evaluations by a new classifier, without generating them again.

Prints a table (accuracy overall and per class, one row per folder); --out also writes the reports (with confusion
matrices) as JSON and the table beside it as .md, atomically, never over existing files unless --overwrite.
Bad input prints one message and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from latentdiff.cli.common import BATCH, ArgumentParser, report_error, report_paths, resolve_device_dtype


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, prog=prog)
    p.add_argument("folders", nargs="+", metavar="FOLDER", help="image folders (or eval-t2i output folders)")
    p.add_argument("--classifier", default=None,
                   help="classifier .safetensors (latentdiff train-classifier); default: the embedded judge")
    p.add_argument("--labels", choices=("prompt", "index"), default="prompt",
                   help="where each image's class comes from: the caption in its PNG, or its index (i mod the classes)")
    p.add_argument("--out", default=None, help="results .json (the Markdown table goes beside it as .md)")
    p.add_argument("--overwrite", action="store_true", help="replace --out and its .md")
    p.add_argument("--batch-size", type=BATCH, default=500, help="images per classifier batch")
    p.add_argument("--device", default="cpu", help="torch device (auto: cuda if available)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def markdown(results: dict) -> str:
    """One row per folder: images judged, accuracy, then each class's accuracy."""
    names = results["class_names"]
    head = ["folder", "images judged", "accuracy", *names]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in results["folders"]:
        per_class = [("-" if row["per_class"][n] is None else f"{100 * row['per_class'][n]:.1f}") for n in names]
        lines.append("| " + " | ".join([f"`{row['folder']}`", str(row["images"]), f"{100 * row['accuracy']:.1f} %",
                                         *per_class]) + " |")
    lines += ["", f"Judge: {results['classifier']} ({results['classifier_test_accuracy']})."]
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> None:
    from latentdiff.atomic import atomic_write
    from latentdiff.metrics.classifier import classifier_metadata, load_classifier
    from latentdiff.metrics.judge import judge_folder
    from latentdiff.metrics.t2i import DEFAULT_CLASSIFIER

    out, md_path = report_paths(args.out, args.overwrite) if args.out else (None, None)
    for folder in map(Path, args.folders):
        if not folder.is_dir():
            raise ValueError(f"{folder} is not a folder")
    path = Path(args.classifier) if args.classifier else DEFAULT_CLASSIFIER
    if not path.is_file():
        raise ValueError(f"classifier {path} does not exist" + ("" if args.classifier else
                         " (the embedded judge is missing: pass --classifier)"))
    device, _ = resolve_device_dtype(args.device, "fp32")
    classifier = load_classifier(path, device)  # CheckpointError (a ValueError) when it is not a classifier file
    test = classifier_metadata(path).get("test", {})
    accuracy = test.get("accuracy")
    start = time.time()
    results = {"classifier": str(path), "class_names": list(classifier.class_names), "labels": args.labels,
               "classifier_test_accuracy": "test accuracy not recorded" if accuracy is None else
               f"{100 * accuracy:.1f} % on {test.get('samples', '?')} real test images", "folders": []}
    for folder in args.folders:
        report = judge_folder(folder, classifier, args.labels, args.batch_size, progress=not args.quiet)
        if "skipped" in report:
            raise ValueError(f"{folder}: no image's caption names exactly one class of {classifier.class_names} "
                             "(--labels index takes the class from the file name)")
        results["folders"].append(report)
        print(f"{report['folder']}: class accuracy {report['accuracy']:.4f} on {report['images']} images"
              + (f" ({report['unlabelled']} without a single-class caption skipped)" if report["unlabelled"] else ""),
              flush=True)
    results["seconds"] = round(time.time() - start, 1)
    table = markdown(results)
    print(table, end="")
    if out is not None:
        with atomic_write(out, "w", overwrite=args.overwrite) as f:
            f.write(json.dumps(results, indent=2) + "\n")
        with atomic_write(md_path, "w", overwrite=args.overwrite) as f:
            f.write(table)
        print(f"wrote {out} and {md_path}")


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(sys.argv[1:] if argv is None else argv)
    try:
        run(args)
    except (FileExistsError, ValueError) as err:
        return report_error(str(err))
    return 0
