"""The attention op against a plain softmax reference, and the attention layers' shapes and equivalences."""

import pytest
import torch
import torch.nn.functional as F

from latentdiff.models.attention import (
    GEGLU,
    BasicTransformerBlock,
    CrossAttention,
    SpatialTransformer,
    attention,
    get_attention_backend,
    set_attention_backend,
)


@pytest.fixture
def backend():
    previous = get_attention_backend()
    yield set_attention_backend
    set_attention_backend(previous)


def reference_attention(q, k, v, heads, mask=None):
    """softmax(q kᵀ / √d) v per head, written out with einsum (mask: (B, M) or (B, N, M), True = keep)."""
    B, N, _ = q.shape
    M = k.shape[1]
    q, k, v = q.view(B, N, heads, -1), k.view(B, M, heads, -1), v.view(B, M, heads, -1)
    scores = torch.einsum("bnhd,bmhd->bhnm", q, k) / q.shape[-1] ** 0.5  # (B, h, N, M)
    if mask is not None:
        mask = mask[:, None, None, :] if mask.dim() == 2 else mask[:, None]
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("bhnm,bmhd->bnhd", scores.softmax(-1), v).reshape(B, N, -1)  # (B, N, h*dv)


@pytest.mark.parametrize("name", ["math", "sdpa"])
@pytest.mark.parametrize("mask_kind", [None, "keys", "full"])
def test_attention_matches_softmax_reference(backend, name, mask_kind):
    backend(name)
    g = torch.Generator().manual_seed(0)
    B, N, M, heads, d, dv = 2, 5, 7, 3, 4, 6
    q = torch.randn(B, N, heads * d, generator=g)
    k = torch.randn(B, M, heads * d, generator=g)
    v = torch.randn(B, M, heads * dv, generator=g)
    mask = None
    if mask_kind == "keys":
        mask = torch.rand(B, M, generator=g) > 0.4
        mask[:, 0] = True  # every query keeps at least one key
    elif mask_kind == "full":
        mask = torch.rand(B, N, M, generator=g) > 0.4
        mask[..., 0] = True
    out = attention(q, k, v, heads, mask)
    assert out.shape == (B, N, heads * dv)
    torch.testing.assert_close(out, reference_attention(q, k, v, heads, mask), atol=1e-5, rtol=1e-5)


def test_backends_agree(backend, monkeypatch):
    import latentdiff.models.attention as attention_module

    sdpa_calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(attention_module.F, "scaled_dot_product_attention",
                        lambda *a, **kw: sdpa_calls.append(1) or sdpa(*a, **kw))
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 9, 16, generator=g) for _ in range(3))
    backend("math")
    expected = attention(q, k, v, heads=4)
    assert sdpa_calls == []  # two different code paths are compared
    backend("sdpa")
    torch.testing.assert_close(attention(q, k, v, heads=4), expected, atol=1e-5, rtol=1e-5)
    assert sdpa_calls == [1]


def test_unknown_backend_is_an_error():
    with pytest.raises(ValueError, match="not one of"):
        set_attention_backend("flash9000")


def test_cross_attention_shapes_and_self_attention():
    torch.manual_seed(0)
    layer = CrossAttention(query_dim=12, heads=3, dim_head=5, context_dim=10)
    x, context = torch.randn(2, 6, 12), torch.randn(2, 4, 10)
    assert layer(x, context).shape == (2, 6, 12)
    self_attn = CrossAttention(query_dim=12, heads=3, dim_head=5)
    assert self_attn(x).shape == (2, 6, 12)
    torch.testing.assert_close(self_attn(x), self_attn(x, x))
    names = {n for n, _ in layer.named_parameters()}
    assert names == {"to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight", "to_out.0.bias"}


def test_geglu_equals_chunked_definition():
    torch.manual_seed(0)
    layer = GEGLU(8, 6)
    x = torch.randn(3, 5, 8)
    a, gate = layer.proj(x).chunk(2, dim=-1)
    torch.testing.assert_close(layer(x), a * F.gelu(gate))


def test_transformer_block_shape():
    block = BasicTransformerBlock(dim=16, heads=2, dim_head=8, context_dim=10)
    assert block(torch.randn(2, 9, 16), torch.randn(2, 3, 10)).shape == (2, 9, 16)
    names = {n for n, _ in block.named_parameters()}
    assert {"ff.net.0.proj.weight", "ff.net.2.weight", "norm3.bias", "attn2.to_k.weight"} <= names


def test_spatial_transformer_conv_and_linear_projections_agree():
    torch.manual_seed(0)
    conv = SpatialTransformer(16, heads=2, dim_head=8, context_dim=10, depth=2, norm_num_groups=4)
    linear = SpatialTransformer(16, heads=2, dim_head=8, context_dim=10, depth=2, use_linear=True, norm_num_groups=4)
    x, context = torch.randn(2, 16, 3, 5), torch.randn(2, 4, 10)
    torch.testing.assert_close(conv(x, context), x)  # proj_out starts at zero: identity at initialisation
    for p in conv.parameters():
        torch.nn.init.normal_(p, std=0.2)
    assert conv.proj_in.weight.shape == (16, 16, 1, 1)
    linear.load_state_dict({k: v.flatten(1) if k.startswith("proj_") and k.endswith("weight") else v
                            for k, v in conv.state_dict().items()})
    out = conv(x, context)
    assert out.shape == x.shape
    torch.testing.assert_close(linear(x, context), out)


def test_auto_falls_back_to_sdpa_once_when_xformers_has_no_kernel(monkeypatch):
    """An xformers wheel built for another torch imports but finds no operator: under ``auto`` the first failure
    warns and makes ``auto`` resolve to SDPA on CUDA from then on; the explicit ``xformers`` backend raises."""
    import latentdiff.models.attention as A

    class BrokenXformers:
        calls = 0

        @classmethod
        def memory_efficient_attention(cls, q, k, v):
            cls.calls += 1
            raise NotImplementedError("No operator found for `memory_efficient_attention_forward`")

    monkeypatch.setattr(A, "_xops", BrokenXformers)
    monkeypatch.setattr(A, "_XFORMERS_FAILED", None)
    monkeypatch.setattr(A, "_BACKEND", "auto")
    q, k, v = (torch.randn(2, 5, 2, 4) for _ in range(3))  # (B, N, h, d)
    assert A.attention_kernel("cuda") == "xformers" and A.attention_kernel("cpu") == "sdpa"
    with pytest.warns(UserWarning, match="uses PyTorch SDPA"):
        assert A._xformers_attention(q, k, v) is None
    assert BrokenXformers.calls == 1 and "No operator" in A._XFORMERS_FAILED
    assert A.attention_kernel("cuda") == "sdpa"  # no second try
    monkeypatch.setattr(A, "_BACKEND", "xformers")
    assert A.attention_kernel("cuda") == "xformers"
    with pytest.raises(NotImplementedError):
        A._xformers_attention(q, k, v)
