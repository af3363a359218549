"""The layers of engine/ (docs/architecture.md), checked on the code: each wing imports only the wings before it, the
root imports no wing, nothing in engine/ imports Prefect, and the doc names every module."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import architecture  # noqa: E402


def test_each_wing_imports_only_the_wings_before_it():
    order = architecture.WINGS
    wrong = []
    for module, imports in architecture.graph().items():
        mine = architecture.wing_of(module)
        for target in imports:
            theirs = architecture.wing_of(target)
            if theirs != "root" and (mine == "root" or order.index(theirs) > order.index(mine)):
                wrong.append(f"{module} ({mine}) imports {target} ({theirs})")
    assert not wrong, "\n".join(wrong)


def test_the_engine_never_imports_prefect():
    offenders = []
    for path in (ROOT / "engine").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] == "prefect"]
    assert not offenders, offenders


def test_architecture_doc_names_every_module():
    doc = (ROOT / "docs" / "architecture.md").read_text()
    missing = [m for m in architecture.graph() if f"`{m}`" not in doc]
    assert not missing, (
        f"docs/architecture.md does not list {missing}: run `python scripts/architecture.py` and update it"
    )


def test_only_the_model_wing_constructs_native_models():
    """Everything else loads through engine.model.loader.open_model (one place for threads, tile and KV sizing)."""
    offenders = []
    for folder in ("engine", "flows", "tasks", "evaluations", "scripts"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.is_relative_to(ROOT / "engine" / "model"):
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if (
                    isinstance(node, ast.Call)
                    and getattr(node.func, "id", getattr(node.func, "attr", None)) == "NativeModel"
                ):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, offenders


def test_flows_hold_no_tasks():
    """Flows are composition: every Prefect task lives in tasks/ (docs/architecture.md)."""
    found = []
    for path in (ROOT / "flows").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef):
                for deco in node.decorator_list:
                    target = deco.func if isinstance(deco, ast.Call) else deco
                    if getattr(target, "id", getattr(target, "attr", None)) == "task":
                        found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    assert not found, found


def test_the_http_layer_sees_engines_only_through_the_client():
    """The app and its routes reach a model only through EngineClient (engine/serving/client.py): no model,
    tokenizer, scheduler or engine-core internals; and app.py stays wiring."""
    graph = architecture.graph()
    http = ["engine.serving.app", "engine.serving.variants"] + [m for m in graph if m.endswith("_routes")]
    assert len(http) >= 5, http
    for module in http:
        reached = {i for i in graph[module] if i.startswith(("engine.model", "engine.serving.scheduler"))}
        assert not reached, f"{module} imports {sorted(reached)}: go through engine.serving.client.EngineClient"
    assert len((ROOT / "engine" / "serving" / "app.py").read_text().splitlines()) < 200
