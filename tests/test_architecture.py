"""The package order of docs/design.md, enforced: every moec import (function-local ones too) goes downwards."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "moec"

#: Bottom to top. A package may import itself and any package before it, never one after it.
ORDER = ["core", "arch", "models", "quant", "profile", "finetune", "artifact", "export", "lower", "runtime", "hardware", "search",
         "pipeline", "api", "cli", "__main__"]


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def moec_imports(path: Path, root: Path = ROOT) -> list[tuple[str, int]]:
    """(imported moec module, line) of every import in ``path``, at any depth (functions included)."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "moec"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the importing package
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == "moec":
                # ``from moec import api`` imports the module moec.api
                out += [(f"{target}.{a.name}" if target == "moec" else target, node.lineno) for a in node.names]
    return out


def package_of(module: str) -> str:
    """The layer of a module: its top-level subpackage (``moec`` itself — the version — counts as core)."""
    parts = module.split(".")
    return "core" if len(parts) == 1 or parts[1] == "__version__" else parts[1]


def edges() -> list[tuple[str, str, str, int]]:
    """(importing module, imported module, file, line) for every moec import inside the package."""
    out = []
    for path in sorted(ROOT.rglob("*.py")):
        for target, line in moec_imports(path):
            out.append((module_name(path), target, str(path.relative_to(ROOT.parent)), line))
    return out


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a node list (first node repeated at the end), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_every_package_has_a_place_in_the_order():
    packages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()} | {"api", "__main__"}
    packages -= {"targets"}  # package data (preset YAML), no code
    assert packages == set(ORDER)


def test_imports_follow_the_package_order():
    rank = {p: i for i, p in enumerate(ORDER)}
    bad = [f"{file}:{line}: {src} imports {dst} ({package_of(src)} is below {package_of(dst)})"
           for src, dst, file, line in edges() if rank[package_of(dst)] > rank[package_of(src)]]
    assert not bad, "\n".join(bad)


def test_no_package_cycle():
    graph: dict[str, set[str]] = {}
    for src, dst, _, _ in edges():
        if package_of(src) != package_of(dst):
            graph.setdefault(package_of(src), set()).add(package_of(dst))
    assert find_cycle(graph) is None, find_cycle(graph)


def test_no_module_cycle():
    """Within a package too: modules import each other one way (no function-local import to dodge a cycle)."""
    modules = {module_name(p) for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for src, dst, _, _ in edges():
        while dst not in modules and "." in dst:  # ``from moec.x import name``: the module is moec.x
            dst = dst.rpartition(".")[0]
        # a package's __init__ importing its own submodules is how registries are built, not a cycle
        if src != dst and not dst.startswith(src + "."):
            graph.setdefault(src, set()).add(dst)
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_only_the_cli_imports_the_api_facade():
    bad = [f"{file}:{line}: {src}" for src, dst, file, line in edges()
           if (dst == "moec.api" or dst.startswith("moec.api.")) and package_of(src) != "cli"]
    assert not bad, "moec.api is imported inside moec:\n" + "\n".join(bad)


@pytest.mark.parametrize("graph, cycle", [({"a": {"b"}, "b": {"a"}}, ["a", "b", "a"]),
                                          ({"a": {"b"}, "b": {"c"}}, None)])
def test_cycle_finder(graph, cycle):
    assert find_cycle(graph) == cycle


def test_function_local_and_relative_imports_are_seen(tmp_path):
    """The walker sees imports inside functions (the form that used to hide cycles) and relative ones."""
    pkg = tmp_path / "moec" / "search"
    pkg.mkdir(parents=True)
    (pkg / "x.py").write_text("def f():\n    from moec import api\n    from ..pipeline import compile\n")
    assert moec_imports(pkg / "x.py", tmp_path / "moec") == [("moec.api", 2), ("moec.pipeline", 3)]
