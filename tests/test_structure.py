"""The shape of the code, checked: no import cycle in the package, short functions, a short
loop, no environment variable that exists only for tests."""

import ast
import re
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "nanogpt"
COMMANDS = [ROOT / "train.py", ROOT / "sample.py", ROOT / "bench.py"]
SOURCES = sorted(PACKAGE.glob("*.py")) + COMMANDS


def imported_modules(path: Path) -> set[str]:
    """Every nanogpt module a file imports, at the top or inside a function (lazy imports count)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}  # from nanogpt import distributed
    return {m for m in found if m.startswith("nanogpt.") and (PACKAGE / f"{m.split('.')[1]}.py").exists()
            and m.count(".") == 1}


def test_the_package_has_no_import_cycle():
    graph = {f"nanogpt.{p.stem}": imported_modules(p) - {f"nanogpt.{p.stem}"} for p in PACKAGE.glob("*.py")}
    done, path = set(), []

    def visit(module: str) -> None:
        if module in path:
            cycle = path[path.index(module):] + [module]
            raise AssertionError("import cycle: " + " -> ".join(cycle))
        if module in done:
            return
        path.append(module)
        for dep in sorted(graph.get(module, ())):
            visit(dep)
        path.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)


def test_the_cycle_check_sees_lazy_imports(tmp_path):
    (tmp_path / "m.py").write_text("def f():\n    from nanogpt.model import GPT\n    from nanogpt import config\n")
    assert imported_modules(tmp_path / "m.py") == {"nanogpt.model", "nanogpt.config"}


def functions(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def test_no_function_is_longer_than_80_lines():
    long = [f"{p.relative_to(ROOT)}:{f.lineno} {f.name} ({f.end_lineno - f.lineno + 1} lines)"
            for p in SOURCES for f in functions(p) if f.end_lineno - f.lineno + 1 > 80]
    assert not long, long


def test_the_training_loop_is_at_most_60_lines():
    tree = ast.parse((PACKAGE / "trainer.py").read_text())
    loops = [n for n in ast.walk(tree) if isinstance(n, ast.For) and isinstance(n.target, ast.Name) and n.target.id == "it"]
    assert len(loops) == 1
    assert loops[0].end_lineno - loops[0].lineno + 1 <= 60


def test_every_environment_variable_of_ours_is_documented():
    """Production code reads no variable that exists only for tests: each NANOGPT_* one it reads
    is one a user may set, so the README or docs/ say what it does."""
    docs = (ROOT / "README.md").read_text() + "".join(p.read_text() for p in (ROOT / "docs").glob("*.md"))
    read = {name for p in SOURCES for name in re.findall(r"\b(NANOGPT_[A-Z0-9_]+)", p.read_text())}
    assert not [name for name in read if name not in docs], read
