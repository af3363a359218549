"""`ryz lm-eval ARGS...`: lm-eval's own CLI with the `ryzanstein` model registered and the bundled task
folder (evaluations/tasks/) included, arguments passed through unchanged:

    ryz lm-eval --model ryzanstein --model_args model=PATH --tasks demo_mc --limit 10
    ryz lm-eval run --model ryzanstein --model_args model=sha256:1a2b3c4d5e6f,engine=reference --tasks mmlu_offline
    ryz lm-eval ls tasks
"""

from __future__ import annotations

import sys


def run_lm_eval(argv: list[str]) -> int:
    """Run lm-eval's CLI on `argv` (as after `lm-eval` on its command line); its exit status."""
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError as exc:
        print(f"ryz lm-eval: lm-eval is not installed ({exc}); pip install -e '.[eval]'", file=sys.stderr)
        return 1
    from evaluations.tasks import install

    install()
    saved = sys.argv
    sys.argv = ["lm-eval", *argv]
    try:
        cli_evaluate()
    except SystemExit as exc:  # argparse and lm-eval exit this way
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = saved
    return 0
