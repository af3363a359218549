"""Per-candidate pipeline: fetch -> quantize -> build kernels -> parity -> evaluate -> register."""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from engine.artifacts.store import open_store
from flows.progress import stage
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
    store = open_store()
    # Fetch: local models are already on disk; Hub ones are pinned to the discovered revision.
    if path:
        checkpoint = path
    else:
        with stage(name, "fetch") as s:
            checkpoint = download_checkpoint(repo, revision)
            s.detail = f"{repo}@{revision[:12]}"
    # Quantize into the artifact store (content-addressed; a re-run finds the stored artifact).
    with stage(name, "quantize") as s:
        artifact_id = quantize_model(checkpoint, origin, weights, head)
        manifest = store.get_manifest(artifact_id)
        s.detail = f"{weights.upper()} + {head.upper()} head, {manifest['size'] / 1e6:.1f} MB"
    # Build the kernels for this host (cached by key) and tune them on this model's shapes.
    with stage(name, "kernels") as s:
        compile_kernels()
        tuning = autotune_kernels(str(store.local_path(artifact_id)))
        tuned = "tuning recorded" if tuning["reused"] else f"tuned in {tuning['seconds']:.1f} s"
        s.detail = f"build {tuning['build_key'][:12]}, {tuning['isa']}, {tuned}"
    # Verify: the native path must equal the numpy reference before anything is measured.
    with stage(name, "parity") as s:
        parity = check_model_parity(artifact_id)
        s.status = "passed" if parity["passed"] else "FAILED"
        s.detail = _short_parity(parity) if parity["passed"] else parity["reason"]
    evaluation: dict | None = None
    # Register: a candidate for the release flow, or rejected with the reason.
    if not parity["passed"]:
        status, reason = "rejected", f"parity failed: {parity['reason']}"
    else:
        with stage(name, "evaluate") as s:
            evaluation = evaluate_model(artifact_id, suite, limit)
            s.status = "done" if evaluation["valid"] else "INVALID"
            s.detail = _evaluation_line(suite, evaluation)
        if not evaluation["valid"]:
            status, reason = "rejected", "evaluation record invalid: " + "; ".join(evaluation["failures"])
        else:
            status, reason = "candidate", f"parity passed ({parity['reason']}); {suite} suite evaluated"
    record_id = evaluation["record_id"] if evaluation else None
    with stage(name, "register") as s:
        version = register_candidate(name, artifact_id, origin, record_id, tuning["build_key"], status, reason)
        s.status, s.detail = version["status"], f"{version['name']}:{version['version']}"
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


def _short_parity(parity: dict) -> str:
    """The parity line's detail: which ISA and how close, without the whole reason."""
    rel, isas = parity.get("rel_l2"), ", ".join(parity.get("isas") or [parity.get("isa", "?")])
    return f"native = reference on {isas}" + (f", rel L2 <= {rel:.1e}" if isinstance(rel, float) else "")


def _evaluation_line(suite: str, evaluation: dict) -> str:
    """`gate: 3 tasks, demo_mc acc 0.995, ...; decode 2237 tok/s`: each top-level task's headline metric."""
    from evaluations.report import headline_metric

    if not evaluation["valid"]:
        return "; ".join(evaluation["failures"])
    top = {t: r for t, r in evaluation["tasks"].items() if not r.get("parent")}
    parts = []
    for task, result in top.items():
        metric = headline_metric(result) or next(iter(result.get("metrics") or {}), None)  # else e.g. perplexity
        if metric and result["metrics"][metric].get("value") is not None:
            parts.append(f"{task} {metric} {result['metrics'][metric]['value']:.3f}")
    text = f"{suite}: {len(top)} task{'s' if len(top) != 1 else ''}" + "".join(f", {p}" for p in parts)
    if evaluation.get("bench"):
        text += f"; decode {evaluation['bench']['decode_tok_s']:.0f} tok/s"
    return text
