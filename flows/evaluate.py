"""Evaluate flow (CI): a model -> suite + benchmark -> validated record -> gates against a baseline; fails on a
regression. The baseline is a record (a file or a registry version's), or a model measured in this run: evaluated
on the same suite, its decode speed interleaved with the candidate's on this machine (`ryz ci-bench`)."""

from __future__ import annotations

from prefect import flow, get_run_logger, unmapped
from prefect.artifacts import create_markdown_artifact

from engine.settings import get_settings
from tasks.evaluate import (
    bench_artifact,
    evaluate_baseline,
    evaluate_model,
    evaluate_shard,
    interleave_decode,
    load_baseline,
    plan_evaluation_shards,
    resolve_model_artifact,
    store_evaluation,
)


class GateFailed(RuntimeError):
    """The flow run fails with this: an invalid record or a regression against the baseline."""


@flow(name="evaluate")
def evaluate(
    model: str,
    suite: str = "gate",
    limit: int | None = None,
    baseline: str | None = "production",
    shards: int = 1,
    baseline_model: str | None = None,
    baseline_ryz: str | None = None,
    rounds: int = 3,
    bench: bool = True,
    require_tasks: bool = False,
    require_speed: bool = False,
) -> dict:
    """Evaluate `model` and gate it against `baseline` (a record file or registry ref; none: the settings' floors),
    or, with `baseline_model`, against that model measured now (by `baseline_ryz`, another installation's `ryz`,
    if given): same suite, decode speed interleaved over `rounds` runs each. `require_*`: a gate that compared no
    task / no speed fails. With `shards` > 1 the suite's tasks run as concurrent tasks on the flow's task runner."""
    from evaluations.gates import gate as combine_gates

    settings = get_settings()
    artifact_id = resolve_model_artifact(model)
    own_bench = bench and baseline_model is None  # a measured baseline's speed is interleaved below instead
    if shards > 1:
        groups = plan_evaluation_shards(suite, limit, shards)
        parts = evaluate_shard.map(unmapped(artifact_id), unmapped(suite), unmapped(limit), groups)
        evaluation = store_evaluation(parts.result(), bench_artifact(artifact_id) if own_bench else None)
    else:
        evaluation = evaluate_model(artifact_id, suite, limit, bench=own_bench)
    if baseline_model is None:
        base = load_baseline(baseline)
        about = baseline if base else "none (floors)"
    else:
        base = evaluate_baseline(baseline_model, suite, limit, baseline_ryz)
        speeds = interleave_decode(artifact_id, base["ref"], rounds, baseline_ryz)
        # Both measured here and now, interleaved: one CPU, whatever either record's environment says.
        evaluation = {**evaluation, "bench": speeds["candidate"]}
        base = {**base, "bench": speeds["baseline"], "environment": evaluation["environment"]}
        about = f"{baseline_model} measured in this run (record {base['record_id']}, runs {speeds['order']})"
    failures = [f"evaluation record invalid: {'; '.join(evaluation['failures'])}"] if not evaluation["valid"] else []
    if base is not None and base.get("valid") is False:
        failures.append(f"baseline evaluation record invalid: {'; '.join(base.get('failures') or [])}")
    gate = None
    if failures:
        verdict = "; ".join(failures)
    else:
        record = {"tasks": evaluation["tasks"], "bench": evaluation["bench"], "environment": evaluation["environment"]}
        gate = combine_gates(record, base, settings, require_tasks=require_tasks, require_speed=require_speed)
        verdict = gate.summary()
    passed = gate is not None and gate.passed  # gate is None when a record is invalid
    checks = "\n".join(f"- {c}" for c in (gate.checks if gate else []))
    create_markdown_artifact(
        key="evaluate-gates",
        markdown=f"# {'PASSED' if passed else 'FAILED'}: {model} on {suite}\n\n"
        f"baseline: {about}\n\n{verdict}\n\n{checks}\n\nrecord `{evaluation['record_id']}`",
    )
    get_run_logger().info("%s: %s", "gates passed" if passed else "GATE FAILED", verdict)
    if not passed:
        raise GateFailed(f"{model}: {verdict}")
    return {
        "artifact_id": artifact_id,
        "record_id": evaluation["record_id"],
        "baseline": about,
        "verdict": verdict,
        "checks": gate.checks if gate else [],
        "passed": passed,
    }


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
