"""One writer per folder (latentdiff.locks): a second locker is refused naming the holder, a SIGKILLed holder or a
leftover .lock never blocks, and `latentdiff train`, `make-shards` and `eval-t2i` exit 2 at once on a held folder
without writing anything."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from latentdiff.cli import eval_t2i as eval_tool
from latentdiff.cli import make_shards as make_shards_tool
from latentdiff.cli import train as train_cli
from latentdiff.locks import LOCK_NAME, FolderLock, FolderLockedError, folder_lock

ROOT = Path(__file__).resolve().parents[1]
AE_CONFIG = ROOT / "configs" / "train_tiny_autoencoder.yaml"
HOLDER = ("import sys, time; from latentdiff.locks import folder_lock; lock = folder_lock(sys.argv[1], 'holder'); "
          "print('locked', flush=True); time.sleep(120)")


def hold_in_subprocess(folder: Path) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True,
                               cwd=ROOT)
    assert process.stdout.readline().strip() == "locked"
    return process


def test_second_locker_is_refused_naming_the_holder_and_a_sigkilled_holder_releases(tmp_path):
    folder = tmp_path / "run"
    holder = hold_in_subprocess(folder)
    try:
        with pytest.raises(FolderLockedError) as e:
            folder_lock(folder, "test")
        message = str(e.value)
        assert str(folder) in message and f"pid {holder.pid} on host {socket.gethostname()}" in message
        assert "holder" in message and "wait for it to finish or choose another folder" in message
        assert isinstance(e.value, ValueError)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
    assert (folder / LOCK_NAME).is_file()  # the dead holder's file is left behind, with its note ...
    assert json.loads((folder / LOCK_NAME).read_text())["pid"] == holder.pid
    start = time.perf_counter()
    with folder_lock(folder, "test") as lock:  # ... and does not block
        assert lock.held and time.perf_counter() - start < 1.0
        assert json.loads((folder / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert not (folder / LOCK_NAME).exists() and folder.is_dir()  # the folder existed before this lock


def test_leftover_lock_file_does_not_block_and_release_cleans_up(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / LOCK_NAME).write_text(json.dumps({"pid": 999999, "host": "gone"}) + "\n")
    lock = folder_lock(folder, "test")
    with pytest.raises(FolderLockedError, match=f"pid {os.getpid()} on host"):  # also in the same process
        FolderLock(folder, "other").acquire()
    lock.release()
    lock.release()  # idempotent
    assert list(folder.iterdir()) == []
    fresh = tmp_path / "new" / "run"
    with folder_lock(fresh, "test"):
        assert fresh.is_dir()
    assert not fresh.exists()  # created by the lock and left empty: removed again
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="is not a folder"):
        folder_lock(tmp_path / "file")


def test_forked_child_does_not_keep_the_lock(tmp_path):
    folder = tmp_path / "run"
    lock = folder_lock(folder, "test")
    pid = os.fork()
    if pid == 0:  # child: its inherited copy is closed at fork; sleep so the parent can check
        time.sleep(5)
        os._exit(0)
    try:
        lock.release()  # the parent lets go while the child lives: the folder is free at once
        with folder_lock(folder, "again"):
            pass
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def _train_argv(shards: Path, outdir: Path, *extra: str) -> list[str]:
    return ["--config", str(AE_CONFIG), "--outdir", str(outdir), "--set", f"data.shards={shards}",
            "--set", "objective.disc_weight=0", "--set", "sample_every=0", "--no-progress", *extra]


def test_train_refuses_a_folder_another_process_trains_in(tmp_path, tiny_shards, capsys):
    shards, outdir = tiny_shards(16), tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "latentdiff", "train",
                              *_train_argv(shards, outdir, "--set", "steps=100000", "--set", "checkpoint_every=1000")],
                             cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while True:
            note = (outdir / LOCK_NAME).read_text() if (outdir / LOCK_NAME).is_file() else ""
            if note.strip() and json.loads(note)["pid"] == first.pid:
                break
            assert first.poll() is None and time.time() < deadline, "the first trainer never locked its folder"
            time.sleep(0.05)
        start = time.perf_counter()
        with pytest.raises(SystemExit) as e:
            train_cli.main(_train_argv(shards, outdir, "--set", "steps=2"), prog="latentdiff train")
        assert e.value.code == 2 and time.perf_counter() - start < 10
        err = capsys.readouterr().err
        assert f"{outdir} is in use by another run (training run: pid {first.pid} on host" in err
        assert "Traceback" not in err
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(30)
    # the killed holder does not block the next run, which resumes (or starts) in the same folder
    assert train_cli.main(_train_argv(shards, outdir, "--set", "steps=1"), prog="latentdiff train") == 0
    assert (outdir / "model.safetensors").is_file() and not (outdir / LOCK_NAME).exists()


def test_train_on_a_held_folder_writes_nothing(tmp_path, tiny_shards, capsys):
    outdir = tmp_path / "run"
    with folder_lock(outdir, "holder"):
        with pytest.raises(SystemExit) as e:
            train_cli.main(_train_argv(tiny_shards(16), outdir, "--set", "steps=1"), prog="latentdiff train")
        assert e.value.code == 2 and f"pid {os.getpid()}" in capsys.readouterr().err
        assert [p.name for p in outdir.iterdir()] == [LOCK_NAME]


def test_make_shards_on_a_held_folder_exits_2_and_writes_nothing(tmp_path, tiny_shards, capsys):
    from tests.test_make_shards import image_bytes

    src = tmp_path / "src" / "cat"
    src.mkdir(parents=True)
    (src / "0.jpg").write_bytes(image_bytes(0, "JPEG"))
    out = tmp_path / "shards"
    with folder_lock(out, "holder"):
        with pytest.raises(SystemExit) as e:
            make_shards_tool.main([str(tmp_path / "src"), str(out), "--quiet"])
        assert e.value.code == 2 and f"{out} is in use by another run (holder: pid {os.getpid()}" in \
            capsys.readouterr().err
        assert [p.name for p in out.iterdir()] == [LOCK_NAME]
    assert not out.exists()  # the lock made the folder and removed it again
    out.mkdir()  # a folder holding only a (stale or live) .lock counts as empty
    (out / LOCK_NAME).write_text("{}\n")
    assert make_shards_tool.main([str(tmp_path / "src"), str(out), "--quiet"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "src-000000.tar"]


def test_eval_t2i_on_a_held_folder_exits_2_at_once(tmp_path, capsys):
    out = tmp_path / "eval"
    with folder_lock(out, "holder"):
        with pytest.raises(SystemExit) as e:  # refused before the (missing) checkpoint is even looked at
            eval_tool.main(["--ckpt", str(tmp_path / "missing.safetensors"), "--captions", "cifar10",
                            "--num-samples", "2", "--reference", "none", "--no-clip", "--outdir", str(out)])
        assert e.value.code == 2 and f"{out} is in use by another run (holder: pid {os.getpid()}" in \
            capsys.readouterr().err
        assert [p.name for p in out.iterdir()] == [LOCK_NAME]
