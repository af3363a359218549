"""Evaluate flow (CI): a model -> suite + benchmark -> validated record -> gates against a baseline; fails on a
regression."""

from __future__ import annotations

from prefect import flow, get_run_logger, unmapped
from prefect.artifacts import create_markdown_artifact

from engine.settings import get_settings
from tasks.evaluate import (
    bench_artifact,
    evaluate_model,
    evaluate_shard,
    load_baseline,
    plan_evaluation_shards,
    resolve_model_artifact,
    store_evaluation,
)


class GateFailed(RuntimeError):
    """The flow run fails with this: an invalid record or a regression against the baseline."""


@flow(name="evaluate")
def evaluate(
    model: str, suite: str = "gate", limit: int | None = None, baseline: str | None = "production", shards: int = 1
) -> dict:
    """Evaluate `model` and gate it against `baseline` (a record file or registry ref; none: the settings' floors).
    With `shards` > 1 the suite's tasks run as that many concurrent tasks on the flow's task runner (Dask)."""
    from evaluations.gates import gate as combine_gates

    settings = get_settings()
    artifact_id = resolve_model_artifact(model)
    if shards > 1:
        groups = plan_evaluation_shards(suite, limit, shards)
        parts = evaluate_shard.map(unmapped(artifact_id), unmapped(suite), unmapped(limit), groups)
        evaluation = store_evaluation(parts.result(), bench_artifact(artifact_id))
    else:
        evaluation = evaluate_model(artifact_id, suite, limit)
    base = load_baseline(baseline)
    if not evaluation["valid"]:
        gate = None
        verdict = "evaluation record invalid: " + "; ".join(evaluation["failures"])
    else:
        record = {"tasks": evaluation["tasks"], "bench": evaluation["bench"], "environment": evaluation["environment"]}
        gate = combine_gates(record, base, settings)
        verdict = gate.summary()
    passed = gate is not None and gate.passed  # gate is None when the record is invalid
    checks = "\n".join(f"- {c}" for c in (gate.checks if gate else []))
    create_markdown_artifact(
        key="evaluate-gates",
        markdown=f"# {'PASSED' if passed else 'FAILED'}: {model} on {suite}\n\n"
        f"baseline: {baseline if base else 'none (floors)'}\n\n{verdict}\n\n{checks}\n\n"
        f"record `{evaluation['record_id']}`",
    )
    get_run_logger().info("%s: %s", "gates passed" if passed else "GATE FAILED", verdict)
    if not passed:
        raise GateFailed(f"{model}: {verdict}")
    return {"artifact_id": artifact_id, "record_id": evaluation["record_id"], "verdict": verdict, "passed": passed}


def with_runner(runner: str | None, shards: int):
    """The evaluate flow on a task runner: None (threads in this process), "dask" (a LocalCluster of `shards`
    single-threaded workers) or "dask=ADDRESS" (an existing Dask scheduler, workers on other machines)."""
    if not runner:
        return evaluate
    kind, _, address = runner.partition("=")
    if kind != "dask":
        raise ValueError(f"--runner takes dask or dask=ADDRESS, got {runner!r}")
    from prefect_dask import DaskTaskRunner

    task_runner = (
        DaskTaskRunner(address=address)
        if address
        else DaskTaskRunner(cluster_kwargs={"n_workers": max(1, shards), "threads_per_worker": 1})
    )
    # Prefect types task_runner as TaskRunner[PrefectFuture[Any]] with an invariant parameter, so no
    # concrete runner matches it (PrefectHQ/prefect#16938); a DaskTaskRunner is what the flow is meant to take.
    return evaluate.with_options(task_runner=task_runner)  # type: ignore[arg-type]
