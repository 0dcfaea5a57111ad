"""The package's layout rules (docs/architecture.md): every import points down, and no cycle.

Each subpackage is one box of the architecture picture, with a rank; a module may import its own
box and boxes of a lower rank, never a peer or anything above it. Every import counts: module
level, inside functions, and under ``TYPE_CHECKING``, because a cycle hidden in a function is
still a cycle a reader has to untangle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "dagster_taskiq_sync"

# box -> rank; a module imports only its own box or lower ranks. Peers (same rank) stay apart.
RANKS = {
    "errors": 0,
    "version": 0,
    "versions": 1,
    "_dagster": 1,
    "wire": 2,
    "storage": 2,
    "config": 3,
    "ops": 4,
    "orchestrator": 5,
    "worker": 5,
    "cli": 6,
    "integrations": 6,
    "__init__": 7,
}
# Top-level modules a box may share (each box imports the error types and the version).
LEAVES = {"errors", "version"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def box(module: str) -> str:
    parts = module.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


def internal_imports(path: Path) -> set[str]:
    """Every ``dagster_taskiq_sync`` module ``path`` imports, wherever the import statement is."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("dagster_taskiq_sync")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                raise AssertionError(f"{path.relative_to(ROOT)}:{node.lineno}: use absolute imports")
            if node.module == "dagster_taskiq_sync":
                found |= {f"dagster_taskiq_sync.{a.name}" for a in node.names}
            elif node.module and node.module.startswith("dagster_taskiq_sync."):
                found.add(node.module)
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for target in internal_imports(path):
            # "from dagster_taskiq_sync.ops import iam" names the module, not the package.
            targets.add(target if target in modules else target.rpartition(".")[0] or target)
        edges[name] = {t for t in targets if t != name and t in modules}
    return edges


def test_every_module_is_in_a_box_of_the_picture():
    strays = sorted(m for m in graph() if box(m) not in RANKS)
    assert strays == [], f"modules outside the layout's boxes (add them to docs/architecture.md): {strays}"


def test_every_import_points_down_the_layout():
    wrong = []
    for source, targets in sorted(graph().items()):
        for target in sorted(targets):
            here, there = box(source), box(target)
            if there == here or there in LEAVES:
                continue
            if box(target) == "__init__" or RANKS[there] >= RANKS[here]:
                wrong.append(f"{source} -> {target} ({here} may not import {there})")
    assert wrong == [], "imports that point up or across the layout: " + "; ".join(wrong)


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_even_through_function_level_or_type_only_imports():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or ())


def test_the_cycle_finder_finds_a_cycle_through_three_modules():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


@pytest.mark.parametrize(
    ("source", "target", "allowed"),
    [
        ("dagster_taskiq_sync.worker.request", "dagster_taskiq_sync.wire.broker", True),
        ("dagster_taskiq_sync.wire.broker", "dagster_taskiq_sync.worker.request", False),
        ("dagster_taskiq_sync.worker.request", "dagster_taskiq_sync.orchestrator.executor", False),
        ("dagster_taskiq_sync.storage.run_report", "dagster_taskiq_sync.worker.step_child", False),
        ("dagster_taskiq_sync.config.worker_config", "dagster_taskiq_sync.orchestrator.executor", False),
    ],
)
def test_the_rank_rule_allows_down_and_refuses_up_and_across(source, target, allowed):
    here, there = box(source), box(target)
    assert (there == here or RANKS[there] < RANKS[here]) is allowed


def test_the_fork_servers_preload_imports_no_orchestrator_or_operator_module():
    # A step child needs the step child module and what it imports; it must not pay for the
    # executor, the launcher or the operator tools on every fork server start.
    edges = graph()
    seen, todo = set(), ["dagster_taskiq_sync.worker.step_child"]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo += edges.get(module, ())
    heavy = sorted(m for m in seen if box(m) in {"orchestrator", "ops", "cli", "config"})
    assert heavy == [], f"the step child module pulls in {heavy}"


def test_docs_architecture_names_every_module_of_every_box():
    text = (ROOT / "docs" / "architecture.md").read_text()
    missing = sorted(
        m
        for m in graph()
        if box(m) not in ("__init__", "cli", "errors", "version", "versions")
        and m.count(".") == 2
        and f"`{m.rsplit('.', 1)[1]}`" not in text
    )
    assert missing == [], f"docs/architecture.md does not mention: {missing}"


def imports_of(path: Path) -> set[str]:
    """Top-level names of every module ``path`` imports, wherever the import statement is."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module.split(".")[0])
    return found


def test_only_the_celery_integration_imports_celery_and_nothing_imports_the_integrations():
    # Celery is an optional extra: importing the package, the CLI or a worker must not need it.
    importers = sorted(str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py") if {"celery", "kombu"} & imports_of(p))
    assert importers == ["dagster_taskiq_sync/integrations/celery.py"]
    users = sorted(
        s
        for s, targets in graph().items()
        if box(s) != "integrations" and any(box(t) == "integrations" for t in targets)
    )
    assert users == []


# One job per module keeps a module short; a module past this has two jobs to split along a seam.
MAX_MODULE_LINES = 450
# Modules allowed past it, each with its reason (none today).
LONG_MODULES: dict[str, str] = {}


def test_every_module_is_under_the_line_limit():
    long = {
        str(p.relative_to(ROOT)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES and str(p.relative_to(ROOT)) not in LONG_MODULES
    }
    assert long == {}, f"modules over {MAX_MODULE_LINES} lines (split each along a seam): {long}"
