"""docs/make_readme_pictures.py remakes the README's sample grid of the embedded default model from its own
sampling defaults: the committed picture must still be what the model and its defaults make (a changed model, sampler
or default shows up here), and each row is what `latentdiff txt2img "<caption>" --n_samples 8 --seed 0` writes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).astype(np.int16)


def test_the_committed_sample_grid_is_what_the_default_model_makes(tmp_path):
    out = tmp_path / "grid.png"
    run = subprocess.run([sys.executable, str(ROOT / "docs/make_readme_pictures.py"), "--picture", "samples",
                          "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    made, committed = pixels(out), pixels(ROOT / "docs/images/default_grid.png")
    assert made.shape == committed.shape == (684, 548, 3)  # 10 rows x 8 tiles of 32 px, 2 px apart, enlarged 2x
    # the same pixels up to float rounding on another CPU (a changed model or default moves most of them)
    assert np.mean(np.abs(made - committed) > 2) < 1e-3, np.abs(made - committed).mean()


def test_a_row_is_what_txt2img_writes(tmp_path):
    grid = pixels(ROOT / "docs/images/default_grid.png")
    run = subprocess.run([sys.executable, "-m", "latentdiff", "txt2img", "a photo of a ship", "--n_samples", "8",
                          "--seed", "0", "--no-grid", "--quiet", "--outdir", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    files = sorted(tmp_path.glob("*.png"))
    assert len(files) == 8
    row, step = 8, (32 + 2) * 2  # ship: the ninth class; tiles 2 px apart (and from the border), enlarged 2x
    for c, f in enumerate(files):
        top, left = 4 + row * step, 4 + c * step  # every second pixel of the enlarged tile is the image
        tile = grid[top:top + 64:2, left:left + 64:2]
        assert np.mean(np.abs(tile - pixels(f)) > 2) < 1e-2, f
