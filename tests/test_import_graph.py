"""The package's imports flow one way: no cycle among its modules (imports inside functions count), no module
importing another's private (underscore) name unless the providing module is itself private, the
single-process export never importing the distributed one (which builds on it), and no module importing one listed
below it in CONTRIBUTING.md's code map, which lists them all."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "offload_export"
CONTRIBUTING = PACKAGE.parent / "CONTRIBUTING.md"


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        out[name] = ast.parse(path.read_text())
    return out


def _target(modules: dict, current: str, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    is_package = any(m.startswith(current + ".") for m in modules)
    base = current.split(".") if is_package else current.split(".")[:-1]
    base = base[:len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _edges() -> tuple[dict[str, set[str]], list[str]]:
    modules = _modules()
    edges: dict[str, set[str]] = {m: set() for m in modules}
    private = []
    for name, tree in modules.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (target := _target(modules, name, node)).startswith("offload_export"):
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    edges[name].add(sub if sub in modules else target)
                    if sub not in modules and _private(alias.name) and not target.rpartition(".")[2].startswith("_"):
                        private.append(f"{name} imports {target}.{alias.name}")
            elif isinstance(node, ast.Import):
                edges[name].update(a.name for a in node.names if a.name in modules)
    return {m: {t for t in ts if t in modules and t != m} for m, ts in edges.items()}, private


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> list[str] | None:
        state[m] = 1
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                return path[path.index(t):] + [t] if t in path else [m, t]
            if t not in state and (found := visit(t, path + [t])):
                return found
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state and (found := visit(m, [m])):
            return found
    return None


def test_imports_flow_one_way():
    edges, private = _edges()
    assert len(edges) > 20  # the package was found
    assert _cycle(edges) is None, f"import cycle: {' -> '.join(_cycle(edges))}"
    assert not private, "private names imported across modules:\n" + "\n".join(private)
    assert "offload_export.distributed" not in edges["offload_export.export"]


def _code_map(modules) -> dict[str, int]:
    """CONTRIBUTING.md's code map: module -> its row (``x.py`` a module, ``x/`` every module of the package)."""
    text = CONTRIBUTING.read_text().partition("## Code map")[2]
    rows = [line.split("|")[1] for line in text.splitlines() if line.startswith("| `")]
    rank = {}
    for i, cell in enumerate(rows):
        for entry in re.findall(r"`([\w/.]+)`", cell):
            name = "offload_export." + entry.removesuffix(".py").removesuffix("/").replace("/", ".")
            rank.update({m: i for m in modules if m == name or (entry.endswith("/") and m.startswith(name + "."))})
    return rank


def test_code_map_lists_every_module_above_what_imports_it():
    edges, _ = _edges()
    rank = _code_map(edges)
    entry_points = {"offload_export", "offload_export.__main__"}
    assert sorted(set(edges) - set(rank) - entry_points) == [], "modules missing from CONTRIBUTING.md's code map"
    upward = [f"{m} imports {t}, listed below it" for m, ts in edges.items() if m in rank
              for t in ts if t in rank and rank[t] > rank[m]]
    assert not upward, "\n".join(upward)
