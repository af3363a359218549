"""Prefect task: the HTML report of one pipeline run (jinja2 template beside this module)."""

from __future__ import annotations

import datetime
import os
import tempfile
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, select_autoescape
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from engine.artifacts.registry import Registry
from engine.artifacts.store import open_store
from engine.settings import get_settings

_env = Environment(
    loader=FileSystemLoader(Path(__file__).parent / "templates"), autoescape=select_autoescape(["html", "j2"])
)


def _metrics(evaluation: dict | None) -> list[dict]:
    if not evaluation:
        return []
    return [
        {"task": task, "metric": metric, "value": m["value"], "stderr": m["stderr"]}
        for task, result in evaluation["tasks"].items()
        for metric, m in result["metrics"].items()
        if metric in ("acc", "acc_norm", "exact_match", "word_perplexity") and not result.get("parent")
    ]


@task(name="write-run-report")
def write_run_report(run_name: str, source: str, suite: str, results: list[dict], seconds: float) -> str:
    """Render the run report (every new candidate, its evaluation and its fate; the registry after the run).

    Returns:
        the report's path, under $RYZ_HOME/reports/.
    """
    store = open_store()
    registry = Registry(store)
    aliases = registry.aliases()
    versions = [
        {**v.to_json(), "aliases": [a for a, t in aliases.items() if (t["name"], t["version"]) == (v.name, v.version)]}
        for v in registry.versions()
    ]
    rows = [
        {
            **r,
            "metrics": _metrics(r.get("evaluation")),
            "bench": (r.get("evaluation") or {}).get("bench"),
            "report": (r.get("evaluation") or {}).get("report"),
        }
        for r in results
    ]
    fates: dict[str, int] = {}
    for r in rows:
        fates[r["status"]] = fates.get(r["status"], 0) + 1
    headline = (
        (f"{len(rows)} new candidate(s): " + ", ".join(f"{n} {s}" for s, n in sorted(fates.items())))
        if rows
        else "Nothing new since the last run."
    )
    html = _env.get_template("run_report.html.j2").render(
        run_name=run_name,
        source=source,
        suite=suite,
        results=rows,
        registry=versions,
        seconds=seconds,
        store=store.url,
        headline=headline,
        started=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    )
    out_dir = get_settings().home / "reports"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"pipeline-{run_name}.html"
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".report-", suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        handle.write(html)
    os.replace(tmp, path)
    lines = [f"# Pipeline run {run_name}", "", headline, "", f"[HTML report]({path.as_uri()})", ""]
    lines += [f"- `{r['repo']}` {r.get('version') or ''}: **{r['status']}**: {r['reason']}" for r in rows]
    create_markdown_artifact(key="pipeline-run", markdown="\n".join(lines), description=headline)
    get_run_logger().info("run report: %s", path)
    return str(path)
