"""No import cycles in python/locdiff, counting imports inside functions too (they hide a
cycle from the interpreter, not from a reader), read with the standard library's ast."""
from __future__ import annotations

import ast
import pathlib

import locdiff

PACKAGE = pathlib.Path(locdiff.__file__).parent


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path, name: str, modules: set[str], extensions: set[str] = frozenset()) -> set[str]:
    out = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            # `from pkg import sub` imports the submodule (or extension, like _C), not pkg's body
            subs = [f"{base}.{a.name}" for a in node.names]
            targets = [t for t in subs if t in modules or t in extensions] or [base]
        else:
            continue
        out |= {t for t in targets if t in modules and t != name}
    return out


def graph() -> dict[str, set[str]]:
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(paths)
    extensions = {f"{_module_name(p.parent / '__init__.py')}.{p.name.split('.')[0]}" for p in PACKAGE.rglob("*.so")}
    return {name: _imports(path, name, modules, extensions | {"locdiff._C"}) for name, path in paths.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_sees_a_cycle_through_a_function_level_import(tmp_path):
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_in_locdiff():
    edges = graph()
    assert "locdiff.ops.shdd_api" in edges["locdiff.shdd"]  # the parser sees real imports
    found = cycles(edges)
    assert not found, f"import cycles: {found}"


def test_ops_never_import_the_library_layer():
    # Arrows point down: locdiff.ops is below sh, shdd and grids.
    upper = {"locdiff.sh", "locdiff.shdd", "locdiff.grids", "locdiff.geo"}
    for name, deps in graph().items():
        if name.startswith("locdiff.ops"):
            assert not deps & upper, (name, deps & upper)
