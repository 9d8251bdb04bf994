"""Every command survives a fuzzed command line: bad numbers, bad enum values, and paths that are missing, the
wrong kind (a folder for a file and the reverse), empty, random bytes, the right extension with the wrong content,
or named with spaces and non-ASCII characters, and output paths that cannot be written. Each case must end with
exit status 2 (1 where the failure is not the input's: none here), one message on stderr naming the problem, no
traceback, and nothing left behind where the command writes.

The cases run in this process through the ``latentdiff`` dispatcher (``latentdiff.cli.main.main``), as the console
script runs them: an exception escaping a command fails the test with its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from latentdiff.argtypes import Float, Int
from latentdiff.cli.main import COMMANDS, main

COUNTS: dict[str, int] = {}  # command -> cases run (printed at the end, for the note)


def parser_of(command: str) -> argparse.ArgumentParser:
    return importlib.import_module(COMMANDS[command][0]).build_parser(f"latentdiff {command}")


def numeric_options(command: str) -> list[argparse.Action]:
    return [a for a in parser_of(command)._actions
            if a.option_strings and a.type is not None and (a.type in (int, float) or isinstance(a.type, (Int, Float)))]


def run(argv: list[str], capsys) -> tuple[int, str]:
    """Exit status and stderr of ``latentdiff *argv``."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    COUNTS[argv[0]] = COUNTS.get(argv[0], 0) + 1
    return code, err


def tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


# ------------------------------------------------------------------------------------------------ numbers, enums


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_numeric_flag_is_checked(command):
    """No flag reads a bare int or float: each uses a checked type (latentdiff.argtypes), which refuses nan, inf,
    and values outside its range before any work starts."""
    raw = [a.option_strings[0] for a in numeric_options(command) if a.type in (int, float)]
    assert not raw, f"{command}: {raw} read bare numbers; use latentdiff.argtypes (POSITIVE, FINITE, ...)"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_bad_numbers_and_enum_values_exit_2_naming_the_flag(command, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cases = []
    for action in numeric_options(command):
        if isinstance(action.type, (Int, Float)):
            cases += [(action.option_strings[0], v) for v in action.type.bad_values]
    for action in parser_of(command)._actions:
        if action.option_strings and action.choices:
            cases.append((action.option_strings[0], "no-such-choice"))
    assert cases or command in ("convert", "pack-model")
    for flag, value in cases:
        code, err = run([command, f"{flag}={value}"], capsys)
        assert code == 2, (command, flag, value, err)
        assert flag in err and "Traceback" not in err, (command, flag, value, err)
    assert tree(tmp_path) == set()  # nothing written


# ------------------------------------------------------------------------------------------------ paths


def bad_paths(root: Path, suffix: str, folder: bool = False) -> dict[str, Path]:
    """Paths a user might pass where a file with ``suffix`` (or, ``folder=True``, a folder) is expected."""
    root.mkdir(parents=True, exist_ok=True)
    out = {"missing": root / f"missing{suffix}"}
    odd = root / "a folder with spaces ü"
    odd.mkdir(exist_ok=True)
    if folder:
        out["file"] = root / "a-file.txt"
        out["file"].write_text("not a folder\n")
        out["empty"] = root / "empty-folder"
        out["empty"].mkdir()
        garbage = root / "garbage-folder"
        garbage.mkdir()
        for i in range(3):  # images and shards by name, random bytes inside
            (garbage / f"{i}.png").write_bytes(os.urandom(200))
        out["garbage"] = garbage
        out["odd"] = odd / "no such folder"
        return out
    out["folder"] = root / f"folder{suffix}"
    out["folder"].mkdir()
    out["empty"] = root / f"empty{suffix}"
    out["empty"].write_bytes(b"")
    out["random"] = root / f"random{suffix}"
    out["random"].write_bytes(os.urandom(4096))
    out["wrong"] = root / f"wrong{suffix}"
    out["wrong"].write_text("- this is\n- a list, not what was asked for\n" if suffix != ".png" else "text\n")
    out["odd"] = odd / f"wrong ü{suffix}"
    out["odd"].write_bytes(b"\x00\x01 not it")
    return out


def png_folder(folder: Path, n: int = 4) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def blocked(root: Path) -> Path:
    """An output path that cannot be created: its parent is a file."""
    parent = root / "a-file"
    parent.write_text("x")
    return parent / "out"


def path_cases(command: str, root: Path, data: dict) -> list[list[str]]:
    """Command lines of ``command``, each with one bad path and otherwise valid arguments."""
    ckpt, images, shards = str(data["ckpt"]), str(data["images"]), str(data["shards"])
    out = str(root / "out")
    f = {ext: bad_paths(root / ext.strip(".") / "in", ext) for ext in (".safetensors", ".yaml", ".png", ".txt",
                                                                       ".npz", ".pth")}
    d = bad_paths(root / "folders" / "in", "", folder=True)
    files = lambda ext: list(f[ext].values())  # noqa: E731
    folders = list(d.values())
    lines = []
    if command == "txt2img":
        lines += [["cat", "--ckpt", str(p), "--outdir", out] for p in files(".safetensors")]
        lines += [["cat", "--ckpt", ckpt, "--init-image", str(p), "--outdir", out] for p in files(".png")]
        lines += [["--ckpt", ckpt, "--from-png", str(p), "--outdir", out] for p in files(".png")]
        lines += [["--ckpt", ckpt, "--from-file", str(p), "--outdir", out] for p in files(".txt")
                  if p.name != "wrong.txt"]  # any text is prompts
        lines += [["cat", "--ckpt", ckpt, "--outdir", str(blocked(root))]]
    elif command == "train":
        lines += [["--config", str(p), "--outdir", out] for p in files(".yaml")]
    elif command == "make-shards":
        lines += [[str(p), out] for p in folders]
        lines += [[images, str(blocked(root))]]
    elif command == "validate-shards":
        lines += [[str(p)] for p in folders]
        lines += [[shards, "--json", str(blocked(root) / "report.json")]]
    elif command == "convert":
        lines += [[str(p), out, "--to", "sd"] for p in files(".safetensors") + folders]
        lines += [[ckpt, str(blocked(root)), "--to", "diffusers"]]
    elif command == "pack-model":
        lines += [[str(p), str(root / "out.safetensors")] for p in files(".safetensors")]
        lines += [[ckpt, str(root / "out.safetensors"), "--vocabulary", str(p)] for p in files(".txt")
                  if p.name not in ("wrong.txt",)]
        lines += [[ckpt, str(root / "out.safetensors"), "--decoder", str(p)] for p in files(".safetensors")]
        lines += [[ckpt, str(blocked(root))]]
    elif command == "fid":
        lines += [[str(p), images, "--no-cache", "--no-progress"] for p in files(".npz") + folders]
        lines += [[images, images, "--inception-weights", str(p), "--no-cache", "--no-progress"]
                  for p in files(".pth")]
        lines += [[images, "--save-stats", str(blocked(root) / "x.npz"), "--no-cache"]]
    elif command == "clip-score":
        lines += [[str(p), "--no-progress"] for p in files(".npz") + folders]
        lines += [[shards, "--weights", str(p), "--no-progress"] for p in files(".safetensors")]
    elif command in ("eval-t2i", "sampler-sweep"):
        base = ["--num-samples", "2", "--batch-size", "2", "--quiet"] + (
            ["--steps", "1"] if command == "eval-t2i" else ["--steps", "1", "--samplers", "ddim"])
        lines += [["--ckpt", str(p), "--outdir", out, *base] for p in files(".safetensors")]
        lines += [["--ckpt", ckpt, "--captions", str(p), "--outdir", out, *base]
                  for p in files(".txt") if p.name != "wrong.txt"]
        lines += [["--ckpt", ckpt, "--reference", str(p), "--outdir", out, *base] for p in files(".npz") + folders]
        lines += [["--ckpt", ckpt, "--classifier", str(p), "--reference", "none", "--no-clip", "--outdir", out,
                   *base] for p in files(".safetensors")] if command == "eval-t2i" else []
        lines += [["--ckpt", ckpt, "--reference", "none", "--outdir", str(blocked(root)), *base]]
    elif command == "rfid":  # models, images, reference and output folder are all checked before any work
        rfid_out = ["--out", str(root / "r.json"), "--no-progress"]
        lines += [[str(p), "--images", images, "--no-fid", *rfid_out] for p in files(".safetensors") + folders]
        lines += [[ckpt, "--images", str(p), "--no-fid", *rfid_out] for p in folders + files(".png")]
        lines += [[ckpt, "--images", images, "--reference", str(p), "--no-cache", *rfid_out]
                  for p in files(".npz") + folders]
        lines += [[ckpt, "--images", images, "--no-fid", "--out", str(blocked(root) / "r.json")]]
    elif command == "judge":  # image folders, the classifier file and the output folder are checked first
        lines += [[str(p), "--quiet"] for p in folders]
        lines += [[images, "--classifier", str(p), "--quiet"] for p in files(".safetensors") + folders]
        lines += [[images, "--out", str(blocked(root) / "j.json"), "--quiet"]]
    elif command == "train-classifier":
        lines += [["--shards", str(p), "--out", str(root / "c.safetensors")] for p in folders]
        lines += [["--shards", shards, "--test-shards", str(p), "--out", str(root / "c.safetensors")]
                  for p in folders]
        lines += [["--shards", shards, "--out", str(blocked(root) / "c.safetensors")]]
    return lines


@pytest.fixture(scope="module")
def data(tiny_ldm_file, tiny_shards, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-data")
    return {"ckpt": tiny_ldm_file, "shards": tiny_shards(8), "images": png_folder(root / "images")}


@pytest.mark.parametrize("command", sorted(c for c in COMMANDS if c != "serve"))
def test_bad_paths_exit_2_with_one_message_and_leave_nothing(command, data, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    lines = path_cases(command, tmp_path, data)
    assert lines, command
    before = tree(tmp_path)
    for argv in lines:
        code, err = run([command, *argv], capsys)
        assert code == 2, (command, argv, code, err)
        assert "Traceback" not in err and err.strip(), (command, argv, err)
        assert err.strip().splitlines()[-1].startswith(("latentdiff ", "usage:")) or "error" in err, (argv, err)
        left = tree(tmp_path) - before
        assert not left, (command, argv, sorted(left))


def test_counts_are_reported():
    """Not a check: prints how many fuzzed command lines ran per command (pytest -s shows it)."""
    print({k: COUNTS[k] for k in sorted(COUNTS)}, "total", sum(COUNTS.values()))
