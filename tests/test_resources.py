"""Running out of disk, running out of memory, and pixels that are not numbers (issue: hardening).

- A full disk (a file-size limit, RLIMIT_FSIZE, in a subprocess: writes past it fail with EFBIG, as on a full
  disk with ENOSPC): the tool says what failed and exits 1, the previous complete file is intact and loads, no
  temporary file is left, and a training run resumed afterwards ends exactly where an uninterrupted one does.
- Out of memory (injected on the CPU): one message naming what to change, exit 1, nothing broken saved.
- A decoder output with NaN or inf is decoded again in float32; an image still not finite is never written.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import latentdiff
from latentdiff.cli.main import main
from latentdiff.pipelines.base import decode_finite
from latentdiff.training.state import list_checkpoints, load_checkpoint
from tests.tiny import CONFIGS

LIMITED = ("import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, ({0}, {0})); "
           "from latentdiff.cli.main import main; sys.exit(main(sys.argv[1:]))")


def run_limited(argv: list[str], limit: int | None, cwd: Path) -> subprocess.CompletedProcess:
    """``latentdiff *argv`` in a subprocess whose files may not grow past ``limit`` bytes (None: no limit)."""
    code = LIMITED.format(limit) if limit else "from latentdiff.cli.main import main; import sys; " \
                                               "sys.exit(main(sys.argv[1:]))"
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([sys.executable, "-c", code, *map(str, argv)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


def temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.startswith((".tmp-", ".old-"))]


# ------------------------------------------------------------------------------------------------- full disk


def test_full_disk_keeps_the_previous_model_file(tiny_ldm_file, tmp_path):
    out = tmp_path / "packed.safetensors"
    assert run_limited(["pack-model", tiny_ldm_file, out, "--half"], None, tmp_path).returncode == 0
    before = out.read_bytes()
    r = run_limited(["pack-model", tiny_ldm_file, out, "--overwrite"], 64 * 1024, tmp_path)  # fp32: larger
    assert r.returncode != 0, r.stderr
    assert "too large" in r.stderr.lower() and str(out) in r.stderr and "Traceback" not in r.stderr
    assert out.read_bytes() == before and not temporaries(tmp_path)
    latentdiff.load_pipeline(out)  # still loads


def test_full_disk_writes_no_partial_png(tiny_ldm_file, tmp_path):
    r = run_limited(["txt2img", "a cat", "--ckpt", tiny_ldm_file, "--steps", "1", "--outdir", tmp_path / "out",
                     "--quiet"], 300, tmp_path)
    assert r.returncode != 0 and "too large" in r.stderr.lower() and "Traceback" not in r.stderr, r.stderr
    assert not list((tmp_path / "out").glob("*.png")) and not temporaries(tmp_path)


def test_full_disk_during_training_then_exact_resume(tmp_path, tiny_shards):
    """Steps 1-2 are checkpointed; steps 3-4 run under a file-size limit that the step-4 checkpoint passes: the
    run stops with exit 1, the step-2 checkpoint is intact, and resuming reaches step 4's weights exactly."""
    config = CONFIGS / "train_tiny_autoencoder.yaml"
    common = ["--config", config, "--set", f"data.shards={tiny_shards(16)}", "--set", "steps=4",
              "--set", "checkpoint_every=2", "--set", "sample_every=100", "--no-progress"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main(["train", *map(str, common), "--outdir", str(whole)]) == 0
    assert main(["train", *map(str, common), "--outdir", str(cut), "--max-steps", "2"]) == 0
    ckpt = cut / "checkpoints" / "step_00000002.pt"
    before = ckpt.read_bytes()
    r = run_limited(["train", *common, "--outdir", cut], ckpt.stat().st_size // 2, tmp_path)
    assert r.returncode != 0 and "too large" in r.stderr.lower() and "Traceback" not in r.stderr, r.stderr
    assert ckpt.read_bytes() == before and not temporaries(cut)
    assert [s for s, _ in list_checkpoints(cut / "checkpoints")] == [2]
    load_checkpoint(ckpt)
    assert main(["train", *map(str, common), "--outdir", str(cut)]) == 0
    a, b = load_file(whole / "model.safetensors"), load_file(cut / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------- out of memory


def test_out_of_memory_in_txt2img_names_what_to_change(tiny_ldm_file, tmp_path, capsys, monkeypatch):
    from latentdiff.pipelines import LatentDiffusionPipeline

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79.11 GiB total)")

    monkeypatch.setattr(LatentDiffusionPipeline, "generate", oom)
    assert main(["txt2img", "a cat", "--ckpt", str(tiny_ldm_file), "--outdir", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "out of memory" in err and "--batch-size" in err and "--H/--W" in err and "Traceback" not in err
    assert not list(tmp_path.rglob("*.png"))


def test_out_of_memory_in_training_saves_nothing_broken(tmp_path, tiny_shards, capsys, monkeypatch):
    from latentdiff.training.objectives.autoencoder_kl import AutoencoderKLObjective

    forward = AutoencoderKLObjective.forward

    def forward_then_oom(self, batch, step):
        if step >= 2:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory")
        return forward(self, batch, step)

    monkeypatch.setattr(AutoencoderKLObjective, "forward", forward_then_oom)
    run = tmp_path / "run"
    code = main(["train", "--config", str(CONFIGS / "train_tiny_autoencoder.yaml"), "--outdir", str(run),
                 "--set", f"data.shards={tiny_shards(16)}", "--set", "checkpoint_every=2", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and "out of memory" in err and "grad_accum" in err and "gradient_checkpointing" in err, err
    assert not temporaries(run) and not (run / "model.safetensors").exists()
    for _, path in list_checkpoints(run / "checkpoints"):
        load_checkpoint(path)  # whatever was saved loads


def test_resource_error_messages():
    import errno

    from latentdiff.cli.main import resource_error_message

    assert "out of memory" in resource_error_message(MemoryError(), "fid") and "--batch-size" in \
        resource_error_message(MemoryError(), "fid")
    full = resource_error_message(OSError(errno.ENOSPC, "No space left on device", "/x/y.pt"), "train")
    assert "no space left" in full and "/x/y.pt" in full
    assert resource_error_message(RuntimeError("shape mismatch"), "train") is None
    assert resource_error_message(OSError(errno.EIO, "I/O error"), "train") is None


# -------------------------------------------------------------------------------------------- NaN and inf


class HalfOverflows(torch.nn.Module):
    """A decoder whose fp16 output overflows (inf) for every image; in fp32 it is finite."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1, dtype=torch.float16))

    def decode(self, z):
        out = z.to(self.w.dtype) * 200000.0 * self.w  # fp16's largest is 65504: inf
        return out.float() / 200000.0


def test_half_precision_overflow_is_decoded_again_in_float32():
    module = HalfOverflows()
    z = torch.full((2, 3, 4, 4), 0.5)
    assert not torch.isfinite(module.decode(z)).all()
    images = decode_finite(module.decode, z, module)
    torch.testing.assert_close(images, z)
    assert module.w.dtype == torch.float16  # put back


def test_an_image_still_not_finite_is_never_written(tiny_ldm_file, tmp_path, capsys, monkeypatch):
    pipe = latentdiff.load_pipeline(tiny_ldm_file)
    decode = type(pipe.autoencoder).decode

    def nan_for_the_first(self, z):
        images = decode(self, z)
        images[0] = float("nan")
        return images

    monkeypatch.setattr(type(pipe.autoencoder), "decode", nan_for_the_first)
    with pytest.warns(UserWarning, match="seed 5 has NaN"):
        images = pipe(["a cat", "a dog"], steps=1, seed=5)
    assert images[0] is None and images[1] is not None
    out = tmp_path / "out"
    code = main(["txt2img", "a cat", "--ckpt", str(tiny_ldm_file), "--steps", "1", "--n_samples", "2",
                 "--seed", "5", "--outdir", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and "seed 5" in err and "not written" in err, err
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 1 and "Seed: 6" in Image.open(pngs[0]).info["parameters"]


def test_full_disk_while_writing_shards(tmp_path):
    """make-shards: a shard that cannot be written ends the run (non-zero, one message), with no partial shard
    and no temporary file (statistics files, like shards and PNGs, go through the same atomic write)."""
    from tests.test_cli_fuzz import png_folder

    images = png_folder(tmp_path / "images" / "cat", n=24).parent
    out = tmp_path / "shards"
    r = run_limited(["make-shards", images, out, "--samples-per-shard", "8", "--image-format", "png",
                     "--quiet"], 3000, tmp_path)
    assert r.returncode == 1 and "too large" in r.stderr.lower() and "Traceback" not in r.stderr, r.stderr
    assert not temporaries(tmp_path)
    assert not out.exists() or not list(out.glob("*.tar"))
