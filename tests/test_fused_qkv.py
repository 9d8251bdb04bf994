"""Fused attention projections (models/attention.py fuse_qkv, pipe.fuse_qkv()): the same outputs as the separate
to_q/to_k/to_v, the same state-dict names and values (saved files unchanged), loadable from unfused state dicts,
and LoRA: refused while loaded, split back when a LoRA loads onto a fused model.
"""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from latentdiff.io.lora import layer_names
from latentdiff.models.attention import CrossAttention
from tests.tiny import fresh_tiny_pipe, random_weights

KWARGS = dict(steps=3, seed=3, scale=3.0, output_type="latent")


@pytest.fixture()
def pipe():
    p = fresh_tiny_pipe()
    random_weights(p.unet, std=0.05, seed=4)
    return p


def inputs(unet, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, unet.cfg.in_channels, 8, 8, generator=g)
    return x, torch.tensor([7, 60]), torch.randn(2, 5, unet.cfg.context_dim, generator=g)


@torch.no_grad()
def test_fused_unet_equals_separate_and_keeps_state_dict(pipe):
    unet = pipe.unet
    x, t, context = inputs(unet)
    expected = unet(x, t, context)
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    n = sum(isinstance(m, CrossAttention) for m in unet.modules())  # 6 transformer blocks x (attn1, attn2)
    assert n == 12 and pipe.fuse_qkv() == n and pipe.fuse_qkv() == 0  # idempotent
    kinds = [m.fused for m in unet.modules() if isinstance(m, CrossAttention)]
    assert kinds == ["qkv", "kv"] * 6
    assert not any(n.endswith(("attn1.to_q.weight", "attn2.to_k.weight")) for n, _ in unet.named_parameters())
    torch.testing.assert_close(unet(x, t, context), expected, rtol=1e-5, atol=1e-5)
    fused_state = unet.state_dict()
    assert list(fused_state) == list(state)  # names and order of the unfused model
    assert all(torch.equal(fused_state[k], v) for k, v in state.items())
    # an unfused state dict loads into the fused model (strict), also by assignment
    other = {k: v + 0.01 * torch.randn_like(v) for k, v in state.items()}
    unet.load_state_dict(other)
    for k, v in unet.state_dict().items():
        assert torch.equal(v, other[k]), k
    unet.load_state_dict(state, assign=True)
    torch.testing.assert_close(unet(x, t, context), expected, rtol=1e-5, atol=1e-5)
    assert pipe.unfuse_qkv() == n and pipe.unfuse_qkv() == 0
    assert all(type(m.to_q) is nn.Linear and m.fused is None for m in unet.modules() if isinstance(m, CrossAttention))
    assert [n for n, _ in unet.named_modules()] == [n for n, _ in fresh_tiny_pipe().unet.named_modules()]
    assert torch.equal(unet(x, t, context), expected)


def test_saved_file_keeps_names(pipe, tmp_path):
    from latentdiff import load_pipeline

    plain = pipe.save(tmp_path / "plain.safetensors")
    images, _ = pipe.generate("a cat", **KWARGS)
    pipe.fuse_qkv()
    fused = pipe.save(tmp_path / "fused.safetensors")
    torch.testing.assert_close(pipe.generate("a cat", **KWARGS)[0], images, rtol=1e-5, atol=1e-5)
    with safe_open(plain, "pt") as a, safe_open(fused, "pt") as b:
        assert list(a.keys()) == list(b.keys())
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())
    again = load_pipeline(fused)
    assert not any(m.fused for m in again.unet.modules() if isinstance(m, CrossAttention))
    assert torch.equal(again.generate("a cat", **KWARGS)[0], images)


@torch.no_grad()
def test_cross_and_self_attention_layers():
    torch.manual_seed(0)
    for context_dim in (None, 24):  # a self-attention sized layer, and a cross-attention with a wider context
        layer = CrossAttention(16, heads=2, dim_head=8, context_dim=context_dim)
        x, context = torch.randn(2, 6, 16), torch.randn(2, 5, context_dim or 16)
        own = context_dim is None
        expected = (layer(x) if own else None, layer(x, context))
        layer.fuse(self_attention=own)
        assert layer.fused == ("qkv" if own else "kv")
        # (a fused self-attention asked to attend to a context uses W's row blocks)
        torch.testing.assert_close(layer(x, context), expected[1], rtol=1e-5, atol=1e-6)
        if own:
            torch.testing.assert_close(layer(x), expected[0], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="self-attention needs key width 16"):
        CrossAttention(16, heads=2, dim_head=8, context_dim=24).fuse(self_attention=True)


def tiny_lora(pipe, path, seed: int = 0):
    """A kohya LoRA file adapting the U-Net's q/k/v projections (rank 2)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for theirs, ours in layer_names(pipe.unet, pipe.text_encoder)["unet"].items():
        if ours.endswith(("to_q", "to_k", "to_v")):
            layer = pipe.unet.get_submodule(ours)
            stem = "lora_unet_" + theirs.replace(".", "_")
            tensors[f"{stem}.lora_down.weight"] = torch.randn(2, layer.in_features, generator=g) * 0.2
            tensors[f"{stem}.lora_up.weight"] = torch.randn(layer.out_features, 2, generator=g) * 0.2
    assert len(tensors) == 2 * 3 * 12  # 12 attention layers x (q, k, v) x (down, up)
    save_file(tensors, str(path))
    return path


def test_lora_on_fused_model(pipe, tmp_path):
    path = tiny_lora(pipe, tmp_path / "qkv.safetensors")
    pipe.load_lora(path, scale=0.7)
    expected, _ = pipe.generate("a cat", **KWARGS)
    with pytest.raises(ValueError, match="unload_lora"):
        pipe.fuse_qkv()
    assert not any(m.fused for m in pipe.unet.modules() if isinstance(m, CrossAttention))  # nothing changed
    pipe.unload_lora()
    plain, _ = pipe.generate("a cat", **KWARGS)
    pipe.fuse_qkv()
    pipe.load_lora(path, scale=0.7)  # split back into to_q, to_k, to_v, then adapted as on the unfused model
    assert not any(m.fused for m in pipe.unet.modules() if isinstance(m, CrossAttention))
    assert torch.equal(pipe.generate("a cat", **KWARGS)[0], expected)
    pipe.unload_lora()
    pipe.fuse_qkv()
    torch.testing.assert_close(pipe.generate("a cat", **KWARGS)[0], plain, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="LoRA adapters"):  # the model-level refusal names the reason too
        layer = CrossAttention(16, heads=2, dim_head=8)
        from latentdiff.models.lora import add_lora

        add_lora(layer, "to_q", "a", torch.zeros(1, 16), torch.zeros(16, 1))
        layer.fuse(self_attention=True)


def test_compile_fuses_and_load_pipeline_compile(pipe, tiny_ldm_file, monkeypatch):
    from latentdiff import load_pipeline

    expected, _ = pipe.generate("a cat", **KWARGS)
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)  # the wiring, not inductor (tests/test_fast.py)
    pipe.compile()
    assert all(m.fused for m in pipe.unet.modules() if isinstance(m, CrossAttention))
    torch.testing.assert_close(pipe.generate("a cat", **KWARGS)[0], expected, rtol=1e-5, atol=1e-5)
    pipe.uncompile()  # undoes the fusion it made
    assert not any(m.fused for m in pipe.unet.modules() if isinstance(m, CrossAttention))
    assert torch.equal(pipe.generate("a cat", **KWARGS)[0], expected)
    pipe.compile(fuse_qkv=False)
    assert not any(m.fused for m in pipe.unet.modules() if isinstance(m, CrossAttention))
    pipe.uncompile()

    loaded = load_pipeline(tiny_ldm_file, compile=True)
    assert set(loaded.compile_report()) == {"unet", "decoder"}
    assert all(m.fused for m in loaded.unet.modules() if isinstance(m, CrossAttention))
    with pytest.raises(ValueError, match="latent-diffusion"):
        load_pipeline("default-vq", compile=True)
    with pytest.raises(TypeError, match="compile must be True or False"):
        load_pipeline(tiny_ldm_file, compile="yes")
