"""The package's structure stays what docs/architecture.md describes: the layers of its module
map, read from that page (no module imports from a layer above its own, every module is in a
layer), no import cycle, no cgc import inside a function, no chain of imports longer than 7
modules, no function longer than 70 lines or with more than 12 parameters, command lines only
through the settings machinery, README's layout naming every module, and the top-level kernels/
folder shadowing no installed package."""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "cgc"
MAX_LINES = 70
MAX_PARAMETERS = 12
MAX_CHAIN = 7
#: the compiled extension setup.py builds: a submodule of the package, not one of its modules
COMPILED = {"cgc._C"}


def modules() -> dict[str, Path]:
    """``{dotted name: file}`` of every module of the package (the kernels live in kernels/)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.with_suffix("").relative_to(ROOT).parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(name: str, path: Path, known: dict[str, Path], nodes) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                child = f"{module}.{alias.name}"
                if child in known:
                    found.add(child)
                elif child not in COMPILED:
                    found.add(module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m in known and m != name}


def imported(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package's modules that module ``name`` imports, wherever the import statement is
    (a compiled extension, ``cgc._C``, is no module of the package)."""
    return _imports(name, path, known, ast.walk(ast.parse(path.read_text())))


def graph() -> dict[str, set[str]]:
    """Every module's imports of the package's modules; a package's ``__init__`` importing its
    own submodules is left out (it gathers them; it does not depend on them)."""
    known = modules()
    edges = {name: imported(name, path, known) for name, path in known.items()}
    return {
        name: {m for m in found if not (known[name].name == "__init__.py" and m.startswith(name + "."))}
        for name, found in edges.items()
    }


def layers() -> dict[str, int]:
    """``{module: layer}`` from docs/architecture.md's module map, 0 the lowest: each row names
    its modules in backticks, a folder (``models/``) for every module in it."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    table = text[text.index("## The module map") :].split("\n## ")[0]
    rows = [line.split("|")[2] for line in table.splitlines() if line.startswith("| ") and "`" in line.split("|")[2]]
    known = modules()
    found = {}
    for level, cell in enumerate(reversed(rows)):
        for item in re.findall(r"`([^`]+)`", cell):
            if item.endswith("/"):
                prefix = "cgc." + item.rstrip("/").replace("/", ".")
                found.update({m: level for m in known if m == prefix or m.startswith(prefix + ".")})
            elif item.endswith(".py"):
                stem = item.removesuffix(".py").replace("/", ".")
                found["cgc" if stem == "__init__" else f"cgc.{stem}"] = level
    return found


def test_every_module_is_in_a_layer_and_imports_only_downwards():
    where = layers()
    known = modules()
    assert not sorted(set(known) - set(where)), "name these modules in docs/architecture.md's module map"
    upward = [
        f"{name} ({where[name]}) imports {m} ({where[m]})"
        for name, found in graph().items()
        for m in sorted(found)
        if where[m] > where[name]
    ]
    assert not upward, "imports from a layer above (move the code down, or the module up):\n" + "\n".join(upward)


def test_no_cgc_import_inside_a_function():
    known = modules()
    inside = []
    for name, path in known.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                nodes = [n for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))]
                if _imports(name, path, known, nodes):
                    inside.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    assert not inside, "import cgc's modules at the top of the module:\n" + "\n".join(inside)


def longest_chain(edges: dict[str, set[str]]) -> list[str]:
    """The longest path of imports (an acyclic graph)."""

    @functools.cache
    def from_(v: str) -> tuple[str, ...]:
        return max(((v, *from_(w)) for w in edges[v]), key=len, default=(v,))

    return list(max((from_(v) for v in edges), key=len))


def test_no_chain_of_imports_is_longer_than_seven():
    chain = longest_chain(graph())
    assert len(chain) <= MAX_CHAIN, " > ".join(chain)
    assert longest_chain({"a": {"b"}, "b": {"c"}, "c": set(), "d": {"c"}}) == ["a", "b", "c"]


def test_no_function_takes_more_than_twelve_parameters():
    """A public entry point with more takes a settings object (and keyword overrides)."""
    many = []
    for path in modules().values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                names = [x.arg for x in (*a.posonlyargs, *a.args, *a.kwonlyargs)] + [
                    x.arg for x in (a.vararg, a.kwarg) if x is not None
                ]
                count = len([n for n in names if n not in ("self", "cls")])
                if count > MAX_PARAMETERS:
                    many.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({count})")
    assert not many, "\n".join(many)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle():
    known = modules()
    edges = {name: imported(name, path, known) for name, path in known.items()}
    assert edges["cgc.train"] >= {"cgc.engine", "cgc.train_config"}  # the graph sees imports at all
    assert cycles(edges) == []


def test_the_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_function_longer_than_70_lines():
    long = []
    for path in modules().values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "split these into functions of one job:\n" + "\n".join(long)


def test_command_lines_come_from_the_settings():
    """argparse appears only in the settings machinery and the shared CLI helpers."""
    allowed = {"settings.py", "cli.py"}
    found = [
        str(path.relative_to(ROOT))
        for path in modules().values()
        if path.name not in allowed and re.search(r"^\s*(import argparse|from argparse )", path.read_text(), re.M)
    ]
    assert not found, f"write these command lines as Settings classes (cgc/settings.py): {found}"


def test_readme_layout_names_every_module():
    text = (ROOT / "README.md").read_text()
    layout = text[text.index("## Layout") :]
    missing = [
        name
        for name, path in modules().items()
        if name.count(".") == 1 and path.name != "__init__.py" and f"{path.stem}.py" not in layout
    ]
    assert not missing, f"README's layout section does not name: {missing}"


def test_the_kernels_folder_does_not_shadow_an_installed_kernels_package():
    """From the repository's root (where ``python -m`` and pytest run), ``import kernels`` is the
    installed ``kernels`` distribution (Hugging Face's, which transformers imports), not this
    repository's kernels/ folder; ``cgc.kernels`` is still the folder."""
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the 'kernels' distribution is not installed (transformers >= 5 installs it)")
    code = "import kernels, cgc.kernels.common as c; print(kernels.__file__); print(c.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    theirs, ours = out.splitlines()
    assert not theirs.startswith(str(ROOT / "kernels")) and ours.startswith(str(ROOT / "kernels"))
