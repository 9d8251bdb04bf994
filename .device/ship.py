"""Mechanics of this project's remote GPU lending, not for users: the lent machine returns at most 8 files of at most
16 MiB per call (64 MiB in all), so a results folder travels back as a tar cut into 15 MiB parts over one or more
calls. Users run benchmarks/gpu_bench.sh, tools/train_default_models.sh and tools/evaluate_default_models.sh
(BENCHMARKS.md, "GPU scripts") and need none of this.

    python .device/ship.py prepare RESULTS PARTS   # on the GPU machine: RESULTS -> PARTS/results.tar.partNN + manifest
    python .device/ship.py send PARTS OUT          # the next batch of parts not sent yet -> OUT (prints what is left)
    python .device/ship.py join FETCHED DEST       # back here: check the sha256 of every part, rejoin, untar into DEST
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tarfile
from pathlib import Path

PART = 15 * 2**20
MAX_FILES, MAX_BYTES = 8, 62 * 2**20  # per call, manifest.json included


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            h.update(block)
    return h.hexdigest()


def prepare(results: Path, parts: Path) -> None:
    parts.mkdir(parents=True, exist_ok=True)
    archive = parts / "results.tar"
    skip = parts.resolve()  # PARTS may lie inside RESULTS

    def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        return None if (results.resolve().parent / info.name).resolve() == skip else info

    with tarfile.open(archive, "w") as tar:
        tar.add(results, arcname=results.resolve().name, filter=keep)
    names = []
    with open(archive, "rb") as f:
        while chunk := f.read(PART):
            names.append(f"results.tar.part{len(names):02d}")
            (parts / names[-1]).write_bytes(chunk)
    archive.unlink()
    manifest = {"parts": names, "sha256": {n: sha256(parts / n) for n in names}}
    (parts / "manifest.json").write_text(json.dumps(manifest, indent=1))
    (parts / "sent.txt").write_text("")
    print(f"{len(names)} parts of <= {PART // 2**20} MiB in {parts}")


def send(parts: Path, out: Path) -> None:
    manifest = json.loads((parts / "manifest.json").read_text())
    sent = set((parts / "sent.txt").read_text().split())
    batch, nbytes = [], (parts / "manifest.json").stat().st_size
    for name in manifest["parts"]:
        size = (parts / name).stat().st_size
        if name not in sent and len(batch) + 1 < MAX_FILES and nbytes + size <= MAX_BYTES:
            batch.append(name)
            nbytes += size
    out.mkdir(parents=True, exist_ok=True)
    for name in ["manifest.json", *batch]:
        shutil.copy(parts / name, out / name)
    sent |= set(batch)
    (parts / "sent.txt").write_text("\n".join(sorted(sent)))
    left = [n for n in manifest["parts"] if n not in sent]
    print(f"sent {len(batch)} parts, {nbytes / 2**20:.1f} MiB; left: {left}")


def join(fetched: Path, dest: Path) -> None:
    manifest = json.loads((fetched / "manifest.json").read_text())
    missing = [n for n in manifest["parts"] if not (fetched / n).is_file()]
    if missing:
        sys.exit(f"missing parts (fetch them with more 'send' calls): {missing}")
    bad = [n for n in manifest["parts"] if sha256(fetched / n) != manifest["sha256"][n]]
    if bad:
        sys.exit(f"sha256 mismatch: {bad}")
    archive = fetched / "results.tar"
    with open(archive, "wb") as f:
        for name in manifest["parts"]:
            f.write((fetched / name).read_bytes())
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")
    archive.unlink()
    print(f"unpacked into {dest}")


if __name__ == "__main__":
    commands = {"prepare": prepare, "send": send, "join": join}
    if len(sys.argv) != 4 or sys.argv[1] not in commands:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    commands[sys.argv[1]](Path(sys.argv[2]), Path(sys.argv[3]))
