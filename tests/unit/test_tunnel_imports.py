"""The tunnel and QUIC packages import in one direction: no cycles, not even type-only ones
(ARCHITECTURE.md section 2: a cycle is a design bug)."""

from __future__ import annotations

import ast
import pathlib

import ramp

ROOT = pathlib.Path(ramp.__file__).resolve().parent
PACKAGES = ("tunnel", "quic", "wire")


def _module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    return ".".join(rel.parts).removesuffix(".__init__")


def _imports(path: pathlib.Path) -> set[str]:
    """Every ramp module `path` imports, including imports under `if TYPE_CHECKING:`."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ramp"):
            found.add(node.module)
            for alias in node.names:  # `from ramp.quic import endpoint` imports a module
                candidate = f"{node.module}.{alias.name}"
                if (ROOT.parent / (candidate.replace(".", "/") + ".py")).exists():
                    found.add(candidate)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("ramp"))
    return found


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).glob("*.py"):
            graph[_module_name(path)] = _imports(path)
    return graph


def test_no_import_cycles() -> None:
    graph = _graph()
    state: dict[str, int] = {}  # 1 visiting, 2 done
    stack: list[str] = []

    def visit(mod: str) -> None:
        state[mod] = 1
        stack.append(mod)
        for dep in sorted(graph.get(mod, ())):
            if dep not in graph:
                continue
            if state.get(dep) == 1:
                cycle = [*stack[stack.index(dep) :], dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[mod] = 2

    for mod in sorted(graph):
        if mod not in state:
            visit(mod)


def test_session_tables_do_not_import_their_connections() -> None:
    graph = _graph()
    assert "ramp.tunnel.connector_side" not in graph["ramp.tunnel.sessions_connector"]
    assert "ramp.tunnel.sessions_connector" not in graph["ramp.tunnel.connector_side"]
    assert "ramp.tunnel.edge_side" not in graph["ramp.tunnel.sessions_edge"]
    assert "ramp.tunnel.sessions_edge" not in graph["ramp.tunnel.edge_side"]


def test_wire_imports_nothing_above_it() -> None:
    for mod, deps in _graph().items():
        if mod.startswith("ramp.wire"):
            assert all(d.startswith("ramp.wire") for d in deps), (mod, deps)


MACHINES = ("bridge_state", "control_state", "flow_state", "session_state")
IO_MODULES = {"asyncio", "socket", "time", "selectors", "ssl", "qh3", "uvloop"}


def test_state_machines_do_no_io() -> None:
    """The sans-I/O machines import no I/O or clock module: events and `now` come in."""
    for name in MACHINES:
        tree = ast.parse((ROOT / "tunnel" / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mods = [node.module or ""]
            else:
                continue
            for mod in mods:
                assert mod.split(".")[0] not in IO_MODULES, f"tunnel/{name}.py imports {mod}"
                if mod.startswith("ramp."):
                    assert mod in {
                        "ramp.wire.tunnel",
                        "ramp.flows.flow",
                        "ramp.flows.client_shares",  # counting only, no I/O
                        "ramp.tunnel.interfaces",
                        "ramp.tunnel.bridge_state",
                    }, f"tunnel/{name}.py imports {mod}"
