"""Import structure of the package: no cycles between its subpackages, and a torch-free runtime.

Every ``import`` and ``from ... import`` in every file under ``edgepeft/`` counts, those inside
function bodies included (a lazy import is still a dependency), relative imports resolved. A
subpackage (``edgepeft/export/``) is one node of the graph; so is each top-level module
(``edgepeft/cli.py`` -> ``cli``) and the package's own ``__init__.py`` (``edgepeft``).
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "edgepeft"
TORCH_FREE = ("runtime", "contract", "serve")  # subpackages that must run without torch (numpy + onnxruntime)
HEAVY = ("torch", "transformers", "peft")


@dataclass(frozen=True)
class Import:
    """One module named by an import statement: ``target`` (absolute, dotted) at ``file:line``."""

    file: str
    line: int
    target: str

    def __post_init__(self):
        if not self.target or self.target.startswith("."):
            raise ValueError(f"{self.file}:{self.line}: target {self.target!r} is not an absolute module name")

    def __str__(self) -> str:
        return f"{self.file}:{self.line} ({self.target})"


def module_name(path: Path, root: Path) -> str:
    """The dotted module name of ``path`` under ``root`` (``edgepeft/export/__init__.py`` -> ``edgepeft.export``)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules(root: Path, package: str = PACKAGE) -> dict[str, Path]:
    """Every module of ``package`` (a folder under ``root``): dotted name -> file."""
    return {module_name(p, root): p for p in sorted((root / package).rglob("*.py"))}


def _resolve_from(node: ast.ImportFrom, module: str, is_package: bool, where: str) -> str:
    """The absolute module a ``from ... import`` names (``from ..export import x`` in ``edgepeft.kinds.prefix``
    -> ``edgepeft.export``)."""
    if node.level == 0:
        return node.module
    package = module.split(".") if is_package else module.split(".")[:-1]
    if node.level - 1 >= len(package):
        raise ValueError(f"{where}: relative import beyond the top-level package")
    base = package[:len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(path: Path, root: Path, modules: Iterable[str]) -> list[Import]:
    """Every module the file at ``path`` imports, anywhere in it. ``from M import a`` names
    ``M.a`` when that is one of ``modules`` (a submodule), else ``M``."""
    modules = set(modules)
    module, rel = module_name(path, root), path.relative_to(root).as_posix()
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [Import(rel, node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_from(node, module, is_package, f"{rel}:{node.lineno}")
            subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules]
            names_other = len(subs) < len(node.names)  # some names are attributes of base itself
            found += [Import(rel, node.lineno, t) for t in subs + ([base] if names_other else [])]
    return sorted(found, key=lambda i: (i.line, i.target))


def node_of(module: str, package: str = PACKAGE) -> str | None:
    """The graph node of a module: its subpackage or top-level module under ``package`` (``edgepeft.export.base``
    -> ``export``, ``edgepeft.cli`` -> ``cli``), ``package`` for the package itself, None outside it."""
    parts = module.split(".")
    if parts[0] != package:
        return None
    return parts[1] if len(parts) > 1 else package


def import_graph(root: Path = ROOT, package: str = PACKAGE) -> dict[str, dict[str, Import]]:
    """Node -> {node it imports: the first such import (file:line)}, edges within a node left out."""
    modules = package_modules(root, package)
    graph: dict[str, dict[str, Import]] = {}
    for module, path in modules.items():
        src = node_of(module, package)
        edges = graph.setdefault(src, {})
        for imp in imports_of(path, root, modules):
            dst = node_of(imp.target, package)
            if dst is not None and dst != src:
                edges.setdefault(dst, imp)
    return graph


def simple_cycles(graph: Mapping[str, Iterable[str]]) -> list[tuple[str, ...]]:
    """Every elementary cycle of a directed graph, each once: it starts at its smallest node
    (``("kinds", "export")`` is kinds -> export -> kinds). Sorted; fine for tens of nodes."""
    cycles = []

    def walk(start: str, path: list[str]) -> None:
        for nxt in sorted(graph.get(path[-1], ())):
            if nxt == start:
                cycles.append(tuple(path))
            elif nxt > start and nxt not in path:
                walk(start, path + [nxt])

    for start in sorted(set(graph) | {n for targets in graph.values() for n in targets}):
        walk(start, [start])
    return sorted(cycles)


def describe_cycle(cycle: tuple[str, ...], graph: Mapping[str, Mapping[str, Import]]) -> str:
    """``a -> b -> a`` and, per edge, one import that makes it (file:line)."""
    hops = list(zip(cycle, cycle[1:] + cycle[:1]))
    lines = [" -> ".join(cycle + cycle[:1])]
    lines += [f"    {a} -> {b}: {graph[a][b]}" for a, b in hops]
    return "\n".join(lines)


def heavy_imports(files: Iterable[Path], root: Path = ROOT) -> list[Import]:
    """The imports of torch, transformers or peft (or a submodule of one) in ``files``."""
    modules = package_modules(root)
    return [imp for path in files for imp in imports_of(path, root, modules)
            if imp.target.split(".")[0] in HEAVY]


def files_loaded_by(start: Iterable[str], root: Path = ROOT, package: str = PACKAGE) -> dict[str, list[str]]:
    """Every package module that importing the modules ``start`` can run (their imports followed,
    lazy ones included; importing ``a.b.c`` runs ``a/__init__``, ``a/b/__init__`` and ``a/b/c``),
    each with the chain of modules that leads to it."""
    modules = package_modules(root, package)
    chains = {m: [m] for m in start}
    todo = list(chains)
    while todo:
        module = todo.pop()
        for imp in imports_of(modules[module], root, modules):
            parts = imp.target.split(".")
            for k in range(1, len(parts) + 1):
                dep = ".".join(parts[:k])
                if dep in modules and dep not in chains:
                    chains[dep] = chains[module] + [dep]
                    todo.append(dep)
    return chains


def heavy_leaks(sub: str, root: Path = ROOT, package: str = PACKAGE) -> list[str]:
    """How subpackage ``sub`` imports torch, transformers or peft: each such import in its own
    files, then the first one of each other package module its files load, with the chain."""
    modules = package_modules(root, package)
    own = [m for m in modules if node_of(m, package) == sub]
    leaks = [str(imp) for m in own for imp in heavy_imports([modules[m]], root)]
    chains = files_loaded_by(own, root, package)
    for m in sorted(set(chains) - set(own)):
        found = heavy_imports([modules[m]], root)
        if found:
            leaks.append(f"{found[0]}, loaded via {' -> '.join(chains[m])}")
    return leaks

# ---------------------------------------------------------------- the finder itself
def test_simple_cycles_on_a_synthetic_graph():
    graph = {"a": {"b"}, "b": {"a", "c"}, "c": {"a", "d"}, "d": set(), "e": {"d"}}
    assert simple_cycles(graph) == [("a", "b"), ("a", "b", "c")]
    assert simple_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert simple_cycles({"x": {"y"}, "y": {"z"}, "z": {"x"}}) == [("x", "y", "z")]


def test_lazy_and_relative_imports_make_edges(tmp_path):
    """A synthetic package: a cycle made only by a relative import inside a function is found."""
    pkg = tmp_path / PACKAGE
    for rel, text in {
        "__init__.py": "",
        "cli.py": "from edgepeft.alpha import run\n",
        "alpha/__init__.py": "from .core import run\n",
        "alpha/core.py": "import numpy\n\ndef run():\n    from ..beta import helper\n    return helper()\n",
        "beta/__init__.py": "from edgepeft import errors\n",
        "beta/helper.py": "def helper():\n    from edgepeft.alpha import core\n    import torch.nn\n",
        "errors.py": "",
        "runtime/__init__.py": "import numpy\n\ndef load():\n    from edgepeft.beta import helper\n",
    }.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    graph = import_graph(tmp_path)
    assert {k: set(v) for k, v in graph.items()} == {
        "edgepeft": set(), "cli": {"alpha"}, "alpha": {"beta"}, "beta": {"errors", "alpha"}, "errors": set(),
        "runtime": {"beta"}}
    assert graph["alpha"]["beta"] == Import("edgepeft/alpha/core.py", 4, "edgepeft.beta.helper")
    assert graph["beta"]["alpha"] == Import("edgepeft/beta/helper.py", 2, "edgepeft.alpha.core")
    assert simple_cycles(graph) == [("alpha", "beta")]
    assert describe_cycle(("alpha", "beta"), graph).splitlines() == [
        "alpha -> beta -> alpha",
        "    alpha -> beta: edgepeft/alpha/core.py:4 (edgepeft.beta.helper)",
        "    beta -> alpha: edgepeft/beta/helper.py:2 (edgepeft.alpha.core)"]
    assert heavy_imports([pkg / "beta" / "helper.py"], tmp_path) == [
        Import("edgepeft/beta/helper.py", 3, "torch.nn")]
    assert heavy_leaks("runtime", tmp_path) == [
        "edgepeft/beta/helper.py:3 (torch.nn), loaded via edgepeft.runtime -> edgepeft.beta.helper"]
    assert heavy_leaks("errors", tmp_path) == []
    chains = files_loaded_by(["edgepeft.cli"], tmp_path)
    assert chains["edgepeft.beta.helper"] == ["edgepeft.cli", "edgepeft.alpha", "edgepeft.alpha.core",
                                               "edgepeft.beta.helper"]


def test_relative_import_beyond_the_package_is_an_error(tmp_path):
    (tmp_path / PACKAGE).mkdir()
    (tmp_path / PACKAGE / "cli.py").write_text("from ... import x\n")
    with pytest.raises(ValueError, match=r"edgepeft/cli.py:1: relative import beyond the top-level package"):
        import_graph(tmp_path)


# ---------------------------------------------------------------- the package
def test_no_import_cycles_between_subpackages():
    graph = import_graph()
    assert {"kinds", "export", "runtime", "contract", "cli"} <= set(graph)  # the scan saw the package
    cycles = simple_cycles(graph)
    assert not cycles, "import cycles between subpackages (every import counts, function bodies included):\n" + \
        "\n".join(describe_cycle(c, graph) for c in cycles)


@pytest.mark.parametrize("sub", TORCH_FREE)
def test_runtime_imports_no_torch(sub):
    """runtime/ and contract/ import no torch, transformers or peft, anywhere in their files nor in
    any package module those files import (lazily or not)."""
    assert (ROOT / PACKAGE / sub).is_dir()
    leaks = heavy_leaks(sub)
    assert not leaks, f"{PACKAGE}/{sub} must run without {', '.join(HEAVY)}, but:\n" + "\n".join(leaks)
