"""The compiled fast path (latentdiff/pipelines/fast.py): torch.compile of the U-Net and the VAE decoder gives the
eager path's images within float32 tolerance, and a compiler that fails means eager with one warning line.

Compiling the tiny pipeline takes inductor tens of seconds on a CPU the first time (C++ kernels; BENCHMARKS.md);
inductor's on-disk cache makes later runs quicker.
"""

from __future__ import annotations

import pytest
import torch

from latentdiff.pipelines.fast import CompiledForward
from tests.tiny import close, fresh_tiny_pipe

KWARGS = dict(steps=2, seed=3, scale=3.0)


def test_compiled_equals_eager():
    pipe = fresh_tiny_pipe()
    eager, params = pipe.generate("a cat", **KWARGS)
    state = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    pipe.compile()
    assert set(pipe.compile_report()) == {"unet", "decoder"}
    compiled, params_c = pipe.generate("a cat", **KWARGS)
    report = pipe.compile_report()
    assert all(r.startswith("compiled, first call") for r in report.values()), report
    close(compiled, eager, rtol=1e-4, atol=1e-4)
    assert params_c == params
    assert list(pipe.unet.state_dict()) == list(state)  # names unchanged: save() and LoRAs see the same module
    pipe.uncompile()
    assert pipe.compile_report() == {} and "forward" not in pipe.unet.__dict__
    assert torch.equal(pipe.generate("a cat", **KWARGS)[0], eager)


def test_compile_failing_at_compile_time_falls_back(monkeypatch, capsys):
    pipe = fresh_tiny_pipe()
    eager, _ = pipe.generate("a cat", **KWARGS)

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler found\nlong details")

    monkeypatch.setattr(torch, "compile", broken)
    pipe.compile()
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and "Traceback" not in err  # one line per module
    assert "torch.compile of unet failed (RuntimeError: no C++ compiler found); running it eager" in err
    assert torch.equal(pipe.generate("a cat", **KWARGS)[0], eager)
    assert pipe.compile_report()["unet"].startswith("eager (RuntimeError")


def test_compile_failing_at_first_call_falls_back(monkeypatch, capsys):
    pipe = fresh_tiny_pipe()
    eager, _ = pipe.generate("a cat", **KWARGS)

    def lazy(fn, **kwargs):  # torch.compile compiles on the first call: that is where a toolchain error shows
        def call(*args, **kw):
            raise RuntimeError("BackendCompilerFailed: inductor raised CppCompileError")
        return call

    monkeypatch.setattr(torch, "compile", lazy)
    pipe.compile()
    assert torch.equal(pipe.generate("a cat", **KWARGS)[0], eager)
    err = capsys.readouterr().err
    assert err.count("warning: torch.compile of") == 2 and "Traceback" not in err
    assert torch.equal(pipe.generate("a cat", **KWARGS)[0], eager)  # eager for good: no second warning
    assert capsys.readouterr().err == ""


def test_errors_of_the_inputs_propagate(monkeypatch):
    pipe = fresh_tiny_pipe()
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)  # "compiled" = eager: errors are the inputs'
    pipe.compile()
    with pytest.raises(ValueError):
        pipe.unet(torch.zeros(1, 3, 8, 8), torch.zeros(1), torch.zeros(1, 16, 32))  # wrong channel count
    assert isinstance(pipe.unet.forward, CompiledForward) and pipe.unet.forward.compiled is not None


def test_channels_last_and_uncompile(monkeypatch):
    pipe = fresh_tiny_pipe()
    eager, _ = pipe.generate("a cat", **KWARGS)
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)  # the wrapping, not inductor
    pipe.compile(channels_last=True)
    weight = pipe.unet.input_blocks[0][0].weight  # (C_out, C_in, 3, 3)
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    close(pipe.generate("a cat", **KWARGS)[0], eager, rtol=1e-5, atol=1e-5)
    pipe.uncompile()
    assert pipe.unet.input_blocks[0][0].weight.is_contiguous()
    assert torch.equal(pipe.generate("a cat", **KWARGS)[0], eager)


def test_bad_mode():
    with pytest.raises(ValueError, match="compile mode"):
        fresh_tiny_pipe().compile(mode="fastest")


def test_txt2img_compile(tiny_ldm_file, tmp_path, monkeypatch, capsys):
    from latentdiff.cli import txt2img

    base = ["cat", "--ckpt", str(tiny_ldm_file), "--steps", "2", "--seed", "1", "--quiet"]
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)  # the wiring, not inductor (tested above)
    assert txt2img.main([*base, "--outdir", str(tmp_path / "a"), "--compile", "--compile-mode", "max-autotune"]) == 0
    err = capsys.readouterr().err
    assert "compiled unet: first call" in err and "compiled decoder: first call" in err
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: (_ for _ in ()).throw(RuntimeError("no compiler")))
    assert txt2img.main([*base, "--outdir", str(tmp_path / "b"), "--compile"]) == 0
    err = capsys.readouterr().err
    assert err.count("warning: torch.compile of") == 2 and "Traceback" not in err
    assert len(list((tmp_path / "b").glob("*.png"))) == 1
    with pytest.raises(SystemExit) as e:
        txt2img.main([*base, "--outdir", str(tmp_path / "c"), "--compile-mode", "default"])
    assert e.value.code == 2 and not (tmp_path / "c").exists()


def _script(name: str):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_profile_generation_script(tiny_ldm_file, tmp_path, capsys):
    import json

    profile = _script("profile_generation")
    out = tmp_path / "profile.json"
    assert profile.main(["--ckpt", str(tiny_ldm_file), "--steps", "3", "--repeats", "1", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    for stage in ("text encoder", "U-Net", "sampler arithmetic", "decode", "other", "total"):
        assert f"\n{stage} " in table
    result = json.loads(out.read_text())
    seconds = result["median_run_s"]
    assert result["runs"][0]["unet_calls"] == 3 and all(v >= 0 for k, v in seconds.items() if k != "other")
    assert abs(sum(v for k, v in seconds.items() if k != "total") - seconds["total"]) < 1e-9


def test_bench_tiling_child(monkeypatch):
    bench = _script("bench_tiling")
    for mode in ("untiled", "tiled"):
        args = bench.parse_args(["--config", "tiny", "--size", "64", "--tile", "32", "--child", mode])
        r = bench.child(args)
        assert r["mode"] == mode and r["shape"] == [1, 3, 64, 64] and r["peak_mib"] >= 0
