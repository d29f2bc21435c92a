"""The layout stays flat (read with ast, nothing imported): no import cycle among the top-level modules, the math
(sampling.py, grpo.py) imports no project module, and project modules are imported at the top of each file, where a
reader sees every dependency (a function-level import hides one, and hid the cycles this test now forbids)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULES = {p.stem: p for p in ROOT.glob("*.py")}


def _imports(path: Path) -> tuple[set[str], list[str]]:
    """(project modules imported anywhere in the file, 'function: module' for those imported inside a function)."""
    tree = ast.parse(path.read_text())
    deps, inner = set(), []

    def names(node) -> list[str]:
        found = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
        return [n.split(".")[0] for n in found if n.split(".")[0] in MODULES and n.split(".")[0] != path.stem]
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            deps.update(names(node))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            inner += [f"{node.name}: {n}" for sub in ast.walk(node) if isinstance(sub, (ast.Import, ast.ImportFrom))
                      for n in names(sub)]
    return deps, inner


GRAPH = {m: _imports(p)[0] for m, p in MODULES.items()}


def test_no_import_cycles():
    cycles = []

    def visit(m, path):
        for d in sorted(GRAPH[m]):
            if d in path:
                cycles.append(path[path.index(d):] + [d])
            elif d not in done:
                visit(d, path + [d])
        done.add(m)
    done: set[str] = set()
    for m in sorted(GRAPH):
        if m not in done:
            visit(m, [m])
    assert not cycles, f"import cycles: {cycles}"


def test_the_math_imports_no_project_module():
    assert GRAPH["sampling"] == set() and GRAPH["grpo"] == set()


def test_project_imports_are_at_the_top_of_each_file():
    inner = {m: _imports(p)[1] for m, p in MODULES.items()}
    assert not {m: v for m, v in inner.items() if v}, "project imports inside functions"
