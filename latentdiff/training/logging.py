"""What a run leaves to look at: a JSONL loss log, a PNG loss plot, sample grids, and TensorBoard events.

``log.jsonl`` gets one JSON object per logged step, each appended with a single ``write`` on an ``O_APPEND``
descriptor and flushed, so a kill can at most cut the last line (which readers skip). On resume the log is
rewritten (atomically) without the entries past the resumed step, so it always describes one history.

When the optional ``tensorboard`` package is installed, the same records (every number but ``step``, one scalar
tag each) and the sample grids (tag ``samples``) also go to ``<outdir>/tensorboard/`` through torch's
``SummaryWriter``, flushed after each write. A resumed run opens its event file with ``purge_step`` = resumed
step + 1, so TensorBoard drops the abandoned history past that step, as the JSONL log does. Without the package
this is a no-op that prints one note.
"""

from __future__ import annotations

import io
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from latentdiff.atomic import atomic_write
from latentdiff.io.images import make_grid, to_pil


def read_log(path: Path) -> list[dict]:
    """All complete records of a JSONL log (a cut last line is skipped)."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class LossLog:
    """Append-only JSONL log of training metrics with a PNG plot next to it.

    Drawing costs about a second, so :meth:`plot` redraws at most every ``plot_interval`` seconds unless forced.
    """

    def __init__(self, path: Path, plot_path: Path | None = None, plot_interval: float = 30.0,
                 tensorboard_dir: Path | None = None):
        self.path = Path(path)
        self.plot_path = plot_path
        self.plot_interval = plot_interval
        self._last_plot = -math.inf
        self.tensorboard = TensorBoardLog(tensorboard_dir) if tensorboard_dir is not None else None

    def truncate_after(self, step: int) -> None:
        """Drop records logged after ``step`` (they belong to a history that a resume discards)."""
        if self.tensorboard is not None:
            self.tensorboard.purge_step = step + 1
        if not self.path.exists():
            return
        records = read_log(self.path)
        kept = [r for r in records if r.get("step", 0) <= step]
        if len(kept) != len(records) or _has_cut_line(self.path):
            with atomic_write(self.path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)

    def append(self, record: dict) -> None:
        line = (json.dumps(record) + "\n").encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
        if self.tensorboard is not None:
            self.tensorboard.add_scalars(record)

    def add_image_grid(self, step: int, path: Path) -> Path:
        """Send the sample grid PNG at ``path`` to TensorBoard (tag ``samples``), when it is installed; returns
        ``path``."""
        if self.tensorboard is not None:
            self.tensorboard.add_image("samples", step, path)
        return Path(path)

    def plot(self, force: bool = False) -> None:
        """Redraw the loss curves (log scale when positive) into ``plot_path``."""
        if self.plot_path is None or not force and time.monotonic() - self._last_plot < self.plot_interval:
            return
        self._last_plot = time.monotonic()
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        records = read_log(self.path)
        if not records:
            return
        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
        fig.subplots_adjust(left=0.1, right=0.97, bottom=0.12, top=0.95)
        keys = tuple(k for k in records[-1] if k.startswith("loss"))
        positive = True
        for key in keys:
            pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))
                   and math.isfinite(r[key])]
            if pts:
                steps, values = zip(*pts)
                ax.plot(steps, values, label=key, linewidth=1)
                positive &= min(values) > 0
        if positive:
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="upper right", fontsize=8)
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        plt.close(fig)
        with atomic_write(self.plot_path, "wb") as f:
            f.write(buf.getvalue())


class TensorBoardLog:
    """Scalars and images for TensorBoard in ``logdir``, written only if the ``tensorboard`` package is installed.

    The writer opens on the first write (with ``purge_step`` when set: events at and after it in earlier files
    are discarded by TensorBoard's readers) and is flushed after every write, so a kill loses nothing logged.
    """

    def __init__(self, logdir: Path):
        self.logdir = Path(logdir)
        self.purge_step: int | None = None
        self._writer = None
        self._missing = False

    def _open(self):
        if self._writer is None and not self._missing:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # torch raises it when the tensorboard package is missing
                self._missing = True
                print("note: the tensorboard package is not installed; logging to log.jsonl only",
                      file=sys.stderr)
                return None
            self._writer = SummaryWriter(str(self.logdir), purge_step=self.purge_step)
        return self._writer

    def add_scalars(self, record: dict) -> None:
        """One scalar per finite number of ``record`` (tag = its key), at ``record["step"]``."""
        writer = self._open()
        if writer is None:
            return
        step = int(record["step"])
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool) \
                    and math.isfinite(value):
                writer.add_scalar(key, value, step)
        writer.flush()

    def add_image(self, tag: str, step: int, path: Path) -> None:
        """The RGB image of the PNG at ``path``."""
        writer = self._open()
        if writer is None:
            return
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))  # (H, W, 3) uint8
        writer.add_image(tag, pixels, step, dataformats="HWC")
        writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _has_cut_line(path: Path) -> bool:
    data = path.read_bytes()
    return bool(data) and not data.endswith(b"\n")


def save_image_grid(images: torch.Tensor, path: Path, cols: int | None = None, min_side: int = 64) -> Path:
    """Write (N, 3, H, W) images in [-1, 1] as one PNG grid, atomically; tiles smaller than ``min_side`` are
    enlarged by an integer factor (nearest neighbour) so that small images stay visible."""
    N, C, H, W = images.shape
    factor = max(1, min_side // min(H, W))
    if factor > 1:
        images = F.interpolate(images, scale_factor=factor, mode="nearest")  # (N, 3, H*f, W*f)
    grid = make_grid(to_pil(images), cols=cols)
    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    with atomic_write(path, "wb") as f:
        f.write(buf.getvalue())
    return Path(path)
