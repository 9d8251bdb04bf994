"""Shard writing: latentdiff make-shards on class folders, caption files, archives and the CIFAR-10 copy; manifest,
byte-identical round trip, determinism, bad input."""

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from latentdiff.cli import make_shards
from latentdiff.cli import validate_shards as tool
from latentdiff.data.captions import article, fill_template, parse_class_map, pick_template
from latentdiff.data.manifest import load_manifest, sha256_file

ROOT = Path(__file__).resolve().parents[1]
CIFAR_TEST = ROOT.parent / "shared" / "data" / "cifar10" / "cifar10-test.tar.gz"  # beside the checkout


def image_bytes(i: int, fmt: str = "JPEG", size=(8, 6)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (i * 40 % 256, 255 - i * 30 % 256, i * 70 % 256)).save(buf, fmt)
    return buf.getvalue()


def read_shards(folder: Path) -> dict[str, dict[str, bytes]]:
    """All samples of a shard folder, in manifest order: key -> {ext: bytes}."""
    out = {}
    for record in load_manifest(folder).shards:
        with tarfile.open(folder / record.name) as tf:
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                out.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return out


@pytest.fixture
def class_folder(tmp_path):
    """3 classes x 3 images: JPEGs, plus one PNG."""
    root = tmp_path / "src"
    files = {}
    for c, name in enumerate(["airplane", "automobile", "cat"]):
        (root / name).mkdir(parents=True)
        for i in range(3):
            fmt, ext = ("PNG", "png") if (c, i) == (2, 2) else ("JPEG", "jpg")
            data = image_bytes(3 * c + i, fmt)
            (root / name / f"{i:04d}.{ext}").write_bytes(data)
            files[f"{name}/{i:04d}.{ext}"] = data
    return root, files


def run(argv: list[str]) -> int:
    return make_shards.main([*argv, "--quiet"])


def test_class_folder_round_trip(class_folder, tmp_path):
    root, files = class_folder
    out = tmp_path / "out"
    assert run([str(root), str(out), "--samples-per-shard", "4"]) == 0
    manifest = load_manifest(out)
    assert [s.samples for s in manifest.shards] == [4, 4, 1] and manifest.total_samples == 9
    assert [s.name for s in manifest.shards] == ["src-000000.tar", "src-000001.tar", "src-000002.tar"]
    for s in manifest.shards:
        assert s.sha256 == sha256_file(out / s.name) and s.bytes == (out / s.name).stat().st_size
    assert manifest.extra["classes"] == {"airplane": 3, "automobile": 3, "cat": 3}
    samples = read_shards(out)
    assert sorted(samples) == [f"{i:09d}" for i in range(9)]
    for members in samples.values():
        meta = json.loads(members["json"])
        source = files[meta["source"]]
        if meta["source"].endswith(".jpg"):
            assert members["jpg"] == source  # copied, not re-encoded
        else:
            assert Image.open(io.BytesIO(members["jpg"])).format == "JPEG"  # the PNG was converted
        assert (meta["width"], meta["height"], meta["class"]) == (8, 6, meta["source"].split("/")[0])
        article_ = "an" if meta["class"] in ("airplane", "automobile") else "a"
        assert members["txt"].decode() == f"a photo of {article_} {meta['class']}"
    out2 = tmp_path / "out2"
    assert run([str(root), str(out2), "--samples-per-shard", "4"]) == 0
    assert all((out / s.name).read_bytes() == (out2 / s.name).read_bytes() for s in manifest.shards)
    # webdataset reads the shards as standard img2dataset shards
    first = next(iter(wds.WebDataset(str(out / "src-000000.tar"), shardshuffle=False)))
    assert first["__key__"] == "000000000" and first["jpg"] == samples["000000000"]["jpg"]


def test_caption_files_png_and_templates(tmp_path):
    root = tmp_path / "src"
    root.mkdir()
    for i in range(4):
        (root / f"img{i}.png").write_bytes(image_bytes(i, "PNG"))
        if i != 3:
            (root / f"img{i}.txt").write_text(f"  caption number {i}\n")
    out = tmp_path / "out"
    assert run([str(root), str(out), "--image-format", "png", "--no-shuffle"]) == 0
    manifest = load_manifest(out)
    assert manifest.total_samples == 3 and manifest.extra["layout"] == "captions"
    assert manifest.skipped == [{"source": "img3.png", "reason": "no caption file img3.txt"}]
    samples = list(read_shards(out).values())
    assert [s["txt"].decode() for s in samples] == [f"caption number {i}" for i in range(3)]
    assert [s["png"] for s in samples] == [(root / f"img{i}.png").read_bytes() for i in range(3)]


def test_archive_source_class_map_and_overwrite(class_folder, tmp_path):
    root, files = class_folder
    archive = tmp_path / "src.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(root, arcname="train")
    out = tmp_path / "out"
    templates = ["a photo of a {}", "a blurry photo of a {}"]
    assert run([str(archive), str(out), "--class-map", "airplane=plane,cat=house_cat",
                "--caption-template", templates[0], "--caption-template", templates[1]]) == 0
    samples = list(read_shards(out).values())
    assert len(samples) == 9
    for members in samples:
        meta = json.loads(members["json"])
        name = {"airplane": "plane", "cat": "house cat"}.get(meta["class"], meta["class"])
        assert members["txt"].decode() == fill_template(pick_template(templates, meta["source"]), name)
        if meta["source"].endswith(".jpg"):
            assert members["jpg"] == files[meta["source"].removeprefix("train/")]
    assert {m["txt"].decode().split(" photo")[0] for m in samples} == {"a", "a blurry"}  # both templates used
    assert run([str(archive), str(out), "--samples-per-shard", "2", "--overwrite", "--max-samples", "3"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "src-000000.tar", "src-000001.tar"]


def test_cifar10_copy_max_samples(tmp_path):
    if not CIFAR_TEST.is_file():
        pytest.skip("the CIFAR-10 copy is not available")
    out = tmp_path / "cifar"
    assert run([str(CIFAR_TEST), str(out), "--max-samples", "20", "--samples-per-shard", "8", "--validate"]) == 0
    manifest = load_manifest(out)
    assert [s.samples for s in manifest.shards] == [8, 8, 4]
    samples = read_shards(out)
    wanted = {json.loads(m["json"])["source"] for m in samples.values()}
    with tarfile.open(CIFAR_TEST, "r|gz") as tf:
        originals = {m.name: tf.extractfile(m).read() for m in tf if m.name in wanted}
    for members in samples.values():
        meta = json.loads(members["json"])
        assert members["jpg"] == originals[meta["source"]] and (meta["width"], meta["height"]) == (32, 32)
        assert meta["source"].split("/")[1] == meta["class"]
        assert members["txt"].decode() == f"a photo of {article(meta['class'])} {meta['class']}"


def test_articles_and_class_maps(tmp_path):
    assert fill_template("a photo of a {}", "airplane") == "a photo of an airplane"
    assert fill_template("A {} on the road", "automobile") == "An automobile on the road"
    assert fill_template("an image of an {}", "truck") == "an image of a truck"
    assert fill_template("a {}", "unicorn") == "a unicorn" and fill_template("a {}", "hour glass") == "an hour glass"
    assert fill_template("{} in a field", "horse") == "horse in a field"
    assert parse_class_map("n01=tench, n02 = goldfish") == {"n01": "tench", "n02": "goldfish"}
    (tmp_path / "map.json").write_text('{"n01": "tench"}')
    assert parse_class_map(str(tmp_path / "map.json")) == {"n01": "tench"}


def test_bad_input_exits_2(class_folder, tmp_path, capsys):
    root, _ = class_folder
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    (tmp_path / "notes.txt").write_text("not an archive")
    cases = [
        ([str(tmp_path / "missing"), str(tmp_path / "o1")], "does not exist"),
        ([str(root), str(tmp_path / "full")], "not empty"),
        ([str(root), str(tmp_path / "o2"), "--caption-template", "a photo"], "exactly once"),
        ([str(root), str(tmp_path / "o3"), "--samples-per-shard", "0"], "--samples-per-shard: 0 is below the smallest"),
        ([str(tmp_path / "notes.txt"), str(tmp_path / "o4")], "readable tar archive"),
        ([str(root), str(tmp_path / "o5"), "--class-map", "nonsense"], "folder=name"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exc:
            run(argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    result = subprocess.run([sys.executable, "tools/make_shards.py", str(tmp_path / "missing"), str(tmp_path / "o")],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and "does not exist" in result.stderr and "Traceback" not in result.stderr


def test_validate_shards_tool(class_folder, tmp_path, capsys):
    root, _ = class_folder
    out = tmp_path / "out"
    assert run([str(root), str(out), "--samples-per-shard", "4"]) == 0
    assert tool.main([str(out), "--quiet"]) == 0
    shard = out / "src-000001.tar"
    shard.write_bytes(shard.read_bytes()[:700])  # truncated inside its first image
    assert tool.main([str(out), "--quiet", "--json", str(tmp_path / "report.json")]) == 1
    printed = capsys.readouterr().out
    assert "truncated_shard" in printed and "size_mismatch" in printed and "src-000001.tar" in printed
    assert json.loads((tmp_path / "report.json").read_text())["counts"]["missing_sample"] == 4
    with pytest.raises(SystemExit) as exc:
        tool.main([str(tmp_path / "nowhere")])
    assert exc.value.code == 2 and "is not a folder" in capsys.readouterr().err
