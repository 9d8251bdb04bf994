"""The text-to-image benchmark (latentdiff eval-t2i, latentdiff sampler-sweep) end to end on a tiny random checkpoint,
a tiny Inception stand-in and a tiny random classifier. Nothing is downloaded."""

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from latentdiff.cli import eval_t2i as eval_tool
from latentdiff.cli import sampler_sweep as sweep_tool
from latentdiff.metrics import clip_score, t2i
from latentdiff.metrics.classifier import CifarClassifier, save_classifier
from latentdiff.metrics.fid import Features
from latentdiff.pipelines import LatentDiffusionPipeline, parse_parameters
from tests.tiny import tiny_ldm_config

ROOT = Path(__file__).resolve().parents[1]




def _tiny_features(weights=None, device="cpu") -> Features:
    """Stand-in for Inception: channel means and stds of a 4x4 average pool, (B, 3, 299, 299) -> (B, 6)."""

    def model(x):
        B = x.shape[0]
        pooled = torch.nn.functional.adaptive_avg_pool2d(x, 4).reshape(B, 3, 16)
        return torch.cat([pooled.mean(-1), pooled.std(-1)], dim=1)  # (B, 6)

    return Features("tiny-test", lambda: (model, "none"))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    torch.manual_seed(0)
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("assets")
    ckpt = LatentDiffusionPipeline.from_config(tiny_ldm_config()).save(folder / "tiny.safetensors")
    classifier = save_classifier(CifarClassifier(list(t2i.CIFAR10_CLASSES), widths=(4, 8, 8)),
                                 folder / "clf.safetensors")
    rng = np.random.default_rng(0)
    reference = folder / "ref.tar"
    with tarfile.open(reference, "w") as tf:
        for i in range(6):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buf, format="PNG")
            info = tarfile.TarInfo(f"{i:04d}.png")
            info.size = len(buf.getvalue())
            tf.addfile(info, io.BytesIO(buf.getvalue()))
    return {"ckpt": str(ckpt), "classifier": str(classifier), "reference": str(reference),
            "cache": str(folder / "cache")}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setattr(t2i, "inception_features", _tiny_features)
    monkeypatch.setattr(clip_score, "cached_pretrained", lambda model, tag: None)  # an empty CLIP cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _argv(assets, outdir, *extra):
    return ["--ckpt", assets["ckpt"], "--steps", "2", "--num-samples", "4", "--batch-size", "3",
            "--reference", assets["reference"], "--classifier", assets["classifier"], "--cache-dir", assets["cache"],
            "--outdir", str(outdir), "--device", "cpu", "--quiet", *extra]


def test_eval_end_to_end(assets, tmp_path, capsys):
    out = tmp_path / "eval"
    assert eval_tool.main(_argv(assets, out, "--scale", "2", "--seed", "5")) == 0
    result = json.loads((out / "results.json").read_text())
    for key in ("checkpoint", "sampler", "steps", "scale", "seed", "num_samples", "wall_seconds", "image_size",
                "captions", "generation_seconds", "device", "precision", "reference", "notes", "created"):
        assert key in result, key
    assert (result["sampler"], result["steps"], result["scale"], result["seed"]) == ("ddim", 2, 2.0, 5)
    assert result["fid"]["value"] >= 0 and result["fid"]["generated_count"] == 4
    assert result["fid"]["reference_count"] == 6 and result["fid"]["feature_extractor"] == "tiny-test"
    assert result["fid"]["resize"] and "inception_weights" in result["fid"]
    assert "skipped" in result["clip_score"]  # no CLIP weights offline: skipped with a note
    acc = result["class_accuracy"]
    assert 0 <= acc["accuracy"] <= 1 and acc["images"] == 4 and len(acc["per_class"]) == 10
    assert acc["count"]["airplane"] == 1 and acc["count"]["truck"] == 0
    pngs = sorted((out / "images").glob("*.png"))
    assert len(pngs) == 4
    for i, path in enumerate(pngs):
        with Image.open(path) as im:
            params = parse_parameters(im.info["parameters"])
            assert im.size == (16, 16)
        assert params["prompt"] == t2i.class_prompts(t2i.CIFAR10_CLASSES, 4).captions[i]
        fields = (params["Steps"], params["Sampler"], params["CFG scale"], params["Seed"])
        assert fields == ("2", "ddim", "2", str(5 + i))
    md = (out / "results.md").read_text().splitlines()
    assert md[0].startswith("| date |") and len(md) == 3 and "| ddim | 2 |" in md[2]
    assert "fid:" in capsys.readouterr().out
    # the reference statistics were cached; the images folder is never reused
    assert list(Path(assets["cache"]).glob("*.npz"))
    with pytest.raises(SystemExit) as e:
        eval_tool.main(_argv(assets, out))
    assert e.value.code == 2 and "already holds images" in capsys.readouterr().err


def test_caption_file_labels_and_no_fid(assets, tmp_path):
    captions = tmp_path / "captions.txt"
    captions.write_text("two cats on a sofa\n\na red truck\na cat and a dog\n")
    out = tmp_path / "eval"
    assert eval_tool.main(_argv(assets, out, "--captions", str(captions), "--reference", "none", "--no-clip",
                                "--sampler", "euler_a")) == 0
    result = json.loads((out / "results.json").read_text())
    assert result["fid"] == {"skipped": "no reference given"}
    assert result["class_accuracy"]["images"] == 3  # "a cat and a dog" names two classes: not counted
    assert t2i.caption_label("Two CATS", list(t2i.CIFAR10_CLASSES)) == 3


@pytest.mark.parametrize("change", [["--steps", "0"], ["--steps", "1000"], ["--captions", "missing.txt"],
                                    ["--ckpt", "missing.safetensors"], ["--reference", "missing-dir"],
                                    ["--num-samples", "0"], ["--sampler", "nope"], ["--classifier", "CKPT"],
                                    ["--sampler", "vq_purity"], ["--truncation", "0.5"], ["--truncation", "0"],
                                    ["--truncation", "1.5"]])
def test_eval_bad_input_exits_2(assets, tmp_path, capsys, change):
    change = [assets["ckpt"] if c == "CKPT" else c for c in change]  # a model file is not a classifier
    with pytest.raises(SystemExit) as e:
        eval_tool.main(_argv(assets, tmp_path / "x", *change))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "error" in err and "Traceback" not in err


def test_vq_truncation_reaches_the_sampler_and_the_results(assets, tmp_path):
    """--truncation on a VQ-Diffusion model: recorded in results.json and every PNG, and it is what samples: the
    model's own rate given explicitly repeats the default run byte for byte, a lower one changes the images."""
    from latentdiff.pipelines import VQDiffusionPipeline
    from tests.test_vq_pipeline import randomize, tiny_vq_config

    torch.manual_seed(0)
    vq = randomize(VQDiffusionPipeline.from_config(tiny_vq_config(), name="tiny-vq")).save(tmp_path / "vq.safetensors")
    runs = {}
    for name, extra in (("default", []), ("same", ["--truncation", "0.9"]), ("low", ["--truncation", "0.3"])):
        argv = _argv(assets, tmp_path / name, "--reference", "none", "--no-clip", *extra)
        argv[argv.index("--ckpt") + 1] = str(vq)
        assert eval_tool.main(argv) == 0
        result = json.loads((tmp_path / name / "results.json").read_text())
        pngs = sorted((tmp_path / name / "images").glob("*.png"))
        truncations = set()
        for path in pngs:
            with Image.open(path) as im:
                truncations.add(parse_parameters(im.info["parameters"])["Truncation"])
        runs[name] = (result["truncation"], truncations, [p.read_bytes() for p in pngs])
    assert runs["default"][:2] == (0.9, {"0.9"}) and runs["same"][:2] == (0.9, {"0.9"})
    assert runs["low"][:2] == (0.3, {"0.3"})
    assert runs["same"][2] == runs["default"][2]
    assert len(runs["low"][2]) == 4 and runs["low"][2] != runs["default"][2]


def test_sweep_writes_table_and_plot(assets, tmp_path):
    out = tmp_path / "sweep"
    argv = _argv(assets, out, "--samplers", "ddim", "dpmpp_2m", "--num-samples", "2")
    argv[argv.index("--steps") + 1:argv.index("--steps") + 2] = ["1", "2"]
    assert sweep_tool.main(argv) == 0
    summary = json.loads((out / "sweep.json").read_text())
    assert [(r["sampler"], r["steps"]) for r in summary["results"]] == [("ddim", 1), ("ddim", 2), ("dpmpp_2m", 1),
                                                                       ("dpmpp_2m", 2)]
    assert all("value" in r["fid"] and "accuracy" in r["class_accuracy"] for r in summary["results"])
    table = (out / "sweep.md").read_text()
    assert "| dpmpp_2m | 2 |" in table
    with Image.open(out / "sweep.png") as im:
        assert im.format == "PNG" and im.size[0] > 100
    assert (out / "ddim-1" / "results.json").is_file()


def test_split_runs_with_start_merge_into_the_whole(assets, tmp_path):
    """Images 0-1 in one run and 2-4 in another (--start 2) are the images of one run of 5, file for file."""
    common = ("--reference", "none", "--no-clip", "--seed", "3")
    whole, first, second = tmp_path / "whole", tmp_path / "a", tmp_path / "b"
    assert eval_tool.main(_argv(assets, whole, *common, "--num-samples", "5")) == 0
    assert eval_tool.main(_argv(assets, first, *common, "--num-samples", "2")) == 0
    assert eval_tool.main(_argv(assets, second, *common, "--num-samples", "3", "--start", "2")) == 0
    parts = sorted(p.name for p in (first / "images").glob("*.png")) + sorted(
        p.name for p in (second / "images").glob("*.png"))
    assert parts == [f"{i:05d}.png" for i in range(5)]
    for name in parts:
        folder = first if (first / "images" / name).exists() else second
        assert (folder / "images" / name).read_bytes() == (whole / "images" / name).read_bytes(), name
    assert json.loads((second / "results.json").read_text())["start"] == 2
    with pytest.raises(SystemExit) as e:
        eval_tool.main(_argv(assets, tmp_path / "bad", *common, "--start", "-1"))
    assert e.value.code == 2


def _pixels(folder: Path) -> list[np.ndarray]:
    return [np.asarray(Image.open(p).convert("RGB")) for p in sorted((folder / "images").glob("*.png"))]


def test_saved_latents_decode_to_the_same_images(assets, tmp_path):
    """--save-latents changes no image; --from-latents with the same model (another batch size) gives the same
    pixels, the same class accuracy and the saving run's settings; a decoder with other latent scaling gets the
    latents rescaled (the same images up to rounding), one with other weights other images."""
    from latentdiff.metrics.saved_latents import load_saved
    from latentdiff.pipelines import load_pipeline

    common = ("--reference", "none", "--no-clip", "--seed", "2", "--num-samples", "5", "--scale", "2")
    plain, saving, decoded = tmp_path / "plain", tmp_path / "saving", tmp_path / "decoded"
    assert eval_tool.main(_argv(assets, plain, *common)) == 0
    assert eval_tool.main(_argv(assets, saving, *common, "--save-latents")) == 0
    files = sorted(p.name for p in (saving / "latents").iterdir())
    assert files == ["latents-000000-000002.safetensors", "latents-000003-000004.safetensors"]
    assert [p.read_bytes() for p in sorted((plain / "images").glob("*.png"))] == [
        p.read_bytes() for p in sorted((saving / "images").glob("*.png"))]
    argv = _argv(assets, decoded, "--reference", "none", "--no-clip", "--num-samples", "5", "--batch-size", "2",
                 "--from-latents", str(saving / "latents"), "--steps", "7", "--scale", "9")
    assert eval_tool.main(argv) == 0
    assert all((a == b).all() for a, b in zip(_pixels(saving), _pixels(decoded))) and len(_pixels(decoded)) == 5
    first, again = (json.loads((d / "results.json").read_text()) for d in (saving, decoded))
    assert (again["steps"], again["scale"], again["seed"], again["sampler"]) == (2, 2.0, 2, "ddim")
    assert again["from_latents"] == str(saving / "latents") and again["sampled_by"][0].startswith("tiny")
    assert again["class_accuracy"]["accuracy"] == first["class_accuracy"]["accuracy"]
    with Image.open(decoded / "images" / "00001.png") as im:
        params = parse_parameters(im.info["parameters"])
    assert (params["Seed"], params["VAE"], params["prompt"]) == ("3", "tiny", "a photo of an automobile")

    original = load_pipeline(assets["ckpt"])
    rescaled = LatentDiffusionPipeline.from_config(tiny_ldm_config(autoencoder={"scaling_factor": 0.5}))
    for name in ("unet", "autoencoder", "text_encoder"):
        getattr(rescaled, name).load_state_dict(getattr(original, name).state_dict())
    other = load_pipeline(assets["ckpt"])
    with torch.no_grad():
        other.autoencoder.decoder.conv_out.bias.add_(0.3)
    for name, pipe in (("rescaled", rescaled), ("other", other)):
        ckpt = pipe.save(tmp_path / f"{name}.safetensors")
        argv = _argv(assets, tmp_path / name, "--reference", "none", "--no-clip",
                     "--from-latents", str(saving / "latents"))
        argv[argv.index("--ckpt") + 1] = str(ckpt)
        del argv[argv.index("--num-samples"):argv.index("--num-samples") + 2]  # default: every saved image
        assert eval_tool.main(argv) == 0
    def largest_differences(name):
        return [np.abs(a.astype(int) - b.astype(int)).max() for a, b in zip(_pixels(saving), _pixels(tmp_path / name))]

    assert len(_pixels(tmp_path / "rescaled")) == 5  # no --num-samples: every saved image
    assert max(largest_differences("rescaled")) <= 1 and min(largest_differences("other")) > 10
    assert len(load_saved(saving / "latents").latents) == 5


def test_vq_codes_round_trip_and_bad_saved_latents_exit_2(assets, tmp_path, capsys):
    """VQ code grids decode to the same images; latents that do not fit the run (another kind of autoencoder,
    captions, indices, a damaged or doubled file, both flags) stop it with status 2 before any image is written."""
    from latentdiff.pipelines import VQDiffusionPipeline
    from tests.test_vq_pipeline import randomize, tiny_vq_config

    torch.manual_seed(0)
    vq = randomize(VQDiffusionPipeline.from_config(tiny_vq_config(), name="tiny-vq")).save(tmp_path / "vq.safetensors")
    common = ("--reference", "none", "--no-clip", "--num-samples", "4")
    runs = {}
    for name, extra in (("vq-save", ["--save-latents"]), ("vq-decoded", ["--from-latents", "vq-save/latents"]),
                        ("kl-save", ["--save-latents"]), ("kl-later", ["--save-latents", "--start", "2"])):
        argv = _argv(assets, tmp_path / name, *common, *[str(tmp_path / e) if "/" in e else e for e in extra])
        if name.startswith("vq"):
            argv[argv.index("--ckpt") + 1] = str(vq)
        assert eval_tool.main(argv) == 0
        runs[name] = _pixels(tmp_path / name)
    assert all((a == b).all() for a, b in zip(runs["vq-save"], runs["vq-decoded"])) and len(runs["vq-decoded"]) == 4

    kl = tmp_path / "kl-save" / "latents"
    captions = tmp_path / "captions.txt"
    captions.write_text("a red truck\n")
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "latents-000000-000003.safetensors").write_bytes(
        (kl / "latents-000000-000002.safetensors").read_bytes()[:100])
    doubled, renamed = tmp_path / "doubled", tmp_path / "renamed"
    for folder in (doubled, renamed):
        folder.mkdir()
        for name in ("latents-000000-000002.safetensors", "latents-000003-000003.safetensors"):
            (folder / name).write_bytes((kl / name).read_bytes())
    shutil.copy(tmp_path / "kl-later" / "latents" / "latents-000002-000004.safetensors", doubled)
    (renamed / "latents-000003-000003.safetensors").rename(renamed / "latents-000004-000004.safetensors")
    cases = [(["--from-latents", str(tmp_path / "vq-save" / "latents")], "VQ code grids"),
             (["--from-latents", str(kl), "--num-samples", "5"], "no latents for images 4..4"),
             (["--from-latents", str(kl), "--start", "2"], "no latents for images 4..5"),
             (["--from-latents", str(kl), "--captions", str(captions)], "were sampled for"),
             (["--from-latents", str(kl), "--save-latents"], "exclude each other"),
             (["--from-latents", str(tmp_path / "nowhere")], "is not a folder"),
             (["--from-latents", str(damaged)], "latents-000000-000003.safetensors is damaged"),
             (["--from-latents", str(doubled)], "image 2 is in two files"),
             (["--from-latents", str(renamed)], "holds images 3..3, not those of its name")]
    for i, (extra, message) in enumerate(cases):
        out = tmp_path / f"bad{i}"
        with pytest.raises(SystemExit) as e:
            eval_tool.main(_argv(assets, out, *common, *extra))
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and "Traceback" not in err, (extra, err)
        assert not list(out.glob("images/*.png"))
    argv = _argv(assets, tmp_path / "after", "--from-latents", str(kl), "--start", "4")
    del argv[argv.index("--num-samples"):argv.index("--num-samples") + 2]  # every saved image from 4 on: none
    with pytest.raises(SystemExit) as e:
        eval_tool.main(argv)
    assert e.value.code == 2 and "holds no latents of images 4 and after" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # the folder of a --save-latents run is never written twice
        eval_tool.main(_argv(assets, tmp_path / "kl-save", *common, "--save-latents"))
    assert e.value.code == 2 and "already holds" in capsys.readouterr().err
