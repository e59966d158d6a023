"""The package layout's rules (docs/DESIGN.md), read from the source with `ast`: imports inside
functions count as much as those at the top.

- no import cycle among parallelspec's modules;
- the runtime (everything outside parallelspec.tools) never imports the tools;
- parallelspec imports only public ps_kernels names (no private module, no op internals);
- ps_kernels never imports parallelspec.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"parallelspec": ROOT / "python" / "parallelspec", "ps_kernels": ROOT / "ps_kernels"}


def module_name(package: str, path: Path) -> str:
    rel = path.relative_to(PACKAGES[package]).with_suffix("")
    parts = [package, *rel.parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(package: str, path: Path) -> set[str]:
    """Absolute names of every module `path` imports (``from a import b`` yields a.b and a)."""
    name = module_name(package, path)
    is_pkg = path.name == "__init__.py"
    here = name.split(".") if is_pkg else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[:len(here) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            found.add(mod)
            found.update(f"{mod}.{alias.name}" for alias in node.names)
    return found


def modules(package: str) -> dict[str, set[str]]:
    return {module_name(package, p): imports_of(package, p) for p in sorted(PACKAGES[package].rglob("*.py"))}


def internal_graph() -> dict[str, set[str]]:
    """parallelspec module -> the parallelspec modules it imports (a package's __init__ counts as
    imported with any of its submodules, as Python runs it first)."""
    mods = modules("parallelspec")
    graph = {}
    for name, imported in mods.items():
        edges = set()
        for target in imported:
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                prefix = ".".join(parts[:i])
                if prefix in mods and prefix != name and not name.startswith(prefix + "."):
                    edges.add(prefix)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_no_import_cycle_in_parallelspec():
    assert find_cycle(internal_graph()) is None, f"import cycle: {' -> '.join(find_cycle(internal_graph()))}"


def test_cycle_finder_finds_a_cycle():
    """Positive control: the checker reports a cycle that exists."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_runtime_never_imports_the_tools():
    bad = [f"{name} imports {t}" for name, imported in modules("parallelspec").items()
           if not name.startswith("parallelspec.tools") for t in imported if t.startswith("parallelspec.tools")]
    assert not bad, bad


def test_parallelspec_uses_public_ps_kernels_only():
    bad = [f"{name} imports {t}" for name, imported in modules("parallelspec").items() for t in imported
           if t.startswith("ps_kernels.") and (any(p.startswith("_") for p in t.split(".")[1:])
                                              or t.split(".")[1] in ("ops", "reference", "triton_kernels"))]
    assert not bad, bad


def test_ps_kernels_never_imports_parallelspec():
    bad = [f"{name} imports {t}" for name, imported in modules("ps_kernels").items() for t in imported
           if t.split(".")[0] == "parallelspec"]
    assert not bad, bad


@pytest.mark.parametrize("source, expected", [
    ("from ..hf.target import TargetModel", {"parallelspec.hf.target", "parallelspec.hf.target.TargetModel"}),
    ("def f():\n    from ps_kernels import _backend", {"ps_kernels", "ps_kernels._backend"}),
])
def test_import_reader_resolves_relative_and_nested_imports(tmp_path, monkeypatch, source, expected):
    """Positive control for the readers above: relative imports resolve, imports in functions count."""
    pkg = tmp_path / "parallelspec" / "trees"
    pkg.mkdir(parents=True)
    (pkg / "auto.py").write_text(source)
    monkeypatch.setitem(PACKAGES, "parallelspec", tmp_path / "parallelspec")
    assert imports_of("parallelspec", pkg / "auto.py") == expected
