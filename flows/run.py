"""The main job: discover -> per-candidate pipeline -> release (issue 7) -> run report."""

from __future__ import annotations

import time
from typing import Literal

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from flows.discovery import discover_models
from flows.pipeline import candidate_pipeline
from tasks.report import write_run_report


@flow(name="pipeline-run")
def pipeline_run(source: Literal["local", "hf"] = "local", path: str | None = None, suite: str = "gate",
                 limit: int | None = None) -> dict:
    """Discover new models and take each, in the order the source lists them, through the candidate pipeline.

    Returns:
        {"report": path, "candidates": [per-candidate results]}.
    """
    started = time.monotonic()
    logger = get_run_logger()
    # Discover: new (repo, revision) pairs only; a second run with nothing new stops here.
    candidates = discover_models(source=source, local_paths=[path] if path else None)
    results = []
    for candidate in candidates:
        # Pipeline: one subflow per candidate; a failing candidate is reported, the others still run.
        state = candidate_pipeline(candidate["repo"], candidate["revision"], candidate["source"], candidate.get("path"),
                                   suite=suite, limit=limit, return_state=True)
        outcome = state.result(raise_on_failure=False) if state.is_completed() else None
        if outcome is None:
            outcome = {"status": "failed", "version": None, "reason": f"pipeline failed: {state.message or state.name}"}
        # Release: the canary flow arrives with issue 7; until then candidates wait in the registry.
        results.append({"repo": candidate["repo"], "revision": candidate["revision"], **outcome,
                        "version": outcome.get("version") and f"{outcome['name']}:{outcome['version']}"})
    report = write_run_report(flow_run.get_name() or "local", source, suite, results, time.monotonic() - started)
    logger.info("%s; report: %s", f"{len(results)} new candidate(s)" if results else "nothing new since the last run", report)
    return {"report": report, "candidates": results}
