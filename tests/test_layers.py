"""The floors of the package (README "Architecture"): a module imports only from its own floor
or below, and no modules import each other in a circle. Every import statement counts,
module-level or inside a function, so a lazy import cannot hide an upward one."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "oodbench"

# Lowest first. A top-level module or package of oodbench not named here fails the test:
# a new one has to be given its floor.
FLOORS = [
    ("foundation", {"errors", "identity", "file_state", "registry", "outputs", "version"}),
    ("storage", {"storage"}),
    ("components", {"datasets", "models", "postprocessors", "metrics"}),
    ("engine", {"benchmark"}),
    ("tasks", {"tasks"}),
    ("report", {"report"}),
    ("entry points", {"api", "cli", "__main__", ""}),  # "" is oodbench/__init__.py, the public face
]
FLOOR_OF = {part: level for level, (_, parts) in enumerate(FLOORS) for part in parts}


def module_name(path: Path) -> str:
    parts = ("oodbench", *path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in PACKAGE.rglob("*.py")}


def imported(name: str, path: Path, known: set[str]) -> set[str]:
    """The oodbench modules `path` imports anywhere in its code (``from a import b`` names
    module ``a.b`` when that is a module, else ``a``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in known else base)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {target for target in found if target == "oodbench" or target.startswith("oodbench.")} - {name}


def floor(module: str) -> int:
    part = module.split(".")[1] if "." in module else ""
    if part not in FLOOR_OF:
        raise AssertionError(f"{module} has no floor: add oodbench.{part} to FLOORS in {Path(__file__).name}")
    return FLOOR_OF[part]


@pytest.fixture(scope="module")
def graph() -> nx.DiGraph:
    known = modules()
    graph = nx.DiGraph()
    for name, path in known.items():
        graph.add_node(name)
        graph.add_edges_from((name, target) for target in imported(name, path, set(known)))
    return graph


def test_every_module_has_a_floor(graph):
    for module in graph:
        floor(module)


def test_no_module_imports_from_a_higher_floor(graph):
    upward = [f"{a} ({FLOORS[floor(a)][0]}) imports {b} ({FLOORS[floor(b)][0]})"
              for a, b in graph.edges if floor(b) > floor(a)]
    assert not upward, "\n".join(upward)


def test_no_import_circles(graph):
    # a package's __init__ that re-exports its modules is not a circle with them
    inits = {module_name(path) for path in PACKAGE.rglob("__init__.py")}
    circles = [sorted(group) for group in nx.strongly_connected_components(graph.subgraph(set(graph) - inits))
               if len(group) > 1]
    assert not circles, circles


def test_the_walk_sees_function_level_and_from_package_imports(tmp_path):
    source = ("from oodbench.storage import store\n"
              "def later():\n    from oodbench.report.render import WIDTH\n    import oodbench.tasks.compare\n")
    (tmp_path / "probe.py").write_text(source)
    known = {"oodbench.storage.store", "oodbench.report.render", "oodbench.tasks.compare"}
    assert imported("oodbench.benchmark.probe", tmp_path / "probe.py", known) == known
    assert floor("oodbench.benchmark.probe") < floor("oodbench.report.render")
