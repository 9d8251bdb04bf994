"""latentdiff pack-model: float16, name and config changes, and a compact token vocabulary for shipping."""


import pytest
import torch

import latentdiff
from latentdiff.cli import pack_model
from latentdiff.io.checkpoint import load_model_file, read_safetensors, save_model_file
from latentdiff.models.tokenizer import Tokenizer

EMB = "text_encoder.token_embedding.weight"


@pytest.fixture(scope="module")
def src(tiny_ldm_file):
    return tiny_ldm_file


def test_vocabulary_pack_keeps_outputs_for_known_prompts(src, tmp_path):
    captions = tmp_path / "captions.txt"
    captions.write_text("a photo of thing 1\n\na photo of thing 2\n")
    dst = tmp_path / "packed.safetensors"
    assert pack_model.main([str(src), str(dst), "--vocabulary", str(captions), "--name", "packed",
                            "--set", "guidance_scale=4.5"]) == 0
    tensors, meta = read_safetensors(dst)
    assert EMB not in tensors and "compact_rows" in meta
    tokenizer = Tokenizer(16)
    kept = set(tokenizer("a photo of thing 1")[0].tolist()) | set(tokenizer("a photo of thing 2")[0].tolist())
    assert set(tensors[EMB + ".kept_ids"].tolist()) == kept | set(tokenizer("")[0].tolist())
    assert dst.stat().st_size < 0.6 * src.stat().st_size  # the 49,408 x 32 embedding was half the file

    a, b = latentdiff.load_pipeline(src), latentdiff.load_pipeline(dst)
    assert b.name == "packed" and b.default_scale == 4.5 and a.default_scale == 3.0
    def latents(pipe, prompt):
        return pipe.generate([prompt], steps=2, seed=3, scale=3.0, output_type="latent")[0]

    for prompt in ["a photo of thing 2", ""]:
        assert torch.equal(latents(a, prompt), latents(b, prompt)), prompt
    # the comparison can fail: a prompt with tokens outside the vocabulary now reads the shared row
    assert not torch.equal(latents(a, "a zebra"), latents(b, "a zebra"))
    _, parts, _ = load_model_file(dst)
    emb = parts["text_encoder"]["token_embedding.weight"]
    other = [i for i in range(emb.shape[0]) if i not in kept][:100]
    assert torch.equal(emb[other], emb[other[0]].expand(len(other), -1))  # one shared row for unseen tokens

    # packing a packed file again (a config change only) keeps its compact rows and every tensor bit for bit
    again = tmp_path / "again.safetensors"
    assert pack_model.main([str(dst), str(again), "--set", "sampler=euler_a", "--set", "steps=10"]) == 0
    tensors2, meta2 = read_safetensors(again)
    assert tensors2.keys() == tensors.keys() and all(torch.equal(tensors[k], tensors2[k]) for k in tensors)
    assert {k: v for k, v in meta2.items() if k != "config"} == {k: v for k, v in meta.items() if k != "config"}
    c = latentdiff.load_pipeline(again)
    assert (c.name, c.default_sampler, c.default_steps, c.default_scale) == ("packed", "euler_a", 10, 4.5)


def test_half_and_vocabulary_from_shards(src, tmp_path, tiny_shards):
    shards = tiny_shards(12)
    dst = tmp_path / "half.safetensors"
    assert pack_model.main([str(src), str(dst), "--half", "--vocabulary", str(shards)]) == 0
    tensors, _ = read_safetensors(dst)
    assert {t.dtype for t in tensors.values() if t.is_floating_point()} == {torch.float16}
    ids = set(tensors[EMB + ".kept_ids"].tolist())
    assert set(Tokenizer(16)("a photo of thing 3")[0].tolist()) <= ids
    pipe = latentdiff.load_pipeline(dst, dtype=torch.float32)
    assert pipe.generate(["a photo of thing 3"], steps=2, seed=0)[0].shape == (1, 3, 16, 16)


@pytest.mark.parametrize("make_args, message", [
    (lambda s, d, t: [str(d), str(d)], "not a latentdiff model file"),
    (lambda s, d, t: [str(s), str(s)], "exists; pass --overwrite"),
    (lambda s, d, t: [str(s), str(d), "--set", "nope=1"], "unknown key 'nope'"),
    (lambda s, d, t: [str(s), str(d), "--vocabulary", str(t)], "no captions found"),
])
def test_bad_input_exits_2(src, tmp_path, capsys, make_args, message):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    before = src.read_bytes()
    with pytest.raises(SystemExit) as e:
        pack_model.main(make_args(src, tmp_path / "out.safetensors", empty))
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out.safetensors").exists() and src.read_bytes() == before  # src == dst: untouched


def test_decoder_swap_takes_the_decoder_and_refuses_another_encoder(src, tmp_path, capsys):
    cfg, parts, _ = load_model_file(src)
    tuned = {k: v.clone() for k, v in parts["autoencoder"].items()}
    for k in tuned:
        if k.startswith(("decoder.", "post_quant_conv.")):
            tuned[k] += 0.01
    dec = tmp_path / "decoder.safetensors"
    save_model_file(dec, cfg, {"autoencoder": tuned})
    dst = tmp_path / "swapped.safetensors"
    assert pack_model.main([str(src), str(dst), "--decoder", str(dec), "--half"]) == 0
    _, out, _ = load_model_file(dst)
    for k, v in out["autoencoder"].items():
        expected = tuned[k] if k.startswith(("decoder.", "post_quant_conv.")) else parts["autoencoder"][k]
        assert torch.equal(v, expected.half()), k
    for name in ("unet", "text_encoder"):  # the rest of the model: the source's, in float16
        assert out[name].keys() == parts[name].keys()
        assert all(torch.equal(out[name][k], v.half()) for k, v in parts[name].items()), name

    tuned["encoder.conv_in.weight"] += 0.01  # another encoder: the diffusion model's latents would change
    save_model_file(dec, cfg, {"autoencoder": tuned}, overwrite=True)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        pack_model.main([str(src), str(tmp_path / "refused.safetensors"), "--decoder", str(dec)])
    assert exc.value.code == 2 and not (tmp_path / "refused.safetensors").exists()
    assert "its encoder side differs from the source's (autoencoder.encoder.conv_in.weight)" in capsys.readouterr().err


def test_the_embedded_models_by_name(tmp_path):
    """SRC 'default' / 'default-vq' is the embedded file, as for txt2img and eval-t2i."""
    from latentdiff.assets import EMBEDDED_MODELS
    from latentdiff.pipelines import load_pipeline

    for name, path in EMBEDDED_MODELS.items():
        dst = tmp_path / f"{name}.safetensors"
        assert pack_model.main([name, str(dst), "--name", f"renamed-{name}"]) == 0
        _, parts, _ = load_model_file(dst)
        _, original, _ = load_model_file(path)
        assert all(torch.equal(parts[m][k], v) for m in original for k, v in original[m].items()), name
        assert load_pipeline(dst).name == f"renamed-{name}"
