"""DeepCache step caching (UNetModel.forward_deepcache, pipelines/fast.py): a full step equals the plain U-Net
exactly; a shallow step equals the plain U-Net whose deep part is replaced by the cached feature (a forward hook on
the unmodified forward, the independent reference); the pipeline's step count restarts with every generate call.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from latentdiff.diffusion.samplers import SAMPLERS
from tests.tiny import fresh_tiny_pipe, random_weights

KWARGS = dict(steps=4, seed=3, scale=3.0, output_type="latent")


@pytest.fixture(scope="module")
def pipe():
    p = fresh_tiny_pipe()
    random_weights(p.unet, std=0.05, seed=4)  # no zero-initialised output layer: every block matters
    return p


def inputs(pipe, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    cfg = pipe.unet.cfg
    x = torch.randn(2, cfg.in_channels, 8, 8, generator=g)
    context = torch.randn(2, 5, cfg.context_dim, generator=g)
    return x, torch.tensor([7, 60]), context


def deep_module(unet, branch: int) -> torch.nn.Module:
    """The module whose output is the deep feature of ``branch``: the output block before K - 1 - branch, or the
    middle block for the deepest branch."""
    K = len(unet.input_blocks)
    return unet.middle_block if branch == K - 1 else unet.output_blocks[K - 2 - branch]


@torch.no_grad()
def reference_shallow(unet, branch: int, x, t, context, deep) -> torch.Tensor:
    """The plain forward with the deep part's output replaced by ``deep`` (a forward hook): what a shallow step
    must compute, since the input blocks up to the branch and the output blocks after it are unchanged."""
    handle = deep_module(unet, branch).register_forward_hook(lambda m, args, out: deep)
    try:
        return unet(x, t, context)
    finally:
        handle.remove()


@torch.no_grad()
def captured_deep(unet, branch: int, x, t, context) -> torch.Tensor:
    box = []
    handle = deep_module(unet, branch).register_forward_hook(lambda m, args, out: box.append(out))
    try:
        unet(x, t, context)
    finally:
        handle.remove()
    return box[0]


@torch.no_grad()
def test_full_step_equals_forward_and_shallow_step_equals_reference(pipe):
    unet = pipe.unet
    x, t, context = inputs(pipe)
    x2, t2, _ = inputs(pipe, seed=1)
    plain, plain2 = unet(x, t, context), unet(x2, t2, context)
    K = len(unet.input_blocks)
    for branch in (0, 1, K - 1):  # conv_in's skip, a ResBlock's, the deepest (the cached feature is the middle's)
        out, deep = unet.forward_deepcache(x, t, context, branch)
        assert torch.equal(out, plain)
        assert torch.equal(deep, captured_deep(unet, branch, x, t, context))
        shallow, same = unet.forward_deepcache(x2, t2, context, branch, deep)
        assert same is deep
        torch.testing.assert_close(shallow, reference_shallow(unet, branch, x2, t2, context, deep),
                                   rtol=1e-5, atol=1e-6)
        assert (shallow - plain2).abs().max() > 1e-4 * plain2.abs().max()  # an approximation, not the forward
    with pytest.raises(ValueError, match=f"branch {K} must be between 0 and {K - 1}"):
        unet.forward_deepcache(x, t, context, K)
    with pytest.raises(ValueError, match="batch"):
        unet.forward_deepcache(x[:1], t[:1], context[:1], 0, deep)


def reference_run(unet, interval: int, branch: int, calls: list):
    """A stand-in for DeepCacheRun from the reference pieces: call i full when i % interval == 0."""
    state = {}

    def run(x_t, t, context):
        i = len(calls)
        calls.append(i % interval == 0)
        if i % interval == 0:
            state["deep"] = captured_deep(unet, branch, x_t, t, context)
            return unet(x_t, t, context)
        return reference_shallow(unet, branch, x_t, t, context, state["deep"])

    return run


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_pipeline_matches_reference_for_every_sampler(pipe, sampler, monkeypatch):
    plain, _ = pipe.generate(["a cat", "a ship"], sampler=sampler, **KWARGS)
    pipe.enable_deepcache(interval=1, branch=1)
    try:
        assert torch.equal(pipe.generate(["a cat", "a ship"], sampler=sampler, **KWARGS)[0], plain)
        pipe.enable_deepcache(interval=2, branch=1)
        cached, _ = pipe.generate(["a cat", "a ship"], sampler=sampler, **KWARGS)
        calls = []
        monkeypatch.setattr(pipe, "denoising_unet", lambda: reference_run(pipe.unet, 2, 1, calls))
        expected, _ = pipe.generate(["a cat", "a ship"], sampler=sampler, **KWARGS)
    finally:
        pipe.disable_deepcache()
    assert calls == [True, False, True, False]  # one guided call per step: steps 0 and 2 full
    torch.testing.assert_close(cached, expected, rtol=1e-5, atol=1e-5)
    assert not torch.equal(cached, plain)


def test_counter_restarts_each_call(pipe, monkeypatch):
    from latentdiff.pipelines import fast

    runs = []
    real = fast.DeepCacheRun

    def spy(unet, settings):
        runs.append(real(unet, settings))
        return runs[-1]

    monkeypatch.setattr(fast, "DeepCacheRun", spy)
    pipe.enable_deepcache(interval=3, branch=0)
    try:
        first, _ = pipe.generate("a cat", steps=5, seed=1)
        pipe.generate(["a ship", "a dog", "a frog"], steps=4, seed=9)  # another batch size and step count between
        again, _ = pipe.generate("a cat", steps=5, seed=1)
    finally:
        pipe.disable_deepcache()
    assert [(r.full_steps, r.shallow_steps) for r in runs] == [(2, 3), (2, 2), (2, 3)]
    assert torch.equal(first, again)
    assert pipe.denoising_unet() is pipe.unet


def test_img2img_and_inpainting(pipe):
    init = Image.new("RGB", (16, 16), (200, 30, 30))
    mask = Image.new("L", (16, 16), 0)
    mask.paste(255, (4, 4, 12, 12))
    for extra in ({"init_image": init, "strength": 0.6}, {"init_image": init, "mask_image": mask}):
        plain, _ = pipe.generate("a cat", **KWARGS, **extra)
        pipe.enable_deepcache(interval=1, branch=0)
        assert torch.equal(pipe.generate("a cat", **KWARGS, **extra)[0], plain)
        pipe.enable_deepcache(interval=2, branch=0)
        cached, _ = pipe.generate("a cat", **KWARGS, **extra)
        pipe.disable_deepcache()
        assert torch.isfinite(cached).all() and not torch.equal(cached, plain)


def test_bad_settings(pipe):
    K = len(pipe.unet.input_blocks)
    for kwargs in ({"interval": 0}, {"interval": 2.0}, {"interval": True}, {"branch": -1}, {"branch": K}):
        with pytest.raises(ValueError, match="DeepCache"):
            pipe.enable_deepcache(**kwargs)
    assert pipe.deepcache is None


def test_txt2img_deepcache(tiny_ldm_file, tmp_path, monkeypatch):
    from latentdiff.cli import txt2img
    from latentdiff.pipelines import fast

    used = []
    real = fast.DeepCacheRun
    monkeypatch.setattr(fast, "DeepCacheRun", lambda unet, s: used.append(s) or real(unet, s))
    base = ["cat", "--ckpt", str(tiny_ldm_file), "--steps", "3", "--seed", "1", "--quiet"]
    assert txt2img.main([*base, "--outdir", str(tmp_path / "a"), "--deepcache", "2", "--deepcache-branch", "0"]) == 0
    assert used == [fast.DeepCache(2, 0)] and len(list((tmp_path / "a").glob("*.png"))) == 1
    png = next((tmp_path / "a").glob("*.png"))
    assert "DeepCache: 2/0" in Image.open(png).info["parameters"]  # recorded, and --from-png takes it back
    assert txt2img.main(["--from-png", str(png), "--ckpt", str(tiny_ldm_file), "--quiet",
                         "--outdir", str(tmp_path / "again")]) == 0
    assert used[-1] == fast.DeepCache(2, 0)
    again = next((tmp_path / "again").glob("*.png"))
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(png)))
    for bad in (["--deepcache", "0"], ["--deepcache-branch", "1"], ["--deepcache", "2", "--deepcache-branch", "9"]):
        with pytest.raises(SystemExit) as e:
            txt2img.main([*base, "--outdir", str(tmp_path / "b"), *bad])
        assert e.value.code == 2 and not (tmp_path / "b").exists()


def test_deepcache_after_compile(pipe, monkeypatch):
    from latentdiff.pipelines.fast import CompiledForward

    pipe.enable_deepcache(interval=2, branch=1)
    try:
        eager, _ = pipe.generate("a cat", **KWARGS)
        monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)  # the wiring, not inductor
        pipe.compile(fuse_qkv=False)
        compiled, _ = pipe.generate("a cat", **KWARGS)
        assert isinstance(pipe.unet.__dict__.get("forward_deepcache"), CompiledForward)
        pipe.uncompile()
        assert "forward_deepcache" not in pipe.unet.__dict__
    finally:
        pipe.disable_deepcache()
    assert torch.equal(compiled, eager)
