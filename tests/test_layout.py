"""The package's shape: imports only go downward through the layers, there is no import cycle (not even through an
import inside a function), no package file passes 400 lines, and no file names a machine's absolute path."""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "latentdiff"

# Bottom to top; a module may import its own layer and the layers below. The longest matching prefix decides.
LAYERS = [
    # no latentdiff imports:
    ("latentdiff.version", "latentdiff.atomic", "latentdiff.locks", "latentdiff.assets", "latentdiff.devices",
     "latentdiff.argtypes"),
    ("latentdiff.config",),
    ("latentdiff.diffusion", "latentdiff.models"),
    ("latentdiff.io",),
    ("latentdiff.data",),
    ("latentdiff.pipelines",),
    ("latentdiff.training", "latentdiff.metrics"),
    ("latentdiff.cli", "latentdiff.serve"),
    ("latentdiff", "latentdiff.__main__"),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> latentdiff modules it imports anywhere in its source (top level or inside functions)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative import
                    base = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                targets.add(module)
                targets.update(f"{module}.{a.name}" for a in node.names)  # `from pkg import submodule`
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def layer(module: str) -> int:
    best, rank = -1, None
    for i, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), i
    assert rank is not None, f"{module} is in no layer of {LAYERS}"
    return rank


def test_every_import_goes_downward():
    upward = [f"{m} (layer {layer(m)}) imports {t} (layer {layer(t)})"
              for m, targets in sorted(import_graph().items()) for t in sorted(targets) if layer(t) > layer(m)]
    assert not upward, "\n".join(upward)


def test_no_import_cycle():
    graph = import_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "\n".join(cycles)


def test_the_cycle_detector_finds_a_cycle(tmp_path, monkeypatch):
    """The graph builder sees imports inside functions and relative imports (a detector that misses them proves
    nothing)."""
    pkg = tmp_path / "latentdiff"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "a.py").write_text("def f():\n    from latentdiff.sub import b\n")
    (pkg / "sub" / "b.py").write_text("from . import a\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    monkeypatch.setattr(__import__(__name__), "PACKAGE", pkg)
    graph = import_graph()
    assert graph["latentdiff.sub.a"] == {"latentdiff.sub", "latentdiff.sub.b"}
    assert "latentdiff.sub.a" in graph["latentdiff.sub.b"]


def test_no_package_file_over_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 400}
    assert not long, long


MACHINE_ROOTS = tuple("/" + name + "/" for name in ("work", "root", "home"))  # spelled so this line has none


def test_no_absolute_machine_path_in_the_repository():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    bad = []
    for rel in files:
        path = ROOT / rel
        if path.suffix in (".png", ".safetensors", ".jpg", ".gz", ".tar") or not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        bad += [f"{rel}: {line.strip()[:120]}" for line in text.splitlines()
                if any(root in line for root in MACHINE_ROOTS)]
    assert not bad, "\n".join(bad)
