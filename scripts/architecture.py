"""The import graph of engine/, drawn from the code: which wing each module is in, what it imports, and the edges
between wings. `python scripts/architecture.py` prints the markdown that docs/architecture.md carries;
tests/test_architecture.py holds the code to the same rules.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WINGS = ("model", "artifacts", "retrieval", "serving")  # each imports only the ones before it


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def wing_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in WINGS else "root"


def engine_imports(path: Path) -> dict[str, bool]:
    """engine.* modules `path` imports -> True when every import of it is at module level (not inside a function)."""
    tree = ast.parse(path.read_text())
    top_level = {id(node) for node in tree.body}
    for node in tree.body:  # `if TYPE_CHECKING:` blocks count as top level
        if isinstance(node, ast.If):
            top_level |= {id(child) for child in node.body}
    found: dict[str, bool] = {}
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("engine"):
            names = [node.module] if node.module != "engine" else [f"engine.{a.name}" for a in node.names]
            if node.module != "engine":
                names += [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("engine")]
        for name in names:
            if (ROOT / (name.replace(".", "/") + ".py")).is_file() or (
                ROOT / name.replace(".", "/") / "__init__.py"
            ).is_file():
                found[name] = found.get(name, True) and id(node) in top_level
    return found


def graph() -> dict[str, dict[str, bool]]:
    return {module_name(p): engine_imports(p) for p in sorted((ROOT / "engine").rglob("*.py"))}


def markdown() -> str:
    g = graph()
    edges: dict[tuple[str, str], int] = defaultdict(int)
    lines = ["| module | wing | imports (engine) |", "|---|---|---|"]
    for module, imports in g.items():
        targets = sorted(
            {m for m in imports if m != module and not any(o != m and o.startswith(m + ".") for o in imports)}
        )
        for target in targets:
            if wing_of(target) != wing_of(module):
                edges[(wing_of(module), wing_of(target))] += 1
        shown = ", ".join(f"`{t.removeprefix('engine.')}`" for t in targets) or "-"
        lines.append(f"| `{module}` | {wing_of(module)} | {shown} |")
    picture = ["```", "wing -> wing it imports (number of module imports)"]
    for (a, b), n in sorted(edges.items(), key=lambda e: (("root",) + WINGS).index(e[0][0])):
        picture.append(f"  {a:9s} -> {b:9s} ({n})")
    picture.append("```")
    return "\n".join(picture + [""] + lines)


if __name__ == "__main__":
    sys.stdout.write(markdown() + "\n")
