"""Evaluation suites: named lists of lm-eval tasks with per-task limits.

- `gate`: quick and decisive, what a candidate must pass for promotion (offline, no code execution).
- `full`: everything, including HumanEval (executes model code: needs the explicit opt-in) and the
  standard Hub-backed tasks (need the Hub; offline they fail with TaskDataOfflineError).

lm-eval applies one `--limit` to every task of a run, so a suite runs as one lm-eval call per distinct
(limit, num_fewshot) pair: `runs(suite)` gives those calls. A limit is a document count per leaf task
(for a group such as mmlu_offline: per subject), None for all documents.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SuiteTask:
    name: str  # an lm-eval task or group name
    limit: int | None = None  # documents per leaf task; None: all
    num_fewshot: int | None = None
    hub: bool = False  # data from the Hugging Face Hub (fails offline)
    unsafe_code: bool = False  # scoring executes model output: needs --confirm_run_unsafe_code


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    tasks: tuple[SuiteTask, ...]

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]


DEMO_TASKS = ("demo_mc", "demo_gen", "demo_ppl")  # evaluations/tasks/demo/ (the demo model zoo's suites)
HUB_TASKS = ("arc_easy", "hellaswag", "piqa", "winogrande", "wikitext")

SUITES: dict[str, Suite] = {
    "gate": Suite(
        "gate",
        "quick and decisive for promotion: offline, deterministic, minutes on a 2B model",
        (
            SuiteTask("demo_mc", limit=200),
            SuiteTask("demo_gen", limit=50),
            SuiteTask("demo_ppl", limit=50),
            SuiteTask("mmlu_offline", limit=5),  # 5 per subject: 285 questions
        ),
    ),
    "full": Suite(
        "full",
        "everything: demo suites, MMLU, HumanEval (opt-in execution) and the Hub tasks",
        (
            *(SuiteTask(name) for name in DEMO_TASKS),
            SuiteTask("mmlu_offline"),
            SuiteTask("humaneval_offline", unsafe_code=True),
            *(SuiteTask(name, hub=True) for name in HUB_TASKS),
        ),
    ),
}


def get_suite(name: str) -> Suite:
    try:
        return SUITES[name]
    except KeyError:
        raise ValueError(f"unknown suite {name!r}; choose one of {', '.join(SUITES)}") from None


def runs(suite: Suite | str, *, offline: bool = False, allow_unsafe_code: bool = False) -> list[dict]:
    """lm-eval calls covering the suite: [{"tasks": [...], "limit": n, "num_fewshot": k}], tasks grouped by
    equal limit and few-shot count, in suite order. `offline` drops Hub tasks; HumanEval-like tasks are
    dropped unless `allow_unsafe_code` (the caller then passes confirm_run_unsafe_code to lm-eval)."""
    suite = get_suite(suite) if isinstance(suite, str) else suite
    calls: dict[tuple, dict] = {}
    for task in suite.tasks:
        if (offline and task.hub) or (task.unsafe_code and not allow_unsafe_code):
            continue
        key = (task.limit, task.num_fewshot)
        calls.setdefault(key, {"tasks": [], "limit": task.limit, "num_fewshot": task.num_fewshot})["tasks"].append(
            task.name
        )
    return list(calls.values())
