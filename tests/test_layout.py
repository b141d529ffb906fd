"""The package's layout rules (docs/ARCHITECTURE.md): no import cycle, and imports flow one way.

Commands (the modules users run) sit at the top of the package; the shared basics too; the machinery lives in
data/, training/, engine/, judging/ and webui/. Every import counts, function-level ones included.
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "dialogpt_zh"

COMMANDS = {"preprocess", "train", "evaluate", "interact", "webapp", "arena", "feedback", "rerank", "index", "convert"}
BASICS = {"errors", "settings", "tokenizer", "checkpoint", "fsutil", "cli", "sequence", "foreign"}
# What each layer may import (besides itself and the basics); a command may import any library.
MAY_IMPORT = {
    "basics": set(),
    "data": set(),
    "training": {"data"},
    "judging": {"data"},
    "engine": {"data", "judging"},
    "webui": {"data", "judging", "engine"},
}


def package_imports(package: Path) -> dict[str, set[str]]:
    """module -> the package modules it imports, anywhere in the file (function-level imports too)."""
    root = package.name
    modules: dict[str, Path] = {}
    for path in package.rglob("*.py"):
        parts = [root, *path.relative_to(package).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        deps = set()
        base = module if path.stem == "__init__" else module.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mod = node.module or ""
                if node.level:  # relative: from . import x / from .x import y
                    anchor = base.split(".")[: len(base.split(".")) - (node.level - 1)]
                    mod = ".".join(anchor + ([mod] if mod else []))
                targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod for a in node.names]
            else:
                continue
            deps |= {t for t in targets if t in modules and t != module}
        graph[module] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def layer(module: str) -> str:
    """'command', 'basics', 'package' (the root __init__) or the subpackage's name."""
    parts = module.split(".")
    if len(parts) == 1:
        return "package"
    if len(parts) == 2 and parts[1] in COMMANDS:
        return "command"
    if len(parts) == 2 and parts[1] in BASICS:
        return "basics"
    return parts[1]


def layering_violations(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for module, deps in sorted(graph.items()):
        own = layer(module)
        if own in ("command", "package"):
            continue
        allowed = MAY_IMPORT[own] | {own, "basics"}
        bad += [f"{module} imports {dep}" for dep in sorted(deps) if layer(dep) not in allowed]
    return bad


def test_find_cycle_finds_one_and_only_then():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_function_level_and_relative_imports_are_edges(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.sub.b import x\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from .. import a\n    import pkg.a\n")
    graph = package_imports(pkg)
    assert graph["pkg.a"] == {"pkg.sub.b"} and graph["pkg.sub.b"] == {"pkg.a"}
    assert find_cycle(graph) == ["pkg.a", "pkg.sub.b", "pkg.a"]


def test_layering_rule_catches_a_library_importing_upwards():
    graph = {"dialogpt_zh.data.store": {"dialogpt_zh.engine.bot"}, "dialogpt_zh.engine.bot": {"dialogpt_zh.interact"},
             "dialogpt_zh.training.loop": {"dialogpt_zh.data.store", "dialogpt_zh.checkpoint"},
             "dialogpt_zh.interact": {"dialogpt_zh.engine.bot"}}
    assert layering_violations(graph) == ["dialogpt_zh.data.store imports dialogpt_zh.engine.bot",
                                          "dialogpt_zh.engine.bot imports dialogpt_zh.interact"]


def test_the_package_has_no_import_cycle():
    graph = package_imports(PACKAGE)
    assert "dialogpt_zh.engine.bot" in graph and graph["dialogpt_zh.interact"]  # the walk really saw the package
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_imports_flow_one_way():
    graph = package_imports(PACKAGE)
    assert {layer(m) for m in graph} >= {"command", "basics", "data", "training", "engine", "judging", "webui"}
    assert layering_violations(graph) == []


def test_every_module_has_a_known_place():
    for module in package_imports(PACKAGE):
        assert layer(module) in MAY_IMPORT or layer(module) in ("command", "package"), module
