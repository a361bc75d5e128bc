"""The import graph of dpo_core, drawn from the code with `ast` (function-level imports included), has no
circle, and no module but the API imports the DPO method module."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dpo_core"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """`{module: {dpo_core modules it imports anywhere in its body}}`."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")
                    parent = parent[:len(parent) - node.level + 1]
                    base = ".".join(parent + ([base] if base else []))
                candidates = [f"{base}.{alias.name}" for alias in node.names] + [base]
            elif isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            else:
                continue
            for candidate in candidates:
                if candidate in modules and candidate != name:
                    targets.add(candidate)
                    break
        graph[name] = targets
    # The package `__init__` of the API loads its exports lazily (strings), and a subpackage's `__init__`
    # re-exports its own modules: neither is an edge a circle can go through from outside.
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_walker_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_dpo_core_has_no_import_cycle():
    graph = import_graph()
    assert "dpo_core.config.run" in graph and graph["dpo_core.dpo"], "the walker must see the package"
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_only_the_api_imports_the_dpo_method_module():
    importers = sorted(name for name, targets in import_graph().items() if "dpo_core.dpo" in targets)
    assert importers == [], importers  # `dpo_core.__init__` loads `train_dpo` lazily, by name
