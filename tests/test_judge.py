"""``latentdiff judge`` (latentdiff/cli/judge.py, metrics/judge.py): class accuracy of saved PNGs by a
classifier, with labels from each PNG's caption or its index, against the classifier applied directly to the
same pixels; bad input exits 2."""

import json

import pytest
import torch

from latentdiff.cli import judge as tool
from latentdiff.io.images import save_png_new, to_pil
from latentdiff.metrics.classifier import CifarClassifier, save_classifier
from latentdiff.metrics.judge import judge_folder
from tests.tiny import jitter

CLASSES = ["cat", "dog", "ship"]
CAPTIONS = ["a photo of a cat", "two dogs on grass", "a photo of a ship", "a cat and a dog", "an empty field"]
LABELS = [0, 1, 2, None, None]  # a caption naming two classes, or none, is not judged


@pytest.fixture(scope="module")
def classifier_file(tmp_path_factory):
    torch.manual_seed(0)
    model = jitter(CifarClassifier(CLASSES, (4, 8, 8), 16), std=0.5).eval()
    return save_classifier(model, tmp_path_factory.mktemp("clf") / "judge.safetensors",
                           metadata={"test": {"accuracy": 0.5, "samples": 30}})


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """20 PNGs (16×16) cycling over CAPTIONS, with A1111 parameters as txt2img writes them; pixels in [-1, 1]."""
    out = tmp_path_factory.mktemp("eval") / "images"
    g = torch.Generator().manual_seed(1)
    images = torch.rand(20, 3, 16, 16, generator=g) * 2 - 1
    for i, im in enumerate(to_pil(images)):
        save_png_new(im, out, f"{CAPTIONS[i % 5]}\nSteps: 25, Sampler: DDIM, CFG scale: 5, Seed: {i}")
    return out


def direct_predictions(classifier_file, folder):
    """The classifier on the decoded PNGs, by PIL and numpy rather than judge_folder's reading."""
    import numpy as np
    from PIL import Image

    from latentdiff.metrics.classifier import load_classifier

    files = sorted(folder.glob("*.png"))
    x = torch.from_numpy(np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files]))
    x = x.permute(0, 3, 1, 2).float() / 127.5 - 1
    return load_classifier(classifier_file).predict(x).argmax(dim=1)


def test_labels_from_captions_and_accuracy_equal_the_direct_classifier(classifier_file, folder):
    from latentdiff.metrics.classifier import load_classifier

    predicted = direct_predictions(classifier_file, folder)
    labels = [LABELS[i % 5] for i in range(20)]
    keep = [i for i, label in enumerate(labels) if label is not None]
    expected = float((predicted[keep] == torch.tensor([labels[i] for i in keep])).float().mean())
    report = judge_folder(folder.parent, load_classifier(classifier_file), batch_size=7, progress=False)  # eval dir
    assert report["files"] == 20 and report["unlabelled"] == 8 and report["images"] == 12
    assert report["accuracy"] == pytest.approx(expected)
    confusion = torch.tensor(report["confusion"])
    assert confusion.sum() == 12 and confusion.sum(dim=1).tolist() == [4, 4, 4]  # 4 images captioned per class
    for c in range(3):  # each row: where that class's images went
        rows = [i for i in keep if labels[i] == c]
        assert confusion[c].tolist() == [int((predicted[rows] == k).sum()) for k in range(3)]


def test_labels_by_index(classifier_file, folder):
    from latentdiff.metrics.classifier import load_classifier

    predicted = direct_predictions(classifier_file, folder)
    report = judge_folder(folder, load_classifier(classifier_file), labels="index", progress=False)
    assert report["images"] == 20 and report["unlabelled"] == 0
    assert report["accuracy"] == pytest.approx(float((predicted == torch.arange(20) % 3).float().mean()))


def test_cli_writes_json_and_markdown(classifier_file, folder, tmp_path, capsys):
    out = tmp_path / "judge.json"
    assert tool.main([str(folder), str(folder.parent), "--classifier", str(classifier_file), "--out", str(out),
                      "--quiet"]) == 0
    results = json.loads(out.read_text())
    assert [r["images"] for r in results["folders"]] == [12, 12]
    assert results["folders"][0]["accuracy"] == results["folders"][1]["accuracy"]
    table = out.with_suffix(".md").read_text()
    assert table.count("\n| `") == 2 and "50.0 % on 30 real test images" in table
    assert "8 without a single-class caption skipped" in capsys.readouterr().out
    assert tool.main([str(folder), "--classifier", str(classifier_file), "--out", str(out), "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err  # never over an existing file


@pytest.mark.parametrize("change", ["missing folder", "not a classifier", "no pngs", "no class", "bad out",
                                    "index names"])
def test_cli_bad_input_exits_2(change, classifier_file, folder, tmp_path, capsys):
    argv = [str(folder), "--classifier", str(classifier_file), "--quiet"]
    if change == "missing folder":
        argv[0] = str(tmp_path / "nothing")
    elif change == "not a classifier":
        bad = tmp_path / "x.safetensors"
        bad.write_bytes(b"not a safetensors file")
        argv[2] = str(bad)
    elif change == "no pngs":
        (tmp_path / "empty").mkdir()
        argv[0] = str(tmp_path / "empty")
    elif change == "no class":  # no caption names one of the classifier's classes
        for i in range(2):
            save_png_new(to_pil(torch.zeros(1, 3, 16, 16))[0], tmp_path / "none", f"an empty field\nSeed: {i}")
        argv[0] = str(tmp_path / "none")
    elif change == "bad out":
        argv += ["--out", str(tmp_path / "judge.txt")]
    else:
        to_pil(torch.zeros(1, 3, 16, 16))[0].save(tmp_path / "a.png")
        argv = [str(tmp_path), "--labels", "index", *argv[1:]]
    assert tool.main(argv) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err
