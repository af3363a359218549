"""The main job: discover -> per-candidate pipeline -> release through the canary -> run report."""

from __future__ import annotations

import contextlib
import time
from typing import Literal

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from pydantic import SecretStr

from engine.settings import get_settings
from flows.discovery import discover_models
from flows.pipeline import candidate_pipeline
from flows.release import release
from tasks.report import write_run_report


@flow(name="pipeline-run")
def pipeline_run(
    source: Literal["local", "hf"] = "local",
    path: str | None = None,
    suite: str = "gate",
    limit: int | None = None,
    release_candidates: bool = True,
) -> dict:
    """Discover new models and take each, in the order the source lists them, through the candidate pipeline
    and then the release flow, against a server of its own on 127.0.0.1 (stopped at the end).

    Returns:
        {"report": path, "candidates": [per-candidate results]}.
    """
    started = time.monotonic()
    logger = get_run_logger()
    # Discover: new (repo, revision) pairs only; a second run with nothing new stops here.
    candidates = discover_models(source=source, local_paths=[path] if path else None, include_errors=True)
    results = []
    with contextlib.ExitStack() as stack:
        server = None
        for candidate in candidates:
            if candidate["status"] == "error":  # seen but unreadable: reported with why, never "nothing new"
                results.append({**candidate, "status": "refused", "version": None})
                continue
            # Pipeline: one subflow per candidate; a failing candidate is reported, the others still run.
            state = candidate_pipeline(
                candidate["repo"],
                candidate["revision"],
                candidate["source"],
                candidate.get("path"),
                suite=suite,
                limit=limit,
                return_state=True,
            )
            result = state.result(raise_on_failure=False) if state.is_completed() else None
            outcome: dict
            if isinstance(result, dict):
                outcome = result
            else:  # failed or crashed: no result, or the exception it raised
                outcome = {
                    "status": "failed",
                    "version": None,
                    "reason": f"pipeline failed: {state.message or state.name}",
                }
            ref = outcome.get("version") and f"{outcome['name']}:{outcome['version']}"
            # Release: gates, canary steps with synthetic traffic, promotion; the server starts with the first one.
            if release_candidates and outcome["status"] == "candidate":
                server = server or stack.enter_context(_own_server())
                rel_state = release(
                    ref=ref,
                    synthetic_load=True,
                    servers=[server.url],
                    admin_token=SecretStr(server.token),
                    return_state=True,
                )
                rel = rel_state.result(raise_on_failure=False) if rel_state.is_completed() else None
                if not isinstance(rel, dict):
                    outcome = {**outcome, "release": "failed", "reason": outcome["reason"] + "; release flow failed"}
                else:
                    final = {"promoted": "production", "rejected": "rejected", "aborted": "rolled_back"}.get(
                        rel["status"], rel["status"]
                    )
                    why = next(
                        (e["reason"] for e in reversed(rel["log"]) if e["event"] == rel["status"]),
                        rel["log"][-1]["reason"],
                    )
                    outcome = {**outcome, "status": final, "release": rel["status"], "reason": why}
            results.append({"repo": candidate["repo"], "revision": candidate["revision"], **outcome, "version": ref})
    report = write_run_report(flow_run.get_name() or "local", source, suite, results, time.monotonic() - started)
    logger.info(
        "%s; report: %s", f"{len(results)} new candidate(s)" if results else "nothing new since the last run", report
    )
    return {"report": report, "candidates": results}


def _own_server():
    """A local `ryz serve` with a generated admin token, which the release flow is given as its fleet."""
    from engine.serving.localserver import LocalServer

    return LocalServer(get_settings().home / "logs" / "pipeline-serve.log")
