"""The modules of fd_onestep import each other without a cycle.

The graph is read from the source (``ast``), not by importing: every ``import x`` / ``from x import y``
(absolute or relative) at module level, in classes and inside functions counts; imports under
``if TYPE_CHECKING:`` do not (they never run). An import names the module it loads: ``from p import m``
is an edge to the submodule ``p.m`` when there is one, else to ``p``; the implicit imports of parent
packages are not edges (a package's ``__init__`` importing its submodules, which import each other by
full name, is not a cycle). The packages and where their sources live come from pyproject.toml's
``[tool.setuptools] package-dir`` (``fd_onestep.pipelines`` is the repository's ``pipelines/``), and
every ``.py`` file below those folders is a module, so new subpackages are picked up as they come.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - pytest itself depends on tomli before Python 3.11
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "fd_onestep"


def package_roots(repo: Path) -> dict[str, Path]:
    """``{package name: source folder}`` from pyproject.toml's ``[tool.setuptools] package-dir``."""
    config = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]
    return {name: repo / folder for name, folder in config.get("package-dir", {}).items() if name}


def module_files(roots: dict[str, Path]) -> dict[str, Path]:
    """``{dotted module name: file}`` for every ``.py`` file below each root (``__init__.py`` = the package)."""
    modules = {}
    for package, folder in roots.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if "__pycache__" in parts:
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([package, *parts])] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(node: ast.AST, type_checking: bool):
    """Every Import/ImportFrom below ``node``; those under ``if TYPE_CHECKING:`` only if ``type_checking``."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child
        if isinstance(child, ast.If) and _is_type_checking(child.test) and not type_checking:
            for other in child.orelse:
                yield from _imports(ast.Module(body=[other], type_ignores=[]), type_checking)
            continue
        yield from _imports(child, type_checking)


def import_graph(modules: dict[str, Path], *, type_checking: bool = False) -> dict[str, set[str]]:
    """``{module: modules of the graph it imports}`` (see the module docstring for what counts).

    ``type_checking=True`` also counts the imports under ``if TYPE_CHECKING:``.
    """
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        targets: set[str] = set()
        for node in _imports(ast.parse(path.read_text(), filename=str(path)), type_checking):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
                continue
            if node.level:
                package = name if is_package else name.rpartition(".")[0]
                base_parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                targets.add(submodule if submodule in modules else base)
        graph[name] = {t for t in targets if t in modules}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle ``[a, b, ..., a]`` per strongly connected component that has one (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)

    cycles = []
    for component in components:
        start = min(component)
        # breadth-first within the component: the shortest path from start back to start
        paths = {start: [start]}
        frontier = [start]
        cycle = None
        while frontier and cycle is None:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v] & component):
                    if w == start:
                        cycle = paths[v] + [start]
                        break
                    if w not in paths:
                        paths[w] = paths[v] + [w]
                        nxt.append(w)
                if cycle:
                    break
            frontier = nxt
        cycles.append(cycle)
    return cycles


def test_fd_onestep_has_no_import_cycle():
    modules = module_files(package_roots(ROOT))
    assert f"{PACKAGE}.frechet" in modules and f"{PACKAGE}.pipelines.pipeline_fd_onestep" in modules
    graph = import_graph(modules)
    assert f"{PACKAGE}.moments" in graph[f"{PACKAGE}.reference_stats"]  # the graph does see imports
    cycles = find_cycles(graph)
    assert not cycles, "import cycles among fd_onestep modules:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_frechet_does_not_import_reference_stats_not_even_for_type_checking():
    # the FD math is below the reference statistics: ReferenceStats calls frechet, never the reverse
    modules = module_files(package_roots(ROOT))
    assert f"{PACKAGE}.reference_stats" not in import_graph(modules, type_checking=True)[f"{PACKAGE}.frechet"]


def test_the_checker_finds_cycles_through_every_kind_of_import(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "a.py": "import os\nfrom pkg.b import thing\n",
        "b.py": "def f():\n    from .sub import c\n",  # function-level, relative, submodule by name
        "sub/__init__.py": "from .c import x\n",
        "sub/c.py": "from ..a import y\n",  # relative, two levels: closes a -> b -> sub.c -> a
        "d.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.e import z\nelse:\n    z = 1\n",
        "e.py": "import pkg.d\n",  # d -> e only under TYPE_CHECKING: no cycle
    }
    for rel, text in files.items():
        (pkg / rel).write_text(text)
    modules = module_files({"pkg": pkg})
    assert set(modules) == {"pkg", "pkg.a", "pkg.b", "pkg.sub", "pkg.sub.c", "pkg.d", "pkg.e"}
    graph = import_graph(modules)
    assert graph["pkg.a"] == {"pkg.b"} and graph["pkg.b"] == {"pkg.sub.c"} and graph["pkg.sub.c"] == {"pkg.a"}
    assert graph["pkg.sub"] == {"pkg.sub.c"} and graph["pkg.d"] == set() and graph["pkg.e"] == {"pkg.d"}
    assert find_cycles(graph) == [["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"]]
    with_type_checking = import_graph(modules, type_checking=True)
    assert with_type_checking["pkg.d"] == {"pkg.e"}
    assert sorted(map(tuple, find_cycles(with_type_checking))) == [
        ("pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"), ("pkg.d", "pkg.e", "pkg.d")]


DEMOS = f"{PACKAGE}.demos"


def test_the_library_never_imports_a_demo():
    # the demos (fd_onestep.demos.*: bundled models, data, recipes) sit on the library, never under it
    modules = module_files(package_roots(ROOT))
    demo_modules = {name for name in modules if name == DEMOS or name.startswith(DEMOS + ".")}
    assert f"{DEMOS}.digits" in demo_modules and f"{DEMOS}.digits.baselines" in demo_modules
    graph = import_graph(modules, type_checking=True)
    leaning = {name: sorted(graph[name] & demo_modules) for name in modules if name not in demo_modules}
    leaning = {name: demos for name, demos in leaning.items() if demos}
    assert not leaning, f"library modules import a demo: {leaning}"


# where a module may import a demo: the demos themselves, the tests and the benchmarks
MAY_IMPORT_A_DEMO = (f"{PACKAGE}/demos", "tests", "benchmarks")
NOT_SOURCE = ("build", "dist", "venv", "site-packages", "__pycache__")


def imported_names(path: Path, module: str | None = None) -> set[str]:
    """Every module name a file's imports reach (all levels, ``TYPE_CHECKING`` included): ``import a.b`` gives
    ``a.b``; ``from a import b`` gives ``a`` and ``a.b``; relative imports are resolved when ``module`` (the file's
    dotted name) is given."""
    names: set[str] = set()
    for node in _imports(ast.parse(path.read_text(), filename=str(path)), True):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
            continue
        base = node.module or ""
        if node.level:
            if module is None:
                continue  # a relative import in a script: not the package's
            package = module if path.name == "__init__.py" else module.rpartition(".")[0]
            parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
            base = ".".join(parts + ([node.module] if node.module else []))
        names.add(base)
        names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def demo_importers(repo: Path) -> dict[str, list[str]]:
    """``{file: demo modules it imports}`` for every ``.py`` file of ``repo`` outside ``MAY_IMPORT_A_DEMO``
    (the package, pipelines/, train_scripts/, the top level, any new folder) that imports a demo."""
    dotted = {path.resolve(): name for name, path in module_files(package_roots(repo)).items()}
    found = {}
    for path in sorted(repo.rglob("*.py")):
        rel = path.relative_to(repo)
        if any(part.startswith(".") or part in NOT_SOURCE or part.endswith(".egg-info") for part in rel.parts):
            continue
        if any(rel.as_posix() == top or rel.as_posix().startswith(top + "/") for top in MAY_IMPORT_A_DEMO):
            continue
        demos = sorted(n for n in imported_names(path, dotted.get(path.resolve()))
                       if n == DEMOS or n.startswith(DEMOS + "."))
        if demos:
            found[rel.as_posix()] = demos
    return found


def test_no_module_outside_the_demos_tests_and_benchmarks_imports_a_demo():
    # train_scripts/ and pipelines/ included: the digits assets' builders live in the demo
    # (python -m fd_onestep.demos.digits.train_*), the general tools take their data through arguments
    assert (ROOT / "train_scripts" / "train_tiny_decoder.py").is_file()
    leaning = demo_importers(ROOT)
    assert not leaning, f"modules outside {MAY_IMPORT_A_DEMO} import a demo: {leaning}"


def test_the_demo_import_check_sees_scripts_and_every_import_form(tmp_path):
    (tmp_path / "pyproject.toml").write_text('[tool.setuptools]\npackage-dir = { "fd_onestep" = "fd_onestep" }\n')
    files = {
        "fd_onestep/__init__.py": "",
        "fd_onestep/lib.py": "def f():\n    from .demos import digits\n",  # relative, in a function
        "fd_onestep/ok.py": "from . import frechet\n",
        "fd_onestep/demos/__init__.py": "",
        "fd_onestep/demos/digits/__init__.py": "from fd_onestep import lib\n",  # a demo may import the library
        "train_scripts/a.py": "from fd_onestep.demos.digits import X\n",
        "train_scripts/b.py": "from fd_onestep import demos\n",
        "train_scripts/c.py": "import fd_onestep.demos.digits.hooks as h\n",
        "train_scripts/ok.py": "import fd_onestep\nfrom fd_onestep.training import demos_hooks\n",
        "pipelines/p.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from fd_onestep.demos import digits\n",
        "top.py": "import fd_onestep.demos\n",
        "tests/t.py": "from fd_onestep.demos import digits\n",
        "benchmarks/bm.py": "from fd_onestep.demos import digits\n",
        ".venv/x.py": "from fd_onestep.demos import digits\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    assert set(demo_importers(tmp_path)) == {
        "fd_onestep/lib.py", "train_scripts/a.py", "train_scripts/b.py", "train_scripts/c.py", "pipelines/p.py",
        "top.py"}


def test_the_training_script_reaches_a_demo_only_through_its_config():
    # the trainer imports no demo module: a demo's config names its hooks, imported by name at run time
    script = ROOT / "train_scripts" / "train_fd_onestep.py"
    imported = set()
    for node in _imports(ast.parse(script.read_text()), True):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
        imported.update(names)
    assert imported and not [name for name in imported if name == DEMOS or name.startswith(DEMOS + ".")]
