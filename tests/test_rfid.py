"""The reconstruction floor (latentdiff/metrics/reconstruction.py, latentdiff rfid): PSNR and codebook statistics
against closed forms, rFID of an exact reconstruction equal to 0 through the same pixels as `latentdiff fid`,
tiny random KL and VQ autoencoders loaded from model files and reconstructed as their own networks do."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from latentdiff.cli.main import main
from latentdiff.config import model_config_from_dict
from latentdiff.data.image_sources import open_image_source
from latentdiff.io.checkpoint import save_model_file
from latentdiff.metrics import fid as fid_module
from latentdiff.metrics.fid import Features, compute_statistics, fid
from latentdiff.metrics.reconstruction import (
    Autoencoder,
    codebook_report,
    fid_subset,
    image_statistics,
    load_autoencoder,
    psnr_report,
    psnr_values,
    read_images,
    reconstruct_all,
    to_uint8,
)
from latentdiff.models.autoencoder_kl import AutoencoderKL
from latentdiff.models.vqvae import VQAutoencoder
from tests.tiny import jitter, tiny_ldm_config


def tiny_features() -> Features:
    """Stand-in extractor (as tests/test_fid.py): channel means and stds of a 4x4 average pool -> (B, 6)."""

    def model(x):
        B = x.shape[0]
        pooled = torch.nn.functional.adaptive_avg_pool2d(x, 4).reshape(B, 3, 16)
        return torch.cat([pooled.mean(-1), pooled.std(-1)], dim=1)  # (B, 6)

    return Features("tiny-test", lambda: (model, "none"))


def tiny_vq_config():
    return model_config_from_dict({
        "type": "vq_diffusion", "image_size": 16,
        "vqvae": {"ch": 8, "ch_mult": [1, 2], "num_res_blocks": 1, "norm_num_groups": 4, "z_channels": 4,
                  "embed_dim": 4, "num_codes": 16},
        "transformer": {"num_codes": 16, "latent_size": 8, "dim": 16, "heads": 2, "depth": 1, "context_dim": 16,
                        "context_length": 16, "num_timesteps": 10},
        "text_encoder": {"type": "trainable", "width": 16, "layers": 1, "heads": 2, "context_length": 16},
        "schedule": {"num_timesteps": 10},
    })


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Ten random 16x16 PNGs in two class folders."""
    root = tmp_path_factory.mktemp("rfid_images")
    rng = np.random.default_rng(0)
    for i in range(10):
        (root / f"c{i % 2}").mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / f"c{i % 2}" / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    """An autoencoder run's KL model file (only ``autoencoder.`` tensors) and a VQ one (only ``vqvae.``)."""
    root = tmp_path_factory.mktemp("rfid_models")
    torch.manual_seed(0)
    kl_cfg, vq_cfg = tiny_ldm_config(), tiny_vq_config()
    kl = jitter(AutoencoderKL(kl_cfg.autoencoder), std=0.02, seed=1).eval()
    vq = jitter(VQAutoencoder(vq_cfg.vqvae), std=0.05, seed=2).eval()
    kl_path = save_model_file(root / "kl.safetensors", kl_cfg, {"autoencoder": kl})
    vq_path = save_model_file(root / "vq.safetensors", vq_cfg, {"vqvae": vq})
    return {"kl": (kl_path, kl), "vq": (vq_path, vq)}


def test_psnr_of_a_constant_offset_is_the_closed_form():
    rng = np.random.default_rng(1)
    original = torch.from_numpy(rng.integers(10, 240, (3, 3, 8, 8), dtype=np.uint8))
    offsets = torch.tensor([1, 4, 9], dtype=torch.uint8).view(3, 1, 1, 1)
    recon = original + offsets  # MSE of image i = offset_i²
    expected = [10 * math.log10(255**2 / d**2) for d in (1, 4, 9)]
    np.testing.assert_allclose(psnr_values(original, recon).numpy(), expected, rtol=1e-12)
    report = psnr_report(original, recon)
    assert report["psnr"] == pytest.approx(np.mean(expected), rel=1e-12)
    assert report["mse"] == pytest.approx((1 + 16 + 81) / 3, rel=1e-12)
    assert report["psnr_of_mean_mse"] == pytest.approx(10 * math.log10(255**2 / (98 / 3)), rel=1e-12)
    assert psnr_report(original, original)["psnr"] == math.inf


def test_codebook_usage_and_perplexity():
    codes = torch.tensor([[0, 0, 1, 1], [2, 2, 3, 3]])  # 4 of 8 codes, equally often: perplexity 4
    report = codebook_report(codes, 8)
    assert report == {"codes_used": 4, "num_codes": 8, "usage": 0.5, "perplexity": pytest.approx(4.0, rel=1e-12)}
    p = np.array([6, 1, 1]) / 8  # one code dominates
    skewed = codebook_report(torch.tensor([5] * 6 + [0, 1]), 8)
    assert skewed["perplexity"] == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-12)


def test_to_uint8_rounds_like_saved_images():
    x = torch.tensor([-2.0, -1.0, 0.0, 0.5, 1.0, 3.0])
    assert to_uint8(x).tolist() == [0, 0, 128, 191, 255, 255]  # 127.5 rounds to even, 191.25 down


def test_exact_reconstruction_has_rfid_zero_against_the_fid_pipeline(folder):
    """The pixels rFID feeds the extractor are those `latentdiff fid` feeds it: identical statistics, FID 0."""
    features = tiny_features()
    images = read_images(folder)
    assert images.pixels.shape == (10, 3, 16, 16) and images.pixels.dtype == torch.uint8
    ours = image_statistics(images.pixels, features, "identity")
    reference = compute_statistics(open_image_source(folder), features).stats
    np.testing.assert_allclose(ours.mu, reference.mu, rtol=1e-12, atol=1e-12)
    assert fid(ours, reference) == pytest.approx(0.0, abs=1e-9)
    shifted = image_statistics((images.pixels.int() + 40).clamp(0, 255).to(torch.uint8), features, "brighter")
    assert fid(shifted, reference) > 1e-3  # and a different image set is not 0


def test_read_images_selection_and_mixed_sizes(folder, tmp_path):
    some = read_images(folder, num_samples=4, subset="random", seed=3)
    everything = read_images(folder)
    assert len(some.names) == 4 and set(some.names) <= set(everything.names)
    for name, pixels in zip(some.names, some.pixels):
        assert torch.equal(pixels, everything.pixels[everything.names.index(name)])
    Image.new("RGB", (16, 16)).save(tmp_path / "a.png")
    Image.new("RGB", (8, 16)).save(tmp_path / "b.png")
    with pytest.raises(ValueError, match="same size"):
        read_images(tmp_path)
    assert fid_subset(10, None, 0).tolist() == list(range(10))
    chosen = fid_subset(10, 4, 0)
    assert len(set(chosen.tolist())) == 4 and chosen.tolist() == sorted(chosen.tolist())


@pytest.mark.parametrize("kind", ["kl", "vq"])
def test_model_file_reconstructs_as_its_network(kind, model_files, folder):
    path, network = model_files[kind]
    ae = load_autoencoder(path)
    assert isinstance(ae, Autoencoder) and ae.kind == kind
    images = read_images(folder)
    recon, codes = reconstruct_all(ae, images.pixels, batch_size=3)
    x = images.pixels.float() / 127.5 - 1
    with torch.no_grad():
        if kind == "kl":
            expected = network.decode(network.encode(x))  # the posterior mode, scaled and unscaled
            assert codes is None and ae.latent_shape(16) == f"{network.cfg.embed_dim}x8x8"
        else:
            want_codes = network.encode_to_codes(x)
            expected = network.decode_codes(want_codes)
            assert torch.equal(codes, want_codes) and ae.latent_shape(16) == "8x8 codes of 16"
    assert torch.equal(recon, to_uint8(expected))
    assert recon.dtype == torch.uint8 and not torch.equal(recon, images.pixels)


def test_embedded_names_load():
    ae = load_autoencoder("default-vq")
    assert ae.kind == "vq" and ae.network.quantize.embedding.weight.dtype == torch.float32


def run(argv, capsys):
    code = main(["rfid", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_writes_json_and_markdown(model_files, folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(fid_module, "inception_features", lambda weights=None, device="cpu": tiny_features())
    out = tmp_path / "r.json"
    argv = [str(model_files["kl"][0]), str(model_files["vq"][0]), "--images", str(folder), "--reference",
            str(folder), "--baseline", "--fid-samples", "6", "--no-cache", "--no-progress", "--out", str(out)]
    code, stdout, err = run(argv, capsys)
    assert code == 0, err
    results = json.loads(out.read_text())
    assert results["images"] == 10 and results["fid_images"] == 6
    assert results["baseline_fid"] > 0  # 6 of 10 images against all 10: the FID-N bias floor
    images = read_images(folder)
    for row, kind in zip(results["models"], ("kl", "vq")):
        recon, codes = reconstruct_all(load_autoencoder(model_files[kind][0]), images.pixels)
        assert row["kind"] == kind and row["psnr"] == pytest.approx(psnr_report(images.pixels, recon)["psnr"])
        assert row["rfid"] > results["baseline_fid"]
        assert ("codebook" in row) == (kind == "vq")
    table = out.with_suffix(".md").read_text()
    assert table.startswith("| model | autoencoder |") and "rFID-6" in table and table.count("\n| `") == 2
    assert run(argv, capsys)[0] == 2  # the outputs exist: refused without --overwrite
    # default reference: the selected real images themselves, through the same pixels: the same rFID here
    code, _, err = run([*argv[:4], "--fid-samples", "6", "--no-progress", "--out", str(tmp_path / "d.json")], capsys)
    assert code == 0, err
    default = json.loads((tmp_path / "d.json").read_text())
    assert default["reference"] == "the 10 selected real images"
    assert default["models"][0]["rfid"] == pytest.approx(results["models"][0]["rfid"], rel=1e-9)


@pytest.mark.parametrize("change", ["missing model", "model without autoencoder", "bad out", "no-fid baseline",
                                    "missing images"])
def test_cli_bad_input_exits_2(change, model_files, folder, tmp_path, capsys):
    base = {"model": str(model_files["vq"][0]), "images": str(folder), "out": str(tmp_path / "r.json")}
    extra = []
    if change == "missing model":
        base["model"] = str(tmp_path / "none.safetensors")
    elif change == "model without autoencoder":
        cfg = tiny_ldm_config()
        base["model"] = str(save_model_file(tmp_path / "t.safetensors", cfg, {"unet": torch.nn.Linear(1, 1)}))
    elif change == "bad out":
        base["out"] = str(tmp_path / "r.txt")
    elif change == "no-fid baseline":
        extra = ["--no-fid", "--baseline"]
    else:
        base["images"] = str(tmp_path / "nothing")
    code, _, err = run([base["model"], "--images", base["images"], "--out", base["out"], "--no-progress",
                        "--no-cache", *extra], capsys)
    assert code == 2 and "Traceback" not in err and err.strip().startswith("latentdiff rfid: error:"), err
    assert not (tmp_path / "r.json").exists()
