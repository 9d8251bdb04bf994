"""benchmarks/bench_attention.py and the attention backend override: the CPU smoke run (SDPA against the math
reference, xformers reported as not available), the SD 1.5 attention shapes it records against the architecture's
closed form, SDPA == math on those shapes, the auto recommendation on synthetic timings, bad arguments (exit 2),
``LATENTDIFF_ATTENTION`` (fresh interpreters) and gpu_bench.sh's ``attention`` entry. No timed assertions."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import latentdiff.models.attention as attn_module
from latentdiff.models.attention import attention, attention_kernel, get_attention_backend, set_attention_backend

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_attention.py"
SMOKE = ["--device", "cpu", "--side", "8", "--batch", "2", "--set", "unet.model_channels=32", "--repeats", "2",
         "--warmup", "1", "--min-sample-ms", "0"]
# Stable Diffusion 1.5 at 512x512 (64x64 latents): transformers at downsampling 1, 2, 4 (320, 640, 1280 channels,
# 8 heads) with 2 per level going down and 3 coming up, plus the middle block's at 8x8 (1280 channels); each has one
# self-attention and one cross-attention over the 77 text tokens. (kind, queries, keys, heads, dim) -> calls.
SD15_512 = {("self", 4096, 4096, 8, 40): 5, ("cross", 4096, 77, 8, 40): 5,
            ("self", 1024, 1024, 8, 80): 5, ("cross", 1024, 77, 8, 80): 5,
            ("self", 256, 256, 8, 160): 5, ("cross", 256, 77, 8, 160): 5,
            ("self", 64, 64, 8, 160): 1, ("cross", 64, 77, 8, 160): 1}


def _bench():
    sys.path.insert(0, str(ROOT / "benchmarks"))  # the script imports its neighbour timing.py
    try:
        spec = importlib.util.spec_from_file_location("bench_attention", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return module


def _python(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}  # one thread: no spinning on a shared machine
    env = {k: v for k, v in env.items() if v is not None}
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)


@pytest.fixture
def backend():
    previous = get_attention_backend()
    yield set_attention_backend
    set_attention_backend(previous)


def test_cpu_smoke_run_writes_json_and_markdown(tmp_path):
    out_json, out_md = tmp_path / "a.json", tmp_path / "a.md"
    out = _python([str(SCRIPT), *SMOKE, "--json", str(out_json), "--markdown", str(out_md)],
                  env={"LATENTDIFF_ATTENTION": "sdpa"})
    assert out.returncode == 0, out.stderr
    r = json.loads(out_json.read_text())
    assert out_md.read_text() == out.stdout
    assert r["backends"] == ["sdpa", "xformers", "math"] and r["runs"] and len(r["runs"]) == 1
    assert r["backend_at_start"] == "sdpa" and r["auto_kernel"] == "sdpa"  # the override is seen, auto resolved
    reason = r["unavailable"]["xformers"]  # never an error: not importable here, or CUDA only
    assert "not importable" in reason or "CUDA" in reason
    assert f"xformers: not available: {reason}" in out.stdout
    run = r["runs"][0]
    assert (run["dtype"], run["batch"]) == ("fp32", 2) and run["failed_backends"] == []
    # 8x8 latents: the SD 1.5 layout at 8, 4, 2 and 1 tokens per side, 16 transformers, 32 attention calls
    assert [(s["name"], s["count"]) for s in run["shapes"]] == [
        (f"{kind} {n}x{n}", 1 if n == 1 else 5) for n in (8, 4, 2, 1) for kind in ("self", "cross")]
    for row in run["shapes"]:
        assert set(row["times_s"]) == {"sdpa", "math"} and row["inner"] >= 1
        for t in row["times_s"].values():
            assert len(t["samples"]) == 2 and t["min"] <= t["median"] <= t["max"] and t["median"] > 0
        assert row["max_abs_diff"]["math"] < 1e-5  # SDPA and the fp32 softmax agree
    total = run["attention_total_s"]
    for name in ("sdpa", "math"):
        expected = sum(row["count"] * row["times_s"][name]["median"] for row in run["shapes"])
        assert total[name] == pytest.approx(expected)
    unet = run["unet"]
    assert set(unet["times_s"]) == {"sdpa", "math"} and unet["finite"] == {"sdpa": True, "math": True}
    assert 0 < unet["max_abs_diff"]["math"] < 1e-4  # > 0: the attention reaches the output (no zero layers)
    assert r["decision"]["auto"] == "sdpa" and "nothing to choose" in r["decision"]["text"]
    assert "Recommendation for auto:" in out.stdout and "| whole U-Net call |" in out.stdout


def test_recorded_shapes_are_those_of_sd15_at_512():
    bench = _bench()
    cfg, side, length, factor = bench.read_config(bench.parse_args([]).config, [])
    assert (side, length, factor) == (64, 77, 8)
    shapes = bench.attention_shapes(cfg, side, length)
    assert {(s["kind"], s["tokens"], s["keys"], s["heads"], s["dim"]): s["count"] for s in shapes} == SD15_512
    assert sum(s["count"] for s in shapes) == 32


@pytest.mark.parametrize("key", sorted(SD15_512))
def test_sdpa_and_math_agree_on_the_sd15_shapes(backend, key):
    """Every shape the script times, batch 1, fp32; queries cut to 256 (rows of attention are independent), keys
    in full."""
    kind, n, m, heads, dim = key
    g = torch.Generator().manual_seed(n + m + dim)
    q = 2 * torch.randn(1, min(n, 256), heads * dim, generator=g)  # logits of std 2: a peaked softmax too
    k, v = (torch.randn(1, m, heads * dim, generator=g) for _ in range(2))
    backend("math")
    expected = attention(q, k, v, heads)
    backend("sdpa")
    out = attention(q, k, v, heads)
    assert out.shape == (1, min(n, 256), heads * dim)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4)


def _runs(times: dict[str, list[float]]) -> list[dict]:
    """Synthetic runs for decide(): per backend its whole-U-Net medians of two runs."""
    return [{"dtype": "bf16", "batch": b, "failed_backends": [],
             "unet": {"times_s": {n: {"median": ts[i]} for n, ts in times.items()}}} for i, b in enumerate((2, 16))]


def test_auto_recommendation():
    bench = _bench()
    cuda = torch.device("cuda")  # a device object only: nothing runs on it
    d = bench.decide(_runs({"sdpa": [10.0, 100.0], "xformers": [11.0, 110.0]}), ["sdpa", "xformers"], cuda, {})
    assert d["auto"] == "sdpa" and d["fastest"] == "sdpa" and "LATENTDIFF_ATTENTION=sdpa" in d["text"]
    assert d["overall_s"]["xformers"] / d["overall_s"]["sdpa"] == pytest.approx(1.1)
    d = bench.decide(_runs({"sdpa": [10.0, 100.0], "xformers": [9.0, 90.0]}), ["sdpa", "xformers"], cuda, {})
    assert d["auto"] == "xformers" and "keep auto" in d["text"]
    d = bench.decide(_runs({"sdpa": [10.0, 100.0], "xformers": [10.1, 99.0]}), ["sdpa", "xformers"], cuda, {})
    assert d["auto"] == "xformers" and "within 2%" in d["text"]  # a tie keeps the default
    d = bench.decide(_runs({"sdpa": [10.0, 100.0], "xformers": [11.0, 90.0]}), ["sdpa", "xformers"], cuda, {})
    assert d["run_winners"] == ["sdpa", "xformers"] and "batch 16: xformers" in d["text"]
    reason = "xformers is not importable (ModuleNotFoundError: No module named 'xformers')"
    d = bench.decide(_runs({"sdpa": [10.0, 100.0]}), ["sdpa"], cuda, {"xformers": reason})
    assert d["auto"] == "sdpa" and reason in d["text"]


@pytest.mark.parametrize("args, message", [
    (["--batch", "0"], "--batch and --repeats must be >= 1"),
    (["--repeats", "0"], "--batch and --repeats must be >= 1"),
    (["--warmup", "-1"], "--warmup >= 0"),
    (["--min-sample-ms", "nan"], "--min-sample-ms must be a finite number"),
    (["--side", "12"], "--side must be a positive multiple of 8"),
    (["--side", "0"], "--side must be a positive multiple of 8"),
    (["--dtype", "fp8"], "invalid choice: 'fp8'"),
    (["--backends", "flash"], "invalid choice: 'flash'"),
    (["--device", "nonsense"], "--device nonsense"),
    (["--config", "missing.yaml"], "cannot read config"),
    (["--set", "unet.nope=1"], "unknown key 'unet.nope'"),
])
def test_bad_arguments_exit_2(args, message, capsys, tmp_path):
    bench = _bench()
    with pytest.raises(SystemExit) as e:
        bench.main([*args, "--json", str(tmp_path / "r.json")])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_bad_arguments_from_the_command_line(tmp_path):
    vq = tmp_path / "vq.yaml"
    vq.write_text("type: vq_diffusion\n")
    out = _python([str(SCRIPT), "--device", "cpu", "--config", str(vq)])
    assert out.returncode == 2 and "not a latent-diffusion config" in out.stderr and "Traceback" not in out.stderr
    out = _python([str(SCRIPT), "--device", "cpu", "--side", "12"])
    assert out.returncode == 2 and "error: --side" in out.stderr


def test_unavailable_backend_only_is_reported_not_an_error():
    out = _python([str(SCRIPT), *SMOKE, "--backends", "xformers"])
    assert out.returncode == 0, out.stderr
    assert "xformers: not available:" in out.stdout and "Recommendation" not in out.stdout


CHECK = ("import torch, torch.nn.functional as F; import latentdiff.models.attention as a; "
         "q = torch.randn(1, 4, 8); print(a.get_attention_backend(), a.attention_kernel('cpu'), end=' '); "
         "F.scaled_dot_product_attention = None; a.attention(q, q, q, 2); print('no-sdpa-call')")


@pytest.mark.parametrize("value, backend_name, kernel, warning", [
    (None, "auto", "sdpa", None),
    ("", "auto", "sdpa", None),
    ("sdpa", "sdpa", "sdpa", None),
    ("math", "math", "math", None),
    ("flash9000", "auto", "sdpa", "LATENTDIFF_ATTENTION='flash9000' is not one of"),
])
def test_environment_override(value, backend_name, kernel, warning):
    out = _python(["-c", CHECK], env={"LATENTDIFF_ATTENTION": value})
    # the math backend never calls SDPA (the check replaced it); every other one does, and fails there
    assert out.stdout.startswith(f"{backend_name} {kernel} ")
    assert (out.returncode == 0 and out.stdout.endswith("no-sdpa-call\n")) == (kernel == "math"), out.stderr
    assert (warning is None) == ("UserWarning" not in out.stderr)
    if warning:
        assert warning in out.stderr


@pytest.mark.skipif(attn_module._xops is not None, reason="xformers is importable here")
def test_environment_xformers_without_xformers_falls_back_with_a_warning():
    out = _python(["-c", "import latentdiff.models.attention as a; print(a.get_attention_backend())"],
                  env={"LATENTDIFF_ATTENTION": "xformers"})
    assert out.returncode == 0 and out.stdout == "auto\n"
    assert "LATENTDIFF_ATTENTION=xformers ignored: xformers is not importable" in out.stderr


def test_set_attention_backend_overrides_the_environment():
    code = ("import latentdiff.models.attention as a; a.set_attention_backend('sdpa'); "
            "print(a.get_attention_backend(), a.attention_kernel('cpu'))")
    out = _python(["-c", code], env={"LATENTDIFF_ATTENTION": "math"})
    assert out.returncode == 0 and out.stdout == "sdpa sdpa\n", out.stderr


def test_attention_kernel_resolves_auto(backend, monkeypatch):
    backend("auto")
    assert attention_kernel("cpu") == "sdpa"
    monkeypatch.setattr(attn_module, "_xops", object())  # as if xformers were importable
    assert attention_kernel("cuda") == "xformers" and attention_kernel("cpu") == "sdpa"
    backend("sdpa")
    assert attention_kernel("cuda") == "sdpa"
    backend("math")
    assert attention_kernel("cuda") == "math"
    monkeypatch.setattr(attn_module, "_xops", None)
    backend("auto")
    assert attention_kernel("cuda") == "sdpa"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_bench_attention_entry(tmp_path):
    script = ROOT / "benchmarks" / "gpu_bench.sh"
    usage = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True, timeout=60).stdout
    assert "attention.*" in usage and "train_compile,attention" in usage
    out = subprocess.run(["bash", str(script), "--only", "attention,nope", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "unknown benchmark 'nope'" in out.stderr and "attention)" in out.stderr
    assert not (tmp_path / "out").exists()
    if not torch.cuda.is_available():  # accepted: it gets as far as asking for CUDA
        out = subprocess.run(["bash", str(script), "--only", "attention", str(tmp_path / "out")],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 2 and "CUDA is not available" in out.stderr, out.stderr
