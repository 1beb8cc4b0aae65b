"""The package layout stays layered: no import circles, no library module importing from a stage above it
(tasks and commands above all), and lmlab imports at the top of library modules (lazy only in commands/,
which keeps `lmlab --help` fast). Read from the source with `ast`, so a lazy import cannot hide an edge."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "lmlab"

LAYERS = [
    ["lmlab", "lmlab.errors", "lmlab.fileio", "lmlab.paths", "lmlab.precision"],  # utilities every stage uses
    ["lmlab.tokenization"],
    ["lmlab.model"],
    ["lmlab.weights"],  # model I/O
    ["lmlab.data"],
    ["lmlab.schema"],  # recipe configs (sections reference ModelConfig and data defaults)
    ["lmlab.adapters"],
    ["lmlab.generation"],
    ["lmlab.train"],
    ["lmlab.evaluation"],  # evaluation and experiments (sweeps, reports)
    ["lmlab.serve"],
    ["lmlab.tasks"],
    ["lmlab.commands", "lmlab.compat", "lmlab.cli", "lmlab.__main__"],
]
"""Stages, lowest first: a module may import from its own stage or any stage below it."""


def _modules() -> dict[str, Path]:
    out = {}
    for f in PACKAGE.rglob("*.py"):
        parts = f.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = f
    return out


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The lmlab module an import refers to (a package attribute resolves to the package module)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported lmlab module, line, inside a function) for every import statement of the file."""
    tree = ast.parse(path.read_text())
    nested = {id(n) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
              for n in ast.walk(fn) if n is not fn}
    out = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            target = _resolve(name) if name.startswith("lmlab") else None
            if target:
                out.append((target, node.lineno, id(node) in nested))
    return out


def _layer(module: str) -> int:
    best = -1, -1
    for i, stage in enumerate(LAYERS):
        for prefix in stage:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best[1]:
                best = i, len(prefix)
    return best[0]


def _edges() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for name, path in MODULES.items():
        for target, _, _ in _imports(path):
            if target != name:
                graph[name].add(target)
    return graph


def test_every_module_has_a_stage():
    assert [m for m in MODULES if _layer(m) < 0] == []


def test_no_import_circles():
    graph, index, low, stack, on_stack, cycles = _edges(), {}, {}, [], set(), []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert cycles == []


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_imports_from_a_stage_above_it(module):
    mine = _layer(module)
    upward = [f"line {line}: {target} ({LAYERS[_layer(target)][0]})" for target, line, _ in _imports(MODULES[module])
              if _layer(target) > mine]
    assert upward == [], f"{module} ({LAYERS[mine][0]}) imports from a stage above it"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if not m.startswith(("lmlab.commands", "lmlab.cli"))))
def test_library_imports_are_at_the_top(module):
    lazy = [f"line {line}: {target}" for target, line, inside in _imports(MODULES[module]) if inside]
    assert lazy == [], f"{module}: lmlab imports inside functions (put them at the top of the file)"


def test_the_rule_sees_a_violation(tmp_path):
    """The checks above would fail on an upward, lazy import (guards against a test that cannot fail)."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from lmlab.tasks.sft import run_sft\n")
    (target, _, inside), = _imports(bad)
    assert target == "lmlab.tasks.sft" and inside and _layer(target) > _layer("lmlab.model")


def _unsafe_loads(path: Path) -> list[str]:
    """Calls that could run code from a file: torch.load without weights_only=True, yaml.load with a loader
    that is not a SafeLoader subclass (lmlab's own `_Loader` is one), pickle.load(s)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        owner = node.func.value.id if isinstance(node.func.value, ast.Name) else ""
        kwargs = {k.arg: k.value for k in node.keywords}
        if owner == "torch" and node.func.attr == "load":
            safe = isinstance(kwargs.get("weights_only"), ast.Constant) and kwargs["weights_only"].value is True
        elif owner == "yaml" and node.func.attr == "load":
            loader = kwargs.get("Loader")
            safe = isinstance(loader, ast.Name | ast.Attribute) and ast.unparse(loader) in ("_Loader", "yaml.SafeLoader")
        elif owner in ("pickle", "dill") and node.func.attr in ("load", "loads"):
            safe = False
        else:
            continue
        if not safe:
            out.append(f"line {node.lineno}: {ast.unparse(node)[:80]}")
    return out


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_code_runs_from_a_file(module):
    """Issue 16: no code runs from any pickle or YAML lmlab reads."""
    assert _unsafe_loads(MODULES[module]) == [], f"{module}: a load that can run code from the file"


def test_the_unsafe_load_rule_sees_one(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import torch, yaml\ntorch.load('x.pt')\nyaml.load(t, Loader=yaml.Loader)\n"
                   "torch.load('y.pt', weights_only=True)\n")
    assert len(_unsafe_loads(bad)) == 2
