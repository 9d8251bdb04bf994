"""The command line: ``latentdiff <command>``, ``python -m latentdiff`` and the ``tools/<name>.py`` scripts.

Most checks call :func:`latentdiff.cli.main.main` in-process; a few run the installed console script, ``python -m``
and a tools/ script as real programs from a temporary folder (so from outside the repository), ending with one
text-to-image run on the session's tiny checkpoint.
"""

from __future__ import annotations

import importlib
import re
import runpy
import shutil
import subprocess
import sys
import sysconfig

import pytest
from PIL import Image

import latentdiff
from latentdiff.cli.main import COMMANDS, main, usage
from latentdiff.pipelines import parse_parameters
from tests.tiny import ROOT

TOOLS = sorted((ROOT / "tools").glob("*.py"))


def console_script() -> str:
    """The ``latentdiff`` script installed with this interpreter (pyproject.toml ``[project.scripts]``)."""
    path = shutil.which("latentdiff", path=sysconfig.get_path("scripts")) or shutil.which("latentdiff")
    assert path, "no `latentdiff` console script: install the package (pip install -e .)"
    return path


def run(argv: list[str], cwd, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    """``latentdiff *argv`` in-process: (exit status, stdout, stderr), whether it returns or exits."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def first_doc_line(command: str) -> str:
    return importlib.import_module(COMMANDS[command][0]).__doc__.strip().splitlines()[0]


# ---------------------------------------------------------------------------------------------- latentdiff


def test_no_arguments_lists_every_command(capsys):
    code, out, err = run_main([], capsys)
    assert code == 0 and err == ""
    assert out.startswith("usage: latentdiff <command>")
    listed = {line.split()[0] for line in out.split("commands:\n", 1)[1].splitlines() if line.strip()}
    assert listed == set(COMMANDS)
    for name, (_, text) in COMMANDS.items():
        assert re.search(rf"^  {re.escape(name)} +{re.escape(text)}$", out, re.M), name
    assert run_main(["--help"], capsys)[:2] == (0, out) and run_main(["-h"], capsys)[:2] == (0, out)


def test_unknown_command_exits_2_with_usage_on_stderr(capsys):
    code, out, err = run_main(["nosuch", "--help"], capsys)
    assert code == 2 and out == ""
    assert err.startswith(usage()) and "latentdiff: error: unknown command 'nosuch'" in err


def test_unknown_flag_of_a_subcommand_exits_2_with_usage(capsys):
    code, out, err = run_main(["txt2img", "x", "--nosuch"], capsys)
    assert code == 2 and out == ""
    assert err.startswith("usage: latentdiff txt2img ")
    assert "latentdiff txt2img: error: unrecognized arguments: --nosuch" in err


@pytest.mark.parametrize("command", COMMANDS)
def test_every_subcommand_refuses_an_unknown_flag(command, capsys):
    code, out, err = run_main([command, "--nosuch"], capsys)  # or its missing required arguments: status 2
    assert code == 2 and out == ""
    assert err.startswith(f"usage: latentdiff {command} ") and f"latentdiff {command}: error: " in err


def test_version(capsys):
    code, out, err = run_main(["--version"], capsys)
    assert (code, out, err) == (0, f"latentdiff {latentdiff.__version__}\n", "")
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", latentdiff.__version__)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_subcommand_answers_help(command, capsys):
    code, out, err = run_main([command, "--help"], capsys)
    assert code == 0 and err == ""
    assert out.startswith(f"usage: latentdiff {command} ")
    assert first_doc_line(command) in out  # its own description, not another command's


# ---------------------------------------------------------------------------------------------- tools/*.py


def test_every_command_has_a_tools_script():
    commands = {}
    for path in TOOLS:
        found = re.findall(r'run_tool\("([\w-]+)"\)', path.read_text(encoding="utf-8"))
        assert len(found) == 1, f"{path.name}: expected one run_tool(...) call, found {found}"
        commands[path.name] = found[0]
    assert sorted(commands.values()) == sorted(COMMANDS), commands


@pytest.mark.parametrize("path", TOOLS, ids=[p.name for p in TOOLS])
def test_tools_script_help_names_the_script(path, monkeypatch, capsys):
    """``python tools/<x>.py --help``, run in-process as ``__main__``: the usage names the script, and the help is
    that of the command the script stands for."""
    command = re.search(r'run_tool\("([\w-]+)"\)', path.read_text(encoding="utf-8")).group(1)
    monkeypatch.setattr(sys, "argv", [str(path), "--help"])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(path), run_name="__main__")
    out, err = capsys.readouterr()
    assert e.value.code == 0 and err == ""
    assert out.startswith(f"usage: {path.name} ") and first_doc_line(command) in out


# ---------------------------------------------------------------------------------------------- real programs


def test_console_script_and_python_m_from_another_folder(tmp_path):
    script = console_script()
    listed = run([script], cwd=tmp_path)
    assert listed.returncode == 0 and listed.stdout == usage() + "\n"
    helped, module = run([script, "--help"], cwd=tmp_path), run([sys.executable, "-m", "latentdiff", "--help"],
                                                                   cwd=tmp_path)
    assert helped.returncode == module.returncode == 0
    assert module.stdout == helped.stdout == listed.stdout
    bad = run([script, "nosuch"], cwd=tmp_path)  # the exit status reaches the shell
    assert bad.returncode == 2 and bad.stdout == "" and bad.stderr.startswith("usage: latentdiff <command>")


def test_tools_script_runs_from_another_folder(tmp_path):
    res = run([sys.executable, str(ROOT / "tools" / "txt2img.py"), "--help"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("usage: txt2img.py ") and "--negative-prompt" in res.stdout
    assert not list(tmp_path.iterdir())  # --help writes nothing


def test_txt2img_end_to_end_writes_a_png(tiny_ldm_file, tmp_path):
    res = run([console_script(), "txt2img", "a photo of a dog", "--ckpt", str(tiny_ldm_file), "--steps", "2",
               "--seed", "3", "--outdir", "OUT"], cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    png = tmp_path / "OUT" / "00000.png"  # --outdir is relative to the working folder
    assert sorted(p.name for p in png.parent.iterdir()) == ["00000.png"]  # one image, no grid
    assert str(png.relative_to(tmp_path)) in res.stdout
    image = Image.open(png)
    assert image.format == "PNG" and image.size == (16, 16)
    params = parse_parameters(image.info["parameters"])
    assert params["prompt"] == "a photo of a dog" and params["Steps"] == "2" and params["Seed"] == "3"
    assert params["Model"] == "tiny"
