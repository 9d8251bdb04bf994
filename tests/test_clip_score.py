"""CLIP score: the definition on known embeddings, mechanics on a tiny random open_clip model, caption sources,
offline behaviour and the command-line tool. Nothing is downloaded."""

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image, PngImagePlugin
from safetensors.torch import save_file

from latentdiff.cli import clip_score as clip_tool
from latentdiff.data.image_sources import open_image_source
from latentdiff.metrics import clip_score as cs

ROOT = Path(__file__).resolve().parents[1]

TINY_NAME = "latentdiff-tiny-test"
TINY_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = open_clip.CLIP(**TINY_CFG).eval()
    return model, open_clip.image_transform(32, is_train=False), open_clip.get_tokenizer("ViT-B-32")


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 40, 36, generator=torch.Generator().manual_seed(seed))  # (n, 3, H, W) in [0, 1]


CAPTIONS = ["a photo of a cat", "a red car", "two dogs", "a bowl of soup", "the sea", "a tree"]


class _FixedEmbeddings(torch.nn.Module):
    """Returns given embeddings, to check the score formula against hand-computed cosines."""

    def __init__(self, image_emb, text_emb):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.image_emb, self.text_emb = image_emb, text_emb

    def encode_image(self, pixels):
        return self.image_emb

    def encode_text(self, tokens):
        return self.text_emb


def test_score_is_100_times_clamped_cosine():
    image_emb = torch.tensor([[1.0, 0.0], [2.0, 0.0], [1.0, 0.0]])
    text_emb = torch.tensor([[3.0, 0.0], [1.0, 1.0], [-1.0, 0.5]])  # cos 1, cos 45°, negative
    model = _FixedEmbeddings(image_emb, text_emb)
    scores = cs.clip_score_from_pixels(torch.zeros(3, 3, 2, 2), ["a", "b", "c"], model, lambda t: torch.zeros(3, 2))
    torch.testing.assert_close(scores, torch.tensor([100.0, 100.0 / 2**0.5, 0.0]))


def test_range_batching_and_identical_pairs(tiny):
    model, preprocess, tokenizer = tiny
    images = _images(6)
    full = cs.clip_score(images, CAPTIONS, model, preprocess, tokenizer)
    assert full.shape == (6,) and (full >= 0).all() and (full <= 100).all()
    batched = torch.cat([cs.clip_score(images[i : i + 2], CAPTIONS[i : i + 2], model, preprocess, tokenizer)
                         for i in range(0, 6, 2)])  # fmt: skip
    torch.testing.assert_close(batched, full, atol=1e-4, rtol=1e-4)
    same = cs.clip_score(images[:1].repeat(3, 1, 1, 1), [CAPTIONS[0]] * 3, model, preprocess, tokenizer)
    assert torch.allclose(same, same[0].expand(3), atol=1e-5)
    assert same[0].item() == pytest.approx(full[0].item(), abs=1e-4)


def test_tensor_and_pil_inputs_agree(tiny):
    model, preprocess, tokenizer = tiny
    images = _images(3, seed=1)
    pil = [Image.fromarray((x * 255).round().byte().permute(1, 2, 0).numpy()) for x in images]
    torch.testing.assert_close(
        cs.clip_score(images, CAPTIONS[:3], model, preprocess, tokenizer),
        cs.clip_score(pil, CAPTIONS[:3], model, preprocess, tokenizer),
    )
    with pytest.raises(ValueError, match="captions"):
        cs.clip_score(images, CAPTIONS[:2], model, preprocess, tokenizer)


def _png_bytes(seed: int, pnginfo=None) -> bytes:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="PNG", pnginfo=pnginfo)
    return buffer.getvalue()


@pytest.fixture
def pairs(tmp_path):
    """A folder: a .txt caption, a PNG 'parameters' chunk, an image without caption, a broken image; a shard."""
    folder = tmp_path / "pairs"
    folder.mkdir()
    (folder / "a.png").write_bytes(_png_bytes(0))
    (folder / "a.txt").write_text("a photo of a cat\n")
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a red car\nNegative prompt: blurry\nSteps: 20, Sampler: Euler")
    (folder / "b.png").write_bytes(_png_bytes(1, info))
    (folder / "c.png").write_bytes(_png_bytes(2))
    (folder / "d.jpg").write_bytes(b"broken")
    shard = tmp_path / "pairs-000000.tar"
    with tarfile.open(shard, "w") as tar:
        for key, caption in (("x0", "a photo of a cat"), ("x1", "a red car")):
            for ext, data in (("png", _png_bytes(3)), ("txt", caption.encode())):
                member = tarfile.TarInfo(f"{key}.{ext}")
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
    return folder, shard


def test_caption_sources(tiny, pairs):
    model, preprocess, tokenizer = tiny
    folder, shard = pairs
    scores, failures, selection = cs.score_source(open_image_source(folder), model, preprocess, tokenizer)
    assert len(scores) == 2 and selection == "all"
    assert sorted(failures)[0] == ("c.png", "no caption") and sorted(failures)[1][0] == "d.jpg"
    a = cs.clip_score([Image.open(folder / "a.png")], ["a photo of a cat"], model, preprocess, tokenizer)
    b = cs.clip_score([Image.open(folder / "b.png")], ["a red car"], model, preprocess, tokenizer)
    torch.testing.assert_close(scores.sort().values, torch.cat([a, b]).sort().values, atol=1e-4, rtol=1e-4)
    scores, failures, _ = cs.score_source(open_image_source(shard), model, preprocess, tokenizer, num_workers=2)
    assert len(scores) == 2 and not failures


def test_offline_without_weights_stops_clearly(pairs, monkeypatch, capsys):
    monkeypatch.setattr(cs, "cached_pretrained", lambda model, tag: None)  # as on a machine with an empty cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(cs.ClipWeightsError, match="allow-download"):
        cs.load_clip("ViT-B-32", "laion2b_s34b_b79k")
    assert clip_tool.main([str(pairs[0])]) == 2
    err = capsys.readouterr().err
    assert "--weights" in err and "Traceback" not in err
    assert clip_tool.main([str(pairs[0]), "--weights", "/nonexistent.safetensors"]) == 2


def test_tool_with_local_weights(tiny, pairs, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / f"{TINY_NAME}.json").write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(tmp_path / f"{TINY_NAME}.json")
    weights = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny[0].state_dict().items()}, str(weights))
    argv = [str(pairs[0]), "--model", TINY_NAME, "--weights", str(weights), "--num-workers", "0", "--no-progress"]
    assert clip_tool.main(argv) == 0
    out = capsys.readouterr().out
    assert "CLIP score:" in out and "2 pairs scored" in out and "2 skipped" in out
