"""Prefect tasks for discovery: list Hub models, read one model's info, scan local directories, judge candidates."""

from __future__ import annotations

from typing import Any

from prefect import Task, get_run_logger, task
from prefect.client.schemas.objects import State, TaskRun
from prefect.tasks import exponential_backoff

from engine.artifacts.discovery import Candidate, judge_candidates, list_hub_models, read_hub_model
from engine.artifacts.discovery import scan_local_models as scan_local
from engine.artifacts.registry import Registry
from engine.artifacts.store import open_store
from engine.errors import HubError
from engine.settings import Settings, get_settings


def retry_if_hub_flaky(_task: Task, _task_run: TaskRun, state: State) -> bool:
    """Retry what may pass next time (429, 5xx, timeouts, malformed JSON); a 404 or a bug fails at once."""
    error = state.result(raise_on_failure=False)
    return isinstance(error, HubError) and error.retryable


def hub_retry_options(settings: Settings) -> dict[str, Any]:
    """`Task.with_options` arguments applying the settings' retry count and exponential backoff to a Hub task."""
    retries = settings.discovery_retries
    return {
        "retries": retries,
        "retry_delay_seconds": exponential_backoff(settings.discovery_retry_delay)(retries) or 0,
        "retry_condition_fn": retry_if_hub_flaky,
    }


def hub_error_row(repo: str, state: State) -> dict:
    """The table row of a Hub request that failed for good: status `error` and what went wrong."""
    error = state.result(raise_on_failure=False)
    reason = str(error) or repr(error)
    if isinstance(error, HubError) and error.retryable:
        reason += f" (gave up after {get_settings().discovery_retries + 1} attempts)"
    return Candidate("hf", repo, None, status="error", reason=reason).to_json()


# Retry defaults here; flows apply settings.discovery_retries / discovery_retry_delay with hub_retry_options.
@task(
    name="list-hf-models",
    retries=3,
    retry_delay_seconds=exponential_backoff(2.0),
    retry_condition_fn=retry_if_hub_flaky,
)
def list_hf_models(
    search: str | None = None, filter: list[str] | None = None, sort: str | None = None, limit: int = 50
) -> list[str]:
    """List Hub model ids matching `search` and the `filter` tags, in the Hub's `sort` order.

    Args:
        search: a substring of the model id; filter: tags every model must have; sort: downloads, likes,
            last_modified, created_at or trending_score; limit: at most this many ids.

    Returns:
        repo ids such as ["microsoft/bitnet-b1.58-2B-4T", ...]; the Hub is settings.hf_endpoint (HF_ENDPOINT).
    """
    settings = get_settings()
    repos = list_hub_models(
        endpoint=settings.hf_endpoint,
        search=search,
        filter=filter or [],
        sort=sort,
        limit=limit,
        timeout=settings.discovery_timeout,
    )
    get_run_logger().info(
        "%s lists %d models for search=%r filter=%r", settings.hf_endpoint, len(repos), search, filter
    )
    return repos


@task(
    name="fetch-model-info",
    retries=3,
    retry_delay_seconds=exponential_backoff(2.0),
    retry_condition_fn=retry_if_hub_flaky,
)
def fetch_model_info(repo: str) -> dict:
    """Read one Hub model's architecture, license, parameter count, download size and commit sha.

    Returns:
        a candidate dict (docs/discovery.md) with status "seen".
    """
    settings = get_settings()
    return read_hub_model(repo, endpoint=settings.hf_endpoint, timeout=settings.discovery_timeout).to_json()


@task(name="scan-local-models")
def scan_local_models(paths: list[str], hf_cache: str | None = None) -> list[dict]:
    """Describe every model directory under `paths` (zoo.json order) and every snapshot in the HF cache.

    Returns:
        candidate dicts with status "seen" (or "error" for a directory that cannot be read).
    """
    logger = get_run_logger()
    seen = [c.to_json() for c in scan_local(paths, hf_cache, warn=logger.warning)]
    logger.info("%d model directories under %s%s", len(seen), ", ".join(paths), f" and {hf_cache}" if hf_cache else "")
    return seen


@task(name="filter-candidates")
def filter_candidates(seen: list[dict]) -> list[dict]:
    """Judge each model seen against the settings' filters and the registry: kept or skipped, and why.

    Returns:
        the same models in the same order, each with `status` (kept, skipped, error) and `reason`.
    """
    settings = get_settings()
    judged = judge_candidates(
        [Candidate.from_json(row) for row in seen], settings, Registry(open_store(settings=settings))
    )
    return [c.to_json() for c in judged]
