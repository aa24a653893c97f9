"""The house: no import circles (module-level or inside functions), and no layer imports one above it."""

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "cfedit"
#: Lowest first: a module may import from its own layer and those below it.
LAYERS = ["errors", "_version", "files", "progress", "device", "distributed", "imageio", "causal", "checkpoint", "data",
          "features", "image", "editor", "eval", "cli", "cfedit", "__main__"]


def _imports() -> dict[str, set[str]]:
    mods = {}
    for f in PACKAGE.rglob("*.py"):
        parts = f.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = f
    edges: dict[str, set[str]] = defaultdict(set)
    for name, f in mods.items():
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cfedit"):
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            edges[name] |= {t for t in targets if t in mods and t != name}
    return {m: edges[m] for m in mods}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "cfedit"


def test_no_import_circles():
    edges = _imports()
    seen, on_path = set(), []

    def visit(m: str) -> None:
        if m in on_path:
            raise AssertionError("import circle: " + " -> ".join(on_path[on_path.index(m):] + [m]))
        if m in seen:
            return
        on_path.append(m)
        for t in sorted(edges[m]):
            visit(t)
        on_path.pop()
        seen.add(m)

    for m in sorted(edges):
        visit(m)


def test_no_layer_imports_one_above_it():
    rank = {name: i for i, name in enumerate(LAYERS)}
    upward = [(m, t) for m, ts in _imports().items() for t in ts if rank[_layer(t)] > rank[_layer(m)]]
    assert not upward, upward
