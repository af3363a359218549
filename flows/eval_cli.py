"""`ryz eval`, `ryz compare`, `ryz ci-bench`: evaluation records, comparisons and the CI gate (docs/evaluation.md)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from flows.cli_common import EXIT_ERROR, EXIT_USAGE, MODEL_REF_HELP
from flows.cli_common import positive_int as _positive_int
from flows.cli_common import print_json as _print_json
from flows.cli_common import store as _store


def cmd_eval(args) -> int:
    from contextlib import redirect_stdout

    from evaluations.evaluate import evaluate_model, store_record
    from evaluations.report import report_record

    store = _store()
    with redirect_stdout(sys.stderr):  # lm-eval and GX print; stdout carries only the result
        record = evaluate_model(
            args.model,
            suite=args.suite,
            limit=args.limit,
            bench=not args.no_bench,
            engine=args.engine,
            threads=args.threads,
            library=args.library,
            allow_unsafe_code=args.allow_unsafe_code,
            store=store,
        )
        record_id = store_record(record, store)
        record["record_id"] = record_id
        report = report_record(record, store)
    if args.json:
        _print_json({**record, "report": str(report)})
    else:
        print(record_id)
        for task, entry in record["tasks"].items():
            metrics = ", ".join(
                f"{m} {v['value']:.4g}" + (f" ± {v['stderr']:.3g}" if v["stderr"] is not None else "")
                for m, v in entry["metrics"].items()
                if v["value"] is not None
            )
            print(f"  {task:<28} n={entry['n']!s:<6} {metrics}", file=sys.stderr)
        if record["bench"]:
            b = record["bench"]
            print(
                f"  bench: decode {b['decode_tok_s']} tok/s, prefill {b['prefill_tok_s']} tok/s, TTFT {b['ttft_ms']} "
                f"ms, "
                f"peak RSS {b['peak_rss_mb']} MB, roofline {b['roofline_fraction']}, {b['threads']} threads",
                file=sys.stderr,
            )
        print(f"  record {'valid' if record['valid'] else 'INVALID'}", file=sys.stderr)
    for failure in record["failures"]:
        print(f"ryz eval: failed expectation: {failure}", file=sys.stderr)
    print(f"ryz eval: record {record_id}; report {report}", file=sys.stderr)
    return 0 if record["valid"] else EXIT_ERROR


def cmd_compare(args) -> int:
    from evaluations.evaluate import resolve_record
    from evaluations.report import compare_records, render_comparison, write_report

    store = _store()
    id_a, a = resolve_record(args.ref_a, store)
    id_b, b = resolve_record(args.ref_b, store)
    report = write_report(render_comparison(a, b), f"compare-{id_a[7:19]}-{id_b[7:19]}")
    result = compare_records(a, b)
    if args.json:
        _print_json(
            {
                "a": {"ref": args.ref_a, "record_id": id_a, "model": a["model"], "suite": a.get("suite")},
                "b": {"ref": args.ref_b, "record_id": id_b, "model": b["model"], "suite": b.get("suite")},
                **result,
                "report": str(report),
            }
        )
    else:
        print(f"a = {args.ref_a} ({id_a[:19]}), b = {args.ref_b} ({id_b[:19]})")
        for task, metrics in result["tasks"].items():
            for metric, c in metrics.items():
                se = "n/a" if c["stderr"] is None else f"{c['stderr']:.3g}"
                print(
                    f"  {task:<24} {metric:<18} {c['a']:>10.4g} -> {c['b']:<10.4g} delta {c['delta']:+.4g} ± {se:<8} "
                    f"{c['verdict']}"
                )
        for key, c in result["bench"].items():
            ratio = "" if c["ratio"] is None else f" (x{c['ratio']:.3f})"
            print(f"  bench {key:<18} {c['a']} -> {c['b']}{ratio}")
    print(f"ryz compare: report {report}", file=sys.stderr)
    return 0


def cmd_ci_bench(args) -> int:
    import os

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from flows.evaluate import with_runner

    measured = args.baseline_model is not None
    misuse = (
        "--baseline-ryz needs --baseline-model (the model it measures)"
        if args.baseline_ryz and not measured
        else "--write-baseline writes a record for --baseline; it does not combine with --baseline-model"
        if args.write_baseline and measured
        else "--accuracy-only skips the speed check; --baseline-model is there to measure it"
        if args.accuracy_only and measured
        else None
    )
    if misuse:
        print(f"ryz ci-bench: {misuse}", file=sys.stderr)
        return EXIT_USAGE
    baseline = args.baseline if args.baseline and Path(args.baseline).exists() else None
    if not measured and baseline is None and not args.write_baseline:
        print(
            f"ryz ci-bench: no baseline record at {args.baseline}; measure one in this run with --baseline-model REF, "
            "or write one with --write-baseline on the main branch",
            file=sys.stderr,
        )
        return EXIT_USAGE
    evaluate = with_runner(args.runner, args.shards)
    state = evaluate(
        model=args.model,
        suite=args.suite,
        limit=args.limit,
        baseline=None if measured else baseline,
        shards=args.shards,
        baseline_model=args.baseline_model,
        baseline_ryz=args.baseline_ryz,
        rounds=args.rounds,
        bench=not args.accuracy_only,
        # A CI gate that compared nothing says nothing: without a task in common, or (unless --accuracy-only)
        # without a speed comparison, it fails with that reason. Writing the first baseline has nothing to compare.
        require_tasks=not args.write_baseline,
        require_speed=not args.write_baseline and not args.accuracy_only,
        return_state=True,
    )
    result = state.result(raise_on_failure=False)
    if isinstance(result, BaseException):
        print(f"ci-bench FAILED: {result}", file=sys.stderr)
        return 1
    if args.write_baseline:
        from engine.artifacts.store import open_store
        from engine.fsutil import atomic_file
        from evaluations.evaluate import load_record

        out = Path(args.baseline)
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(out) as tmp:
            tmp.write_text(json.dumps(load_record(result["record_id"], open_store()), indent=1) + "\n")
        print(f"baseline written to {out}", file=sys.stderr)
    if args.json:
        _print_json(result)
    else:
        print(f"ci-bench passed: {result['verdict']}")
    return 0


def add_eval_commands(sub, command) -> None:
    """Add these commands to `ryz`'s subparsers (`command(name, handler, help)` makes one with --json)."""
    p = command(
        "eval",
        cmd_eval,
        "evaluate a model on a suite plus the speed benchmark, validate the record (Great "
        "Expectations), store it and write an HTML report; exits 1 when the record is invalid",
    )
    p.add_argument("model", metavar="MODEL_REF", help=MODEL_REF_HELP)
    p.add_argument("--suite", default="gate", help="gate (default), full, or task names (demo_mc or demo_mc,demo_ppl)")
    p.add_argument(
        "--limit", type=_positive_int, help="documents per task (per subject of a group), overriding the suite's"
    )
    p.add_argument("--no-bench", action="store_true", help="skip the speed benchmark (the record's bench is null)")
    p.add_argument(
        "--engine",
        choices=["native", "reference"],
        default="native",
        help="lm-eval scoring engine: native (default) or the numpy reference (slow)",
    )
    p.add_argument("--threads", type=int, help="compute threads (default RYZ_THREADS, else all physical cores)")
    p.add_argument("--library", type=Path, help="a prebuilt native library (default: the kernel build for this CPU)")
    p.add_argument(
        "--allow-unsafe-code",
        action="store_true",
        help="run tasks that execute model-written code (humaneval_offline in the full suite)",
    )

    p = command(
        "compare",
        cmd_compare,
        "compare two evaluation records: per-task deltas and their significance given "
        "stderr, bench ratios; writes an HTML report",
    )
    p.add_argument(
        "ref_a",
        metavar="REF_A",
        help="a registry version (its record), an evaluation record id, or a model "
        "artifact id / .gguf path (its newest record)",
    )
    p.add_argument("ref_b", metavar="REF_B")

    p = command(
        "ci-bench",
        cmd_ci_bench,
        "CI: evaluate a model (suite + speed) and fail on a regression against a baseline model measured in the "
        "same run (--baseline-model: accuracy on the same suite, decode speed interleaved on this machine) or a "
        "stored baseline record; a gate that compared nothing fails (what .github/workflows/ci-bench.yml runs)",
    )
    p.add_argument(
        "--model",
        default="examples/zoo/ryz-demo-m",
        help=f"the candidate: {MODEL_REF_HELP}, or a checkpoint directory (default: the demo zoo's ryz-demo-m)",
    )
    p.add_argument("--suite", default="demo_mc,demo_gen", help="suite or task list (default demo_mc,demo_gen)")
    p.add_argument("--limit", type=int, default=50, help="examples per task (default 50)")
    p.add_argument(
        "--baseline-model",
        metavar="REF",
        help=f"measure the baseline in this run: {MODEL_REF_HELP}, or a checkpoint directory (e.g. production, or "
        "the same directory with --baseline-ryz); --baseline is then not read",
    )
    p.add_argument(
        "--baseline-ryz",
        metavar="EXE",
        help="the `ryz` executable of another installation (e.g. the main branch's checkout) that quantizes, "
        "evaluates and benchmarks --baseline-model, with its own RYZ_HOME ($RYZ_HOME/ci-baseline)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="interleaved decode runs of each model with --baseline-model (default 5, at least 2)",
    )
    p.add_argument(
        "--baseline",
        default="ci/baseline-record.json",
        help="without --baseline-model: a baseline evaluation record (JSON file); its speed counts only when it "
        "was measured on this CPU, otherwise the gate fails unless --accuracy-only",
    )
    p.add_argument("--write-baseline", action="store_true", help="store this run's record as the new --baseline")
    p.add_argument(
        "--accuracy-only",
        action="store_true",
        help="with --baseline: no benchmark and no speed check (the verdict says so)",
    )
    p.add_argument("--shards", type=_positive_int, default=1, help="run the suite's tasks as N concurrent shards")
    p.add_argument(
        "--runner", help="dask (a local cluster of --shards workers) or dask=ADDRESS (an existing scheduler)"
    )
