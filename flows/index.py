"""Index flows: corpus -> changed files -> embed -> Qdrant -> evaluate -> index artifact -> registry; and the
recall evaluation of an index for each quantization."""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from engine.retrieval.index import default_index_dir
from engine.settings import get_settings
from tasks.index import evaluate_built_index, find_index_version, register_index, store_index, update_corpus_index

BUILD_KEY = "index-build"
EVAL_KEY = "index-eval"


@flow(name="build-index", log_prints=True)
def build_index(
    corpus_dir: str | None = None,
    index_dir: str | None = None,
    quantization: str | None = None,
    full: bool = False,
    strict: bool = False,
    publish_first: bool = True,
) -> dict:
    """Bring the index up to date with `corpus_dir` and register the result as a version of `index`.

    Args:
        corpus_dir: the directory to index (in a git checkout: what git tracks or would track); default
            RYZ_INDEX_CORPUS (this project's checkout, or the installed engine package).
        index_dir: the working index (default RYZ_INDEX_DIR, else $RYZ_HOME/indexes/default).
        quantization: none, int8, binary1, binary1.5 or binary2 (default RYZ_INDEX_QUANTIZATION); a change rebuilds.
        full: rebuild from scratch instead of re-indexing changed files only.
        strict: fail (indexing nothing) if any file cannot be read.
        publish_first: publish the version if there is no production index yet.

    Returns:
        {"update": stats, "evaluation": own row, "artifact_id", "version"}.
    """
    settings = get_settings()
    # A path the run names is taken as given; the default is resolved on the worker, so it exists there.
    corpus_dir = corpus_dir or str(settings.index_corpus.expanduser())
    index_dir = index_dir or str(default_index_dir(settings))
    # Extract + transform + load: changed files -> chunks -> vectors -> Qdrant (swapped in only when complete)
    update = update_corpus_index(corpus_dir, index_dir, quantization, full, strict)
    quantization = update["quantization"]
    unchanged = not (update["changed"] or update["deleted"] or update["full"] or update["reconfigured"])
    if unchanged and (existing := find_index_version(corpus_dir, update["revision"], quantization)):
        get_run_logger().info(
            "%s unchanged since %s:%d; nothing to store", corpus_dir, existing["name"], existing["version"]
        )
        return {
            "update": update,
            "evaluation": (existing.get("extra") or {}).get("evaluation", {}),
            "artifact_id": existing["artifact_id"],
            "version": f"{existing['name']}:{existing['version']}",
            "status": existing["status"],
            "unchanged": True,
        }
    # Evaluate: recall@10 vs exact float search and latency, on the index's own configuration
    evaluation = evaluate_built_index(index_dir)
    row = evaluation["rows"][0] if evaluation["rows"] else {"skipped": evaluation["summary"]["skipped"]}
    # Store + register: the index artifact (shard tarball + manifest), a version of `index`
    artifact_id = store_index(
        index_dir,
        {**row, "queries": evaluation["summary"]["queries"], "embed_ms_p50": evaluation["summary"]["embed_ms_p50"]},
    )
    version = register_index(artifact_id, corpus_dir, update["revision"], quantization, row, publish_first)
    measured = (
        f"{row['quantization']} recall@10 {row['recall_at_10']:.3f} at {row['compression']}x, p95 {row['p95_ms']} ms"
        if "recall_at_10" in row
        else row["skipped"]
    )
    summary = (
        f"{corpus_dir}: {update['files']} files, {update['chunks']} chunks ({update['embedded']} embedded, "
        f"{update['removed']} removed, {update['binary_skipped']} binary skipped, {len(update['unreadable'])} "
        f"unreadable); "
        f"{measured}; {version['name']}:{version['version']} ({version['status']})"
    )
    create_table_artifact(
        key=BUILD_KEY,
        table=[{**row, "artifact_id": artifact_id, "version": version["version"]}],
        description=f"Index build ({summary})",
    )
    get_run_logger().info("%s", summary)
    return {
        "update": update,
        "evaluation": row,
        "artifact_id": artifact_id,
        "version": f"{version['name']}:{version['version']}",
        "status": version["status"],
        "unchanged": False,
    }


@flow(name="evaluate-index", log_prints=True)
def evaluate_index_flow(
    index_dir: str,
    quantizations: list[str] | None = None,
    dims: list[int] | None = None,
    index_kinds: list[bool] | None = None,
    queries: int | None = None,
    oversampling: float | None = None,
    rescore: bool | None = None,
    hnsw_m: int | None = None,
    label: str = "",
    hnsw_ef: int | None = None,
) -> dict:
    """recall@10 / compression / p50-p95 latency of an index for each quantization, as a table artifact and a report."""
    from engine.retrieval.index import QUANTIZATIONS
    from evaluations.retrieval import format_table

    search = {
        k: v
        for k, v in {"oversampling": oversampling, "rescore": rescore, "hnsw_m": hnsw_m, "hnsw_ef": hnsw_ef}.items()
        if v is not None
    }
    result = evaluate_built_index(index_dir, queries, quantizations or list(QUANTIZATIONS), dims, index_kinds, search)
    s = result["summary"]
    description = (
        f"Index recall@10 vs exact float search: {label or index_dir}, {s['chunks']} chunks, {s['queries']} queries"
    )
    create_table_artifact(key=EVAL_KEY, table=result["rows"], description=description)
    create_markdown_artifact(
        key=f"{EVAL_KEY}-report",
        markdown=f"# {description}\n\n{format_table(result['rows'])}\n\n"
        f"Query embedding p50 {s['embed_ms_p50']} ms; embedder {s['embedder']['model']} "
        f"({s['embedder']['precision']}, {s['embedder']['onnx_sha256']}).\n",
        description=description,
    )
    return result


if __name__ == "__main__":
    import sys

    print(build_index(sys.argv[1] if len(sys.argv) > 1 else None))
