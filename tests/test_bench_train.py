"""benchmarks/bench_train.py on the CPU with the tiny preset: both sides compute the same first loss and the same
U-Net FLOPs, the trained state is the closed-form size of parameters + AdamW moments + EMA, the Markdown table and
JSON are written; the card table behind MFU; gpu_bench.sh's training entries (argument handling; the longer
``gpu_bench.sh --smoke --device cpu --only train_sd15,train_mid,train_compile OUTDIR`` rehearses them)."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_train", ROOT / "benchmarks" / "bench_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fused_adamw_state_bytes(n_params: int, n_tensors: int) -> int:
    """fp32 parameter + exp_avg + exp_avg_sq + EMA copy per element, and the fused kernel's float32 step per tensor."""
    return 16 * n_params + 4 * n_tensors


def test_tiny_preset_on_cpu(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    bench = _bench()
    out_json, out_md = tmp_path / "r.json", tmp_path / "r.md"
    bench.main(["--preset", "tiny", "--repeats", "1", "--warmup", "0", "--workers", "0", "--json", str(out_json),
                "--markdown", str(out_md)])
    r = json.loads(out_json.read_text())
    assert r["batch"] == 4 and r["latent"] == [4, 8, 8] and r["text"] == "encode"  # the tiny recipe trains it
    first = r["first_step_loss"]
    assert math.isclose(first["latentdiff"], first["diffusers"], rel_tol=1e-5), first  # same math, same draws
    flops = r["forward_flops"]
    assert flops["latentdiff"] == flops["diffusers"] > 0 and r["train_flops_per_step"]["diffusers"] == 3 * flops[
        "diffusers"]
    for side in ("latentdiff", "diffusers"):
        assert len(r["raw_step_s"][side]) == 1 and r["step_s"][side] > 0
        assert math.isclose(r["samples_per_s"][side], 4 / r["step_s"][side])
    assert math.isclose(r["ratio"], r["samples_per_s"]["latentdiff"] / r["samples_per_s"]["diffusers"])
    assert r["mfu"] is None and r["peak_bf16_tflops"] is None and r["step_peak_bytes"] is None  # CPU: n/a
    assert r["data_wait_s_per_step"] >= 0 and r["fused_adamw"] is True

    # both sides train the U-Net and the text encoder: the same closed-form state size
    n = r["params"]["unet"] + r["params"]["text_encoder"]
    from latentdiff.config import load_train_config
    from latentdiff.models.text_encoders import build_text_encoder
    from latentdiff.models.unet import UNetModel

    cfg = load_train_config(ROOT / "configs" / "train_tiny_ldm.yaml")
    tensors = len(list(UNetModel(cfg.model.unet).parameters())) + len(
        list(build_text_encoder(cfg.model.text_encoder).parameters()))
    assert r["state_bytes"] == {"latentdiff": _fused_adamw_state_bytes(n, tensors),
                                "diffusers": _fused_adamw_state_bytes(n, tensors)}

    table = out_md.read_text()
    assert "| latentdiff |" in table and "| diffusers |" in table and "ratio latentdiff/diffusers" in table
    assert table.count("n/a") >= 4  # MFU and step peak of both sides


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200", 989.4),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA H100 NVL", None), ("Tesla T4", None)])
def test_peak_table(monkeypatch, name, peak):
    bench = _bench()
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert bench.peak_tflops(torch.device("cuda", 0)) == peak
    assert bench.peak_tflops(torch.device("cpu")) is None


@pytest.mark.parametrize("argv", [["--repeats", "0"], ["--steps-per-repeat", "0"], ["--workers", "-1"],
                                  ["--batch", "0"], ["--device", "nodevice"], ["--compile", "all"]])
def test_bad_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        _bench().parse_args(argv)
    assert e.value.code == 2


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_bench_training_entries(tmp_path):
    def run(*args):
        return subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_bench.sh"), *args], cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)

    usage = run("--help").stdout
    assert all(name in usage for name in ("train_sd15", "train_mid", "train_compile"))
    out = run("--only", "train_sd15,train_bogus", str(tmp_path / "bad"))
    assert out.returncode == 2 and "unknown benchmark 'train_bogus'" in out.stderr and not (tmp_path / "bad").exists()
