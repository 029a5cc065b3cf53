"""The package's shape, read from the source with ``ast`` (nothing of ctexp is imported).

* Layers, lowest first: the root modules of ``ctexp/`` (errors, records, config, locking, home), then
  ``data`` < ``lens`` < ``model`` < ``analysis`` < ``registry`` < ``experiment`` < ``sweep`` < ``notebook``
  < ``cli``.
  A module imports only from its own layer or lower ones; imports inside functions and under
  ``TYPE_CHECKING`` count too.
* No import cycles between modules.
* No package directory holds more than ``MAX_MODULES`` modules (``__init__`` and ``__main__`` aside).
* No module is longer than ``MAX_LINES`` lines unless its docstring has a line starting with
  ``Long because:`` that says why.

The last tests run the same checks on a small tree written to a temporary directory, so that each rule
is seen to fail.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ctexp"
# "": ctexp/*.py; notebook (the notebook API) reads runs as the CLI does, beside it and below it
LAYERS = ("", "data", "lens", "model", "analysis", "tinycodi", "registry", "experiment", "sweep", "notebook", "cli")
MAX_MODULES = 10
MAX_LINES = 500
LONG_BECAUSE = "Long because:"

# Known exceptions: none left. An entry here must say why; one that no longer applies fails the test.
PENDING_UPWARD_IMPORTS: frozenset[tuple[str, str]] = frozenset()
PENDING_LONG_MODULES: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    line: int


def module_name(path: Path, root: Path) -> str:
    """``ctexp/sweep/study.py`` -> ``ctexp.sweep.study``; a package's ``__init__.py`` is the package."""
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(root: Path) -> dict[str, Path]:
    return {module_name(path, root): path for path in sorted(root.rglob("*.py"))}


def layer(module: str, root: Path) -> int:
    """The layer of a module: its first package below the root, or the root's own modules."""
    parts = module.split(".")
    package = parts[1] if len(parts) > 2 or (len(parts) == 2 and (root / parts[1]).is_dir()) else ""
    if package not in LAYERS:
        raise AssertionError(f"{module}: package {package!r} has no layer; add it to LAYERS in {Path(__file__).name}")
    return LAYERS.index(package)


def imports(root: Path) -> Iterator[Import]:
    """Every import of one of the package's modules, anywhere in a module (functions included).

    ``from ctexp.sweep import study`` imports the module ``ctexp.sweep.study``; ``from ctexp.sweep.study
    import run_sweep`` imports ``ctexp.sweep.study``. Relative imports are resolved.
    """
    known = modules(root)
    for name, path in known.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                    base = ".".join([*anchor, *([base] if base else [])])
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
            else:
                continue
            for target in dict.fromkeys(targets):
                if target in known and target != name:
                    yield Import(name, target, node.lineno)


def upward_imports(root: Path) -> dict[tuple[str, str], int]:
    """(importer, imported) pairs that cross a layer upwards, with the line of the first such import."""
    found: dict[tuple[str, str], int] = {}
    for one in imports(root):
        if layer(one.imported, root) > layer(one.importer, root):
            found.setdefault((one.importer, one.imported), one.line)
    return found


def cycles(root: Path) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    graph: dict[str, set[str]] = {name: set() for name in modules(root)}
    for found in imports(root):
        graph[found.importer].add(found.imported)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found_cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph[node]):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found_cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found_cycles


def crowded_packages(root: Path) -> dict[str, int]:
    """Package directories holding more than MAX_MODULES modules, with their counts."""
    counts = {}
    for directory in [root, *sorted(p for p in root.rglob("*") if p.is_dir() and (p / "__init__.py").is_file())]:
        n = sum(1 for p in directory.glob("*.py") if p.name not in ("__init__.py", "__main__.py"))
        if n > MAX_MODULES:
            counts[module_name(directory / "__init__.py", root)] = n
    return counts


def long_modules(root: Path) -> dict[str, int]:
    """Modules over MAX_LINES lines whose docstring has no line starting with ``Long because:``."""
    found = {}
    for name, path in modules(root).items():
        text = path.read_text(encoding="utf-8")
        n = len(text.splitlines())
        docstring = ast.get_docstring(ast.parse(text, str(path))) or ""
        if n > MAX_LINES and not any(line.strip().startswith(LONG_BECAUSE) for line in docstring.splitlines()):
            found[name] = n
    return found


# ---------------------------------------------------------------------------------------------------------
# The package


def test_no_module_imports_from_a_higher_layer() -> None:
    found = upward_imports(PACKAGE)
    new = sorted(set(found) - PENDING_UPWARD_IMPORTS)
    assert not new, (
        "imports from a higher layer (layers, lowest first: root, " + " < ".join(LAYERS[1:]) + "):\n"
        + "\n".join(f"  {importer} (line {found[importer, imported]}) imports {imported}" for importer, imported in new)
    )
    stale = sorted(PENDING_UPWARD_IMPORTS - set(found))
    assert not stale, f"no longer imported upwards, remove from PENDING_UPWARD_IMPORTS: {stale}"


def test_no_import_cycles() -> None:
    found = cycles(PACKAGE)
    assert not found, "modules that import each other, directly or around a loop:\n" + "\n".join(
        "  " + ", ".join(cycle) for cycle in found
    )


def test_no_package_holds_more_than_ten_modules() -> None:
    assert crowded_packages(PACKAGE) == {}


def test_no_module_is_long_without_saying_why() -> None:
    found = long_modules(PACKAGE)
    new = {name: n for name, n in found.items() if name not in PENDING_LONG_MODULES}
    assert not new, (
        f"modules over {MAX_LINES} lines: split them by concern, or say why in a docstring line "
        f"starting with {LONG_BECAUSE!r}: {new}"
    )
    stale = sorted(PENDING_LONG_MODULES - set(found))
    assert not stale, f"no longer long (or they say why), remove from PENDING_LONG_MODULES: {stale}"


def test_every_package_has_a_layer() -> None:
    for name in modules(PACKAGE):
        layer(name, PACKAGE)  # raises for a package missing from LAYERS


# ---------------------------------------------------------------------------------------------------------
# The checks themselves, on a small tree that breaks each rule


def write(root: Path, files: dict[str, str]) -> Path:
    for relative, text in files.items():
        path = root / "ctexp" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root / "ctexp"


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return write(tmp_path, {
        "__init__.py": "",
        "errors.py": '"""Errors."""\n',
        "data/__init__.py": "",
        "data/store.py": "from ctexp.errors import *\n",
        "lens/__init__.py": "",
        "lens/head.py": "from ctexp.data import store\nfrom . import train\n",
        "lens/train.py": "import ctexp.lens.head\n",
        "cli/__init__.py": "",
        "cli/run.py": "from ctexp.lens.train import x\n",
    })


def test_an_upward_import_is_found_even_inside_a_function(tree: Path) -> None:
    assert upward_imports(tree) == {}
    write(tree.parent, {"data/align.py": "def f():\n    from ctexp.cli import run\n"})
    assert upward_imports(tree) == {("ctexp.data.align", "ctexp.cli.run"): 2}


def test_a_cycle_is_found_through_relative_and_plain_imports(tree: Path) -> None:
    assert cycles(tree) == [["ctexp.lens.head", "ctexp.lens.train"]]


def test_a_crowded_package_is_found(tree: Path) -> None:
    assert crowded_packages(tree) == {}
    write(tree.parent, {f"data/m{i}.py": "" for i in range(MAX_MODULES)})  # with store.py: one too many
    assert crowded_packages(tree) == {"ctexp.data": MAX_MODULES + 1}


def test_a_long_module_needs_a_reason(tree: Path) -> None:
    body = "x = 1\n" * MAX_LINES
    write(tree.parent, {"data/long.py": '"""Long."""\n' + body,
                        "data/explained.py": '"""Long.\n\nLong because: one table of constants.\n"""\n' + body})
    assert long_modules(tree) == {"ctexp.data.long": MAX_LINES + 1}


def test_a_package_without_a_layer_is_refused(tree: Path) -> None:
    write(tree.parent, {"plugins/__init__.py": "", "plugins/extra.py": ""})
    with pytest.raises(AssertionError, match="'plugins' has no layer"):
        layer("ctexp.plugins.extra", tree)
