"""latentdiff txt2img in-process on the session's tiny checkpoint (tests/conftest.py): PNGs with their parameters,
no overwriting, clear exits on bad input. The console script and tools/txt2img.py run as programs in test_cli.py."""

import io

import pytest
from PIL import Image

from latentdiff.cli import txt2img
from latentdiff.io.checkpoint import load_model_file, save_model_file
from latentdiff.pipelines import parse_parameters
from tests.tiny import tiny_ldm_config


@pytest.fixture(scope="module")
def ckpt(tiny_ldm_file):
    return tiny_ldm_file


def test_writes_pngs_and_a_grid_with_parameters(ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    assert txt2img.main(["a photo of a cat", "--ckpt", str(ckpt), "--steps", "3", "--seed", "5", "--n_samples", "2",
                         "--outdir", str(out), "--negative-prompt", "blurry", "--quiet"]) == 0
    pngs = sorted(out.glob("*.png"))
    assert [p.name for p in pngs] == ["00000.png", "00001.png", "00002-grid.png"]
    assert str(pngs[0]) in capsys.readouterr().out  # each file is named as it is written
    images = [Image.open(p) for p in pngs]
    assert [im.size for im in images[:2]] == [(16, 16)] * 2 and images[2].size[0] > 2 * 16  # grid: side by side
    params = parse_parameters(images[1].info["parameters"])
    assert params["prompt"] == "a photo of a cat" and params["negative_prompt"] == "blurry"
    assert params["Steps"] == "3" and params["Seed"] == "6" and params["Size"] == "16x16"
    assert params["Sampler"] == "ddim" and params["CFG scale"] == "3"
    assert "Steps: 3, Sampler: DDIM, CFG scale: 3, Seed: 6, Size: 16x16" in images[1].info["parameters"]
    assert parse_parameters(images[0].info["parameters"])["Seed"] == "5"


def test_never_overwrites(ckpt, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "00000.png").write_bytes(b"precious")
    assert txt2img.main(["cat", "--ckpt", str(ckpt), "--steps", "2", "--seed", "1", "--outdir", str(out),
                         "--quiet"]) == 0
    assert (out / "00000.png").read_bytes() == b"precious"
    assert Image.open(out / "00001.png").size == (16, 16) and sorted(p.name for p in out.iterdir()) == [
        "00000.png", "00001.png"]


@pytest.mark.parametrize("args, message", [
    (["--H", "18"], "height=18 must be a positive multiple of 4"),
    (["--W", "-4"], "argument --W: -4 is below the smallest allowed value, 1"),
    (["--steps", "0"], "argument --steps: 0 is below the smallest allowed value, 1"),
    (["--steps", "500"], "--steps must be at most 100"),
    (["--sampler", "plms"], "invalid choice: 'plms'"),
    (["--n_samples", "0"], "argument --n_samples: 0 is below the smallest"),
    (["--precision", "fp16", "--device", "cpu"], "fp16 is not supported on the CPU"),
    (["--sampler", "euler_a", "--eta", "0.5", "--steps", "2"], "is only used by sampler='ddim'"),
    (["--scale", "nan"], "argument --scale: 'nan' is not a finite number"),
    (["--scale", "inf"], "argument --scale: 'inf' is not a finite number"),
    (["--eta", "nan"], "argument --eta: 'nan' is not a finite number"),
    (["--batch-size", "0"], "argument --batch-size: 0 is below the smallest"),
])
def test_bad_input_exits_2(ckpt, tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        txt2img.main(["cat", "--ckpt", str(ckpt), "--outdir", str(tmp_path), "--quiet", *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not list(tmp_path.glob("*.png"))


def test_bad_checkpoints_exit_2(ckpt, tmp_path, capsys):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01not a safetensors file")
    cfg_mismatch = tmp_path / "mismatch.safetensors"
    _, parts, _ = load_model_file(ckpt)
    save_model_file(cfg_mismatch, tiny_ldm_config(unet={"model_channels": 16}), parts)
    cases = [(tmp_path / "missing.safetensors", "does not exist"),
             (garbage, "truncated or corrupt"),
             (cfg_mismatch, "unet weights do not fit the model")]
    for path, message in cases:
        with pytest.raises(SystemExit) as e:
            txt2img.main(["cat", "--ckpt", str(path), "--outdir", str(tmp_path), "--quiet"])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (path, err)
    assert not list(tmp_path.glob("*.png"))


def test_outdir_that_is_a_file_exits_2(ckpt, tmp_path, capsys):
    target = tmp_path / "taken"
    target.write_bytes(b"keep")
    with pytest.raises(SystemExit) as e:
        txt2img.main(["cat", "--ckpt", str(ckpt), "--outdir", str(target), "--quiet"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"--outdir {target} exists and is not a folder" in err and "Traceback" not in err
    assert target.read_bytes() == b"keep"


def test_batches_give_the_images_of_one_call(ckpt, tmp_path):
    """--batch-size splits the work, not the result: image i has seed + i either way, and a large --n_samples is
    written batch by batch (no grid past GRID_MAX)."""
    common = ["a photo of a cat", "--ckpt", str(ckpt), "--steps", "2", "--seed", "7", "--n_samples", "5", "--quiet"]
    assert txt2img.main([*common, "--outdir", str(tmp_path / "one"), "--batch-size", "5"]) == 0
    assert txt2img.main([*common, "--outdir", str(tmp_path / "split"), "--batch-size", "2"]) == 0
    for i in range(5):
        a, b = (Image.open(tmp_path / d / f"{i:05d}.png") for d in ("one", "split"))
        assert a.info["parameters"] == b.info["parameters"] and f"Seed: {7 + i}," in a.info["parameters"]
        diff = max(abs(x - y) for pa, pb in zip(a.getdata(), b.getdata()) for x, y in zip(pa, pb))
        assert diff <= 1  # the same image; batch composition may move a rounding by one level
    assert (tmp_path / "split" / "00005-grid.png").is_file()
    many = txt2img.GRID_MAX + 1
    assert txt2img.main(["cat", "--ckpt", str(ckpt), "--steps", "1", "--n_samples", str(many), "--batch-size", "32",
                         "--outdir", str(tmp_path / "many"), "--quiet"]) == 0
    assert len(list((tmp_path / "many").glob("*.png"))) == many  # every image, no grid


def test_steps_and_sampler_default_to_the_models_own(ckpt, tmp_path, capsys):
    """Without --steps/--sampler the model file's config decides (here Euler ancestral, 3 steps); flags win."""
    _, parts, _ = load_model_file(ckpt)
    own = save_model_file(tmp_path / "own.safetensors", tiny_ldm_config(sampler="euler_a", steps=3), parts)
    common = ["a cat", "--ckpt", str(own), "--seed", "1", "--quiet"]
    assert txt2img.main([*common, "--outdir", str(tmp_path / "a")]) == 0
    assert txt2img.main([*common, "--outdir", str(tmp_path / "b"), "--steps", "2", "--sampler", "ddpm"]) == 0
    assert txt2img.main([*common, "--outdir", str(tmp_path / "c"), "--init-image", str(tmp_path / "a" / "00000.png"),
                         "--strength", "0.7"]) == 0
    fields = []
    for name in "abc":
        with Image.open(tmp_path / name / "00000.png") as im:
            params = parse_parameters(im.info["parameters"])
        fields.append((params["Steps"], params["Sampler"]))
    assert fields == [("3", "euler_a"), ("2", "ddpm"), ("3", "euler_a")]
    with pytest.raises(SystemExit) as e:
        txt2img.main([*common, "--outdir", str(tmp_path / "d"), "--steps", "500"])
    assert e.value.code == 2
    assert "--steps must be at most 100, got 500" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ --from-png / --from-file


def _random_image(seed, size=16):
    import numpy as np

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def _pixels(path):
    with Image.open(path) as im:
        return im.convert("RGB").tobytes()


def _params(path):
    with Image.open(path) as im:
        return im.info["parameters"]


@pytest.mark.parametrize("extra", [[], ["--sampler", "dpmpp_2m", "--scale", "2.5"]])
def test_from_png_regenerates_the_image_bit_for_bit(ckpt, tmp_path, capsys, extra):
    first = tmp_path / "first"
    assert txt2img.main(["a photo of a cat", "--ckpt", str(ckpt), "--steps", "3", "--seed", "5", "--n_samples", "2",
                         "--negative-prompt", "blurry", "--outdir", str(first), "--quiet", *extra]) == 0
    capsys.readouterr()
    source = first / "00001.png"  # the second image: seed 6
    again = tmp_path / "again"
    assert txt2img.main(["--from-png", str(source), "--ckpt", str(ckpt), "--outdir", str(again), "--quiet"]) == 0
    assert "warning" not in capsys.readouterr().err  # the same model
    assert sorted(p.name for p in again.iterdir()) == ["00000.png"]
    assert _params(again / "00000.png") == _params(source) and "Seed: 6," in _params(source)
    assert _pixels(again / "00000.png") == _pixels(source)
    # an explicit flag overrides the PNG's value and only that one
    other = tmp_path / "other"
    assert txt2img.main(["--from-png", str(source), "--seed", "9", "--ckpt", str(ckpt), "--outdir", str(other),
                         "--quiet"]) == 0
    assert _params(other / "00000.png") == _params(source).replace("Seed: 6,", "Seed: 9,")
    assert _pixels(other / "00000.png") != _pixels(source)
    # a positional prompt replaces the PNG's prompt
    assert txt2img.main(["a photo of a ship", "--from-png", str(source), "--ckpt", str(ckpt), "--outdir",
                         str(other), "--quiet"]) == 0
    assert parse_parameters(_params(other / "00001.png"))["prompt"] == "a photo of a ship"


def test_from_png_round_trips_img2img(ckpt, tmp_path, capsys):
    src = tmp_path / "in.png"
    _random_image(3, size=16).save(src)
    first = tmp_path / "first"
    assert txt2img.main(["a cat", "--ckpt", str(ckpt), "--init-image", str(src), "--strength", "0.6", "--steps", "5",
                         "--sampler", "ddim", "--eta", "0.5", "--seed", "2", "--outdir", str(first), "--quiet"]) == 0
    source = first / "00000.png"
    assert "Denoising strength: 0.6" in _params(source) and "Eta: 0.5" in _params(source)
    again = tmp_path / "again"
    with pytest.raises(SystemExit) as e:  # the init image is not in the PNG
        txt2img.main(["--from-png", str(source), "--ckpt", str(ckpt), "--outdir", str(again), "--quiet"])
    assert e.value.code == 2 and "give it with --init-image" in capsys.readouterr().err and not again.exists()
    assert txt2img.main(["--from-png", str(source), "--init-image", str(src), "--ckpt", str(ckpt), "--outdir",
                         str(again), "--quiet"]) == 0
    assert _params(again / "00000.png") == _params(source) and _pixels(again / "00000.png") == _pixels(source)


def test_from_png_warns_about_another_model(ckpt, tmp_path, capsys):
    from latentdiff.io.images import png_bytes

    first = tmp_path / "first"
    assert txt2img.main(["a cat", "--ckpt", str(ckpt), "--steps", "2", "--seed", "1", "--sampler", "euler_a",
                         "--outdir", str(first), "--quiet"]) == 0
    text = _params(first / "00000.png")
    assert "Model: " in text
    with Image.open(first / "00000.png") as im:
        (tmp_path / "renamed.png").write_bytes(png_bytes(im, text.replace("Model: ", "Model: other-")))
    assert txt2img.main(["--from-png", str(tmp_path / "renamed.png"), "--ckpt", str(ckpt), "--outdir",
                         str(tmp_path / "out"), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "warning:" in err and "other-" in err
    assert _pixels(tmp_path / "out" / "00000.png") == _pixels(first / "00000.png")


def test_from_png_bad_input_exits_2(ckpt, tmp_path, capsys):
    from latentdiff.io.images import png_bytes
    plain = tmp_path / "plain.png"
    _random_image(1, size=16).save(plain)
    (tmp_path / "noseed.png").write_bytes(png_bytes(_random_image(1, size=16), "a cat\nSteps: 3, Sampler: DDIM"))
    (tmp_path / "other.png").write_bytes(png_bytes(_random_image(1, size=16), "a cat\nSteps: 3, Sampler: LMS, Seed: 1"))
    (tmp_path / "text.png").write_text("not an image")
    (tmp_path / "nan.png").write_bytes(png_bytes(_random_image(1, size=16), "a cat\nSteps: 3, CFG scale: nan, Seed: 1"))
    (tmp_path / "zero.png").write_bytes(png_bytes(_random_image(1, size=16), "a cat\nSteps: 0, Seed: 1"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    cases = [(["--from-png", str(plain)], "has no 'parameters' text chunk"),
             (["--from-png", str(tmp_path / "noseed.png")], "lacks Seed"),
             (["--from-png", str(tmp_path / "text.png")], "not a readable image"),
             (["--from-png", str(tmp_path / "missing.png")], "not a readable image"),
             (["--from-png", str(tmp_path / "other.png")], "sampler 'LMS' is not one of ours"),
             (["--from-png", str(tmp_path / "nan.png")], "its scale nan cannot be used: 'nan' is not a finite"),
             (["--from-png", str(tmp_path / "zero.png")], "its steps 0 cannot be used: 0 is below the smallest"),
             (["--from-png", str(plain), "--from-file", str(prompts)], "cannot be combined"),
             ([], "the prompt is empty")]
    out = tmp_path / "out"
    for args, message in cases:
        with pytest.raises(SystemExit) as e:
            txt2img.main([*args, "--ckpt", str(ckpt), "--outdir", str(out), "--quiet"])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and message in err and len(err.splitlines()) == 1, (args, err)
    assert not out.exists()


def test_png_settings_reads_vq_diffusion_truncation():
    from latentdiff.io.images import png_bytes, png_settings
    from latentdiff.pipelines.vq import VQGenerationParams
    text = VQGenerationParams("a ship", "", 100, "VQ-Diffusion", 5.0, 3, 32, 32, model="vq", truncation=0.86,
                              batch_size=2, batch_pos=1).to_text()
    settings = png_settings(io.BytesIO(png_bytes(_random_image(1, size=16), text)))
    assert settings["truncation"] == 0.86 and settings["sampler"] == "VQ-Diffusion" and settings["seed"] == 3
    assert (settings["steps"], settings["scale"], settings["H"], settings["W"]) == (100, 5.0, 32, 32)
    assert (settings["batch_size"], settings["batch_pos"], settings["model"]) == (2, 1, "vq")


def test_from_file_makes_each_lines_images_with_their_own_seeds(ckpt, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\n\n  \na photo of a ship\n", encoding="utf-8")
    out = tmp_path / "out"
    assert txt2img.main(["--from-file", str(prompts), "--n_samples", "2", "--seed", "10", "--steps", "2",
                         "--ckpt", str(ckpt), "--outdir", str(out), "--quiet"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["00000.png", "00001.png", "00002-grid.png", "00003.png",
                                                     "00004.png", "00005-grid.png"]
    params = [parse_parameters(_params(out / f"{i:05d}.png")) for i in (0, 1, 3, 4)]
    assert [(p["prompt"], p["Seed"]) for p in params] == [("a photo of a cat", "10"), ("a photo of a cat", "11"),
                                                          ("a photo of a ship", "12"), ("a photo of a ship", "13")]
    alone = tmp_path / "alone"  # line 1 alone: --seed 10 + 1 * 2
    assert txt2img.main(["a photo of a ship", "--n_samples", "2", "--seed", "12", "--steps", "2", "--ckpt",
                         str(ckpt), "--outdir", str(alone), "--quiet"]) == 0
    assert _pixels(alone / "00000.png") == _pixels(out / "00003.png")
    capsys.readouterr()
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\x00bad")
    cases = [(["--from-file", str(empty)], "has no prompts"),
             (["--from-file", str(bad)], "not UTF-8 text"),
             (["--from-file", str(tmp_path / "missing.txt")], "cannot be read"),
             (["a cat", "--from-file", str(prompts)], "cannot be combined with a prompt")]
    for args, message in cases:
        with pytest.raises(SystemExit) as e:
            txt2img.main([*args, "--ckpt", str(ckpt), "--outdir", str(tmp_path / "none"), "--quiet"])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and message in err and len(err.splitlines()) == 1, (args, err)
    assert not (tmp_path / "none").exists()


def test_vq_purity_sampler_from_the_command_line_and_back_from_its_png(ckpt, tmp_path, capsys):
    """--sampler vq_purity on a VQ-Diffusion model records "VQ-Diffusion purity", which --from-png reads back to
    the same image; on a latent-diffusion model it is refused."""
    import torch

    from latentdiff.pipelines import VQDiffusionPipeline
    from tests.test_vq_pipeline import randomize, tiny_vq_config

    torch.manual_seed(0)
    vq = randomize(VQDiffusionPipeline.from_config(tiny_vq_config(), name="tiny-vq")).save(tmp_path / "vq.safetensors")
    first, again, chain = tmp_path / "first", tmp_path / "again", tmp_path / "chain"
    common = ["--ckpt", str(vq), "--steps", "5", "--quiet", "--no-grid"]
    assert txt2img.main(["a cat", "--sampler", "vq_purity", "--seed", "2", "--outdir", str(first), *common]) == 0
    assert "Sampler: VQ-Diffusion purity," in _params(first / "00000.png")
    assert txt2img.main(["--from-png", str(first / "00000.png"), "--outdir", str(again), *common]) == 0
    assert _params(again / "00000.png") == _params(first / "00000.png")
    assert _pixels(again / "00000.png") == _pixels(first / "00000.png")
    assert txt2img.main(["a cat", "--seed", "2", "--outdir", str(chain), *common]) == 0  # the config's: vq
    assert "Sampler: VQ-Diffusion," in _params(chain / "00000.png")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        txt2img.main(["a cat", "--sampler", "vq_purity", "--ckpt", str(ckpt), "--outdir", str(tmp_path / "x")])
    assert e.value.code == 2 and "--sampler vq_purity applies to VQ-Diffusion models only" in capsys.readouterr().err
