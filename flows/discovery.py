"""Discovery flow: what a source offers -> filters and novelty -> a table of every model -> the new candidates."""

from __future__ import annotations

from typing import Literal

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from engine.settings import Settings, get_settings
from tasks.discovery import (
    fetch_model_info,
    filter_candidates,
    hub_error_row,
    hub_retry_options,
    list_hf_models,
    scan_local_models,
)

ARTIFACT_KEY = "discovery"


@flow(name="discover-models")
def discover_models(
    source: Literal["hf", "local"] = "local",
    search: str | None = None,
    hf_filter: list[str] | None = None,
    sort: str | None = None,
    limit: int | None = None,
    local_paths: list[str] | None = None,
    include_errors: bool = False,
) -> list[dict]:
    """Find models in `source` that pass the settings' filters and whose (repo, revision) is not registered
    (with `include_errors`, also those that could not be read: truncated weights, unreadable config).

    Args:
        source: "hf" (the Hub at HF_ENDPOINT) or "local" (directories, then the HF cache).
        search, hf_filter, sort, limit: the Hub query (default: settings.discovery_hf_*).
        local_paths: model directories or folders of them (default: settings.discovery_local_paths).

    Returns:
        the new candidates (candidate dicts, docs/discovery.md) in the order the source lists them.
    """
    settings = get_settings()
    # Find: every model the source lists, in its order; Hub failures become `error` rows, never a crash.
    if source == "hf":
        seen = _read_hub(
            settings,
            settings.discovery_hf_search if search is None else search,
            settings.discovery_hf_filter if hf_filter is None else hf_filter,
            sort or settings.discovery_hf_sort,
            limit or settings.discovery_hf_limit,
        )
    else:
        seen = scan_local_models(local_paths or settings.discovery_local_paths, settings.discovery_hf_cache or None)
    # Filter: architecture / license / parameter / size allowlists, then novelty against the registry.
    rows = filter_candidates(seen)
    kept = [row for row in rows if row["status"] == "kept"]
    wanted = [row for row in rows if row["status"] == "kept" or (include_errors and row["status"] == "error")]
    # Report: one row per model seen and why it was kept or skipped.
    counts = {status: sum(row["status"] == status for row in rows) for status in ("kept", "skipped", "error")}
    summary = (
        f"{source}: {len(rows)} models seen, {counts['kept']} new, {counts['skipped']} skipped, {counts['error']} "
        f"errors"
    )
    create_table_artifact(key=ARTIFACT_KEY, table=rows, description=f"Discovery ({summary})")
    get_run_logger().info("%s%s", summary, "".join(f"\n  new: {row['repo']}@{row['revision'][:12]}" for row in kept))
    return wanted


def _read_hub(settings: Settings, search: str, hf_filter: list[str], sort: str, limit: int) -> list[dict]:
    """List the Hub, then read every listed model concurrently; each failure is a row, not an exception."""
    retry = hub_retry_options(settings)
    listing = list_hf_models.with_options(**retry)(search, hf_filter, sort, limit, return_state=True)
    if not listing.is_completed():
        return [hub_error_row(f"(listing {search!r})", listing)]
    repos = listing.result()
    futures = fetch_model_info.with_options(**retry).map(repos)
    futures.wait()
    return [f.result() if f.state.is_completed() else hub_error_row(repo, f.state) for repo, f in zip(repos, futures)]


if __name__ == "__main__":
    for candidate in discover_models(source="local"):
        print(candidate["repo"], candidate["revision"], candidate["reason"])
