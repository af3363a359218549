"""Prefect tasks that write the registry: register a candidate, reject one."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.runtime import flow_run

from engine.artifacts.registry import Registry
from engine.artifacts.store import open_store


def _actor() -> str:
    run_id = flow_run.get_id()
    return f"flow-run:{run_id}" if run_id else "ryz"


@task(name="register-candidate", retries=2, retry_delay_seconds=[1, 5])
def register_candidate(
    name: str,
    artifact_id: str,
    source: dict,
    evaluation: str | None,
    kernel_build: str | None,
    status: str = "candidate",
    reason: str = "passed the candidate pipeline",
) -> dict:
    """Add a version of `name` (or return the one already registered from this source revision).

    Returns:
        the version as JSON ({"name", "version", "status", "artifact_id", ...}).
    """
    registry = Registry(open_store(), actor=_actor())
    version, added = registry.register_once(
        name, artifact_id, source, evaluation, kernel_build, reason=reason, status=status
    )
    if added:
        get_run_logger().info("registered %s (%s): %s", version.ref, status, reason)
    else:
        get_run_logger().info("%s@%s is already %s", name, source["revision"][:12], version.ref)
    return version.to_json()
