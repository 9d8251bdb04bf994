"""AUTOMATIC1111 prompts: parsing against its documented examples, chunking and its comma rule, weighted chunked
encoding (closed form, plain prompts bit for bit as before), clip skip against transformers, the pipeline and the
CLI (--clip-skip recorded in the PNG and read back by --from-png)."""

from __future__ import annotations

import random

import pytest
import torch
from PIL import Image

from latentdiff.config import TextEncoderConfig
from latentdiff.models.prompt_encoding import encode_prompt_batches
from latentdiff.models.prompts import BREAK, parse_prompt_attention, prompt_chunks
from latentdiff.models.text_encoders import build_text_encoder
from latentdiff.models.tokenizer import COMMA_TOKEN, Tokenizer
from tests.tiny import close, jitter, tiny_ldm_config

# The docstring examples of AUTOMATIC1111's modules/prompt_parser.py parse_prompt_attention, as data.
A1111_EXAMPLES = [
    ("normal text", [["normal text", 1.0]]),
    ("an (important) word", [["an ", 1.0], ["important", 1.1], [" word", 1.0]]),
    ("(unbalanced", [["unbalanced", 1.1]]),
    ("\\(literal\\]", [["(literal]", 1.0]]),
    ("(unnecessary)(parens)", [["unnecessaryparens", 1.1]]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [["a ", 1.0], ["house", 1.5730000000000004], [" ", 1.1], ["on", 1.0], [" a ", 1.1], ["hill", 0.55],
      [", sun, ", 1.1], ["sky", 1.4641000000000006], [".", 1.1]]),
]

BPE = Tokenizer().encode
A, B = BPE("a")[0], BPE("b")[0]


def parsed(text):
    return [[t, w] for t, w in parse_prompt_attention(text)]


@pytest.mark.parametrize("text, expected", A1111_EXAMPLES)
def test_parse_matches_automatic1111_examples(text, expected):
    assert parsed(text) == expected  # exact floats: the same products in the same order


def test_parse_more_syntax():
    assert parsed("[[a]] b") == [["a", 1 / 1.1 / 1.1], [" b", 1.0]]
    assert parsed("(a : 1.5 ) b") == [["a ", 1.5], [" b", 1.0]]  # spaces around the number, as A1111 allows
    assert parsed("(a:-0.5)") == [["a", -0.5]]
    assert parsed("a \\\\ b \\ c") == [["a \\ b  c", 1.0]]  # \\ is a backslash, a lone \ is dropped
    assert parsed("x) y] z:1") == [["x) y] z:1", 1.0]]  # unmatched closers and colons are text
    assert parsed("[a") == [["a", 1 / 1.1]]
    assert parsed("") == [["", 1.0]]
    assert parsed("a cat BREAK a dog") == [["a cat", 1.0], [BREAK, -1.0], ["a dog", 1.0]]
    assert parsed("BREAKING news") == [["BREAKING news", 1.0]]  # BREAK only as a word of its own
    assert parsed("(a:1.2.3)") == [["a:1.2.3)", 1.1]]  # A1111 raises here; we keep the text


def test_parse_never_raises():
    rng = random.Random(0)
    alphabet = "()[]:\\ .1-aBREAK,"
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        pieces = parse_prompt_attention(text)
        assert pieces and all(isinstance(t, str) and isinstance(w, float) for t, w in pieces)


def test_chunks_of_75_and_the_comma_rule():
    chunks = prompt_chunks("a " * 200, BPE, 75, COMMA_TOKEN)
    assert [len(t) for t, _ in chunks] == [75, 75, 50]
    # comma at position 60 of a full chunk: 75 - 60 <= 20, so the 14 tokens after it move to the next chunk
    chunks = prompt_chunks("a " * 60 + ", " + "b " * 20, BPE, 75, COMMA_TOKEN)
    assert chunks[0][0] == [A] * 60 + [COMMA_TOKEN] and chunks[1][0] == [B] * 20
    assert prompt_chunks("a " * 60 + ", " + "b " * 20, BPE, 75, COMMA_TOKEN, backtrack=0)[0][0] == \
        [A] * 60 + [COMMA_TOKEN] + [B] * 14
    # comma at position 50: 25 tokens back is beyond the rule's 20, the chunk is simply cut at 75
    chunks = prompt_chunks("a " * 50 + ", " + "b " * 40, BPE, 75, COMMA_TOKEN)
    assert chunks[0][0] == [A] * 50 + [COMMA_TOKEN] + [B] * 24 and len(chunks[1][0]) == 16
    chunks = prompt_chunks("a (b:1.5) BREAK a", BPE, 75, COMMA_TOKEN)
    assert chunks == [([A, B], [1.0, 1.5]), ([A], [1.0])]
    assert prompt_chunks("", BPE, 75, COMMA_TOKEN) == [([], [])]
    assert len(prompt_chunks("a " * 75, BPE, 75, COMMA_TOKEN)) == 1 and len(prompt_chunks("a " * 76, BPE, 75,
                                                                                           COMMA_TOKEN)) == 2


# ---------------------------------------------------------------------------------------------- encoding


def encoder(kind: str, context_length: int = 77, layers: int = 2, seed: int = 0, **kw):
    """A tiny random encoder; jittered so that its final LayerNorm has a bias (with none the mean of its output,
    the denominator of the emphasis, is 0 up to rounding)."""
    torch.manual_seed(seed)
    cfg = TextEncoderConfig(type=kind, width=32, layers=layers, heads=2, context_length=context_length, **kw)
    return jitter(build_text_encoder(cfg), std=0.2, seed=seed).eval()


KINDS = ["trainable", "clip", "openclip"]
PLAIN = ["a photo of a cat", "", "An astronaut riding a horse on Mars, 4k, highly detailed!!"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layer", ["last", "penultimate"])
def test_plain_prompts_give_exactly_the_old_encoding(kind, layer):
    enc = encoder(kind, layers=3, layer=layer)
    with torch.no_grad():
        [new] = encode_prompt_batches(enc, [PLAIN])
        context, uncond = encode_prompt_batches(enc, [PLAIN, ["", "blurry", "x"]])
        assert torch.equal(new, enc.encode(PLAIN)) and torch.equal(context, new)
        assert torch.equal(uncond, enc.encode(["", "blurry", "x"]))
        assert torch.equal(encode_prompt_batches(enc, [PLAIN], clip_skip=2)[0], enc.encode(PLAIN, clip_skip=2))


def test_pipeline_encoding_of_plain_prompts_is_unchanged(tiny_ldm_pipe):
    te = tiny_ldm_pipe.text_encoder
    prompts, negatives = ["a photo of a cat", "a ship"], ["", "blurry"]
    with torch.no_grad():
        context, uncond = tiny_ldm_pipe.encode_prompts(prompts, negatives)
        assert torch.equal(context, te.encode(prompts).to(tiny_ldm_pipe.dtype))
        assert torch.equal(uncond, te.encode(negatives).to(tiny_ldm_pipe.dtype))
        assert tiny_ldm_pipe.encode_prompts(prompts, negatives, guided=False)[1] is None


@pytest.mark.parametrize("kind", KINDS)
def test_weighting_closed_form(kind):
    enc = encoder(kind)
    tok = enc.tokenizer
    ids = torch.tensor([tok.wrap(BPE("a cat photo"))])  # (1, 77)
    with torch.no_grad():
        [got] = encode_prompt_batches(enc, [["a (cat:1.5) photo"]])
        z = enc(ids).double()  # (1, 77, D)
    w = torch.ones(77, dtype=torch.float64)
    w[2] = 1.5  # [START, a, cat, photo, END, ...]: the weight of "cat"
    zw = z * w[None, :, None]
    expected = zw * (z.mean() / zw.mean())  # A1111 "Original": z·w, then its mean restored
    close(got, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got.double(), z)


def test_long_prompt_is_encoded_chunk_by_chunk():
    enc = encoder("trainable")
    prompt = "a photo of a cat " * 40  # 200 tokens, no comma
    bpe = BPE(prompt)
    assert len(bpe) == 200
    with torch.no_grad():
        [z] = encode_prompt_batches(enc, [[prompt]])
        assert z.shape == (1, 77 * 3, 32)
        for i, part in enumerate((bpe[:75], bpe[75:150], bpe[150:])):
            alone = enc(torch.tensor([enc.tokenizer.wrap(part)]))  # (1, 77, D)
            assert torch.equal(z[:, 77 * i:77 * (i + 1)], alone)
        assert torch.equal(z[:, :77], enc.encode(Tokenizer().decode(bpe[:75])))


def test_chunks_follow_each_encoders_context_length(tiny_ldm_pipe):
    te = tiny_ldm_pipe.text_encoder  # context_length 16: chunks of 14 tokens
    with torch.no_grad():
        [z] = encode_prompt_batches(te, [["a photo of a cat " * 6]])  # 30 tokens
        assert z.shape == (1, 16 * 3, te.width)
        assert torch.equal(z[:, :16], te.encode("a photo of a cat a photo of a cat a photo of a"))


def test_break_starts_a_new_chunk():
    enc = encoder("clip")
    with torch.no_grad():
        [z] = encode_prompt_batches(enc, [["a red cat BREAK a blue dog"]])
        assert z.shape == (1, 154, 32)
        assert torch.equal(z[:, :77], enc.encode("a red cat")) and torch.equal(z[:, 77:], enc.encode("a blue dog"))


def test_rows_and_negatives_padded_with_empty_chunks():
    enc = encoder("openclip")
    long = "a photo of a cat " * 20  # 100 tokens: 2 chunks
    with torch.no_grad():
        context, uncond = encode_prompt_batches(enc, [[long, "a dog"], ["blurry", ""]])
        empty = enc.encode("")
        assert context.shape == uncond.shape == (2, 154, 32)
        assert torch.equal(context[1:, 77:], empty) and torch.equal(uncond[:, 77:], empty.expand(2, -1, -1))
        assert torch.equal(context[1:, :77], enc.encode("a dog"))
        context, uncond = encode_prompt_batches(enc, [["a dog"], [long]])  # a long negative lengthens the prompt
        assert context.shape == uncond.shape == (1, 154, 32) and torch.equal(context[:, 77:], empty)


# ---------------------------------------------------------------------------------------------- clip skip


def test_clip_skip_equals_transformers_hidden_states():
    from tests.sd_helpers import clip_text_model

    hf = clip_text_model()  # 2 layers, width 64, quick_gelu
    enc = build_text_encoder(TextEncoderConfig(type="clip", width=64, layers=2, heads=1, act="quick_gelu")).eval()
    text_model = getattr(hf, "text_model", hf)
    enc.transformer.text_model.load_state_dict(text_model.state_dict())
    ids = enc.tokenize(["a photo of a cat", "a (castle"])
    with torch.no_grad():
        out = hf(input_ids=ids, output_hidden_states=True)
        reference = text_model.final_layer_norm(out.hidden_states[-2])  # AUTOMATIC1111's Clip skip 2
        close(enc(ids, clip_skip=2), reference, atol=1e-6)
        close(enc(ids), out.last_hidden_state, atol=1e-6)
        [z] = encode_prompt_batches(enc, [["a photo of a cat"]], clip_skip=2)
        close(z, reference[:1], atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_clip_skip_counts_from_the_output_layer(kind):
    last, pen = encoder(kind, layers=3), encoder(kind, layers=3, layer="penultimate")
    pen.load_state_dict(last.state_dict())
    ids = last.tokenize(["a photo of a cat"])
    with torch.no_grad():
        assert torch.equal(last(ids, clip_skip=2), pen(ids))
        assert torch.equal(last(ids, clip_skip=3), pen(ids, clip_skip=2))
        assert not torch.equal(last(ids, clip_skip=2), last(ids))
    for bad, enc in ((0, last), (4, last), (3, pen), (True, last), (2.0, last)):
        with pytest.raises(ValueError, match="clip_skip"):
            enc(ids, clip_skip=bad)
    with pytest.raises(ValueError, match="clip_skip"):
        encode_prompt_batches(last, [["a"]], clip_skip=4)


# ---------------------------------------------------------------------------------------------- U-Net, pipeline, CLI


def test_unet_attends_over_any_context_length(tiny_ldm_pipe):
    unet = tiny_ldm_pipe.unet
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g)
    c = torch.randn(1, 16, 32, generator=g)
    with torch.no_grad():
        one = unet(x, torch.tensor([10]), c)
        # attention over [K; K], [V; V] equals attention over K, V: a repeated context gives the same output
        close(unet(x, torch.tensor([10]), torch.cat([c, c, c], dim=1)), one, atol=1e-5)
        other = unet(x, torch.tensor([10]), torch.cat([c, torch.randn(1, 40, 32, generator=g)], dim=1))
    assert other.shape == one.shape and not torch.allclose(other, one)


@pytest.fixture(scope="module")
def two_layer_pipe():
    from latentdiff.pipelines import LatentDiffusionPipeline

    with torch.random.fork_rng():
        torch.manual_seed(0)
        pipe = LatentDiffusionPipeline.from_config(tiny_ldm_config(text_encoder={"layers": 2}), name="tiny2")
    jitter(pipe.unet, std=0.05, seed=1)
    return pipe


def test_pipeline_generates_with_long_weighted_prompts(two_layer_pipe):
    pipe = two_layer_pipe
    prompt = "a (photo:1.3) of a [cat], " * 5 + "BREAK (((red))) sky"  # several chunks of 14 tokens
    negative = "blurry"
    with torch.no_grad():
        context, uncond = pipe.encode_prompts([prompt], [negative])
    assert context.shape == uncond.shape and context.shape[1] % 16 == 0 and context.shape[1] >= 16 * 4
    images, params = pipe.generate(prompt, negative_prompt=negative, steps=2, seed=0, clip_skip=2)
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()
    assert "Clip skip: 2" in params[0].to_text() and params[0].prompt == prompt
    plain, _ = pipe.generate("a photo of a cat", steps=2, seed=0)
    weighted, _ = pipe.generate("a (photo:1.5) of a cat", steps=2, seed=0)
    assert not torch.equal(plain, weighted)
    with pytest.raises(ValueError, match="clip_skip"):
        pipe.generate("a cat", steps=2, seed=0, clip_skip=3)


def test_cli_clip_skip_recorded_and_read_back(two_layer_pipe, tmp_path, capsys):
    from latentdiff.cli import txt2img
    from latentdiff.io.images import png_settings

    ckpt = two_layer_pipe.save(tmp_path / "tiny2.safetensors")
    common = ["--ckpt", str(ckpt), "--steps", "2", "--seed", "3", "--quiet", "--device", "cpu"]
    first = tmp_path / "first"
    assert txt2img.main(["a (red:1.2) castle BREAK a lake", *common, "--clip-skip", "2", "--outdir", str(first)]) == 0
    [source] = sorted(first.glob("*.png"))
    assert "Clip skip: 2" in Image.open(source).info["parameters"] and png_settings(source)["clip_skip"] == 2
    again = tmp_path / "again"
    assert txt2img.main(["--from-png", str(source), "--ckpt", str(ckpt), "--outdir", str(again), "--quiet",
                         "--device", "cpu"]) == 0
    [copy] = sorted(again.glob("*.png"))
    assert Image.open(copy).info["parameters"] == Image.open(source).info["parameters"]
    assert Image.open(copy).tobytes() == Image.open(source).tobytes()
    capsys.readouterr()
    for value, message in (("3", "--clip-skip: clip_skip=3 must be an integer from 1 to 2"),
                           ("0", "argument --clip-skip: 0 is below the smallest allowed value, 1")):
        with pytest.raises(SystemExit) as e:
            txt2img.main(["a cat", *common, "--clip-skip", value, "--outdir", str(tmp_path / "bad")])
        assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
