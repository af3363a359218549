"""The main job's console output: one line per stage per model, and the environment that keeps the rest quiet.

The flows call `stage()` at each stage boundary; the line goes to the run's logger (the Prefect UI keeps it) and,
when `ryz pipeline run` turned the console on (`console()`), as a plain line to stderr. Tasks print nothing.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from typing import TextIO

# Quiet defaults (setdefault: a value the user exported wins). Prefect's console handler only, not its loggers:
# the API handler still gets INFO, so the UI keeps every run log.
QUIET_LOGS = {
    "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "WARNING",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",  # "PyTorch was not found": we never use it
}
# Progress bars: tqdm (lm-eval and ours), huggingface_hub and datasets. Read at import by those libraries and
# inherited by subprocesses (our server, Dask workers), so set before anything imports them.
NO_BARS = {
    "TQDM_DISABLE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
}

_console: TextIO | None = None  # where stage lines go besides the run logger; None: logger only


def quiet_environment(verbose: bool, stderr_tty: bool) -> dict[str, str]:
    """The variables `ryz pipeline run` sets: none with --verbose; otherwise quiet logs, and no progress bars
    unless stderr is a terminal."""
    if verbose:
        return {}
    return {**QUIET_LOGS, **({} if stderr_tty else NO_BARS)}


@contextlib.contextmanager
def console(verbose: bool = False, stream: TextIO | None = None) -> Iterator[dict[str, str]]:
    """For the duration of a `ryz pipeline run`: set the quiet environment (restored after) and print the stage
    lines on `stream` (default stderr). With `verbose` nothing is silenced and the stage lines appear through
    the Prefect console logger instead, once."""
    global _console
    stream = stream or sys.stderr
    env = quiet_environment(verbose, stream.isatty())
    previous = {k: os.environ.get(k) for k in env}
    for key, value in env.items():
        os.environ.setdefault(key, value)
    saved, _console = _console, (None if verbose else stream)
    try:
        yield env
    finally:
        _console = saved
        for key, before in previous.items():
            if before is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = before


def emit(model: str, stage: str, text: str) -> None:
    """One progress line: `model  stage  text`."""
    line = f"{model:<16} {stage:<9} {text}"
    with contextlib.suppress(Exception):  # outside a flow run there is no run logger: the console line suffices
        from prefect import get_run_logger

        get_run_logger().info(line)
    if _console is not None:
        print(line, file=_console, flush=True)


class Stage:
    """What the `with stage(...)` body learned: `detail` goes in the line's parentheses, `status` replaces
    "done" (e.g. "rejected")."""

    def __init__(self) -> None:
        self.detail = ""
        self.status = "done"


@contextlib.contextmanager
def stage(model: str, name: str) -> Iterator[Stage]:
    """Time a stage and print its line at the end: done (or the status set) with the detail, or failed with the
    error, which is re-raised."""
    started, state = time.monotonic(), Stage()
    try:
        yield state
    except BaseException as exc:
        emit(model, name, f"failed {seconds(time.monotonic() - started)}  ({shorten(f'{type(exc).__name__}: {exc}')})")
        raise
    detail = f"  ({shorten(state.detail)})" if state.detail else ""
    emit(model, name, f"{state.status} {seconds(time.monotonic() - started)}{detail}")


def seconds(s: float) -> str:
    """1.2 s, 14 s."""
    return f"{s:.1f} s" if s < 10 else f"{s:.0f} s"


def shorten(text: str, limit: int = 140) -> str:
    """The stage line stays one line; the full reason is in the final table and the report."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
