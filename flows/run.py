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
from flows.progress import emit, seconds, shorten, stage
from flows.release import release
from tasks.release import Fleet, fleet_configured, resolve_fleet
from tasks.report import write_run_report


@flow(name="pipeline-run")
def pipeline_run(
    source: Literal["local", "hf"] = "local",
    path: str | None = None,
    suite: str = "gate",
    limit: int | None = None,
    release_candidates: bool = True,
    servers: list[str] | None = None,
    admin_token: SecretStr | None = None,
    synthetic_load: bool | None = None,
) -> dict:
    """Discover new models and take each, in the order the source lists them, through the candidate pipeline
    and then the release flow. The release goes to the fleet (`servers`, else RYZ_RELEASE_SERVERS) with its real
    traffic (synthetic load only when asked: `synthetic_load` or RYZ_RELEASE_SYNTHETIC_LOAD); with no fleet
    configured, to a server of its own on 127.0.0.1 with synthetic load (stopped at the end): the embedded default.

    Returns:
        {"report": path, "candidates": [per-candidate results]}.
    """
    started = time.monotonic()
    logger = get_run_logger()
    # Discover: new (repo, revision) pairs only; a second run with nothing new stops here.
    with stage(source, "discover") as s:
        candidates = discover_models(source=source, local_paths=[path] if path else None, include_errors=True)
        unreadable = sum(c["status"] == "error" for c in candidates)
        s.detail = f"{len(candidates) - unreadable} new" + (f", {unreadable} unreadable" if unreadable else "")
    results = []
    settings = get_settings()
    fleet = resolve_fleet(servers, admin_token, settings) if servers or fleet_configured(settings) else None
    load = settings.release_synthetic_load if synthetic_load is None else synthetic_load
    with contextlib.ExitStack() as stack:
        for candidate in candidates:
            if candidate["status"] == "error":  # seen but unreadable: reported with why, never "nothing new"
                results.append({**candidate, "status": "refused", "version": None})
                emit(candidate["repo"], "discover", f"refused  ({candidate.get('reason', '')})")
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
            # Release: gates, canary steps, promotion; without a fleet, our own server starts with the first one.
            if release_candidates and outcome["status"] == "candidate":
                if fleet is None:
                    server = stack.enter_context(_own_server())
                    fleet, load = Fleet(servers=[server.url], admin_token=SecretStr(server.token)), True
                release_started = time.monotonic()
                rel_state = release(
                    ref=ref,
                    synthetic_load=load,
                    servers=fleet.servers,
                    admin_token=fleet.admin_token,
                    return_state=True,
                )
                rel = rel_state.result(raise_on_failure=False) if rel_state.is_completed() else None
                _release_line(candidate["repo"], rel, rel_state, time.monotonic() - release_started)
                if not isinstance(rel, dict):
                    outcome = {**outcome, "release": "failed", "reason": outcome["reason"] + "; release flow failed"}
                else:
                    final = {"promoted": "production", "aborted": "rolled_back"}.get(rel["status"], rel["status"])
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


def _release_line(model: str, rel: object, state, elapsed: float) -> None:
    """`model  release  5% → 25% → 50% → 100% promoted 9.1 s`: the canary steps the release went through."""
    took = seconds(elapsed)
    if not isinstance(rel, dict):
        emit(model, "release", f"failed {took}  ({shorten(state.message or state.name)})")
        return
    steps = [
        f"{e['weight']}%" + ("" if e["event"] == "step-pass" else f" {e['event'].removeprefix('step-')}")
        for e in rel["log"]
        if e["event"].startswith("step-") and "weight" in e
    ]
    why = next((e["reason"] for e in reversed(rel["log"]) if e["event"] == rel["status"]), "")
    text = "".join(f"{s} → " for s in steps) + f"{rel['status']} {took}"
    emit(model, "release", text + (f"  ({shorten(why)})" if why and not steps else ""))


def _own_server():
    """A local `ryz serve` with a generated admin token, which the release flow is given as its fleet."""
    from engine.serving.localserver import LocalServer

    return LocalServer(get_settings().home / "logs" / "pipeline-serve.log")
