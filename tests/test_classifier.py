"""The CIFAR-10 judge classifier: shard reading, augmentation, training on a tiny synthetic shard set, exact reload,
and the training tool's exit codes."""

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from latentdiff.cli import train_classifier as tool
from latentdiff.io.checkpoint import CheckpointError
from latentdiff.metrics.classifier import (
    CifarClassifier,
    TrainSettings,
    augment,
    classifier_metadata,
    evaluate_classifier,
    load_classifier,
    load_labelled_shards,
    save_classifier,
    train_classifier,
)

ROOT = Path(__file__).resolve().parents[1]

CLASSES = ["blue", "green", "red"]  # the colour each class's images lean to
SETTINGS = TrainSettings(epochs=2, batch_size=8, widths=(4, 8, 8), lr=0.05)


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def write_shard(path: Path, n: int, seed: int = 0, size: int = 16, json_member: bool = True) -> None:
    rng = np.random.default_rng(seed)
    with tarfile.open(path, "w") as tf:
        for i in range(n):
            c = i % len(CLASSES)
            pixels = rng.integers(0, 120, (size, size, 3), dtype=np.uint8)
            pixels[..., 2 - c] += 120  # blue -> channel 2, green -> 1, red -> 0
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, format="PNG")
            _add(tf, f"{i:06d}.png", buf.getvalue())
            _add(tf, f"{i:06d}.txt", f"a photo of a {CLASSES[c]}".encode())
            if json_member:
                _add(tf, f"{i:06d}.json", json.dumps({"class": CLASSES[c]}).encode())


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    write_shard(folder / "train-000000.tar", 24, seed=0)
    write_shard(folder / "train-000001.tar", 24, seed=1)
    test = tmp_path_factory.mktemp("test") / "test.tar"
    write_shard(test, 12, seed=2)
    return folder, test


def test_reads_images_labels_and_sorted_classes(shards):
    folder, _ = shards
    data = load_labelled_shards(str(folder))
    assert data.images.shape == (48, 3, 16, 16) and data.images.dtype == torch.uint8
    assert data.class_names == CLASSES
    assert data.labels[:3].tolist() == [0, 1, 2]  # samples 0, 1, 2 are blue, green, red
    assert len(load_labelled_shards(str(folder), limit=5)) == 5


def test_missing_label_is_a_clear_error(tmp_path):
    write_shard(tmp_path / "x.tar", 3, json_member=False)
    with pytest.raises(ValueError, match="no .json member"):
        load_labelled_shards(str(tmp_path / "x.tar"))


def test_augment_translates_and_flips_whole_images():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    out = augment(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    for i in range(2):  # the centre 4x4 of each output is a shifted (maybe mirrored) window of the input
        windows = [x[i].flip(2) if f else x[i] for f in (0, 1)]
        assert any((w[:, 2 + dy:6 + dy, 2 + dx:6 + dx] == out[i, :, 2:6, 2:6]).all()
                   for w in windows for dy in range(-2, 3) for dx in range(-2, 3))


def test_train_save_reload_identical(shards, tmp_path):
    torch.set_num_threads(1)
    folder, test = shards
    model = train_classifier(load_labelled_shards(str(folder)), SETTINGS, progress=False)
    report = evaluate_classifier(model, load_labelled_shards(str(test), class_names=CLASSES))
    assert set(report["per_class"]) == set(CLASSES) and 0 <= report["accuracy"] <= 1
    path = save_classifier(model, tmp_path / "clf.safetensors", metadata={"note": {"a": 1}})
    loaded = load_classifier(path)
    assert loaded.class_names == CLASSES and loaded.widths == (4, 8, 8)
    x = torch.rand(5, 3, 20, 24) * 2 - 1  # any size: resized to the network's 16x16
    assert torch.equal(model.predict(x), loaded.predict(x))
    assert classifier_metadata(path)["note"] == {"a": 1}
    with pytest.raises(FileExistsError):
        save_classifier(model, path)


def test_load_refuses_other_files(tmp_path):
    save_file({"w": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="not a latentdiff classifier"):
        load_classifier(tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_classifier(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError):
        CifarClassifier(["a", "a"])


def test_tool_trains_and_reports(shards, tmp_path, capsys):
    folder, test = shards
    out = tmp_path / "clf.safetensors"
    argv = ["--shards", str(folder), "--test-shards", str(test), "--out", str(out), "--epochs", "1",
            "--batch-size", "8", "--widths", "4", "8", "8", "--quiet"]
    assert tool.main(argv) == 0
    meta = classifier_metadata(out)
    assert meta["config"]["class_names"] == CLASSES
    assert meta["test"]["samples"] == 12 and "accuracy" in meta["test"]
    assert meta["train"]["samples"] == 48
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # never replaces a file silently
        tool.main(argv)
    assert e.value.code == 2 and "--overwrite" in capsys.readouterr().err


@pytest.mark.parametrize("change", [["--out", "x.pt"], ["--shards", "/nonexistent/dir"], ["--epochs", "0"],
                                    ["--widths", "4", "8", "8", "8"]])
def test_tool_bad_input_exits_2(shards, tmp_path, capsys, change):
    folder, _ = shards
    argv = ["--shards", str(folder), "--out", str(tmp_path / "c.safetensors"), "--widths", "4", "8", "8",
            "--quiet", *change]
    with pytest.raises(SystemExit) as e:
        tool.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "error:" in err and "Traceback" not in err
