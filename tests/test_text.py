"""Tokenizer and text encoders against open_clip and transformers (random weights, tiny shapes, CPU)."""

from __future__ import annotations

import warnings

import pytest
import torch

from latentdiff.config import TextEncoderConfig
from latentdiff.io.convert_text import (
    hf_text_to_openclip,
    openclip_text_to_hf,
    text_config_from_hf,
    text_config_from_state_dict,
    text_state_dict_from_single_file,
)
from latentdiff.models.text_encoders import build_text_encoder
from latentdiff.models.tokenizer import END_TOKEN, START_TOKEN, Tokenizer
from tests.sd_helpers import clip_tokenizer

PROMPTS = [
    "a photo of a cat",
    "",
    "An astronaut riding a horse on Mars, 4k, highly detailed!!",
    "Hello, World... it's 3.14 naïve café 😀 don't",
    "  multiple   spaces\tand\nnewlines ",
    "a " * 40 + "very long prompt " * 20,
]


def tiny(**kw) -> TextEncoderConfig:
    return TextEncoderConfig(**{"width": 32, "layers": 3, "heads": 4, "context_length": 16, **kw})


def tokens(context_length: int = 16) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Tokenizer(context_length)(["a photo of a cat", "An astronaut riding a horse on Mars, 4k, detailed"])


# ---------------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_known_ids_and_padding():
    ids = Tokenizer()("a photo of a cat")
    assert ids.shape == (1, 77) and ids.dtype == torch.long
    assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert (ids[0, 7:] == 0).all()
    ids = Tokenizer(pad_token=END_TOKEN)(["a photo of a cat", ""])
    assert ids[1, :2].tolist() == [START_TOKEN, END_TOKEN] and (ids[:, 7:] == END_TOKEN).all()
    assert Tokenizer.lengths(ids).tolist() == [7, 2]
    assert Tokenizer().decode(ids[0]) == "a photo of a cat"


def test_tokenizer_matches_open_clip():
    import open_clip

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = Tokenizer(77)(PROMPTS)
    assert torch.equal(ours, open_clip.tokenize(PROMPTS, context_length=77))


def test_tokenizer_matches_transformers_clip_tokenizer():
    """transformers' CLIPTokenizer built offline from the vocabulary shipped in open_clip (SD 1.x: pad = end)."""
    hf = clip_tokenizer(pad_token="<|endoftext|>")
    expected = hf(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")["input_ids"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.equal(Tokenizer(77, pad_token=END_TOKEN)(PROMPTS), expected)


def test_truncation_warns_with_dropped_words():
    tok = Tokenizer(77)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        exact = tok("cat " * 75)  # 75 tokens + start + end: fits, no warning
    assert exact[0, -1] == END_TOKEN
    with pytest.warns(UserWarning, match=r'prompt truncated to 77 tokens; dropped: "zebra giraffe"'):
        ids = tok("cat " * 75 + "zebra giraffe")
    assert torch.equal(ids, exact)


def test_tokenizer_rejects_bad_input():
    with pytest.raises(TypeError, match="prompts"):
        Tokenizer()([1, 2])
    with pytest.raises(ValueError, match="context_length"):
        Tokenizer(1)


# ---------------------------------------------------------------------------------------------- trainable


def test_trainable_shapes_causality_interface():
    torch.manual_seed(0)
    enc = build_text_encoder(tiny())
    assert (enc.width, enc.context_length) == (32, 16)
    out = enc.encode(["a photo of a cat", ""])
    assert out.shape == (2, 16, 32) and out.dtype == torch.float32
    assert torch.equal(enc.unconditional(3)[0], enc.encode([""])[0]) and enc.unconditional(3).shape == (3, 16, 32)
    ids = enc.tokenize("a photo of a cat")
    changed = ids.clone()
    changed[0, 5] = 1000
    a, b = enc(ids), enc(changed)
    assert torch.equal(a[:, :5], b[:, :5])  # causal: earlier positions cannot see token 5
    assert not torch.allclose(a[:, 5:], b[:, 5:])
    assert enc.freeze() is enc and not enc.training and not any(p.requires_grad for p in enc.parameters())
    with pytest.raises(ValueError, match="tokens must have shape"):
        enc(torch.zeros(1, 17, dtype=torch.long))


def test_trainable_penultimate_is_last_of_shorter_stack():
    torch.manual_seed(0)
    pen = build_text_encoder(tiny(layer="penultimate"))
    short = build_text_encoder(tiny(layers=2))
    short.load_state_dict({k: v for k, v in pen.state_dict().items() if not k.startswith("blocks.2.")})
    last = build_text_encoder(tiny())
    last.load_state_dict(pen.state_dict())
    ids = tokens()
    torch.testing.assert_close(pen(ids), short(ids), rtol=0, atol=1e-6)
    assert not torch.allclose(pen(ids), last(ids))


# ---------------------------------------------------------------------------------------------- clip


def _hf_reference(enc, layers: int):
    """A transformers CLIPTextModel with ``enc``'s weights (the first ``layers`` blocks)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    ref = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=128, num_attention_heads=4,
                                       num_hidden_layers=layers, max_position_embeddings=16,
                                       hidden_act=enc.cfg.act)).eval()
    prefix = "transformer." if hasattr(ref, "text_model") else "transformer.text_model."  # transformers < 5 | >= 5
    sd = {k.removeprefix(prefix): v for k, v in enc.state_dict().items()}
    missing, _ = ref.load_state_dict(sd, strict=False)
    assert not [k for k in missing if "position_ids" not in k]
    return ref


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_clip_matches_transformers(act):
    torch.manual_seed(0)
    enc = build_text_encoder(tiny(type="clip", act=act)).eval()
    assert "transformer.text_model.embeddings.token_embedding.weight" in enc.state_dict()  # SD 1.x key layout
    assert enc.tokenizer.pad_token == (END_TOKEN if act == "quick_gelu" else 0)
    ids = tokens()
    with torch.no_grad():
        torch.testing.assert_close(enc(ids), _hf_reference(enc, 3)(input_ids=ids).last_hidden_state,
                                   rtol=0, atol=1e-5)
        pen = build_text_encoder(tiny(type="clip", act=act, layer="penultimate")).eval()
        pen.load_state_dict(enc.state_dict())
        torch.testing.assert_close(pen(ids), _hf_reference(enc, 2)(input_ids=ids).last_hidden_state,
                                   rtol=0, atol=1e-5)


def test_clip_loads_local_folder(tmp_path):
    torch.manual_seed(0)
    enc = build_text_encoder(tiny(type="clip")).eval()
    _hf_reference(enc, 3).save_pretrained(tmp_path)
    loaded = build_text_encoder(tiny(type="clip", pretrained=str(tmp_path))).eval()
    ids = tokens()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), enc(ids), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="num_hidden_layers"):
        build_text_encoder(tiny(type="clip", layers=2, pretrained=str(tmp_path)))


# ---------------------------------------------------------------------------------------------- openclip


def _openclip_reference(enc):
    from open_clip.transformer import TextTransformer

    c = enc.cfg
    ref = TextTransformer(context_length=c.context_length, vocab_size=c.vocab_size, width=c.width, heads=c.heads,
                          layers=c.layers, output_dim=c.width, output_tokens=True).eval()
    ref.load_state_dict({k.removeprefix("model."): v for k, v in enc.state_dict().items()})
    return ref


def test_openclip_matches_open_clip():
    torch.manual_seed(0)
    pen = build_text_encoder(tiny(type="openclip", layer="penultimate")).eval()
    last = build_text_encoder(tiny(type="openclip")).eval()
    last.load_state_dict(pen.state_dict())
    keys = set(pen.state_dict())
    assert {"model.token_embedding.weight", "model.positional_embedding", "model.ln_final.weight",
            "model.text_projection", "model.transformer.resblocks.2.attn.in_proj_weight"} <= keys  # SD 2.x layout
    ref = _openclip_reference(pen)
    ids = tokens()
    with torch.no_grad():
        _, ref_tokens = ref(ids)
        torch.testing.assert_close(last(ids), ref_tokens, rtol=0, atol=1e-5)
        inter = ref.forward_intermediates(ids, indices=[1], normalize_intermediates=True, intermediates_only=True,
                                         output_fmt="NLC")
        torch.testing.assert_close(pen(ids), inter["text_intermediates"][0], rtol=0, atol=1e-5)


def test_openclip_loads_local_file(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    enc = build_text_encoder(tiny(type="openclip")).eval()
    sd = {k.removeprefix("model."): v for k, v in enc.state_dict().items()}
    save_file({**sd, "logit_scale": torch.ones([]), "visual.proj": torch.zeros(2, 2)}, tmp_path / "clip.safetensors")
    loaded = build_text_encoder(tiny(type="openclip", pretrained=str(tmp_path / "clip.safetensors"))).eval()
    ids = tokens()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), enc(ids), rtol=0, atol=0)
    with pytest.raises(ValueError, match="does not fit"):
        build_text_encoder(tiny(type="openclip", width=64, pretrained=str(tmp_path / "clip.safetensors")))


# ---------------------------------------------------------------------------------------------- conversion


def test_openclip_to_hf_conversion_same_hidden_states():
    torch.manual_seed(0)
    oc = build_text_encoder(tiny(type="openclip")).eval()
    tower = {k.removeprefix("model."): v for k, v in oc.state_dict().items()}
    hf_sd = openclip_text_to_hf(tower)
    assert "text_model.encoder.layers.0.self_attn.q_proj.weight" in hf_sd and "text_projection.weight" not in hf_sd
    ids = tokens()
    for layer in ("last", "penultimate"):
        ours = build_text_encoder(tiny(type="openclip", layer=layer)).eval()
        ours.load_state_dict(oc.state_dict())
        hf = build_text_encoder(tiny(type="clip", act="gelu", layer=layer)).eval()
        hf.load_state_dict({"transformer." + k: v for k, v in hf_sd.items()})
        with torch.no_grad():
            torch.testing.assert_close(hf(ids), ours(ids), rtol=0, atol=1e-4)
    back = hf_text_to_openclip(openclip_text_to_hf(tower, with_projection=True))
    assert back.keys() == tower.keys() and all(torch.equal(back[k], tower[k]) for k in tower)
    with pytest.raises(ValueError, match="not OpenCLIP"):
        openclip_text_to_hf({**tower, "transformer.resblocks.0.ls_1.gamma": torch.ones(32)})


def test_configs_from_weights_and_hf():
    from transformers import CLIPTextConfig

    for kind, act in (("trainable", "gelu"), ("clip", "quick_gelu"), ("openclip", "gelu")):
        cfg = tiny(type=kind, width=128, heads=2, mlp_ratio=2.0, act=act)
        sd = {"cond_stage_model." + k: v for k, v in build_text_encoder(cfg).state_dict().items()}
        got = text_config_from_state_dict(sd, kind, layer=cfg.layer)
        assert got == TextEncoderConfig(**{**cfg.__dict__, "heads": 2})
    hf = CLIPTextConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                        hidden_act="gelu", projection_dim=512).to_dict()  # diffusers' SD 2 text_encoder
    cfg = text_config_from_hf(hf, pretrained="sd2/text_encoder")
    assert (cfg.type, cfg.width, cfg.layers, cfg.heads, cfg.mlp_ratio, cfg.act, cfg.layer) == (
        "clip", 1024, 23, 16, 4.0, "gelu", "last")
    single = {"cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None],
              "cond_stage_model.transformer.text_model.final_layer_norm.bias": torch.zeros(4),
              "cond_stage_model.model.logit_scale": torch.ones([]), "model.diffusion_model.x": torch.zeros(1)}
    assert list(text_state_dict_from_single_file(single)) == ["transformer.text_model.final_layer_norm.bias"]


# ---------------------------------------------------------------------------------------------- offline


def test_pretrained_offline_fails_clearly(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="does not exist"):
        build_text_encoder(tiny(type="clip", pretrained="/nonexistent/clip-text-encoder"))
    with pytest.raises(RuntimeError, match="offline mode.*local path"):
        build_text_encoder(tiny(type="clip", pretrained="no-such-org/no-such-clip-model"))
    with pytest.raises(ValueError, match="does not exist"):
        build_text_encoder(tiny(type="openclip", pretrained="/nonexistent/open_clip_model.safetensors"))
    with pytest.raises(ValueError, match="open_clip tag"):
        build_text_encoder(tiny(type="openclip", pretrained="no_such_tag"))
    vit_h = TextEncoderConfig(type="openclip", width=1024, layers=24, heads=16, pretrained="laion2b_s32b_b79k")
    with pytest.raises(RuntimeError, match="offline mode.*local path"):  # config checked, tower not built
        build_text_encoder(vit_h)
    with pytest.raises(ValueError, match="does not match open_clip model"):
        build_text_encoder(tiny(type="openclip", pretrained="laion2b_s32b_b79k"))
