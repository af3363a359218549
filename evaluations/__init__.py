"""evaluations"""

from __future__ import annotations

import os
import sys


def say(line: str) -> None:
    """An evaluation's or benchmark's progress line. Inside a Prefect run (the main job) it goes to the run's
    logger: the UI keeps it and `ryz pipeline run --verbose` shows it; elsewhere (`ryz eval`, `ryz bench`) to
    stderr."""
    if "prefect" in sys.modules:  # never imported for it: engine commands stay free of Prefect
        from prefect.exceptions import MissingContextError
        from prefect.logging import get_run_logger

        try:
            get_run_logger().info(line)
            return
        except MissingContextError:
            pass
    print(line, file=sys.stderr, flush=True)


def bars_disabled() -> bool:
    """TQDM_DISABLE as tqdm reads it, for bars made with an explicit `disable=` (which tqdm lets win over the
    variable): `ryz pipeline run` sets it when stderr is not a terminal."""
    return os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true", "yes", "on")
