"""The layout a reader meets (read with ast, nothing imported): the paper's five files at the top, the plumbing in
the `flow_cps` package, what produced results/ in `tools/`, and imports that point one way:

* sampling.py and grpo.py (the math) import nothing of the project;
* the package never imports train.py or tools/ (the algorithm and the measurements sit above it);
* no import cycle anywhere, the package included;
* project modules are imported at the top of each file, where a reader sees every dependency (a function-level
  import hides one, and hid the cycles this test forbids);
* every reference to a .md document names one the repository holds (or one a tool writes, declared below)."""
import ast
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
THE_PAPER = {"sampling", "grpo", "rewards", "train", "theory"}
# Each extra file at the top must be explained in the README's file table; none today.
EXTRA_AT_THE_TOP: set[str] = set()
FILES = {p: ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
         for p in [*ROOT.glob("*.py"), *ROOT.glob("flow_cps/*.py"), *ROOT.glob("tools/*.py")]}
MODULES = set(FILES.values())


def _targets(node) -> list[str]:
    """The project modules an import statement names: `import x`, `from pkg import mod`, `from pkg.mod import f`."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        names = [node.module or "", *(f"{node.module}.{a.name}" for a in node.names)]
    found = []
    for n in names:
        parts = n.split(".")
        match = next((".".join(parts[:k]) for k in range(len(parts), 0, -1) if ".".join(parts[:k]) in MODULES), None)
        if match and match not in ("flow_cps", "tools"):  # the packages' __init__ hold only docstrings
            found.append(match)
    return found


def _imports(path: Path) -> tuple[set[str], list[str]]:
    """(project modules imported anywhere in the file, 'function: module' for those imported inside a function)."""
    tree = ast.parse(path.read_text())
    deps, inner = set(), []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            deps.update(_targets(node))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            inner += [f"{node.name}: {m}" for sub in ast.walk(node) if isinstance(sub, (ast.Import, ast.ImportFrom))
                      for m in _targets(sub)]
    return deps - {FILES[path]}, inner


GRAPH = {m: _imports(p)[0] for p, m in FILES.items()}


def test_the_top_level_is_the_paper():
    top = {p.stem for p in ROOT.glob("*.py")}
    assert THE_PAPER <= top, f"missing at the top: {THE_PAPER - top}"
    assert top - THE_PAPER == EXTRA_AT_THE_TOP, f"at the top but not the paper: {top - THE_PAPER}; move them into " \
                                                "flow_cps/ (plumbing) or tools/ (what produces results/)"
    readme = (ROOT / "README.md").read_text()
    assert all(f"`{m}.py`" in readme for m in EXTRA_AT_THE_TOP)


def test_no_import_cycles():
    cycles, done = [], set()

    def visit(m, path):
        for d in sorted(GRAPH[m]):
            if d in path:
                cycles.append(path[path.index(d):] + [d])
            elif d not in done:
                visit(d, path + [d])
        done.add(m)
    for m in sorted(GRAPH):
        if m not in done:
            visit(m, [m])
    assert not cycles, f"import cycles: {cycles}"


def test_the_math_imports_no_project_module():
    assert GRAPH["sampling"] == set() and GRAPH["grpo"] == set()


def test_the_package_never_imports_the_algorithm_or_the_tools():
    up = {m: sorted(d for d in deps if d == "train" or d.startswith("tools."))
          for m, deps in GRAPH.items() if m.startswith("flow_cps.")}
    assert not {m: d for m, d in up.items() if d}


def test_project_imports_are_at_the_top_of_each_file():
    inner = {m: _imports(p)[1] for p, m in FILES.items()}
    assert not {m: v for m, v in inner.items() if v}, "project imports inside functions"


# .md files that tools write rather than the repository holding them, each with the file that writes it (the test
# checks that file names it, so an entry cannot outlive its tool).
WRITTEN_BY = {"results/gpu.md": "tools/gpu_check.py",  # the GPU check's report (its default --out)
              "X.md": "tools/gpu_check.py",  # the --out of its usage line
              "report.md": "tools/report.py",  # results/report.md, and the bench's report in another folder
              "gpu.md": "tests/test_gpu_check.py"}  # the GPU check's report in the test's temporary folder
MD_REFERENCE = re.compile(r"[\w./-]*\w\.md\b")


def _held() -> list[str]:
    """The repository's files, as git sees them: tracked, plus new ones not ignored."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    return [f for f in out.splitlines() if (ROOT / f).is_file()]


def test_every_md_reference_is_to_a_document_the_repository_holds():
    """No file points a reader to a document they cannot open (as the code once cited notes kept outside the
    repository): a reference resolves from the referring file's folder (a markdown link) or from the root."""
    held = set(_held())
    for name, tool in WRITTEN_BY.items():
        assert name in (ROOT / tool).read_text(), f"{tool} no longer writes {name}: drop it from WRITTEN_BY"
    dangling = []
    for f in sorted(held):
        if not f.endswith((".py", ".md", ".toml")):
            continue
        for ref in MD_REFERENCE.findall((ROOT / f).read_text()):
            ref = ref.removeprefix("./")
            near = (Path(f).parent / ref).as_posix()
            if ref not in held and near not in held and ref not in WRITTEN_BY:
                dangling.append(f"{f}: {ref}")
    assert not dangling, "references to .md files the repository does not hold: " + "; ".join(dangling)
