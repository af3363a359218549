"""`ryz index build|eval|publish`: the retrieval index commands. flows/cli.py adds them with
`add_index_commands(sub)`; every handler imports Prefect lazily, so other `ryz` commands never pay for it.

`--json` prints machine-readable output on stdout and nothing else there (Prefect logs go to stderr);
`index eval --json` prints an array of rows (quantization, compression, recall_at_10, p50_ms, p95_ms, ...).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from flows.cli_common import print_json as _print_json


def _quiet_prefect() -> None:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


def cmd_index_build(args) -> int:
    _quiet_prefect()
    from flows.index import build_index

    result = build_index(
        str(Path(args.corpus_dir).resolve()),
        index_dir=str(args.index_dir) if args.index_dir else None,
        quantization=args.quantization,
        full=args.full,
        strict=args.strict,
    )
    if args.json:
        _print_json(result)
    else:
        u, e = result["update"], result["evaluation"]
        print(f"{result['version']} ({result['status']})  {result['artifact_id']}")
        print(
            f"  {u['files']} files, {u['chunks']} chunks: {u['embedded']} embedded, {u['reused']} reused, "
            f"{u['removed']} removed; skipped {u['skipped']}; {len(u['unreadable'])} unreadable"
        )
        for item in u["unreadable"][:10]:
            print(f"  unreadable: {item['path']}: {item['error']}")
        if "recall_at_10" not in e:
            print(f"  evaluation {e['skipped']}")
            return 0
        print(
            f"  {e['quantization']} ({e['index']}): recall@10 {e['recall_at_10']:.4f} vs exact float search, "
            f"{e['compression']}x, p50 {e['p50_ms']} ms, p95 {e['p95_ms']} ms"
        )
    return 0


def cmd_index_eval(args) -> int:
    _quiet_prefect()
    from engine.retrieval.index import resolve_index
    from evaluations.retrieval import format_table, index_kinds_arg
    from flows.index import evaluate_index_flow

    with resolve_index(args.ref) as index_dir:
        result = evaluate_index_flow(
            str(index_dir),
            args.quantization,
            args.dims,
            index_kinds_arg(args.index),
            args.queries,
            args.oversampling,
            args.rescore,
            args.hnsw_m,
            label=args.ref,
            hnsw_ef=args.hnsw_ef,
        )
    if args.json:
        _print_json(result["rows"])
    else:
        print(format_table(result["rows"]))
        s = result["summary"]
        print(f"\n{s['chunks']} chunks, {s['queries']} held-out queries; query embedding p50 {s['embed_ms_p50']} ms")
    return 0


def cmd_index_publish(args) -> int:
    from engine.artifacts.registry import Registry
    from engine.artifacts.store import open_store
    from engine.retrieval.index import publish_index
    from engine.settings import get_settings

    version = publish_index(Registry(open_store(settings=get_settings())), args.ref, args.reason)
    if args.json:
        _print_json(version.to_json())
    else:
        print(f"{version.ref} is the production index ({version.artifact_id})")
    return 0


def add_index_commands(sub) -> None:
    """Add `index build|eval|publish` to the `ryz` subparsers."""
    from evaluations import retrieval

    index = sub.add_parser(
        "index", help="the retrieval index: build from a directory, evaluate recall, publish"
    ).add_subparsers(dest="index_command", required=True)
    p = index.add_parser(
        "build", help="index a directory (incremental: only changed files) and register it as a version of `index`"
    )
    p.set_defaults(handler=cmd_index_build)
    p.add_argument(
        "corpus_dir", metavar="DIR", help="markdown, text and source code; in a git checkout only what git tracks"
    )
    p.add_argument(
        "--quantization",
        choices=["none", "int8", "binary1", "binary1.5", "binary2"],
        help="vector codes (default RYZ_INDEX_QUANTIZATION); a change rebuilds the index",
    )
    p.add_argument(
        "--index-dir", type=Path, help="working index directory (default RYZ_INDEX_DIR, $RYZ_HOME/indexes/default)"
    )
    p.add_argument("--full", action="store_true", help="rebuild from scratch")
    p.add_argument("--strict", action="store_true", help="fail, indexing nothing, if any file cannot be read")
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout")

    p = index.add_parser("eval", help=retrieval.HELP)
    p.set_defaults(handler=cmd_index_eval)
    retrieval.add_arguments(p)

    p = index.add_parser("publish", help="make an index version the production index")
    p.set_defaults(handler=cmd_index_publish)
    p.add_argument("ref", help="index:N (or `index`: the newest version)")
    p.add_argument("--reason", default="published by hand", help="recorded in the registry history")
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout")


def main(argv: list[str] | None = None) -> int:
    """`python -m flows.index_cli index ...` until flows/cli.py wires the commands."""
    import argparse

    parser = argparse.ArgumentParser(prog="ryz")
    add_index_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    from engine.errors import RyzError

    try:
        return args.handler(args)
    except RyzError as exc:
        print(f"ryz: error: {exc}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError) as exc:
        print(f"ryz: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
