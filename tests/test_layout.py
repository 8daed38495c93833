"""The package's shape: no import cycle, a short top level, every package says its job."""

from __future__ import annotations

import ast
from pathlib import Path

import rlhflab

ROOT = Path(rlhflab.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """Every rlhflab module that `path` imports: at the top, inside functions and under
    TYPE_CHECKING alike (a lazy import is still a dependency)."""
    name, out = module_name(path), set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # 'pkg.mod.func' -> 'pkg.mod'
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def graph() -> dict[str, set[str]]:
    paths = sorted(ROOT.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imports_of(p, modules) for p in paths}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules, or None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(edges.get(m, ())):
            # A package's __init__ re-exporting its own submodules is not a cycle: importing
            # `pkg.sub` runs `pkg/__init__` first by Python's rules, not by our design.
            if n.startswith(m + "."):
                continue
            if state.get(n) == 1:
                return stack[stack.index(n) :] + [n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "p": {"p.x"}, "p.x": set()}) is None


def test_no_import_cycle_in_the_package():
    edges = graph()
    assert "rlhflab.stages.sft" in edges and "rlhflab.cli" in edges  # the walk saw the tree
    assert find_cycle(edges) is None, " -> ".join(find_cycle(edges))


def test_nothing_imports_the_command_line_or_the_web_pages():
    """Dependencies point one way: the CLI and the servers import the core, never back."""
    for module, deps in graph().items():
        if module not in ("rlhflab.cli", "rlhflab.__main__"):  # the two entry points
            assert "rlhflab.cli" not in deps, module
        if not module.startswith(("rlhflab.label", "rlhflab.sim")):
            assert not {d for d in deps if d.startswith(("rlhflab.label.server", "rlhflab.sim.server"))}, module


def test_top_level_is_short_and_every_package_says_its_job():
    top = [p for p in ROOT.glob("*.py") if p.name != "__init__.py"]
    assert len(top) <= 15, sorted(p.name for p in top)
    for init in ROOT.rglob("__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8")))
        assert doc and len(doc.split()) >= 5, f"{init} has no docstring saying its job"
