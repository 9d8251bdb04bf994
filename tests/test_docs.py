"""Every command the documentation shows runs as written.

Commands are taken from the fenced shell blocks (```bash, ```sh, ```shell, ```console and plain ```) and from the
inline code spans that start with a command (``latentdiff ...``, ``python tools/...``, ``python benchmarks/...``,
``python -m latentdiff ...``, ``torchrun ... tools/...``, ``bash tools/...``) of README.md, BENCHMARKS.md,
docs/*.md and the model cards, and from the comments of configs/*.yaml. Continuation lines (``\\``), ``&&`` / ``;``
chains, comments, redirections, leading ``VAR=value`` assignments and ``torchrun`` options are handled. For each
command:

1. the subcommand (``latentdiff <command>``, ``python tools/<name>.py``) or script exists;
2. every long flag it uses appears in that command's ``--help`` (subcommands in-process through
   ``latentdiff.cli.main.main``; other Python scripts and shell scripts by running ``--help``, once each);
3. the arguments parse: subcommands through their own ``build_parser(prog).parse_args``, so a missing required
   argument (``--outdir`` of sampler-sweep, say) is reported; for other Python scripts, the flags their usage line
   marks as required must be given.

A command with a placeholder (``PATH``, ``<command>``, ``...``, ``$s``) whose arguments cannot parse for that reason
(``--steps N``) is skipped and listed; a missing required argument is reported even then.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import io
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from latentdiff.cli.main import COMMANDS
from latentdiff.cli.main import main as latentdiff_main

ROOT = Path(__file__).resolve().parents[1]

DOC_FILES = sorted({"README.md", "BENCHMARKS.md", "latentdiff/assets/MODEL_CARD.md",
                    "latentdiff/assets/MODEL_CARD_VQ.md",
                    *(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))})
CONFIG_FILES = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").glob("*.yaml"))

SHELL_FENCES = {"", "bash", "sh", "shell", "console", "zsh"}
FENCE = re.compile(r"^\s*(```|~~~)\s*([\w+-]*)")
SEPARATORS = {"&&", "||", ";", "|", "&", "(", ")", ";;"}
REDIRECTS = {">", ">>", "<", ">&", "&>", "<<", "2>", ">|"}
SHELL_WORDS = {"do", "then", "else", "time", "!", "{", "}", "if", "while", "until"}
ANGLE = re.compile(r"<[A-Za-z][\w.-]*>")  # <command>, <name>: a placeholder, not a redirection
ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
UPPER = re.compile(r"(^|[/=])[A-Z][A-Z0-9_]*(\.[A-Za-z0-9]+)?($|/)")  # PATH, OUT.npz, PATH/TO/x, --set K=VALUE
PLACEHOLDER_MARK = "PLACEHOLDER"


@dataclass
class Command:
    where: str  # file:line
    text: str  # the command as written (one segment of a shell line)
    kind: str  # "cli" (a latentdiff subcommand), "script" (another Python script), "shell" (a shell script)
    target: str  # subcommand name or script path
    args: list[str]
    placeholder: bool = False


@dataclass
class Report:
    commands: list[Command] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


# -- extraction ----------------------------------------------------------------------------------------------------


def strip_comment(line: str) -> str:
    """The line up to a shell comment (``#`` at the start of a word, outside quotes)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def logical_lines(lines: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """Join ``\\``-continued lines: (first line number, joined text)."""
    out, current, start = [], "", None
    for number, line in lines:
        if start is None:
            start = number
        text = strip_comment(line).rstrip()
        if text.endswith("\\"):
            current += text[:-1] + " "
            continue
        out.append((start, current + text))
        current, start = "", None
    if start is not None:
        out.append((start, current))
    return out


def shell_segments(line: str) -> list[list[str]]:
    """Simple commands of a shell line: split at ``&&``, ``;``, ``|``..., redirections and their targets dropped.
    Raises ValueError for text that is not valid shell (e.g. an unclosed quote)."""
    line = ANGLE.sub(PLACEHOLDER_MARK, line)
    line = re.sub(r"(?<!\S)[0-9]+(?=>)", "", line)  # the 2 of 2>&1 (a file descriptor, not an argument)
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|<>()")
    lexer.whitespace_split = True
    lexer.commenters = ""
    tokens = list(lexer)
    segments, current, i = [], [], 0
    while i < len(tokens):
        tok = tokens[i]
        if tok in SEPARATORS:
            segments.append(current)
            current = []
        elif tok in REDIRECTS:
            i += 1  # the redirection's target
        else:
            current.append(tok)
        i += 1
    segments.append(current)
    return [s for s in segments if s]


def is_placeholder(token: str) -> bool:
    return (PLACEHOLDER_MARK in token or "..." in token or "…" in token or "$" in token
            or token.startswith("[") or token.endswith("]") or token == "|" or bool(UPPER.search(token)))


@functools.cache
def tool_commands() -> dict[str, str]:
    """tools/<name>.py -> the latentdiff subcommand it runs (thin entries call ``run_tool("<command>")``)."""
    out = {}
    for path in (ROOT / "tools").glob("*.py"):
        m = re.search(r"run_tool\(\s*[\"']([\w-]+)[\"']", path.read_text(encoding="utf-8"))
        if m:
            out[f"tools/{path.name}"] = m.group(1)
    return out


def classify(argv: list[str], where: str, text: str) -> Command | None:
    """The documented command ``argv`` as a :class:`Command`, or None when it is not one of ours (pip, git, ...)."""
    while argv and (argv[0] in SHELL_WORDS or ENV.match(argv[0])):
        argv = argv[1:]
    if not argv:
        return None
    prog, rest = argv[0], argv[1:]
    placeholder = any(is_placeholder(t) for t in argv)

    def cli(args: list[str]) -> Command:
        return Command(where, text, "cli", args[0] if args else "", args[1:], placeholder)

    if prog == "latentdiff":
        return cli(rest)
    if prog in ("python", "python3"):
        if rest[:2] == ["-m", "latentdiff"]:
            return cli(rest[2:])
        if rest and rest[0].endswith(".py") and rest[0].lstrip("./").startswith(("tools/", "benchmarks/")):
            script = rest[0].removeprefix("./")
            if script in tool_commands():
                return cli([tool_commands()[script], *rest[1:]])
            return Command(where, text, "script", script, rest[1:], placeholder)
        return None
    if prog == "torchrun":  # torchrun [its options] SCRIPT [script options]: check the script part
        for i, tok in enumerate(rest):
            if tok.endswith(".py"):
                return classify(["python", *rest[i:]], where, text)
        return None
    if prog in ("bash", "sh") and rest and rest[0].lstrip("./").startswith(("tools/", "benchmarks/")):
        return Command(where, text, "shell", rest[0].removeprefix("./"), rest[1:], placeholder)
    if prog.endswith(".sh") and prog.lstrip("./").startswith(("tools/", "benchmarks/")):
        return Command(where, text, "shell", prog.removeprefix("./"), rest, placeholder)
    return None


def commands_of_line(number: int, line: str, where: str, strict: bool, report: Report) -> None:
    """Add the commands of one logical shell line. ``strict``: the line is meant as shell (a shell fence), so text
    that is not valid shell is a problem; otherwise (plain fences, inline spans, config comments) only lines that
    start with one of our commands count."""
    line = line.strip()
    if line.startswith("$ "):
        line = line[2:]
    try:
        segments = shell_segments(line)
    except ValueError as e:
        if strict:
            report.problems.append(f"{where}:{number}: not valid shell ({e}): {line}")
        return
    if not strict and (not segments or classify(segments[0], "", "") is None):
        return
    for argv in segments:
        while argv and argv[0] in SHELL_WORDS:  # `do python tools/...` inside a for loop
            argv = argv[1:]
        command = classify(argv, f"{where}:{number}", shlex.join(argv))
        if command is not None:
            report.commands.append(command)


def is_command_start(text: str) -> bool:
    words = text.split()
    while words and ENV.match(words[0]):
        words = words[1:]
    if not words:
        return False
    if words[0] == "latentdiff":
        return len(words) > 1  # `latentdiff` alone is the package's name
    return (words[0] in ("python", "python3") and len(words) > 1
            and (words[1].startswith(("tools/", "benchmarks/")) or words[1:3] == ["-m", "latentdiff"])
            or words[0] == "torchrun"
            or words[0] in ("bash", "sh") and len(words) > 1 and words[1].startswith(("tools/", "benchmarks/")))


INLINE = re.compile(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)", re.DOTALL)


def markdown_commands(text: str, where: str, report: Report) -> None:
    """Commands of a Markdown text: shell fences line by line, inline code spans that start with a command."""
    lines = text.splitlines()
    prose: list[tuple[int, str]] = []
    fence, fence_lines = None, []
    for number, line in enumerate(lines, 1):
        m = FENCE.match(line)
        if fence is None:
            if m:
                fence, fence_lines = m, []
            else:
                prose.append((number, line))
            continue
        if m and m.group(1) == fence.group(1) and not m.group(2):  # closing fence
            lang = fence.group(2).lower()
            if lang in SHELL_FENCES:
                for start, joined in logical_lines(fence_lines):
                    commands_of_line(start, joined, where, strict=lang != "", report=report)
            fence = None
        else:
            fence_lines.append((number, line))
    # Inline spans may wrap onto the next line, never across a blank line (a paragraph break).
    paragraph: list[tuple[int, str]] = []
    for number, line in [*prose, (len(lines) + 1, "")]:
        if line.strip():
            paragraph.append((number, line))
            continue
        if paragraph:
            joined = "\n".join(t for _, t in paragraph)
            for m in INLINE.finditer(joined):
                span = m.group(2).replace("\\|", "|").replace("\n", " ").strip()
                if is_command_start(span):
                    start = paragraph[0][0] + joined[: m.start()].count("\n")
                    commands_of_line(start, span, where, strict=False, report=report)
        paragraph = []


def config_commands(text: str, where: str, report: Report) -> None:
    """Commands in the ``#`` comments of a YAML config (``#   python tools/train.py --config ...``)."""
    comment = [(n, line.lstrip()[1:]) for n, line in enumerate(text.splitlines(), 1) if line.lstrip().startswith("#")]
    for start, joined in logical_lines(comment):
        if is_command_start(joined.strip()):
            commands_of_line(start, joined, where, strict=False, report=report)


# -- checking ------------------------------------------------------------------------------------------------------


def capture(fn, *args) -> tuple[int, str]:
    """Run ``fn(*args)``, capturing stdout and stderr and a SystemExit: (exit status, output)."""
    buf = io.StringIO()
    code = 0
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        try:
            result = fn(*args)
            code = result if isinstance(result, int) else 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return code, buf.getvalue()


@functools.cache
def cli_help(command: str) -> tuple[int, str]:
    return capture(latentdiff_main, [command, "--help"])


@functools.cache
def script_help(script: str, shell: bool) -> tuple[int, str]:
    argv = ["bash", script, "--help"] if shell else [sys.executable, script, "--help"]
    try:
        done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return 124, f"{script} --help did not finish in 300 s"
    return done.returncode, done.stdout + done.stderr


def long_flags(args: list[str]) -> list[str]:
    out = []
    for tok in args:
        m = re.match(r"--[A-Za-z][\w-]*", tok.lstrip("[("))
        if m:
            out.append(m.group(0))
    return out


def missing_flags(args: list[str], help_text: str) -> list[str]:
    return [f for f in long_flags(args) if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", help_text)]


def required_flags(help_text: str) -> list[str]:
    """Flags the argparse usage line shows outside brackets (the required ones)."""
    m = re.search(r"usage:(.*?)(\n\s*\n|\Z)", help_text, re.DOTALL)
    if not m:
        return []
    usage, previous = m.group(1), None
    while usage != previous:
        previous, usage = usage, re.sub(r"\[[^\[\]]*\]", "", usage)
    return re.findall(r"(?<![\w-])--[A-Za-z][\w-]*", usage)


def parse_cli(command: str, args: list[str]) -> tuple[int, str]:
    module = importlib.import_module(COMMANDS[command][0])
    parser = module.build_parser(f"latentdiff {command}")
    return capture(parser.parse_args, args)


def check(command: Command, report: Report) -> None:
    where, text = command.where, command.text
    if command.kind == "cli":
        if not command.target or command.target.startswith("-"):  # `latentdiff`, `latentdiff --help`
            bad = [a for a in ([command.target] if command.target else []) + command.args
                   if a not in ("-h", "--help", "--version")]
            if bad:
                report.problems.append(f"{where}: `{text}`: latentdiff takes only --help or --version before the "
                                       f"command, not {bad}")
            return
        if PLACEHOLDER_MARK in command.target:
            report.skipped.append(f"{where}: `{text}` (the subcommand is a placeholder)")
            return
        if command.target not in COMMANDS:
            report.problems.append(f"{where}: `{text}`: no subcommand {command.target!r} "
                                   f"(latentdiff has {', '.join(COMMANDS)})")
            return
        code, help_text = cli_help(command.target)
        if code != 0:
            report.problems.append(f"{where}: `latentdiff {command.target} --help` exits {code}: {help_text[-500:]}")
            return
        unknown = missing_flags(command.args, help_text)
        for flag in unknown:
            report.problems.append(f"{where}: `{text}`: {flag} is not an option of latentdiff {command.target} "
                                   f"(see its --help)")
        code, output = parse_cli(command.target, command.args)
        if code != 0:
            message = output.strip().splitlines()[-1] if output.strip() else f"exit {code}"
            if "required" in message:
                report.problems.append(f"{where}: `{text}`: does not parse: {message}")
            elif unknown and "unrecognized arguments" in message:
                pass  # reported above, flag by flag
            elif command.placeholder:
                report.skipped.append(f"{where}: `{text}` ({message})")
            else:
                report.problems.append(f"{where}: `{text}`: does not parse: {message}")
        return
    if PLACEHOLDER_MARK in command.target:
        report.skipped.append(f"{where}: `{text}` (the script is a placeholder)")
        return
    path = ROOT / command.target
    if not path.is_file():
        report.problems.append(f"{where}: `{text}`: {command.target} does not exist")
        return
    shell = command.kind == "shell"
    if shell and "--help" not in path.read_text(encoding="utf-8"):
        report.problems.append(f"{where}: `{text}`: {command.target} does not answer --help (it would start its "
                               f"work), so its use cannot be checked")
        return
    code, help_text = script_help(command.target, shell)
    if code != 0 or not help_text.strip():
        report.problems.append(f"{where}: `{command.target} --help` exits {code}: {help_text[-500:]}")
        return
    for flag in missing_flags(command.args, help_text):
        report.problems.append(f"{where}: `{text}`: {flag} is not an option of {command.target} (see its --help)")
    if not shell and not {"-h", "--help"} & set(command.args):
        given = set(long_flags(command.args))
        for flag in required_flags(help_text):
            if flag not in given:
                report.problems.append(f"{where}: `{text}`: the required {flag} of {command.target} is missing")


def check_text(text: str, where: str, config: bool = False) -> Report:
    report = Report()
    (config_commands if config else markdown_commands)(text, where, report)
    for command in report.commands:
        check(command, report)
    return report


@functools.cache
def report_of(rel: str) -> Report:
    return check_text((ROOT / rel).read_text(encoding="utf-8"), rel, config=rel.endswith(".yaml"))


# -- tests ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rel", DOC_FILES + CONFIG_FILES)
def test_documented_commands_run_as_written(rel):
    report = report_of(rel)
    for line in report.skipped:
        print(f"skipped: {line}")
    assert not report.problems, f"{len(report.problems)} problem(s) in {rel}:\n" + "\n".join(report.problems)


def test_the_docs_show_commands_and_skip_few():
    """The extraction finds the commands (a checker that finds none proves nothing) and skips few of them."""
    reports = {rel: report_of(rel) for rel in DOC_FILES + CONFIG_FILES}
    total = sum(len(r.commands) for r in reports.values())
    skipped = [s for r in reports.values() for s in r.skipped]
    print(f"{total} commands checked, {len(skipped)} skipped:", *skipped, sep="\n  ")
    assert len(reports["README.md"].commands) >= 15
    assert total >= 60
    assert len(skipped) <= max(3, total // 20), skipped


def test_the_checker_reports_what_does_not_run():
    doc = """
Some text with `latentdiff txt2img "a dog" --nosuch-inline 2` and
`python tools/sampler_sweep.py --steps 10 25` (no --outdir), and `latentdiff nosuchcmd --x`.

```bash
pip install -r requirements.txt && latentdiff txt2img "a cat" --nosuch 3   # a comment --not-a-flag
python tools/txt2img.py "a cat" --steps 10 \\
    --seed 1 --made-up-too && python tools/fid.py a/ b/
OMP_NUM_THREADS=2 python tools/nosuch.py --x
torchrun --nproc_per_node 2 tools/train.py --outdir runs/x
latentdiff make-shards ONLY_ONE
bash tools/nosuch.sh
```

```bash
latentdiff txt2img "a fine prompt" --steps 10 --seed 1 --n_samples 2 > out.txt 2>&1
python -m latentdiff fid --save-stats PATH/TO/cifar10-test.tar.gz stats.npz
latentdiff eval-t2i --num-samples N --outdir eval/x
```
"""
    report = check_text(doc, "fake.md")
    problems = "\n".join(report.problems)
    for expected in ("--nosuch-inline", "--nosuch ", "--made-up-too", "--outdir", "nosuchcmd", "tools/nosuch.py",
                     "the following arguments are required: --config", "outdir", "tools/nosuch.sh"):
        assert expected in problems, f"{expected!r} not reported:\n{problems}"
    assert "--not-a-flag" not in problems
    assert "a fine prompt" not in problems and "stats.npz" not in problems, problems  # the good block
    assert [s for s in report.skipped if "--num-samples N" in s], report.skipped  # N is not an int: skipped
    assert {c.target for c in report.commands} >= {"txt2img", "fid", "sampler-sweep", "train", "make-shards",
                                                   "eval-t2i", "tools/nosuch.py", "tools/nosuch.sh"}


LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


@pytest.mark.parametrize("rel", DOC_FILES)
def test_relative_links_point_at_files_in_the_repository(rel):
    path = ROOT / rel
    bad = []
    for target in LINK.findall(path.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        resolved = (path.parent / target.split("#")[0]).resolve()
        if not resolved.exists() or ROOT not in resolved.parents and resolved != ROOT:
            bad.append(target)
    assert not bad, f"{rel}: links to nothing in the repository: {bad}"
