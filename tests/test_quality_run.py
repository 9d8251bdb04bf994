"""tools/quality_run.sh (issue #17's one GPU run): --help does nothing, bad arguments exit 2 before any work, and
its --smoke mode runs on the CPU on tiny data made here. The end-to-end test covers the stages shards, judge,
rfid-old, rfid-new and eval; `train` is skipped there (its own script's smoke run alone takes about a minute here)
and its outputs are stood in for by a tiny pipeline file, and `stats` with --no-fid (no Inception weights needed).
The train stage itself, with the discrete stream and a percept network, runs in tests/test_benchmarks_scripts.py."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.tiny import fresh_tiny_pipe

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools/quality_run.sh"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def run(args: list, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def archive(path: Path, split: str, per_class: int) -> Path:
    """A CIFAR-10-like archive: ``{split}/<class>/NNNN.jpg``, 32x32, a colour per class plus noise."""
    rng = np.random.default_rng(len(split))
    with tarfile.open(path, "w:gz") as tar:
        for c, name in enumerate(CLASSES):
            for i in range(per_class):
                base = np.array([c * 25, 255 - c * 25, (c * 70) % 256], np.int64)
                pixels = np.clip(base + rng.integers(-30, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
                buf = io.BytesIO()
                Image.fromarray(pixels).save(buf, format="JPEG")
                info = tarfile.TarInfo(f"{split}/{name}/{i:04d}.jpg")
                info.size = buf.tell()
                buf.seek(0)
                tar.addfile(info, buf)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cifar")
    archive(folder / "train.tar.gz", "train", 6)
    archive(folder / "test.tar.gz", "test", 2)
    return folder


def stand_in_runs(outdir: Path, model_bytes: bytes | None = None) -> None:
    """What the train stage of the continuous stream leaves: an autoencoder run's model and the packed model (both
    a tiny pipeline file here; rfid reads a pipeline's autoencoder), or ``model_bytes`` for both."""
    for rel in ("runs/cifar10_autoencoder/model.safetensors", "runs/cifar10_ldm/model-fp16.safetensors"):
        path = outdir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if model_bytes is None:
            fresh_tiny_pipe().save(path)
        else:
            path.write_bytes(model_bytes)


def test_help_prints_usage_and_does_nothing(tmp_path):
    out = run(["--help"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: tools/quality_run.sh [options] OUTDIR")
    for stage in ("stats", "judge", "rfid-old", "train", "rfid-new", "eval"):
        assert f"\n  {stage} " in out.stdout, stage
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments_exit_2_before_any_work(data, tmp_path):
    src = ["--train-source", data / "train.tar.gz", "--test-source", data / "test.tar.gz",
           "--shards", tmp_path / "trs", "--test-shards", tmp_path / "tes"]
    cases = {
        "missing OUTDIR": [],
        "unknown option --nope": ["--nope", "out"],
        "more than one OUTDIR": ["a", "b"],
        "--skip: unknown stage 'sample'": [*src, "--skip", "train,sample", "out"],
        "--skip names every stage (": [*src, "--skip", "stats,judge,rfid-old,train,rfid-new,eval", "out"],
        "nothing to run": [*src, "--no-fid", "--skip", "judge,rfid-old,train,rfid-new,eval", "out"],
        "--streams: unknown stream 'finetune'": [*src, "--streams", "continuous,finetune", "out"],
        "--num-samples must be a positive whole number": [*src, "--num-samples", "0", "out"],
        "--ae-minutes must be a positive number": [*src, "--ae-minutes", "soon", "out"],
        "--precision must be": [*src, "--precision", "fp8", "out"],
        "--device must be": [*src, "--device", "tpu", "out"],
        "--reference: no file": [*src, "--reference", tmp_path / "none.npz", "out"],
        "exclude each other": [*src, "--no-fid", "--reference", data / "test.tar.gz", "out"],
        "--train-source: ": ["--train-source", tmp_path / "none.tar.gz", "out"],
        "--ldm-config: no config file": [*src, "--ldm-config", tmp_path / "none.yaml", "out"],
        "--set takes KEY=VALUE": [*src, "--set", "steps", "out"],
        "no training shards": ["--shards", tmp_path / "trs", "--test-source", data / "test.tar.gz", "out"],
        "no test statistics": [*src, "--skip", "stats", "out"],
        "model.safetensors does not exist": [*src, "--no-fid", "--skip", "train", "out"],
        "--needs a value": ["--skip"],
    }
    for message, args in cases.items():
        out = run(args, cwd=tmp_path)
        assert out.returncode == 2, (args, out.stdout, out.stderr)
        expected = "--skip needs a value" if message == "--needs a value" else message
        assert "quality_run.sh: error: " in out.stderr and expected in out.stderr, (args, out.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no OUTDIR, no shards


def test_smoke_runs_the_stages_end_to_end(data, tmp_path):
    """shards -> judge -> rfid-old -> rfid-new -> eval on the CPU (train skipped, its outputs stood in for), then
    the summary's table is checked against the eval results and an independent re-scoring of the PNGs."""
    outdir = tmp_path / "out"
    stand_in_runs(outdir)
    out = run(["--smoke", "--device", "cpu", "--no-fid", "--streams", "continuous", "--skip", "train",
               "--train-source", data / "train.tar.gz", "--test-source", data / "test.tar.gz",
               "--shards", tmp_path / "trs", "--test-shards", tmp_path / "tes", outdir], cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert (tmp_path / "trs" / "manifest.json").is_file() and (tmp_path / "tes" / "manifest.json").is_file()
    status = {row.split("\t")[0]: row.split("\t")[1] for row in (outdir / "timings.tsv").read_text().splitlines()}
    assert status == {"shards": "done", "stats": "not run (--no-fid)", "judge": "done",
                      "percept": "not run (no train stage or no discrete stream)", "rfid-old": "done",
                      "train": "skipped (--skip)", "rfid-new": "done", "eval": "done"}
    for name in ("env.txt", "judge.log", "eval.log", "judge/cifar10_classifier.safetensors", "rfid/embedded.json",
                 "rfid/new.md"):
        assert (outdir / name).is_file(), name
    rfid = json.loads((outdir / "rfid/embedded.json").read_text())
    assert [m["kind"] for m in rfid["models"]] == ["kl"] and "rfid" not in rfid["models"][0]

    import torch

    from latentdiff.assets import CIFAR10_CLASSIFIER
    from latentdiff.metrics.classifier import load_classifier
    from latentdiff.metrics.t2i import caption_label
    from latentdiff.pipelines import load_pipeline

    embedded = load_classifier(CIFAR10_CLASSIFIER)
    summary = (outdir / "summary.md").read_text()
    assert sorted(p.name for p in outdir.glob("eval_*")) == ["eval_new_default", "eval_new_default_guided",
                                                             "eval_old_default"]
    embedded_config = load_pipeline("default").config  # the new model is also sampled with its guidance
    guided = json.loads((outdir / "eval_new_default_guided/results.json").read_text())
    assert guided["scale"] == embedded_config.guidance_scale and guided["sampler"] == "euler_a"
    assert guided["guidance_interval"] == embedded_config.guidance_interval is not None
    assert json.loads((outdir / "eval_new_default/results.json").read_text())["guidance_interval"] is None
    for label in ("old_default", "new_default", "new_default_guided"):
        folder = outdir / f"eval_{label}"
        result = json.loads((folder / "results.json").read_text())
        assert result["num_samples"] == 20 and result["fid"]["skipped"]
        assert result["class_accuracy"]["classifier"].endswith("judge/cifar10_classifier.safetensors")
        # the embedded judge's score, recomputed here from the PNGs and the captions they record
        files = sorted((folder / "images").glob("*.png"))
        images = [Image.open(f) for f in files]
        labels = torch.tensor([caption_label(im.info["parameters"].split("\n")[0], list(CLASSES)) for im in images])
        x = torch.stack([torch.from_numpy(np.asarray(im.convert("RGB")).copy()) for im in images])
        predicted = embedded.predict(x.permute(0, 3, 1, 2).float() / 127.5 - 1).argmax(1)
        expected = (predicted == labels).float().mean().item()
        second = json.loads((folder / "judge_embedded.json").read_text())["folders"][0]
        assert second["images"] == 20 and second["accuracy"] == pytest.approx(expected)
        new_judge = result["class_accuracy"]["accuracy"]
        assert f"| {label} | 20 | - | {100 * new_judge:.1f} % | {100 * expected:.1f} % |" in summary, summary
    assert "- default: undecided: no FID yet" in summary and "python tools/fid.py --save-stats" in summary
    assert "Traceback" not in out.stdout + out.stderr


def fake_eval(outdir: Path, label: str, fid: float, new_judge: float, old_judge: float, file: str,
              **settings) -> None:
    """An eval_<label>/ folder as the eval stage leaves it (results.json of eval_t2i with ``settings`` such as its
    scale, judge_embedded.json)."""
    folder = outdir / f"eval_{label}"
    folder.mkdir(parents=True)
    result = {"num_samples": 10000, "fid": {"value": fid}, "class_accuracy": {"accuracy": new_judge},
              "checkpoint": file, **settings}
    (folder / "results.json").write_text(json.dumps(result))
    (folder / "judge_embedded.json").write_text(json.dumps({"folders": [{"accuracy": old_judge, "images": 10000}]}))


@pytest.mark.parametrize("case", ["new ships with purity", "old repacked with purity"])
def test_vq_diffusion_verdict_weighs_both_samplers(data, tmp_path, case):
    """The discrete stream is judged with both samplers: a new VQ-Diffusion model that wins with purity sampling
    ships repacked with it as its default (the lower FID of the rows that ship); when no new model ships but purity
    sampling beats the embedded model's own sampler on both counts, the embedded file is repacked."""
    outdir = tmp_path / "out"
    new_file = outdir / "runs/cifar10_vq_diffusion/model-fp16.safetensors"
    new_file.parent.mkdir(parents=True)
    new_file.write_bytes(b"x" * 1000)
    new = (60.0, 0.70, 0.66) if case == "new ships with purity" else (120.0, 0.30, 0.28)
    fake_eval(outdir, "old_default-vq", 95.8, 0.46, 0.50, "default-vq")
    fake_eval(outdir, "old_default-vq_purity", 92.0, 0.47, 0.52, "default-vq")
    fake_eval(outdir, "new_default-vq", *new, str(new_file))
    fake_eval(outdir, "new_default-vq_purity", new[0] - 5, new[1] + 0.02, new[2] + 0.02, str(new_file))
    out = run(["--smoke", "--device", "cpu", "--no-fid", "--streams", "discrete", "--skip", "judge,train,rfid-new,eval",
               "--test-source", data / "test.tar.gz", outdir], cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = (outdir / "summary.md").read_text()
    assert "| old_default-vq_purity | 10000 | 92.00 | 47.0 % | 52.0 % |" in summary, summary
    asset = "latentdiff/assets/default_vq.safetensors"
    if case == "new ships with purity":
        assert "- default-vq: SHIPS (FID 60.00 vs 95.80, accuracy 70.0 % vs 46.0 % by the new judge" in summary
        assert "- default-vq with purity sampling: SHIPS (FID 55.00 vs 95.80, accuracy 72.0 % vs 46.0 %" in summary
        assert (f"ships: new_default-vq_purity: `python tools/pack_model.py {new_file} {asset} --set "
                "sampler=vq_purity --overwrite`") in summary, summary
        assert "the embedded model with purity sampling" not in summary
    else:
        assert "- default-vq: does not ship (FID 120.00 vs 95.80" in summary and "ships:" not in summary
        assert ("- default-vq, the embedded model with purity sampling against its own sampler: better (FID 92.00 vs "
                "95.80, accuracy 47.0 % vs 46.0 % by the new judge)") in summary, summary
        assert f"repack it so: `python tools/pack_model.py {asset} {asset} --set sampler=vq_purity" in summary


@pytest.mark.parametrize("case", ["guided ships", "plain ships", "neither"])
def test_continuous_verdict_weighs_the_embedded_guidance(data, tmp_path, case):
    """A new latent-diffusion model is judged with its packed defaults and with the embedded model's guidance
    (scale and interval): the lower FID of the settings that beat the old model on both counts ships, with the
    command that packs the new file with the guidance it won with."""
    outdir = tmp_path / "out"
    new_file = outdir / "runs/cifar10_ldm/model-fp16.safetensors"
    new_file.parent.mkdir(parents=True)
    new_file.write_bytes(b"x" * 1000)
    plain, guided = {"guided ships": ((45.0, 0.93, 0.90), (30.0, 0.97, 0.95)),
                     "plain ships": ((30.0, 0.97, 0.95), (45.0, 0.97, 0.95)),
                     "neither": ((45.0, 0.97, 0.95), (30.0, 0.93, 0.90))}[case]
    fake_eval(outdir, "old_default", 39.2, 0.96, 0.94, "default", scale=7.0, guidance_interval=[0.28, 5.42])
    fake_eval(outdir, "new_default", *plain, str(new_file), scale=5.0, guidance_interval=None)
    fake_eval(outdir, "new_default_guided", *guided, str(new_file), scale=7.0, guidance_interval=[0.28, 5.42])
    out = run(["--smoke", "--device", "cpu", "--no-fid", "--streams", "continuous", "--skip",
               "judge,train,rfid-new,eval", "--test-source", data / "test.tar.gz", outdir], cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = (outdir / "summary.md").read_text()
    assert "| new_default_guided | 10000 | " + f"{guided[0]:.2f} | {100 * guided[1]:.1f} % |" in summary, summary
    line = "- default with the embedded model's guidance (scale 7 in σ ∈ (0.28, 5.42]): "
    asset = "latentdiff/assets/default.safetensors"
    if case == "guided ships":
        assert line + "SHIPS (FID 30.00 vs 39.20, accuracy 97.0 % vs 96.0 % by the new judge" in summary, summary
        assert "- default: does not ship (FID 45.00 vs 39.20" in summary
        assert (f"ships: new_default_guided: `python tools/pack_model.py {new_file} {asset} --set guidance_scale=7.0 "
                '--set "guidance_interval=[0.28, 5.42]" --overwrite`') in summary, summary
    elif case == "plain ships":
        assert line + "does not ship (FID 45.00" in summary and "- default: SHIPS (FID 30.00" in summary
        assert f"ships: new_default: `cp {new_file} {asset}`" in summary, summary
    else:
        assert line + "does not ship (FID 30.00 vs 39.20, accuracy 93.0 % vs 96.0 %" in summary, summary
        assert "ships:" not in summary


@pytest.mark.parametrize("steps", [None, 3])
def test_eval_samples_each_latent_diffusion_model_with_its_own_steps(tmp_path, steps):
    """Outside --smoke, eval samples the old and the new continuous model at each one's own number of steps (the
    embedded model's 10, the new file's from its config; its guided row too) unless --steps N overrides all."""
    import dataclasses

    from latentdiff.pipelines import load_pipeline

    outdir = tmp_path / "out"
    stand_in_runs(outdir)
    new_file = outdir / "runs/cifar10_ldm/model-fp16.safetensors"
    pipe = load_pipeline(new_file)
    pipe.config = dataclasses.replace(pipe.config, steps=4)  # a step count no other model has
    pipe.save(new_file, overwrite=True)
    out = run(["--device", "cpu", "--no-fid", "--streams", "continuous", "--skip", "judge,train,rfid-old,rfid-new",
               "--num-samples", 2, "--batch-size", 2, *(["--steps", steps] if steps else []), outdir], cwd=tmp_path,
              timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    embedded = load_pipeline("default").config
    results = {label: json.loads((outdir / f"eval_{label}/results.json").read_text())
               for label in ("old_default", "new_default", "new_default_guided")}
    assert {label: r["steps"] for label, r in results.items()} == (
        {"old_default": embedded.steps, "new_default": 4, "new_default_guided": 4} if steps is None
        else dict.fromkeys(results, steps))
    assert results["new_default_guided"]["scale"] == embedded.guidance_scale
    assert results["new_default"]["scale"] == pipe.config.guidance_scale
    assert all(r["sampler"] == "euler_a" and r["num_samples"] == 2 for r in results.values())


def test_a_failed_stage_exits_1_and_the_others_still_run(data, tmp_path):
    outdir = tmp_path / "out"
    stand_in_runs(outdir, model_bytes=b"not a model")
    out = run(["--device", "cpu", "--no-fid", "--streams", "continuous", "--skip", "judge,train,eval",  # not --smoke
               "--test-source", data / "test.tar.gz", outdir], cwd=tmp_path, timeout=300)
    assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-3000:]
    assert "failed: rfid-new" in out.stderr
    status = {row.split("\t")[0]: row.split("\t")[1] for row in (outdir / "timings.tsv").read_text().splitlines()}
    assert status["rfid-new"] == "FAILED" and status["rfid-old"] == "done"
    assert "| rfid-new | FAILED |" in (outdir / "summary.md").read_text()
