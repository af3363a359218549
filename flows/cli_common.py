"""Helpers every `ryz` command group shares (flows/cli.py and its *_cli.py modules)."""

from __future__ import annotations

import argparse
import datetime
import json
import sys

EXIT_ERROR = 1  # a failed command or check
EXIT_USAGE = 2  # bad arguments

# Every command that takes a model names the forms it accepts (engine/artifacts/refs.py resolves them).
MODEL_REF_HELP = (
    "a model reference: name:version (ryz-demo-m:1), an alias (production, canary, previous), "
    "an artifact id or prefix of >= 12 hex digits, or a .gguf path"
)


def print_json(value) -> None:
    """`--json` output: JSON on stdout and nothing else there."""
    sys.stdout.write(json.dumps(value, indent=2, sort_keys=False, default=str) + "\n")


def store():
    """The artifact store the settings name."""
    from engine.artifacts.store import open_store
    from engine.settings import get_settings

    return open_store(settings=get_settings())


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def when(t: float) -> str:
    """A UTC timestamp as the registry and release listings print it."""
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")
