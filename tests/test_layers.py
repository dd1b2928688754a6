"""chatd's modules import one way: transport → handlers → services → core.

The table below is docs/architecture.md's map. The test reads every module's imports
from its source (all of them: inside functions and under TYPE_CHECKING too) and fails
when one points up a layer, when a module is in no layer, or when imports form a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "chatd"

# Lowest first. A module may import its own layer and those before it.
LAYERS: dict[str, set[str]] = {
    # The wire contract, settings, and what talks to PostgreSQL and the log.
    "core": {
        "chatd",  # the package: its __init__.py is empty
        "chatd.protocol",
        "chatd.config",
        "chatd.db",
        "chatd.auth",
        "chatd.text",
        "chatd.metrics",
        "chatd.logs",
        "chatd.media",
        "chatd.signing",
    },
    # What handlers use: the node and everything it owns.
    "services": {
        "chatd.node",
        "chatd.writer",
        "chatd.store",
        "chatd.hub",
        "chatd.redis_bus",
        "chatd.revocations",
        "chatd.ratelimit",
        "chatd.presence",
        "chatd.push",
        "chatd.files",
        "chatd.tokens",
        "chatd.integrations",
        "chatd.deliveries",
        "chatd.identity",
        "chatd.hooks",
        "chatd.app_hooks",
    },
    # One function per request, with its SQL.
    "handlers": {"chatd.handlers"},
    # Sockets, routes, and the app that holds them.
    "transport": {
        "chatd.app",
        "chatd.session",
        "chatd.outbox",
        "chatd.rest",
        "chatd.rest_files",
        "chatd.openapi",
        "chatd.asyncapi",
        "chatd.webapp",
        "chatd.http_protocol",
        "chatd.websocket_protocol",
    },
    # Commands and tools beside the server: the server never imports them.
    "tools": {
        "chatd.__main__",
        "chatd.cli",
        "chatd.admin_cli",
        "chatd.embedded",
        "chatd.backup",
        "chatd.bench",
        "chatd.client",
        "chatd.bot",
        "chatd.migrations",
    },
}
RANK = {layer: n for n, layer in enumerate(LAYERS)}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str | None:
    """The layer of the longest listed prefix: chatd.handlers.chats is in chatd.handlers's."""
    best: tuple[int, str] | None = None
    for layer, names in LAYERS.items():
        for name in names:
            if (module == name or module.startswith(name + ".")) and (
                best is None or len(name) > best[0]
            ):
                best = (len(name), layer)
    return best[1] if best else None


MODULE_NAMES = {
    module_name(path) for path in PACKAGE.rglob("*.py") if "migrations" not in path.parts
}


def imports_of(path: Path) -> set[str]:
    """The chatd modules `path` imports, wherever the import statement is."""
    found: set[str] = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path.parent)
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            # `from chatd import rest` imports the module chatd.rest; `from chatd.rest
            # import route`, the module chatd.rest.
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.add(submodule if submodule in MODULE_NAMES else base)
    return {name for name in found if name == "chatd" or name.startswith("chatd.")}


MODULES = {
    module_name(path): path for path in PACKAGE.rglob("*.py") if "migrations" not in path.parts
}


def known(name: str) -> bool:
    return name in MODULES


GRAPH = {
    module: {name for name in imports_of(path) if known(name) and name != module}
    for module, path in MODULES.items()
}


def test_every_module_is_in_a_layer() -> None:
    assert [m for m in MODULES if layer_of(m) is None] == []


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module: str) -> None:
    mine = RANK[layer_of(module)]  # type: ignore[index]
    upward = sorted(
        f"{name} ({layer_of(name)})"
        for name in GRAPH[module]
        if RANK[layer_of(name)] > mine  # type: ignore[index]
    )
    assert upward == [], f"{module} ({layer_of(module)}) imports up the layers"


def test_the_server_never_imports_the_tools() -> None:
    for module, names in GRAPH.items():
        if layer_of(module) != "tools":
            assert not {n for n in names if layer_of(n) == "tools"}, module


def test_no_import_cycles() -> None:
    """Not even under TYPE_CHECKING: a cycle there is a cycle in the design."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = "visiting"
        path.append(module)
        for name in sorted(GRAPH[module]):
            if state.get(name) == "visiting":
                cycle = [*path[path.index(name) :], name]
                raise AssertionError("import cycle: " + " → ".join(cycle))
            if name not in state:
                visit(name)
        path.pop()
        state[module] = "done"

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)


def test_the_check_sees_imports_in_functions_and_type_checking() -> None:
    """The reader finds the imports a cycle can hide in (so the tests above can fail)."""
    assert "chatd.bench" in GRAPH["chatd.cli"]  # imported inside main()
    assert {"chatd.node", "chatd.handlers.base"} <= GRAPH["chatd.session"]
    assert layer_of("chatd.handlers.chats") == "handlers"
    assert layer_of("chatd.bench.loadgen") == "tools"
