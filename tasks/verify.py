"""Prefect task: prove a model artifact's native path equal to the numpy reference before evaluating it."""

from __future__ import annotations

from prefect import get_run_logger, task

from engine.artifacts.store import open_store
from engine.model import build
from engine.model.parity import check_parity


@task(name="check-parity")
def check_model_parity(artifact_id: str, new_tokens: int = 16) -> dict:
    """Native vs reference on a short prompt: logits within tolerance and equal greedy tokens.

    Returns:
        {"passed", "rel_l2", "tolerance", "reason", ...} (engine.model.parity.check_parity).
    """
    logger = get_run_logger()
    result = check_parity(
        open_store().local_path(artifact_id), build.load_library(progress=logger.info), new_tokens=new_tokens
    )
    (logger.info if result["passed"] else logger.error)(
        "parity %s on %s: %s", "passed" if result["passed"] else "FAILED", result["isa"], result["reason"]
    )
    return result
