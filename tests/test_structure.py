"""The layering rules of DESIGN.md, read from the source: who may import whom, and no cycles."""

from __future__ import annotations

import ast
import gc
from pathlib import Path

from dtrain.workloads.corpus import parse_python

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "dtrain"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, module: str | None = None) -> set[str]:
    """Every module ``path`` imports, at top level or inside functions (lazy imports count too)."""
    tree = parse_python(path.read_text(), filename=str(path))
    module = module or _module_name(path)
    package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            out.add(module)
            out.update(f"{module}.{a.name}" for a in node.names)  # `from pkg import module`
    return out


def _modules() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def _offenders(prefix: str, forbidden: tuple[str, ...]) -> list[str]:
    bad = []
    for module, imports in _modules().items():
        if module.startswith(prefix):
            bad += [f"{module} imports {i}" for i in sorted(imports) if any(i == f or i.startswith(f + ".") for f in forbidden)]
    return bad


def test_algorithms_import_no_transport_and_no_workload():
    assert _offenders("dtrain.algorithms", ("torch.distributed", "hivemind", "dtrain.workloads", "dtrain.comm.torch_backend",
                                            "dtrain.comm.hivemind", "dtrain.comm.local")) == []


def test_comm_touches_no_checkpoint_loop_or_algorithm():
    assert _offenders("dtrain.comm", ("dtrain.checkpoint", "dtrain.train", "dtrain.algorithms", "dtrain.run_dir")) == []


def test_no_import_cycles_inside_dtrain():
    modules = _modules()
    graph = {m: {i for i in imports if i in modules and i != m} for m, imports in modules.items()}
    # A package's __init__ re-exporting its own submodules is not a cycle of design.
    for m in graph:
        graph[m] = {i for i in graph[m] if not (i.startswith(m + ".") or m.startswith(i + ".") and _is_init(i))}
    assert _cycles(graph) == []


def _cycles(graph: dict[str, set[str]]) -> list[str]:
    cycles: list[str] = []
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join([*path[path.index(nxt):], node, nxt]) if nxt in path else f"{node} -> {nxt}")
            elif nxt not in state:
                visit(nxt, [*path, node])
        state[node] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    return cycles


def test_the_cycle_finder_finds_one():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a -> b -> c -> a"]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def _is_init(module: str) -> bool:
    return (PACKAGE.parent / module.replace(".", "/") / "__init__.py").exists()


def test_the_checker_sees_lazy_and_relative_imports(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    import torch.distributed as dist\n    from ..workloads import base\n")
    assert {"torch.distributed", "dtrain.workloads", "dtrain.workloads.base"} <= _imports(probe, "dtrain.algorithms.probe")


class _ParsesWhenCollected:
    def __del__(self) -> None:
        ast.parse("def f(x):\n    return [(i, x) for i in range(3)]\n")


def test_a_parse_survives_another_parse_run_by_the_garbage_collector_mid_parse():
    # In CI a leaked asyncio task was collected during this file's parse; its finalizer logged a traceback, whose
    # formatting parses a line, and CPython 3.11 raised "AST constructor recursion depth mismatch".
    source = Path(ast.__file__).read_text()
    threshold = gc.get_threshold()
    gc.set_threshold(1)  # a collection at almost every allocation, so the finalizer runs mid-parse
    try:
        for _ in range(3):
            garbage = _ParsesWhenCollected()
            garbage.cycle = garbage  # only the cycle collector frees it
            del garbage
            assert isinstance(parse_python(source), ast.Module)
    finally:
        gc.set_threshold(*threshold)
