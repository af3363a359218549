"""Prefect task: evaluate a model artifact (lm-eval suite + speed benchmark) into a validated, stored record."""

from __future__ import annotations

from prefect import get_run_logger, task

from engine.store import open_store


@task(name="evaluate-model", timeout_seconds=6 * 3600)
def evaluate_model(artifact_id: str, suite: str = "gate", limit: int | None = None) -> dict:
    """Run the suite and the benchmark on the artifact, validate the record (Great Expectations), store it.

    Returns:
        {"record_id", "valid", "failures", "tasks", "bench", "report"}: the stored record's id and its summary.
    """
    from evaluations.evaluate import evaluate_model as run_evaluation
    from evaluations.evaluate import store_record
    from evaluations.report import report_record

    logger = get_run_logger()
    store = open_store()
    record = run_evaluation(artifact_id, suite=suite, limit=limit)
    record_id = store_record(record, store)
    record["record_id"] = record_id
    record["report"] = str(report_record(record, store))
    (logger.info if record["valid"] else logger.error)(
        "evaluation of %s on %s: %s (record %s)", artifact_id[:19], suite,
        "valid" if record["valid"] else "INVALID: " + "; ".join(record["failures"]), record_id)
    return {"record_id": record_id, "valid": record["valid"], "failures": record["failures"], "tasks": record["tasks"],
            "bench": record["bench"], "environment": record.get("environment"), "report": record.get("report")}
