"""Per-candidate pipeline: fetch -> quantize -> build kernels -> parity -> evaluate -> register."""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from engine.artifacts.store import open_store
from tasks.acquire import download_checkpoint
from tasks.compile import autotune_kernels, compile_kernels
from tasks.evaluate import evaluate_model
from tasks.quantize import quantize_model
from tasks.registry import register_candidate
from tasks.verify import check_model_parity


@flow(name="candidate-pipeline")
def candidate_pipeline(
    repo: str,
    revision: str,
    source: str = "hf",
    path: str | None = None,
    suite: str = "gate",
    limit: int | None = None,
    weights: str = "tq2_0",
    head: str = "q8_0",
) -> dict:
    """Turn one model (a Hub repo at a revision, or a local directory) into a registered version with its
    evaluation record.

    Returns:
        {"name", "version", "status", "artifact_id", "parity", "evaluation", "reason"}.
    """
    name, origin = repo, {"type": source, "repo": repo, "revision": revision}
    # Fetch: local models are already on disk; Hub ones are pinned to the discovered revision.
    checkpoint = path or download_checkpoint(repo, revision)
    # Quantize into the artifact store (content-addressed; a re-run finds the stored artifact).
    artifact_id = quantize_model(checkpoint, origin, weights, head)
    # Build the kernels for this host (cached by key) and tune them on this model's shapes.
    compile_kernels()
    tuning = autotune_kernels(str(open_store().local_path(artifact_id)))
    # Verify: the native path must equal the numpy reference before anything is measured.
    parity = check_model_parity(artifact_id)
    evaluation: dict | None = None
    # Register: a candidate for the release flow, or rejected with the reason.
    if not parity["passed"]:
        status, reason = "rejected", f"parity failed: {parity['reason']}"
    else:
        evaluation = evaluate_model(artifact_id, suite, limit)
        if not evaluation["valid"]:
            status, reason = "rejected", "evaluation record invalid: " + "; ".join(evaluation["failures"])
        else:
            status, reason = "candidate", f"parity passed ({parity['reason']}); {suite} suite evaluated"
    record_id = evaluation["record_id"] if evaluation else None
    version = register_candidate(name, artifact_id, origin, record_id, tuning["build_key"], status, reason)
    create_markdown_artifact(
        key="candidate-summary",
        markdown=_summary(version, parity, evaluation, reason),
        description=f"{name}: {version['status']}",
    )
    get_run_logger().info("%s:%s %s: %s", version["name"], version["version"], version["status"], reason)
    return {
        "name": version["name"],
        "version": version["version"],
        "status": version["status"],
        "artifact_id": artifact_id,
        "parity": parity,
        "evaluation": evaluation,
        "reason": reason,
    }


def _summary(version: dict, parity: dict, evaluation: dict | None, reason: str) -> str:
    lines = [
        f"# {version['name']}:{version['version']} — {version['status']}",
        "",
        reason,
        "",
        f"- artifact `{version['artifact_id']}`",
        f"- parity: {parity['reason']}",
    ]
    if evaluation:
        lines.append(
            f"- evaluation record `{evaluation['record_id']}`"
            + (f" ([report]({evaluation['report']}))" if evaluation.get("report") else "")
        )
        lines += ["", "| task | metric | value | stderr |", "|---|---|---|---|"]
        for task, result in evaluation["tasks"].items():
            for metric, m in result["metrics"].items() if not result.get("parent") else ():
                stderr = "n/a" if m["stderr"] is None else f"{m['stderr']:.4f}"
                lines.append(f"| {task} | {metric} | {m['value']:.4f} | {stderr} |")
        if evaluation.get("bench"):
            b = evaluation["bench"]
            lines.append(
                f"\ndecode {b['decode_tok_s']:.1f} tok/s, prefill {b['prefill_tok_s']:.1f} tok/s, TTFT "
                f"{b['ttft_ms']:.0f} ms"
            )
    return "\n".join(lines)
