"""`ryz pull REPO[@REVISION] | DIR`: fetch, check, quantize and register a model for local use (docs/pull.md)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from contextlib import contextmanager

from flows.cli_common import print_json, store


def cmd_pull(args) -> int:
    from engine.artifacts.pull import pull_model
    from engine.settings import get_settings

    tty = sys.stderr.isatty()

    @contextmanager
    def quantize_bar(total: int):
        from tqdm import tqdm

        with tqdm(total=total, desc="quantize", unit="B", unit_scale=True, file=sys.stderr, leave=False) as bar:
            yield bar.update

    result = pull_model(
        args.target,
        get_settings(),
        store(),
        weights=args.weights,
        head=args.head,
        log=lambda line: print(f"ryz pull: {line}", file=sys.stderr),
        progress_bars=tty,
        quantize_bar=quantize_bar if tty else None,
    )
    if args.json:
        print_json(result.to_json())
    else:
        print(result.message)
        if not result.already:
            print(
                f"  artifact  {result.artifact_id}\n  status    {result.status} (runnable, never served by the fleet)"
            )
        print(f"  run it    ryz run {result.ref}  (or ryz serve --model {result.ref})")
    return 0


def add_pull_command(sub, command: Callable) -> None:
    """Register `ryz pull` on the `ryz` parser (`command` is flows/cli.py build_parser's helper)."""
    p = command(
        "pull",
        cmd_pull,
        "fetch a model from the Hugging Face Hub (REPO[@REVISION]) or a local directory, check it like discovery, "
        "quantize it and register it as NAME:VERSION with status pulled (runnable locally, never served by the fleet)",
    )
    p.add_argument(
        "target",
        metavar="REPO[@REVISION] | DIR",
        help="a Hub repo id, optionally @ a branch, tag or commit sha (org/name@main), pinned to its commit sha; "
        "or a local model directory (config.json, *.safetensors, tokenizer), named after the directory",
    )
    p.add_argument("--weights", choices=["tq2_0", "tq1_0"], help="ternary GGUF type (default RYZ_WEIGHTS_TYPE)")
    p.add_argument("--head", choices=["q8_0", "q6_k", "f16"], help="embedding/head type (default RYZ_HEAD_TYPE)")
