"""Prefect tasks: evaluate a model artifact (lm-eval suite + speed benchmark) into a validated, stored record.

`evaluate_model` runs the whole suite in one task. For scale-out the same work is split: `evaluate_shard`
runs some of the suite's tasks (any task runner, e.g. Dask workers on several machines), `bench_artifact`
measures speed on the machine the record is about, and `store_evaluation` merges, validates and stores.
"""

from __future__ import annotations

from prefect import get_run_logger, task

from engine.artifacts.store import open_store
from engine.settings import get_settings
from tasks.quantize import find_quantized


def _summary(record: dict, record_id: str) -> dict:
    return {
        "record_id": record_id,
        "valid": record["valid"],
        "failures": record["failures"],
        "tasks": record["tasks"],
        "bench": record["bench"],
        "environment": record.get("environment"),
        "report": record.get("report"),
    }


def _store(record: dict) -> dict:
    from evaluations.evaluate import store_record
    from evaluations.report import report_record

    store = open_store()
    record_id = store_record(record, store)
    record["record_id"] = record_id
    record["report"] = str(report_record(record, store))
    (get_run_logger().info if record["valid"] else get_run_logger().error)(
        "evaluation of %s on %s: %s (record %s)",
        record["model"]["artifact_id"][:19],
        record["suite"],
        "valid" if record["valid"] else "INVALID: " + "; ".join(record["failures"]),
        record_id,
    )
    return _summary(record, record_id)


@task(name="evaluate-model", timeout_seconds=6 * 3600)
def evaluate_model(artifact_id: str, suite: str = "gate", limit: int | None = None, bench: bool = True) -> dict:
    """Run the suite and (unless `bench` is false) the benchmark on the artifact, validate the record (Great
    Expectations), store it.

    Returns:
        {"record_id", "valid", "failures", "tasks", "bench", "environment", "report"}.
    """
    from evaluations.evaluate import evaluate_model as run_evaluation

    return _store(run_evaluation(artifact_id, suite=suite, limit=limit, bench=bench))


def _baseline_home():
    """The baseline installation's own RYZ_HOME: two versions never share a store or a kernel cache."""
    return get_settings().home / "ci-baseline"


@task(name="evaluate-baseline", timeout_seconds=6 * 3600)
def evaluate_baseline(model: str, suite: str, limit: int | None, ryz: str | None = None) -> dict:
    """The CI gate's baseline model evaluated now on the same suite (no benchmark: speed is interleaved), by this
    installation (stored like any record) or by another installation's `ryz` (the main branch's checkout).

    Returns:
        {"ref" (what interleave_decode benchmarks), "record_id", "valid", "failures", "tasks", "environment"}.
    """
    from evaluations.ci_bench import ExternalRyz
    from evaluations.evaluate import evaluate_model as run_evaluation

    if ryz:
        external = ExternalRyz(ryz, _baseline_home())
        ref = external.resolve(model)
        record = external.evaluate(ref, suite, limit)
        keys = ("record_id", "valid", "failures", "tasks", "environment")
        return {"ref": ref, **{k: record.get(k) for k in keys}}
    ref = resolve_model_artifact.fn(model)
    return {"ref": ref, **_store(run_evaluation(ref, suite=suite, limit=limit, bench=False))}


@task(name="interleave-decode", timeout_seconds=3600)
def interleave_decode(artifact_id: str, baseline_ref: str, rounds: int, ryz: str | None = None) -> dict:
    """Decode speed of the candidate and the baseline on this machine, `rounds` runs each, interleaved
    (evaluations/ci_bench.py). Returns {"candidate": bench, "baseline": bench, "order"}."""
    from evaluations.ci_bench import ExternalRyz, bench_here, bench_workload, interleaved_decode

    store = open_store()
    path = store.local_path(artifact_id)
    prompt, gen = bench_workload(path)
    baseline = (
        ExternalRyz(ryz, _baseline_home()).bench(baseline_ref, prompt, gen)
        if ryz
        else bench_here(store.local_path(baseline_ref), prompt, gen)
    )
    return interleaved_decode(baseline, bench_here(path, prompt, gen), rounds)


@task(name="plan-evaluation-shards")
def plan_evaluation_shards(suite: str, limit: int | None, shards: int) -> list[list[str]]:
    """The suite's tasks in at most `shards` groups."""
    from evaluations.evaluate import shard_tasks

    return shard_tasks(suite, limit, shards)


@task(name="evaluate-shard", timeout_seconds=6 * 3600, retries=1)
def evaluate_shard(artifact_id: str, suite: str, limit: int | None, tasks: list[str]) -> dict:
    """Some of the suite's tasks (with the suite's limits), no benchmark, not yet validated."""
    from evaluations.evaluate import evaluate_model as run_evaluation

    return run_evaluation(artifact_id, suite=suite, limit=limit, bench=False, validate=False, only_tasks=tasks)


@task(name="bench-artifact", timeout_seconds=3600)
def bench_artifact(artifact_id: str) -> dict:
    """The evaluation's speed benchmark, on this machine."""
    from evaluations.evaluate import run_suite_bench

    return run_suite_bench(open_store().local_path(artifact_id), None, None, get_settings())


@task(name="store-evaluation")
def store_evaluation(parts: list[dict], bench: dict | None) -> dict:
    """Merge shard records and the benchmark into one record, validate it, store it with its report."""
    from evaluations.evaluate import merge_records

    return _store(merge_records(parts, bench))


@task(name="resolve-model")
def resolve_model_artifact(model: str) -> str:
    """A model reference (or a checkpoint directory, quantized first) -> its artifact id."""
    from pathlib import Path

    from engine.artifacts.refs import resolve_artifact
    from engine.model.quantize import directory_revision, quantize_to_store

    store = open_store()
    path = Path(model).expanduser()
    if path.is_dir():
        revision = directory_revision(path)
        return (
            find_quantized(store, revision, "tq2_0", "q8_0")
            or quantize_to_store(
                path,
                store,
                get_settings().cache_dir / "work",
                source={"type": "local", "repo": path.name, "revision": revision},
            )["artifact_id"]
        )
    if path.suffix == ".gguf" and path.is_file():
        return store.put_file(path, kind="model")
    return resolve_artifact(model, store)


@task(name="load-baseline")
def load_baseline(baseline: str | None) -> dict | None:
    """The baseline evaluation record: a JSON file, a registry reference (its version's record), or None."""
    import json
    from pathlib import Path

    from engine.artifacts.registry import Registry
    from evaluations.evaluate import load_record

    if not baseline:
        return None
    if Path(baseline).is_file():
        return json.loads(Path(baseline).read_text())
    store = open_store()
    version = Registry(store).find(baseline)  # none (e.g. no production yet): the floors apply
    return load_record(version.evaluation, store) if version and version.evaluation else None
