"""Prefect tasks that turn a checkpoint into a stored model artifact."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import CacheKeyFnPolicy

from engine.artifacts.store import open_store
from engine.model.quantize import find_quantized, quantize_to_store
from engine.settings import get_settings


def _quantize_key(_context: Any, p: dict[str, Any]) -> str | None:
    """Keyed on the checkpoint's content revision and the types; only while the artifact is still stored,
    so a cache hit never names a deleted artifact."""
    artifact = find_quantized(open_store(), p["source"]["revision"], p["weights"], p["head"])
    if artifact is None:
        return None
    return (
        "ryz-quantize-"
        + hashlib.sha256(f"{p['source']['revision']}|{p['weights']}|{p['head']}|{artifact}".encode()).hexdigest()
    )


@task(name="quantize-model", cache_policy=CacheKeyFnPolicy(cache_key_fn=_quantize_key))
def quantize_model(checkpoint_dir: str, source: dict, weights: str = "tq2_0", head: str = "q8_0") -> str:
    """Quantize a checkpoint into a ternary GGUF in the artifact store; return its artifact id.

    Args:
        checkpoint_dir: a local Hugging Face checkpoint directory.
        source: {"type": "hf"|"local", "repo", "revision", ...}, recorded in the manifest.
        weights, head: GGUF types of the ternary linears and of the embedding/head.

    Returns:
        "sha256:<hex>" of the GGUF.
    """
    logger = get_run_logger()
    store = open_store()
    if (existing := find_quantized(store, source["revision"], weights, head)) is not None:
        logger.info("%s@%s already quantized as %s", source.get("repo"), source["revision"][:12], existing)
        return existing
    manifest = quantize_to_store(
        Path(checkpoint_dir), store, get_settings().cache_dir / "work", weights, head, source=source
    )
    logger.info(
        "quantized %s into %s (%s, %.1f MB)", checkpoint_dir, manifest["artifact_id"], weights, manifest["size"] / 1e6
    )
    return manifest["artifact_id"]
