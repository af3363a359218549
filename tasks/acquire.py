"""Prefect task: fetch a Hub checkpoint pinned to its revision (local candidates need nothing)."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import INPUTS

from engine.settings import get_settings

CHECKPOINT_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model"]


@task(
    name="download-checkpoint",
    retries=3,
    retry_delay_seconds=[5, 30, 120],
    cache_policy=INPUTS,
    timeout_seconds=6 * 3600,
)
def download_checkpoint(repo: str, revision: str) -> str:
    """snapshot_download of config, tokenizer and safetensors at exactly `revision`; returns the local directory.

    Example:
        >>> download_checkpoint("microsoft/bitnet-b1.58-2B-4T", "04c3b9ad...")   # ~/.cache/huggingface/hub/...
    """
    from huggingface_hub import snapshot_download

    settings = get_settings()
    path = snapshot_download(
        repo,
        revision=revision,
        allow_patterns=CHECKPOINT_PATTERNS,
        endpoint=settings.hf_endpoint,
        etag_timeout=settings.discovery_timeout,
    )
    get_run_logger().info("downloaded %s@%s to %s", repo, revision[:12], path)
    return path
