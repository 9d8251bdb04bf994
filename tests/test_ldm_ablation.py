"""benchmarks/ldm_ablation.py: the objective each candidate asks tools/train.py for, and one end-to-end run of two
candidates on the tiny config (trained models with the asked prediction target and weighting, class accuracy from
tools/eval_t2i.py, a rerun that trains nothing)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.tiny import CONFIGS, ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import ldm_ablation  # noqa: E402


def test_candidate_names_and_overrides():
    assert ldm_ablation.parse_candidate("eps") == ("epsilon", None)
    assert ldm_ablation.parse_candidate("v-snr5") == ("v_prediction", 5.0)
    assert ldm_ablation.parse_candidate("x0-snr2.5") == ("sample", 2.5)
    for bad in ("eps-snr0", "v5", "snr5", "eps-snr", "epsilon", ""):
        with pytest.raises(Exception, match="must look like eps"):
            ldm_ablation.parse_candidate(bad)
    assert ldm_ablation.objective_overrides("epsilon", None) == [
        "model.schedule.prediction_type=epsilon", "objective.min_snr_gamma=null"]
    assert ldm_ablation.objective_overrides("v_prediction", 5.0)[1] == "objective.min_snr_gamma=5.0"
    assert ldm_ablation.parse_samplers("ddim:25, euler_a:10") == [("ddim", 25), ("euler_a", 10)]
    for bad in ("ddim", "ddim:0", "nope:10", "ddim:25,ddim:25", "", "ddim:x"):
        with pytest.raises(Exception, match="sampler|give at least one"):
            ldm_ablation.parse_samplers(bad)


def test_two_candidates_end_to_end_and_rerun(tmp_path, tiny_shards, tiny_ldm_file):
    cmd = [sys.executable, "benchmarks/ldm_ablation.py", str(tmp_path / "out"), "--shards", str(tiny_shards(16)),
           "--config", str(CONFIGS / "train_tiny_ldm.yaml"), "--autoencoder", str(tiny_ldm_file), "--steps", "2",
           "--num-samples", "4", "--batch-size", "2", "--samplers", "ddim:2,euler_a:3", "--candidates", "eps,v-snr5",
           "--jobs", "2", "--threads", "1", "--device", "cpu"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    from latentdiff.io.checkpoint import load_model_file

    rows = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [r["candidate"] for r in rows] == ["eps", "v-snr5"] and [r["steps"] for r in rows] == [2, 2]
    for row, (target, gamma) in zip(rows, [("epsilon", None), ("v_prediction", 5.0)]):
        folder = tmp_path / "out" / row["candidate"]
        cfg, _, _ = load_model_file(folder / "model.safetensors")
        assert cfg.schedule.prediction_type == target  # the exported model samples with the trained target
        assert f"min_snr_gamma: {'null' if gamma is None else gamma}" in (folder / "config.yaml").read_text()
        assert list(row["evals"]) == ["ddim2", "euler_a3"]
        for label, (sampler, steps) in zip(row["evals"], [("ddim", 2), ("euler_a", 3)]):
            scored = row["evals"][label]
            assert scored["fid"] is None and 0 <= scored["class_accuracy"] <= 1  # 4 images judged, no reference
            assert scored["seconds"] > 0
            result = json.loads((folder / f"eval_{label}" / "results.json").read_text())
            assert (result["sampler"], result["steps"], result["scale"]) == (sampler, steps, 5.0)
            assert len(list((folder / f"eval_{label}" / "images").glob("*.png"))) == 4
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| FID-4 ddim2 | accuracy ddim2 | FID-4 euler_a3 | accuracy euler_a3 |" in summary
    assert "| eps | epsilon | – | 2 |" in summary and "| v-snr5 | v_prediction | 5 | 2 |" in summary
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "training" not in again.stdout  # both done: scored rows reused
    reused = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [r["evals"] for r in reused] == [r["evals"] for r in rows]
    assert [r["train_seconds"] for r in reused] == [r["train_seconds"] for r in rows]  # from the training log
    # one more sampler later: only its evaluation runs
    more = subprocess.run([a.replace("euler_a:3", "euler_a:3,dpmpp_2m:2") for a in cmd], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert more.returncode == 0, more.stdout + more.stderr
    assert "generating and scoring with dpmpp_2m2" in more.stdout and "with ddim2" not in more.stdout
    extended = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [list(r["evals"]) for r in extended] == [["ddim2", "euler_a3", "dpmpp_2m2"]] * 2
    assert [r["steps"] for r in extended] == [2, 2]


def test_bad_arguments_exit_2(tmp_path):
    base = [sys.executable, "benchmarks/ldm_ablation.py", str(tmp_path / "out"), "--shards", "x"]
    for extra in (["--steps", "2", "--candidates", "eps-snr"], ["--steps", "0"], [],
                  ["--steps", "2", "--candidates", "eps,eps"], ["--steps", "2", "--jobs", "0"],
                  ["--steps", "2", "--autoencoder", str(tmp_path / "none.safetensors")],
                  ["--steps", "2", "--set", "optim.lr=-1"], ["--steps", "2", "--samplers", "nope:2"],
                  ["--steps", "2", "--candidates", "v,eps", "--set", "model.schedule.rescale_betas_zero_snr=true"]):
        out = subprocess.run(base + extra, cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert out.returncode == 2 and "error:" in out.stderr and "Traceback" not in out.stderr, extra
    assert not (tmp_path / "out").exists()
