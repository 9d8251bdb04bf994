"""Writing tar shards: ``{prefix}-{index:06d}.tar`` of ``samples_per_shard`` samples each, written atomically.

    with ShardWriter(outdir, prefix="cifar10-train", samples_per_shard=1000) as writer:
        writer.write("000000000", {"jpg": jpeg_bytes, "txt": b"a photo of a cat", "json": b"{...}"})
    records = writer.records          # ShardRecord(name, samples, bytes, sha256) per shard

Members are written in the order given, as regular files with fixed metadata (mtime 0, uid/gid 0, no user
names, mode 0644), so the same samples always give byte-identical shards. Each shard goes through
:func:`latentdiff.atomic.atomic_write` (temp file, fsync, rename): a reader never sees half a shard, and an
interrupted write leaves only a ``.tmp-*`` file. Keys must not contain '.' or '/' (webdataset splits the member
name at the first dot of the file name).

``prepare_outdir`` refuses a non-empty output folder unless asked to overwrite; ``remove_stale_shards`` then
deletes the replaced manifest's shards that the new one no longer lists.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

from latentdiff.atomic import atomic_write
from latentdiff.data.manifest import MANIFEST_NAME, ShardRecord, load_manifest
from latentdiff.locks import LOCK_NAME


class _HashingFile:
    """Forwards writes to ``f`` and keeps their sha256 and byte count."""

    def __init__(self, f):
        self.f = f
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.f.write(data)
        self.sha256.update(data)
        self.size += len(data)
        return len(data)

    def tell(self) -> int:
        return self.size


class ShardWriter:
    """Roll samples into numbered shards; ``records`` lists the finished ones."""

    def __init__(self, outdir: str | Path, prefix: str, samples_per_shard: int = 1000, overwrite: bool = False):
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard={samples_per_shard} must be >= 1")
        if not prefix or "/" in prefix:
            raise ValueError(f"shard prefix {prefix!r} must be a non-empty file name")
        self.outdir = Path(outdir)
        self.prefix = prefix
        self.samples_per_shard = samples_per_shard
        self.overwrite = overwrite
        self.records: list[ShardRecord] = []
        self._atomic = None  # the open atomic_write context of the current shard
        self._file: _HashingFile | None = None
        self._tar: tarfile.TarFile | None = None
        self._count = 0

    def shard_name(self, index: int) -> str:
        return f"{self.prefix}-{index:06d}.tar"

    def _open(self) -> None:
        self._atomic = atomic_write(self.outdir / self.shard_name(len(self.records)), "wb", overwrite=self.overwrite)
        self._file = _HashingFile(self._atomic.__enter__())
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.PAX_FORMAT)
        self._count = 0

    def _finish(self) -> None:
        self._tar.close()  # end-of-archive blocks
        self._atomic.__exit__(None, None, None)
        self.records.append(ShardRecord(self.shard_name(len(self.records)), self._count, self._file.size,
                                        self._file.sha256.hexdigest()))
        self._atomic = self._file = self._tar = None

    def write(self, key: str, members: dict[str, bytes]) -> None:
        """Add one sample: ``members`` maps extensions (``jpg``, ``txt``, ``json``...) to bytes."""
        if not key or "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} must be non-empty without '.' or '/'")
        if self._tar is None:
            self._open()
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
        self._count += 1
        if self._count == self.samples_per_shard:
            self._finish()

    def close(self) -> list[ShardRecord]:
        """Finish the last, partial shard; return the records of all shards."""
        if self._tar is not None:
            self._finish()
        return self.records

    def abort(self, exc: BaseException | None = None) -> None:
        """Drop the shard being written (its temp file is removed); finished shards stay."""
        if self._atomic is not None:
            self._tar = None
            self._atomic.__exit__(type(exc) if exc else RuntimeError, exc or RuntimeError("aborted"), None)
            self._atomic = self._file = None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort(exc)


def prepare_outdir(outdir: str | Path, overwrite: bool) -> list[str]:
    """Check that ``outdir`` may be written; return the shard names of a manifest being replaced.

    A non-empty folder is refused unless ``overwrite``; then its old manifest is removed first, so that a
    crash cannot leave an old manifest describing new shards.
    """
    outdir = Path(outdir)
    if outdir.exists() and not outdir.is_dir():
        raise FileExistsError(f"output {str(outdir)!r} exists and is not a folder")
    if outdir.is_dir() and any(p.name != LOCK_NAME for p in outdir.iterdir()):  # a held lock counts as empty
        if not overwrite:
            raise FileExistsError(f"output folder {str(outdir)!r} is not empty; pass --overwrite (overwrite=True) "
                                  "to replace its shards")
        old = load_manifest(outdir)
        (outdir / MANIFEST_NAME).unlink(missing_ok=True)
        return [s.name for s in old.shards] if old else []
    outdir.mkdir(parents=True, exist_ok=True)
    return []


def remove_stale_shards(outdir: str | Path, old_names: list[str], records: list[ShardRecord]) -> None:
    """After an overwrite, delete the shards of the replaced manifest that the new one does not list."""
    keep = {r.name for r in records}
    for name in old_names:
        if name not in keep:
            (Path(outdir) / name).unlink(missing_ok=True)
