"""Fixtures shared by the test modules: a tiny random latent-diffusion pipeline and its model file, and tiny
webdataset shards, each built once per test session (helpers to build others: tests/tiny.py).

The session's files are shared between modules: tests read them and write their outputs elsewhere (``tmp_path``).
Each is fingerprinted when made and checked again at the end of the session, so a test that changes one fails
rather than silently changing the input of the tests that run after it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from tests.tiny import jitter, make_shards, tiny_ldm_config


def _digest(path: Path) -> str:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256()
    for p in files:
        h.update(str(p.relative_to(path) if path.is_dir() else p.name).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


class _Unchanged:
    """Paths whose content must be the same at the end of the session as when they were made."""

    def __init__(self):
        self.digests: dict[Path, str] = {}

    def add(self, path: Path) -> Path:
        self.digests[path] = _digest(path)
        return path

    def check(self) -> None:
        changed = [str(p) for p, d in self.digests.items() if not p.exists() or _digest(p) != d]
        assert not changed, f"a test changed shared session files: {changed}"


@pytest.fixture(scope="session")
def _session_files():
    files = _Unchanged()
    yield files
    files.check()


@pytest.fixture(scope="session")
def tiny_ldm_pipe():
    """A LatentDiffusionPipeline of tests/tiny.py's config (16x16 images, 100 timesteps, guidance 3) with random
    weights, named "tiny". Shared by the session: use it, do not change its weights or config.

    The U-Net's initialisation zeroes its output layers (as Stable Diffusion's does), so a freshly built U-Net
    predicts 0 whatever the prompt: its weights are jittered so that the prompt, the negative prompt, the guidance
    scale and every U-Net weight change the images."""
    import torch

    from latentdiff.pipelines import LatentDiffusionPipeline

    with torch.random.fork_rng():  # the global RNG state is left as it was
        torch.manual_seed(0)
        pipe = LatentDiffusionPipeline.from_config(tiny_ldm_config(), name="tiny")
    jitter(pipe.unet, std=0.05, seed=1)
    return pipe


@pytest.fixture(scope="session")
def tiny_ldm_file(tiny_ldm_pipe, tmp_path_factory, _session_files) -> Path:
    """``tiny_ldm_pipe`` saved as a latentdiff model file (``--ckpt`` of txt2img, input of pack-model...)."""
    path = tiny_ldm_pipe.save(tmp_path_factory.mktemp("tiny_ldm") / "tiny.safetensors")
    return _session_files.add(path)


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory, _session_files):
    """``tiny_shards(n)``: a folder of ``n`` random 16x16 PNGs captioned "a photo of thing {i % 4}", 8 per shard
    (tests/tiny.py make_shards), made once per ``n`` in the session."""
    made: dict[int, Path] = {}

    def get(n: int) -> Path:
        if n not in made:
            made[n] = _session_files.add(make_shards(tmp_path_factory.mktemp(f"shards{n}"), n))
        return made[n]

    return get
