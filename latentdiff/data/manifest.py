"""``manifest.json``: what a shard folder holds, written last by the shard writer.

    {
      "format": "latentdiff-shards/1",
      "kind": "image",                      # image | latent
      "source": "/abs/path/of/the/source",
      "command": "tools/make_shards.py ...",
      "total_samples": 50000,
      "shards": [{"name": "cifar10-train-000000.tar", "samples": 1000, "bytes": 1843200, "sha256": "..."}, ...],
      "skipped": [{"source": "train/cat/0001.jpg", "reason": "..."}],   # inputs not written, and why
      ...                                   # writer extras: image_format, captions, classes
    }

Readers take per-shard sample counts from it (so that an epoch can be planned without opening the shards) and
read a folder's shards in manifest order; :mod:`latentdiff.data.validate` checks shards against it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from latentdiff.atomic import atomic_write

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "latentdiff-shards/1"


@dataclass
class ShardRecord:
    name: str  # file name, relative to the manifest's folder
    samples: int
    bytes: int
    sha256: str


@dataclass
class Manifest:
    kind: str = "image"
    source: str = ""
    command: str = ""
    shards: list[ShardRecord] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    @property
    def total_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    def to_dict(self) -> dict:
        return {"format": MANIFEST_FORMAT, "kind": self.kind, "source": self.source, "command": self.command,
                "total_samples": self.total_samples, **self.extra,
                "shards": [asdict(s) for s in self.shards], "skipped": self.skipped}

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / MANIFEST_NAME
        with atomic_write(path, mode="w") as f:
            json.dump(self.to_dict(), f, indent=1)
            f.write("\n")
        return path


def load_manifest(folder: str | Path) -> Manifest | None:
    """The manifest of ``folder``, or ``None`` when it has none; a malformed one is a ``ValueError``."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        shards = [ShardRecord(name=str(s["name"]), samples=int(s["samples"]), bytes=int(s["bytes"]),
                              sha256=str(s["sha256"])) for s in data["shards"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a valid shard manifest: {e}") from None
    known = {"format", "kind", "source", "command", "total_samples", "shards", "skipped"}
    return Manifest(kind=data.get("kind", "image"), source=data.get("source", ""), command=data.get("command", ""),
                    shards=shards, skipped=list(data.get("skipped", [])),
                    extra={k: v for k, v in data.items() if k not in known})


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
