"""benchmarks/ae_ablation.py: the latent shapes it asks tools/train.py for, the U-Net FLOPs of its cost column
against a hand count of the convolutions that scale with the latent, and one end-to-end run of two candidates on the
tiny configs (trained models of the asked shapes, PSNR from tools/rfid.py, a rerun that trains nothing)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.tiny import CONFIGS, ROOT, make_shards

sys.path.insert(0, str(ROOT / "benchmarks"))
import ae_ablation  # noqa: E402


def test_candidate_names_and_shape_overrides():
    assert ae_ablation.parse_candidate("f4c16") == (4, 16)
    for bad in ("f3c4", "f4", "c4f4", "f4c0", "f0c4"):
        with pytest.raises(Exception, match="must look like f4c16"):
            ae_ablation.parse_candidate(bad)
    sets = ae_ablation.shape_overrides([1, 2, 4], 2, 4)
    assert sets[0] == "model.autoencoder.ch_mult=[1,2]" and "model.autoencoder.z_channels=4" in sets
    assert ae_ablation.shape_overrides([1, 2, 4], 8, 16)[0] == "model.autoencoder.ch_mult=[1,2,4,4]"
    assert "model.unet.in_channels=16" in ae_ablation.shape_overrides([1, 2], 4, 16)


def test_unet_flops_grow_with_the_latent_area_not_its_channels():
    """Only the U-Net's first and last convolutions see the latent channels: 2 · (3·3·C·M) · h·w multiply-adds
    each (M = model_channels); everything else scales with the area h·w alone (attention a bit faster)."""
    config = CONFIGS / "train_tiny_ldm.yaml"
    f8, f16 = (ae_ablation.unet_forward_flops(config, c, 8) for c in (8, 16))
    M = 8  # train_tiny_ldm.yaml's model_channels
    assert f16 - f8 == 2 * 2 * 9 * (16 - 8) * M * 8 * 8  # conv_in (C -> M) and conv_out (M -> C), 2 FLOPs per MAC
    assert ae_ablation.unet_forward_flops(config, 8, 16) > 3.5 * f8  # 4x the area


def test_two_candidates_end_to_end_and_rerun(tmp_path):
    shards = make_shards(tmp_path / "shards", 16)
    images = tmp_path / "test"
    images.mkdir()
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    for i in range(6):
        Image.fromarray((torch.rand(16, 16, 3, generator=g) * 255).byte().numpy()).save(images / f"{i}.png")
    cmd = [sys.executable, "benchmarks/ae_ablation.py", str(tmp_path / "out"), "--shards", str(shards),
           "--images", str(images), "--config", str(CONFIGS / "train_tiny_autoencoder.yaml"),
           "--ldm-config", str(CONFIGS / "train_tiny_ldm.yaml"), "--steps", "2", "--num-samples", "6", "--no-fid",
           "--candidates", "f2c4,f4c8", "--threads", "1", "--device", "cpu"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    from latentdiff.io.checkpoint import read_safetensors

    rows = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [r["candidate"] for r in rows] == ["f2c4", "f4c8"] and [r["steps"] for r in rows] == [2, 2]
    for row, (levels, channels) in zip(rows, [(2, 4), (3, 8)]):
        tensors, _ = read_safetensors(tmp_path / "out" / row["candidate"] / "model.safetensors")
        assert tensors["autoencoder.quant_conv.weight"].shape[0] == 2 * channels  # mean and log-variance
        assert sum(k.startswith("autoencoder.encoder.down.") and k.endswith(".downsample.conv.weight")
                   for k in tensors) == levels - 1
        assert 0 < row["psnr"] < 60 and row["rfid"] is None
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| f2c4 | 8×8×4 | 256 |" in summary and "| f4c8 | 4×4×8 | 128 |" in summary
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "training" not in again.stdout  # both done: scored rows reused
    reused = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [r["train_seconds"] for r in reused] == [r["train_seconds"] for r in rows]  # kept in timing.json


def test_bad_arguments_exit_2(tmp_path):
    base = [sys.executable, "benchmarks/ae_ablation.py", str(tmp_path / "out"), "--shards", "x", "--images", "y"]
    for extra in (["--steps", "2", "--candidates", "f3c4"], ["--steps", "0"], [],
                  ["--steps", "2", "--config", str(tmp_path / "none.yaml")],
                  ["--steps", "2", "--no-fid", "--reference", "r.npz"]):
        out = subprocess.run(base + extra, cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert out.returncode == 2 and "error:" in out.stderr and "Traceback" not in out.stderr, extra
    assert not (tmp_path / "out").exists()
