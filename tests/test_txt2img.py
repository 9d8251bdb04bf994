import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from latentdiff.cli import txt2img
from latentdiff.pipelines import LatentDiffusionPipeline, parse_parameters
from tests.tiny import tiny_ldm_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    LatentDiffusionPipeline.from_config(tiny_ldm_config()).save(path)
    return path


def test_end_to_end_subprocess_writes_png_with_parameters(ckpt, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "tools" / "txt2img.py"), "a photo of a cat", "--ckpt", str(ckpt),
           "--steps", "3", "--seed", "5", "--n_samples", "2", "--outdir", str(out), "--negative-prompt", "blurry"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    pngs = sorted(out.glob("*.png"))
    assert [p.name for p in pngs] == ["00000.png", "00001.png", "00002-grid.png"]
    params = parse_parameters(Image.open(pngs[1]).info["parameters"])
    assert params["prompt"] == "a photo of a cat" and params["negative_prompt"] == "blurry"
    assert params["Steps"] == "3" and params["Seed"] == "6" and params["Size"] == "16x16"
    assert params["Sampler"] == "ddim" and params["CFG scale"] == "3"


def test_never_overwrites(ckpt, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "00000.png").write_bytes(b"precious")
    assert txt2img.main(["cat", "--ckpt", str(ckpt), "--steps", "2", "--seed", "1", "--outdir", str(out),
                         "--quiet"]) == 0
    assert (out / "00000.png").read_bytes() == b"precious"
    assert (out / "00001.png").exists()


@pytest.mark.parametrize("args, message", [
    (["--H", "18"], "height=18 must be a positive multiple of 4"),
    (["--W", "-4"], "--W must be a positive integer"),
    (["--steps", "0"], "--steps must be a positive integer"),
    (["--steps", "500"], "--steps must be at most 100"),
    (["--sampler", "plms"], "invalid choice: 'plms'"),
    (["--n_samples", "0"], "--n_samples must be a positive integer"),
    (["--precision", "fp16", "--device", "cpu"], "fp16 is not supported on the CPU"),
    (["--sampler", "euler_a", "--eta", "0.5", "--steps", "2"], "is only used by sampler='ddim'"),
])
def test_bad_input_exits_2(ckpt, tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        txt2img.main(["cat", "--ckpt", str(ckpt), "--outdir", str(tmp_path), "--quiet", *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_bad_checkpoints_exit_2(ckpt, tmp_path, capsys):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01not a safetensors file")
    cfg_mismatch = tmp_path / "mismatch.safetensors"
    from latentdiff.io.checkpoint import load_model_file, save_model_file

    _, parts, _ = load_model_file(ckpt)
    wrong = tiny_ldm_config(unet={"model_channels": 16, "channel_mult": [1, 2], "attention_resolutions": [2],
                                  "num_heads": 2, "context_dim": 32, "norm_num_groups": 8})
    save_model_file(cfg_mismatch, wrong, parts)
    cases = [(tmp_path / "missing.safetensors", "does not exist"),
             (garbage, "truncated or corrupt"),
             (cfg_mismatch, "unet weights do not fit the model")]
    for path, message in cases:
        with pytest.raises(SystemExit) as e:
            txt2img.main(["cat", "--ckpt", str(path), "--outdir", str(tmp_path), "--quiet"])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (path, err)
