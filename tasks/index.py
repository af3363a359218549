"""Prefect tasks for the retrieval index: update it from a corpus, evaluate it, store it, register it."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from prefect import get_run_logger, task
from prefect.runtime import flow_run

from engine.artifacts.registry import Registry
from engine.artifacts.store import open_store
from engine.errors import CorpusError, RetrievalIndexError
from engine.retrieval.corpus import scan_corpus
from engine.retrieval.embedder import Embedder
from engine.retrieval.index import (
    ARTIFACT_KIND,
    REGISTRY_NAME,
    STATE_FILE,
    IndexConfig,
    manifest_fields,
    open_index,
    pack_index,
    production_index,
    publish_index,
    read_state,
    update_index,
)
from engine.settings import get_settings


def _actor() -> str:
    run_id = flow_run.get_id()
    return f"flow-run:{run_id}" if run_id else "ryz"


def _built_state(index_dir: str) -> dict:
    """The state of the index built in `index_dir`; an error if there is none."""
    state = read_state(Path(index_dir))
    if state is None:
        raise RetrievalIndexError(
            f"{index_dir} holds no index ({STATE_FILE} missing); build one with `ryz index build DIR`"
        )
    return state


def _embedder(dims: int) -> Embedder:
    settings = get_settings()
    return Embedder.load(
        settings.cache_dir,
        precision=settings.index_precision,
        dims=dims,
        batch_size=settings.index_batch_size,
        threads=settings.threads or os.cpu_count() or 1,
    )


@task(name="update-index")
def update_corpus_index(
    corpus_dir: str, index_dir: str, quantization: str | None = None, full: bool = False, strict: bool = False
) -> dict:
    """Scan the corpus, embed the chunks not seen before and write them (plus deletions) into the index.

    Returns:
        {"files", "changed", "deleted", "chunks", "embedded", "reused", "removed", "embed_s", "skipped",
        "unreadable", "revision", ...}; the index directory is replaced only if everything succeeded.
    """
    settings, logger = get_settings(), get_run_logger()
    scan = scan_corpus(corpus_dir, settings.index_max_file_bytes)
    if scan.unreadable:
        shown = ", ".join(f"{u['path']} ({u['error']})" for u in scan.unreadable[:5])
        if strict:
            raise CorpusError(
                f"{len(scan.unreadable)} files of {scan.root} could not be read: {shown}; nothing was "
                "indexed: fix their permissions or remove them"
            )
        logger.warning(
            "%d unreadable files skipped (their previous chunks, if any, are kept): %s", len(scan.unreadable), shown
        )
    if not scan.files:
        raise CorpusError(
            f"no text files to index in {scan.root} "
            f"({'git checkout: only tracked or trackable files; ' if scan.git else ''}"
            f"skipped: {scan.skipped})"
        )
    cfg = IndexConfig.from_settings(settings, quantization=quantization)
    stats = update_index(
        Path(index_dir),
        scan,
        _embedder(cfg.dims),
        cfg,
        full=full,
        chunk_chars=settings.index_chunk_chars,
        overlap_chars=settings.index_chunk_overlap,
        qdrant_url=settings.qdrant_url,
        collection=settings.index_collection,
        log=logger.info,
    )
    logger.info(
        "index %s: %d chunks (%d embedded in %.1fs, %d reused, %d removed); skipped %s",
        index_dir,
        stats["chunks"],
        stats["embedded"],
        stats["embed_s"],
        stats["reused"],
        stats["removed"],
        scan.skipped,
    )
    return {
        **stats,
        "skipped": scan.skipped,
        "binary_skipped": scan.skipped["binary"],
        "unreadable": scan.unreadable,
        "revision": scan.revision,
        "git": scan.git,
        "quantization": cfg.quantization,
    }


@task(name="evaluate-index")
def evaluate_built_index(
    index_dir: str,
    queries: int | None = None,
    quantizations: list[str] | None = None,
    dims: list[int] | None = None,
    index_kinds: list[bool] | None = None,
    search: dict | None = None,
) -> dict:
    """Measure recall@10 against exact float search and p50/p95 latency (evaluations/retrieval.py).

    Returns:
        {"rows": [...], "summary": {...}}; by default one row, for the index's own configuration.
    """
    from evaluations.retrieval import evaluate_index

    settings = get_settings()
    state = _built_state(index_dir)
    if state["corpus"]["chunks"] < 2 * 10:
        reason = f"not measured: {state['corpus']['chunks']} chunks, recall@10 needs at least 20"
        get_run_logger().warning("%s", reason)
        return {"rows": [], "summary": {"skipped": reason, "queries": 0, "embed_ms_p50": None}}
    quantizations = quantizations or [state["config"]["quantization"]]
    with tempfile.TemporaryDirectory(prefix="ryz-index-eval-") as work:
        return evaluate_index(
            Path(index_dir),
            _embedder(state["embedder"]["dims"]),
            quantizations,
            dims,
            index_kinds,
            queries or settings.index_eval_queries,
            search_overrides=search,
            workdir=Path(work),
        )


@task(name="store-index", retries=2, retry_delay_seconds=[1, 5])
def store_index(index_dir: str, evaluation: dict | None) -> str:
    """Pack the index directory (Edge shard, or the server collection's snapshot) into the artifact store.

    Returns:
        the artifact id (sha256:...) of the tarball; its manifest is the DESIGN.md "Index artifact".
    """
    state = _built_state(index_dir)
    with tempfile.TemporaryDirectory(prefix="ryz-index-pack-") as work:
        snapshot = None
        if state["backend"] == "server":
            idx, _ = open_index(Path(index_dir))
            try:
                snapshot = idx.snapshot(Path(work) / "collection.snapshot")
            finally:
                idx.close()
        tarball = pack_index(Path(index_dir), Path(work) / "index.tar.gz", snapshot)
        artifact_id = open_store().put_file(tarball, ARTIFACT_KIND, manifest_fields(state, evaluation))
    get_run_logger().info("stored index %s (%d chunks)", artifact_id, state["corpus"]["chunks"])
    return artifact_id


@task(name="find-index-version")
def find_index_version(corpus_dir: str, revision: str, quantization: str) -> dict | None:
    """The `index` version already registered from this corpus revision with this quantization, if any.

    Returns:
        the version as JSON, or None.
    """
    for version in reversed(Registry(open_store()).versions(REGISTRY_NAME)):
        source = version.source
        if (source.get("repo"), source.get("revision"), source.get("quantization")) == (
            str(Path(corpus_dir).resolve()),
            revision,
            quantization,
        ):
            return version.to_json()
    return None


@task(name="register-index", retries=2, retry_delay_seconds=[1, 5])
def register_index(
    artifact_id: str,
    corpus_dir: str,
    revision: str,
    quantization: str,
    evaluation: dict | None = None,
    publish_first: bool = True,
) -> dict:
    """Register the artifact as a version of `index` (unless this artifact already is one); the first index
    ever is published (status production).

    Returns:
        the version as JSON.
    """
    registry, logger = Registry(open_store(), actor=_actor()), get_run_logger()
    for version in registry.versions(REGISTRY_NAME):
        if version.artifact_id == artifact_id:
            logger.info("%s is already %s", artifact_id[:19], version.ref)
            return version.to_json()
    version = registry.register(
        REGISTRY_NAME,
        artifact_id,
        {"kind": "corpus", "repo": str(Path(corpus_dir).resolve()), "revision": revision, "quantization": quantization},
        reason=f"built from {corpus_dir}",
        extra={"evaluation": evaluation or {}},
    )
    if publish_first and production_index(registry) is None:
        version = publish_index(registry, version.ref, "first index: nothing to compare with")
    logger.info("registered %s (%s)", version.ref, version.status)
    return version.to_json()
