"""Shard reader: batch format, deterministic order, rank/worker split, exact resume, caption dropout, error
accounting, validation and latent caching. Tiny shards of 12x10 images are written by the tests themselves."""

import io
import random
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from latentdiff.config import DataConfig
from latentdiff.data.decode import IMAGE_EXTS, decode_image
from latentdiff.data.image_sources import SourceError, open_image_source
from latentdiff.data.latents import cache_latents
from latentdiff.data.manifest import Manifest, ShardRecord, load_manifest, sha256_file
from latentdiff.data.plan import plan_epoch
from latentdiff.data.reader import decode_sample, make_dataloader
from latentdiff.data.shards import RawSample, payload_ext, resolve_shards
from latentdiff.data.sources import ImageSource
from latentdiff.data.stats import DataError, DataStats, Problem
from latentdiff.data.transforms import ImageTransform
from latentdiff.data.validate import validate_shards
from latentdiff.data.writer import ShardWriter


def jpeg(i: int, size=(12, 10)) -> bytes:
    img = Image.new("RGB", size, ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95)
    return buf.getvalue()


def sample(i: int) -> dict[str, bytes]:
    return {"jpg": jpeg(i), "txt": f"caption {i}".encode()}


def write(folder, n: int, per_shard: int = 5, members=sample, manifest: bool = True) -> list[str]:
    """Shards of ``per_shard`` samples (keys 000000000, ...) plus a manifest; returns the keys."""
    keys = [f"{i:09d}" for i in range(n)]
    with ShardWriter(folder, "s", per_shard) as writer:
        for i, key in enumerate(keys):
            writer.write(key, members(i))
    if manifest:
        Manifest(shards=writer.records).save(folder)
    return keys


def cfg(folder, **kw) -> DataConfig:
    base = dict(shards=str(folder), image_size=8, batch_size=2, num_workers=0, shuffle_buffer=4, caption_dropout=0.0,
                random_flip=True, crop="random", max_error_rate=0.0, seed=3)
    return DataConfig(**{**base, **kw})


def keys_of(batches) -> list[str]:
    return [k for b in batches for k in b["key"]]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    return folder, write(folder, 18)  # shards of 5, 5, 5, 3


def test_batch_format_and_manifest(shards):
    folder, keys = shards
    manifest = load_manifest(folder)
    assert [s.samples for s in manifest.shards] == [5, 5, 5, 3] and manifest.total_samples == 18
    for s in manifest.shards:
        assert s.sha256 == sha256_file(folder / s.name) and s.bytes == (folder / s.name).stat().st_size
    loader = make_dataloader(cfg(folder, shuffle=False, drop_last=False, batch_size=4))
    batches = list(loader)
    assert len(loader) == loader.batches_per_epoch == len(batches) == 5 and loader.position == 18
    assert keys_of(batches) == keys  # no shuffle: manifest order
    b = batches[0]
    assert set(b) == {"image", "caption", "key"} and b["image"].shape == (4, 3, 8, 8)
    assert b["image"].dtype == torch.float32 and -1 <= b["image"].min() and b["image"].max() <= 1
    assert b["caption"] == [f"caption {i}" for i in range(4)]
    assert batches[-1]["image"].shape[0] == 2  # drop_last=False keeps the short last batch
    assert loader.stats.samples_ok == 18 and loader.stats.ok


def test_order_is_deterministic_and_changes_with_epoch(shards):
    folder, keys = shards
    a = list(make_dataloader(cfg(folder), epoch=1))
    b = list(make_dataloader(cfg(folder), epoch=1))
    assert keys_of(a) == keys_of(b) and all(torch.equal(x["image"], y["image"]) for x, y in zip(a, b))
    other = keys_of(make_dataloader(cfg(folder), epoch=2))
    assert keys_of(a) != other and len(set(keys_of(a))) == len(keys_of(a)) == 18
    assert keys_of(a) != keys and keys_of(make_dataloader(cfg(folder, seed=4), epoch=1)) != keys_of(a)


@pytest.mark.parametrize("world_size, workers, batch, drop_last", [
    (1, 1, 2, True), (2, 3, 2, True), (3, 2, 4, False), (4, 1, 3, True), (2, 2, 1, False)])
def test_plan_splits_ranks_and_workers_disjointly(world_size, workers, batch, drop_last):
    counts = [5, 5, 5, 3, 7]
    shard_names = [f"s{i}" for i in range(len(counts))]
    seen, batches = Counter(), set()
    for rank in range(world_size):
        plan = plan_epoch(shard_names, counts, epoch=1, rank=rank, world_size=world_size, num_workers=workers,
                          batch_size=batch, drop_last=drop_last, seed=0)
        batches.add(plan.num_batches)
        for wp in plan.workers:
            assert len(wp.batch_sizes) == len(range(wp.worker, plan.num_batches, plan.num_workers))
            assert sum(s.stop - s.start for s in wp.segments) == wp.num_samples
            seen.update((s.shard, i) for s in wp.segments for i in range(s.start, s.stop))
    L = sum(counts) // world_size
    assert len(batches) == 1  # the same number of batches on every rank
    assert max(seen.values()) == 1  # each position read by exactly one rank/worker
    assert len(seen) == world_size * (L - L % batch if drop_last else L)


def test_ranks_and_workers_with_a_real_dataloader(shards):
    folder, keys = shards
    per_rank = [keys_of(make_dataloader(cfg(folder, num_workers=2, drop_last=False), rank=r, world_size=2, epoch=5))
                for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == 9
    assert not set(per_rank[0]) & set(per_rank[1]) and set(per_rank[0]) | set(per_rank[1]) == set(keys)


@pytest.mark.parametrize("workers", [0, 2])
def test_reading_leaves_the_global_rng_alone(shards, workers):
    folder, _ = shards
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    assert len(list(make_dataloader(cfg(folder, num_workers=workers), epoch=1))) > 0
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("workers", [0, 2])
def test_exact_resume(shards, workers):
    folder, _ = shards
    c = cfg(folder, num_workers=workers, caption_dropout=0.5)
    full = list(make_dataloader(c, epoch=4))
    assert len(full) == 9
    for k in (1, 4) if workers else (3,):
        loader = make_dataloader(c, epoch=4, start_index=k * c.batch_size)
        rest = list(loader)
        assert len(loader) == len(rest) == len(full) - k and loader.position == 18
        assert keys_of(rest) == keys_of(full[k:])
        assert [b["caption"] for b in rest] == [b["caption"] for b in full[k:]]
        assert all(torch.equal(x["image"], y["image"]) for x, y in zip(rest, full[k:]))
    assert list(make_dataloader(c, epoch=4, start_index=18)) == []
    with pytest.raises(ValueError, match="multiple of batch_size"):
        make_dataloader(c, epoch=4, start_index=3)


def test_caption_dropout_rate(shards):
    buf = io.BytesIO()
    np.save(buf, np.zeros((1, 2, 2), np.float32))
    raw = RawSample("s", 0, "k", {"npy": buf.getvalue(), "txt": b"caption 0"})  # a latent: cheap to decode
    transform = ImageTransform(8)
    dropped = [decode_sample(raw, transform, random.Random(i), caption_dropout=0.3)[2] == "" for i in range(2000)]
    assert abs(np.mean(dropped) - 0.3) < 0.04  # 4 standard deviations
    folder, _ = shards
    captions = [c for b in make_dataloader(cfg(folder, caption_dropout=0.5)) for c in b["caption"]]
    assert 0 < captions.count("") < len(captions) and all(c == "" or c.startswith("caption ") for c in captions)
    assert decode_sample(raw, transform, random.Random(0), caption_dropout=0.0)[2] == "caption 0"
    assert decode_sample(raw, transform, random.Random(0), caption_dropout=1.0)[2] == ""


def test_failures_are_counted_and_named(tmp_path):
    def members(i):
        m = sample(i)
        if i == 1:
            m["jpg"] = b"\xff\xd8\xff\xe0 not a jpeg"
        if i == 2:
            m["jpg"] = m["jpg"][: len(m["jpg"]) // 2]  # truncated JPEG
        if i == 6:
            del m["txt"]
        return m

    write(tmp_path, 20, members=members)  # shards s-000000..3, 5 samples each
    truncated = tmp_path / "s-000002.tar"
    truncated.write_bytes(truncated.read_bytes()[:600])  # cut inside the first image member
    empty = tmp_path / "s-000004.tar"
    with tarfile.open(empty, "w"):
        pass
    manifest = load_manifest(tmp_path)
    manifest.shards.append(ShardRecord(empty.name, 0, empty.stat().st_size, sha256_file(empty)))
    manifest.shards[3].samples = 6  # s-000003 is shorter than its manifest count
    manifest.save(tmp_path)

    loader = make_dataloader(cfg(tmp_path, batch_size=7, max_error_rate=1.0, shuffle=False))
    batches = list(loader)
    assert len(batches) == 3 and all(b["image"].shape[0] == 7 for b in batches)  # failed samples are repeats
    stats = loader.stats
    assert stats.counts["decode_error"] == 2 and stats.counts["missing_caption"] == 1
    assert stats.counts["truncated_shard"] == 1 and stats.counts["short_shard"] == 1
    assert stats.counts["empty_shard"] == 1
    assert stats.counts["missing_sample"] == 5 + 1  # the truncated shard's lost samples + the short shard's
    found = {(p.kind, p.key) for p in stats.problems}
    assert {("decode_error", "000000001"), ("decode_error", "000000002"), ("missing_caption", "000000006")} <= found
    assert any(p.kind == "truncated_shard" and p.shard.endswith("s-000002.tar") for p in stats.problems)
    assert any(p.kind == "empty_shard" and p.shard.endswith("s-000004.tar") for p in stats.problems)
    assert "decode_error=2" in stats.summary()
    with pytest.raises(DataError, match="error rate"):
        list(make_dataloader(cfg(tmp_path, batch_size=7, max_error_rate=0.2, shuffle=False)))

    report = validate_shards(tmp_path)
    counts = report.counts
    assert counts["decode_error"] == 2 and counts["missing_caption"] == 1 and counts["truncated_shard"] == 1
    assert counts["size_mismatch"] == 1 and counts["short_shard"] == 1 and counts["empty_shard"] == 1
    assert counts["missing_sample"] == 5 + 1
    (tmp_path / "stray.tar").write_bytes(empty.read_bytes())
    assert validate_shards(tmp_path, decode=False).counts["unlisted_shard"] == 1


def test_validate_clean_shards_and_checksum(shards, tmp_path):
    folder, _ = shards
    assert validate_shards(folder).ok
    write(tmp_path, 5)
    shard = tmp_path / "s-000000.tar"
    data = bytearray(shard.read_bytes())
    data[600] ^= 0xFF  # flip a byte of the first image: same size, other sha256
    shard.write_bytes(bytes(data))
    assert validate_shards(tmp_path, decode=False).counts["checksum_mismatch"] == 1


def test_resampled_mode_is_deterministic(shards):
    folder, _ = shards
    c = cfg(folder, resampled=True, num_workers=0)
    a, b = make_dataloader(c, epoch=0), make_dataloader(c, epoch=0)
    assert keys_of(a) == keys_of(b) and len(keys_of(a)) == 18
    rest = make_dataloader(c, epoch=0, start_index=4)
    assert keys_of(rest) == keys_of(a)[4:]


def test_img2dataset_shards_without_manifest(tmp_path):
    """Shards written by webdataset's TarWriter (what img2dataset uses), found by brace pattern, counted by scan."""
    for s in range(2):
        with wds.TarWriter(str(tmp_path / f"{s:05d}.tar")) as sink:
            for i in range(3):
                sink.write({"__key__": f"{s:05d}{i:04d}", "jpg": jpeg(i), "txt": f"c{i}", "json": {"i": i}})
    assert resolve_shards(str(tmp_path / "{00000..00001}.tar")) == [str(tmp_path / "00000.tar"),
                                                                  str(tmp_path / "00001.tar")]
    batches = list(make_dataloader(cfg(tmp_path, shuffle=False, drop_last=False, batch_size=4)))
    assert keys_of(batches) == ["000000000", "000000001", "000000002", "000010000", "000010001", "000010002"]
    assert batches[0]["caption"][:2] == ["c0", "c1"]


def test_cache_latents_round_trip(shards, tmp_path):
    folder, keys = shards

    def encode(x):  # (B, 3, 8, 8) -> (B, 4, 2, 2)
        B, C, H, W = x.shape
        pooled = torch.nn.functional.avg_pool2d(x, 4)  # (B, 3, 2, 2)
        return torch.cat([pooled, pooled.mean(1, keepdim=True)], dim=1)  # (B, 4, 2, 2)

    manifest = cache_latents(str(folder), encode, tmp_path / "lat", image_size=8, batch_size=4,
                             samples_per_shard=7, dtype="float32", progress=False)
    assert manifest.kind == "latent" and manifest.total_samples == 18 and len(manifest.shards) == 3
    batches = list(make_dataloader(cfg(tmp_path / "lat", shuffle=False, drop_last=False, batch_size=5)))
    assert keys_of(batches) == keys and "image" not in batches[0]
    assert batches[0]["latent"].shape == (5, 4, 2, 2) and batches[0]["caption"][0] == "caption 0"
    images = next(iter(make_dataloader(cfg(folder, shuffle=False, random_flip=False, crop="center",
                                           batch_size=5))))["image"]
    assert torch.allclose(batches[0]["latent"], encode(images), atol=1e-6)
    assert validate_shards(tmp_path / "lat").ok


def test_datastats_error_rate_check():
    stats = DataStats()
    stats.add_ok(99)
    stats.add(Problem("decode_error", "s.tar", "k"))
    assert stats.error_rate == pytest.approx(0.01)
    stats.check(0.01)
    with pytest.raises(DataError, match="decode_error=1"):
        stats.check(0.005)


def _encoded(fmt: str, i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (6, 4), (i * 40, 0, 0)).save(buf, fmt)
    return buf.getvalue()


FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP", "bmp": "BMP", "tif": "TIFF", "tiff": "TIFF"}


def test_one_image_extension_list_for_writing_reading_and_evaluation(tmp_path):
    """Every extension of IMAGE_EXTS decodes, and shard writing, shard reading and evaluation all take it."""
    assert {"jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff"} == set(IMAGE_EXTS)
    folder = tmp_path / "images" / "cat"
    folder.mkdir(parents=True)
    for i, ext in enumerate(FORMATS):
        data = _encoded(FORMATS[ext], i)
        assert decode_image(data).size == (6, 4)
        (folder / f"{i}.{ext.upper() if ext == 'bmp' else ext}").write_bytes(data)  # any case
        assert payload_ext({ext: data, "txt": b"x"}) == ext
    (folder / ".hidden.png").write_bytes(_encoded("PNG", 9))
    (folder / "notes.gif").write_bytes(b"GIF89a")  # not in the list: ignored
    with ImageSource(tmp_path / "images") as source:
        assert len(source.entries) == len(FORMATS) and not source.skipped
    assert open_image_source(tmp_path / "images").count() == len(FORMATS)
    with tarfile.open(tmp_path / "shard.tar", "w") as tar:
        for i, ext in enumerate(FORMATS):
            data = _encoded(FORMATS[ext], i)
            info = tarfile.TarInfo(f"{i:06d}.{ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert open_image_source(tmp_path / "shard.tar").count() == len(FORMATS)


def test_evaluation_reads_archives_through_the_shard_reader(tmp_path):
    """A cut .tar is caught as the training reader catches it (no end blocks), as one clear SourceError."""
    write(tmp_path / "shards", 6, per_shard=6, manifest=False)
    shard = tmp_path / "shards" / "s-000000.tar"
    source = open_image_source(shard)
    names = [sample.name for _, sample in source.iter_samples(lambda i: True, captions=True)]
    assert names == [f"{i:09d}.jpg" for i in range(6)] and source.count() == 6
    cut = tmp_path / "cut.tar"
    cut.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(SourceError, match="cut.tar: unreadable archive .truncated shard"):
        open_image_source(cut).count()
    (tmp_path / "fake.tar").write_bytes(b"not a tar archive" * 100)
    with pytest.raises(SourceError, match="fake.tar: unreadable archive"):
        open_image_source(tmp_path / "fake.tar")  # found when opened, before anything is computed
