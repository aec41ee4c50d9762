"""The shape of the code: import layers (docs/design-notes.md, The shape of the hub), no import cycle, narrow
interfaces between the hub's parts, the public surface and the exception tree.

Imports are read with ``ast`` (runtime imports only: those under
``if TYPE_CHECKING:`` exist for the type checker and are not followed).
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

import dispatcher
from dispatcher import Dispatcher

ROOT = Path(__file__).resolve().parents[1]

# Modules of the hub's parts: what the transports and features must not reach into.
PARTS = ("commands", "connections", "sessions", "router", "tasks", "hub", "peers")
# Modules that reach the parts only through their public methods.
FEATURES = ("events", "calls", "cluster", "metrics", "admin", "transport", "ws_fastpath", "jobs",
            "feed", "history", "sse")
# The hub below its servers: never imports a server, the CLI or the composition.
CORE = ("commands", "connections", "sessions", "router", "tasks", "peers", "events", "calls",
        "cluster", "metrics", "deadlines", "handle", "lifecycle", "models", "errors", "futures",
        "emitter", "ids", "clock", "config", "jobs", "targets", "feed", "history")
SERVERS_AND_ABOVE = ("transport", "ws_fastpath", "admin", "sse", "dashboard", "cli", "hub",
                     "demo", "admin_client")


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _runtime_imports(path: Path) -> set[str]:
    """Absolute names of the modules ``path`` imports at run time."""
    tree = ast.parse(path.read_text(), str(path))
    package = _module_name(path) if path.name == "__init__.py" \
        else _module_name(path).rpartition(".")[0]
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            # "from . import x" / "from .store import base": x may be a module
            out.update(f"{mod}.{alias.name}" for alias in node.names)
    return out


def _graph() -> dict[str, set[str]]:
    files = [*ROOT.joinpath("dispatcher").rglob("*.py"), *ROOT.joinpath("agent_client").rglob("*.py")]
    modules = {_module_name(f): f for f in files}
    return {name: {m for m in _runtime_imports(path) if m in modules}
            for name, path in modules.items()}


GRAPH = _graph()


def test_the_import_scan_sees_the_packages() -> None:
    assert "dispatcher.commands" in GRAPH and "agent_client.protocol" in GRAPH
    assert "dispatcher.commands" in GRAPH["dispatcher.hub"]


def test_no_import_cycle() -> None:
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(GRAPH[node]):
            if nxt == node or nxt.startswith(node + "."):
                continue  # a package importing its own submodules
            if state.get(nxt) == 1:
                cycle = [*path[path.index(nxt):], nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(GRAPH):
        if node not in state:
            visit(node)


def test_agent_client_never_imports_the_hub() -> None:
    for mod, deps in GRAPH.items():
        if mod.startswith("agent_client"):
            assert not {d for d in deps if d.startswith("dispatcher")}, mod


def test_protocol_module_is_pure() -> None:
    imports = _runtime_imports(ROOT / "agent_client" / "protocol.py")
    impure = {"asyncio", "socket", "websockets", "redis", "structlog"}
    assert not {i.split(".")[0] for i in imports} & impure, imports


def test_store_knows_nothing_of_the_hub_above_it() -> None:
    allowed = {"dispatcher.models", "dispatcher.errors", "dispatcher.lifecycle",
               "dispatcher.futures", "dispatcher.clock"}
    for mod, deps in GRAPH.items():
        if mod.startswith("dispatcher.store"):
            above = {d for d in deps if d.startswith("dispatcher")
                     and not d.startswith("dispatcher.store") and d not in allowed
                     and d != "dispatcher"}
            assert not above, f"{mod} imports {above}"


@pytest.mark.parametrize("name", CORE)
def test_the_core_never_imports_servers_or_the_cli(name: str) -> None:
    deps = GRAPH[f"dispatcher.{name}"]
    above = {d for d in deps if d.split(".")[1:2] and d.split(".")[1] in SERVERS_AND_ABOVE}
    assert not above, f"dispatcher.{name} imports {above}"


def _private_members(module: str) -> set[str]:
    """Names of the private attributes and methods the classes of ``module`` define."""
    tree = ast.parse((ROOT / "dispatcher" / f"{module}.py").read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("_") \
                and not node.name.startswith("__"):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                and node.value.id == "self" and node.attr.startswith("_") \
                and not node.attr.startswith("__"):
            names.add(node.attr)
    return names


@pytest.mark.parametrize("feature", FEATURES)
def test_features_use_the_parts_public_methods_only(feature: str) -> None:
    path = ROOT / "dispatcher" / f"{feature}.py"
    if not path.exists():
        pytest.skip(f"no {feature}.py")
    private = set().union(*(_private_members(p) for p in PARTS))
    own = _private_members(feature)
    tree = ast.parse(path.read_text())
    reached = sorted(
        f"{ast.unparse(node.value)}.{node.attr}" for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and node.attr in private - own
        and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")))
    assert not reached, f"{feature}.py reaches into private members: {reached}"


# The public API's names on the hub (docs/guide.md), plus the documented additions (docs/guide.md, "The hub object").
API_NAMES = {"listen", "close", "on", "once", "off", "execute_on_agent", "emit_to", "broadcast",
             "apply_command_response", "apply_command_error", "apply_command_progress",
             "list_pending_commands", "get_command", "list_connected_agents",
             "execute_on_agents", "get_job", "list_jobs", "list_job_commands", "list_commands"}
DOCUMENTED_ADDITIONS = {"config", "hub_id", "engine", "store", "metrics", "port", "admin_port",
                        "auth_required", "connected_count", "bus_status", "cancel_command",
                        "get_agent", "cancel_job", "on_job_changed", "follow_job", "feed",
                        "accepting", "drain"}


def test_dispatcher_surface_is_the_documented_one() -> None:
    hub = Dispatcher.__new__(Dispatcher)
    public = {n for n in dir(Dispatcher) if not n.startswith("_")}
    public |= {n for n in ("config", "hub_id")}  # instance attributes
    assert public == API_NAMES | DOCUMENTED_ADDITIONS
    assert not inspect.isclass(hub)
    guide = (ROOT / "docs" / "guide.md").read_text()
    for name in sorted(DOCUMENTED_ADDITIONS):
        assert f"`{name}" in guide or f".{name}" in guide, f"{name} is not documented"


def test_exceptions_fit_python() -> None:
    assert issubclass(dispatcher.CommandTimeout, TimeoutError)
    assert issubclass(dispatcher.DeliveryTimeout, TimeoutError)
    assert issubclass(dispatcher.StoreUnavailable, ConnectionError)
    assert issubclass(dispatcher.UnknownCommand, LookupError)
    for name in ("CommandFailed", "CommandTimeout", "CommandCancelled", "AgentOffline",
                 "DeliveryTimeout", "StoreUnavailable", "UnknownCommand", "TooManyCommands",
                 "HubClosed", "NoAgentsMatched"):
        assert issubclass(getattr(dispatcher, name), dispatcher.DispatcherError), name
        assert name in (dispatcher.errors.__doc__ or ""), f"{name} missing from the tree"
