"""Pack results on the device machine into <=15 MB parts (prepare) and copy the next batch into $OUT (send)."""
import hashlib
import json
import os
import shutil
import sys
import tarfile
from pathlib import Path

PART = 15 * 2**20
MAX_FILES, MAX_BYTES = 8, 62 * 2**20


def split(src: Path, parts_dir: Path, name: str) -> list[str]:
    out, data_len = [], src.stat().st_size
    with open(src, "rb") as f:
        i = 0
        while True:
            chunk = f.read(PART)
            if not chunk and i:
                break
            p = parts_dir / f"{name}.part{i:02d}"
            p.write_bytes(chunk)
            out.append(p.name)
            i += 1
            if f.tell() >= data_len:
                break
    return out


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def prepare(keep: Path, runs: Path) -> None:
    parts = keep / "parts"
    parts.mkdir(exist_ok=True)
    items = []  # (name, [part files]) in priority order
    logs = parts / "logs.tgz"
    with tarfile.open(logs, "w:gz") as tar:
        for run in sorted(runs.glob("*")):
            if run.is_file() and run.suffix == ".log":
                tar.add(run, f"runs/{run.name}")
            elif run.is_dir():
                for f in ("log.jsonl", "loss.png", "config.yaml"):
                    if (run / f).exists():
                        tar.add(run / f, f"runs/{run.name}/{f}")
                for f in sorted((run / "samples").glob("*.png")):
                    tar.add(f, f"runs/{run.name}/samples/{f.name}")
        for f in sorted(keep.rglob("*")):
            rel = f.relative_to(keep)
            if f.is_file() and rel.parts[0] != "parts" and "images" not in rel.parts:
                tar.add(f, f"keep/{rel}")
    items.append(("logs.tgz", [logs.name]))

    def add_images(name: str, folder: Path) -> None:
        if folder.is_dir():
            tmp = keep / name
            with tarfile.open(tmp, "w") as tar:
                for f in sorted(folder.rglob("*.png")):
                    tar.add(f, str(f.relative_to(folder.parent)))
            items.append((name, split(tmp, parts, name)))
            tmp.unlink()

    add_images("sweep_default_images.tar", keep / "sweep_default")
    for name, src in (("ldm-fp16.safetensors", runs / "cifar10_ldm" / "model-fp16.safetensors"),
                      ("vq-fp16.safetensors", runs / "cifar10_vq_diffusion" / "model-fp16.safetensors")):
        if src.exists():
            items.append((name, split(src, parts, name)))
    add_images("eval_ldm_images.tar", keep / "eval_ldm" / "images")
    add_images("eval_vq_images.tar", keep / "eval_vq" / "images")
    add_images("sweep_images.tar", keep / "sweep")
    manifest = {"items": [{"name": n, "parts": ps, "sha256": [sha(parts / p) for p in ps]} for n, ps in items]}
    (parts / "manifest.json").write_text(json.dumps(manifest, indent=1))
    print(json.dumps({n: len(ps) for n, ps in items}))


def send(keep: Path, out: Path) -> None:
    parts = keep / "parts"
    manifest = json.loads((parts / "manifest.json").read_text())
    sent_file = parts / "sent.txt"
    sent = set(sent_file.read_text().split()) if sent_file.exists() else set()
    files, nbytes = ["manifest.json"], (parts / "manifest.json").stat().st_size
    for item in manifest["items"]:
        for p in item["parts"]:
            size = (parts / p).stat().st_size
            if p in sent or len(files) >= MAX_FILES or nbytes + size > MAX_BYTES:
                continue
            files.append(p)
            nbytes += size
    for f in files:
        shutil.copy(parts / f, out / f)
    sent |= set(files) - {"manifest.json"}
    sent_file.write_text("\n".join(sorted(sent)))
    left = [p for it in manifest["items"] for p in it["parts"] if p not in sent]
    print(f"sent {len(files)} files, {nbytes / 2**20:.1f} MiB; left: {left}")


if __name__ == "__main__":
    cmd, keep = sys.argv[1], Path(sys.argv[2])
    if cmd == "prepare":
        prepare(keep, Path(sys.argv[3]))
    else:
        send(keep, Path(sys.argv[3] if len(sys.argv) > 3 else os.environ["OUT"]))
