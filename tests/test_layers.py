"""The house in layers: imports only go down (import-linter's contract in pyproject.toml), no module imports
itself back through others, and an import inside a function only defers a heavy library, saying so."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint_imports(tree: Path) -> subprocess.CompletedProcess:
    """import-linter on the `ldm` package found in `tree`, with the contract of `tree/pyproject.toml`."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=tree, env=env, capture_output=True, text=True)


def test_the_package_keeps_the_layers_contract():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


def test_an_upward_import_breaks_the_contract(tmp_path):
    shutil.copytree(ROOT / "ldm", tmp_path / "ldm", ignore=shutil.ignore_patterns("__pycache__", "*.safetensors"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    with open(tmp_path / "ldm" / "utils" / "files.py", "a") as handle:
        handle.write("\nimport ldm.commands.train  # noqa: E402,F401\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0
    assert "ldm.utils is not allowed to import ldm.commands" in result.stdout
    assert "ldm.utils.files -> ldm.commands.train" in result.stdout


def import_cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """The groups of modules that import one another in a circle (Tarjan's strongly connected components)."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in graph.find_modules_directly_imported_by(module):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            group = []
            while not group or group[-1] != module:
                group.append(stack.pop())
                on_stack.discard(group[-1])
            if len(group) > 1:
                cycles.append(sorted(group))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return cycles


def test_no_import_cycle_between_modules():
    graph = grimp.build_graph("ldm")
    assert len(graph.modules) > 100
    assert import_cycles(graph) == []


def test_the_cycle_finder_finds_a_planted_circle():
    graph = grimp.ImportGraph()
    for name in ("p", "p.a", "p.b", "p.c"):
        graph.add_module(name)
    graph.add_import(importer="p.a", imported="p.b")
    graph.add_import(importer="p.b", imported="p.c")
    assert import_cycles(graph) == []
    graph.add_import(importer="p.c", imported="p.a")
    assert import_cycles(graph) == [["p.a", "p.b", "p.c"]]


def imports_inside_functions(path: Path) -> list[tuple[int, str]]:
    lines = path.read_text().splitlines()
    found = []
    for function in ast.walk(ast.parse("\n".join(lines))):
        if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            found += [(node.lineno, lines[node.lineno - 1].strip()) for node in ast.walk(function)
                      if isinstance(node, (ast.Import, ast.ImportFrom))]
    return sorted(set(found))


def test_an_import_inside_a_function_only_defers_a_heavy_library_and_says_so():
    """Every such import carries its reason on its line or the line above (`deferred: ...`)."""
    unexplained = []
    for path in sorted((ROOT / "ldm").rglob("*.py")):
        lines = path.read_text().splitlines()
        for number, line in imports_inside_functions(path):
            above = lines[number - 2].strip()
            if "deferred" not in line and not above.startswith("# deferred"):
                unexplained.append(f"{path.relative_to(ROOT)}:{number}: {line}")
    assert not unexplained, "\n".join(unexplained)
