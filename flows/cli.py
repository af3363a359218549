"""`ryz`: the command line. Each subcommand imports what it needs lazily, so engine commands
(`serve`, `generate`, `bench`, `quantize`) never import Prefect.

Conventions (DESIGN.md): `--json` prints machine-readable output on stdout and nothing else there;
progress and logs go to stderr; a failed check exits non-zero.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

EXIT_ERROR = 1
EXIT_USAGE = 2


def _print_json(value) -> None:
    sys.stdout.write(json.dumps(value, indent=2, sort_keys=False, default=str) + "\n")


@contextmanager
def _progress(total: int, desc: str, enabled: bool = True):
    """A byte-counting tqdm bar on stderr; yields the update callback."""
    from tqdm import tqdm

    with tqdm(
        total=total, desc=desc, unit="B", unit_scale=True, file=sys.stderr, disable=not enabled, leave=False
    ) as bar:
        yield bar.update


def _store():
    from engine.artifacts.store import open_store
    from engine.settings import get_settings

    return open_store(settings=get_settings())


# --- commands -------------------------------------------------------------------------------------


def cmd_config_show(args) -> int:
    from engine.settings import describe_settings, get_settings

    rows = describe_settings(get_settings())
    if args.json:
        _print_json({r["name"]: {"value": r["value"], "source": r["source"], "env": r["env"]} for r in rows})
        return 0
    width = max(len(r["env"]) for r in rows)
    for r in rows:
        print(f"{r['env']:<{width}}  {r['value']!s:<40}  ({r['source']})")
    return 0


def cmd_synth(args) -> int:
    import numpy as np

    from engine.model.shapes import get_shape
    from engine.model.synth import plan_tensors, write_synthetic_checkpoint

    shape = get_shape(args.shape)
    total = sum(int(np.prod(s)) * 2 for _, s, _ in plan_tensors(shape))
    with _progress(total, f"synth {args.shape}", not args.json) as update:
        out = write_synthetic_checkpoint(shape, args.output, seed=args.seed, progress=update)
    result = {"path": str(out.resolve()), "shape": args.shape, "seed": args.seed, "config": shape.as_dict()}
    if args.json:
        _print_json(result)
    else:
        print(f"wrote a random {args.shape} BitNet checkpoint (seed {args.seed}) to {out}")
    return 0


def cmd_quantize(args) -> int:
    from engine.model.quantize import planned_bytes, quantize_to_store
    from engine.settings import get_settings

    settings = get_settings()
    weights = args.weights or settings.weights_type
    head = args.head or settings.head_type
    store = _store()
    with _progress(planned_bytes(args.model_dir, weights, head), "quantize", not args.json) as update:
        manifest = quantize_to_store(args.model_dir, store, settings.cache_dir / "tmp", weights, head, update)
    if args.json:
        _print_json(manifest)
        return 0
    hp, params = manifest["hyperparameters"], manifest["parameters"]
    rel = [
        t["rel_error"]
        for t in manifest["tensors"]
        if t.get("rel_error") is not None and t["type"] in ("tq2_0", "tq1_0")
    ]
    print(manifest["artifact_id"])
    print(
        f"  architecture  {manifest['architecture']['gguf']} ({manifest['architecture']['hf_class']}, FFN "
        f"{manifest['architecture']['ffn_activation']})",
        file=sys.stderr,
    )
    print(
        f"  shape         hidden {hp['hidden']}, {hp['layers']} layers, {hp['heads']}/{hp['kv_heads']} heads, FFN "
        f"{hp['ffn']}, vocab {hp['vocab']}",
        file=sys.stderr,
    )
    print(f"  parameters    {params['total']:,} ({params['ternary']:,} ternary)", file=sys.stderr)
    print(f"  types         weights {weights}, head {head}, norms f32", file=sys.stderr)
    print(
        f"  size          {manifest['size']:,} bytes; {manifest['bytes_per_token']:,} bytes read per decoded token",
        file=sys.stderr,
    )
    if rel:
        print(f"  ternary error mean relative L2 {sum(rel) / len(rel):.4f} (max {max(rel):.4f})", file=sys.stderr)
    print(f"  store         {store.url}", file=sys.stderr)
    return 0


def cmd_generate(args) -> int:
    from engine.artifacts.refs import resolve_model
    from engine.model.reference import ReferenceModel
    from engine.model.tokenizer import ModelTokenizer

    path = resolve_model(args.model, _store())
    if args.engine == "native":
        from engine.model.loader import open_model

        model = open_model(path, "generate")
    else:
        model = ReferenceModel(path)
    tokenizer = ModelTokenizer(model.file)
    prompt_ids = tokenizer.encode(args.prompt)
    ids = model.generate(prompt_ids, args.max_tokens, stop_ids=tokenizer.stop_ids)
    text = tokenizer.decode(ids)
    if args.json:
        _print_json({"text": text, "token_ids": ids, "prompt_token_ids": prompt_ids, "engine": args.engine})
    else:
        print(text)
    return 0


def cmd_artifacts(args) -> int:
    store = _store()
    rows = store.list_artifacts(kind=args.kind)
    if args.json:
        _print_json(rows)
        return 0
    for m in rows:
        print(
            f"{m['artifact_id'][:19]}  {m.get('kind', '?'):<8} {m.get('size', 0):>14,}  {m.get('created', '')}  "
            f"{m.get('source', {}).get('path', '')}"
        )
    return 0


def cmd_artifact_show(args) -> int:
    store = _store()
    _print_json(store.get_manifest(store.resolve(args.ref)))
    return 0


def cmd_build_kernels(args) -> int:
    from engine.model.autotune import autotune
    from engine.model.build import build_kernels, load_library, read_manifest
    from engine.settings import get_settings

    build = build_kernels(force=args.force)  # progress goes to stderr
    library = load_library()
    entry = None
    if args.model:
        from engine.artifacts.refs import resolve_model

        entry = autotune(library, resolve_model(args.model, _store()))
    if args.json:
        _print_json(read_manifest(build.directory))
        return 0
    print(build.key)
    print(f"  library   {build.path}", file=sys.stderr)
    print(
        f"  cache     {'hit' if build.cache_hit else 'miss (built in %.1f s)' % build.manifest['build_seconds']}",
        file=sys.stderr,
    )
    print(f"  isa       {library.isa} (RYZ_ISA={get_settings().isa})", file=sys.stderr)
    families = ", ".join(f"{isa} {r['checks']} checks" for isa, r in build.manifest["self_test"]["families"].items())
    print(f"  self-test passed ({families})", file=sys.stderr)
    if fallback := build.manifest.get("fallback"):
        print(f"  fallback  {' '.join(fallback['extra_flags'])}: {fallback['reason']}", file=sys.stderr)
    if entry:
        w = entry["winner"]
        print(
            f"  autotune  {entry['signature']}: gemm_token_tile {w.get('gemm_token_tile')}, threads decode "
            f"{w.get('threads_decode')} / prefill {w.get('threads_prefill')}",
            file=sys.stderr,
        )
    return 0


def cmd_bench(args) -> int:
    from evaluations.bench import format_report, run_bench

    result = run_bench(
        args.target,
        threads=args.threads,
        prompt=args.prompt,
        gen=args.gen,
        repeats=args.repeats,
        peers=args.peers,
        weights=args.weights,
        head=args.head,
        library=args.library,
        ubatch=args.ubatch,
    )
    if args.json:
        _print_json(result)
    else:
        print(format_report(result))
    return 0


def cmd_serve(args) -> int:
    if args.bundle:
        if args.model:
            raise ValueError("--bundle serves the bundle's own model; drop --model")
        from flows.bundle_cli import cmd_serve_bundle

        return cmd_serve_bundle(args)
    from engine.serving.server import serve
    from engine.settings import get_settings

    overrides = {
        k: v
        for k, v in {
            "host": args.host,
            "port": args.port,
            "threads": args.threads,
            "max_seqs": args.max_seqs,
            "max_context": args.max_context,
        }.items()
        if v is not None
    }
    settings = get_settings().model_copy(update=overrides)
    if settings.host not in ("127.0.0.1", "localhost", "::1") and not settings.api_keys:
        print(
            f"ryz serve: warning: binding {settings.host} without RYZ_API_KEYS: anyone who can reach it can use it",
            file=sys.stderr,
        )
    serve(args.model, settings=settings)
    return 0


def cmd_mcp(args) -> int:
    from engine.serving.mcp_server import run_mcp

    run_mcp(args.model, args.index)
    return 0


def cmd_lm_eval(args) -> int:
    from evaluations.lm_eval_cli import run_lm_eval

    return run_lm_eval(args.lm_eval_args)


def cmd_continue_config(args) -> int:
    import httpx

    from deployments import render_continue_config
    from engine.settings import get_settings

    settings = get_settings()
    url = (args.url or f"http://{settings.host}:{settings.port}").rstrip("/")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        response = httpx.get(f"{url}/v1/models", headers=headers, timeout=10)
        response.raise_for_status()
    except httpx.HTTPError as exc:
        print(
            f"ryz continue-config: cannot list models at {url}/v1/models ({exc}); start `ryz serve` first or pass "
            f"--url",
            file=sys.stderr,
        )
        return 1
    models = [m["id"] for m in response.json()["data"]]
    text = render_continue_config(url, models, api_key=args.api_key)
    if args.output:
        out = Path(args.output).expanduser()
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(out)
        print(f"wrote {out}", file=sys.stderr)
    else:
        print(text, end="")
    return 0


def cmd_pipeline_run(args) -> int:
    import os

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from flows.run import pipeline_run

    result = pipeline_run(
        source=args.source,
        path=str(Path(args.path).resolve()) if args.path else None,
        suite=args.suite,
        limit=args.limit,
    )
    if args.json:
        _print_json(result)
    else:
        for r in result["candidates"]:
            print(f"{r['repo']:<40} {r.get('version') or '-':<28} {r['status']:<10} {r['reason']}")
        if not result["candidates"]:
            print("nothing new since the last run")
    print(f"report: {result['report']}")
    return 0


def cmd_ci_bench(args) -> int:
    import os

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from flows.evaluate import with_runner

    baseline = args.baseline if args.baseline and Path(args.baseline).exists() else None
    if args.baseline and baseline is None and not args.write_baseline:
        print(
            f"ryz ci-bench: no baseline record at {args.baseline}; run once with --write-baseline on the main branch",
            file=sys.stderr,
        )
        return 2
    evaluate = with_runner(args.runner, args.shards)
    state = evaluate(
        model=args.model, suite=args.suite, limit=args.limit, baseline=baseline, shards=args.shards, return_state=True
    )
    result = state.result(raise_on_failure=False)
    if isinstance(result, BaseException):
        print(f"ci-bench FAILED: {result}", file=sys.stderr)
        return 1
    if args.write_baseline:
        from engine.artifacts.store import open_store
        from evaluations.evaluate import load_record

        out = Path(args.baseline)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(load_record(result["record_id"], open_store()), indent=1) + "\n")
        tmp.replace(out)
        print(f"baseline written to {out}", file=sys.stderr)
    if args.json:
        _print_json(result)
    else:
        print(f"ci-bench passed: {result['verdict']}")
    return 0


def _releases():
    from engine.artifacts.releases import ReleaseStore

    return ReleaseStore(_store())


def _release_flow(**kw) -> dict:
    import os

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from flows.release import release

    return release(**kw)


def _print_release(rel: dict | None, as_json: bool) -> None:
    if as_json:
        _print_json(rel)
        return
    if rel is None:
        print("no releases yet")
        return
    step = rel["steps"][min(rel["step_index"], len(rel["steps"]) - 1)]
    print(f"release {rel['id']}: {rel['ref']} {rel['status']} (next step {step}% of {rel['steps']})")
    for e in rel["log"]:
        print(f"  {_when(e['time'])}  {e['event']:<18} {e['reason']}")


def cmd_release(args) -> int:
    import getpass

    releases = _releases()
    actor = f"user:{getpass.getuser()}"
    action = args.release_command
    if action == "start":
        rel = _release_flow(ref=args.ref, synthetic_load=args.synthetic_load or None)
    elif action == "status":
        rel = releases.get(args.id) if args.id else releases.latest()
    elif action == "pause":
        rel = _current(releases, ("canary",))
        rel = releases.set_status(rel["id"], "pause_requested", f"pause requested by {actor}")
    elif action == "resume":
        rel = releases.get(args.id) if args.id else _current(releases, ("paused",))
        rel = _release_flow(release_id=rel["id"], synthetic_load=args.synthetic_load or None)
    elif action == "promote":
        rel = _current(releases, ("paused", "canary"))
        if not args.force and rel["step_index"] < len(rel["steps"]):
            print(
                f"ryz release promote: {rel['ref']} has passed {rel['step_index']} of {len(rel['steps'])} canary "
                f"steps; "
                "`ryz release resume` runs the rest, `--force` promotes now",
                file=sys.stderr,
            )
            return 1
        rel = _release_flow(release_id=rel["id"], force_promote=True)
    elif action == "abort":
        from tasks.release import abort_actions

        rel = _current(releases, ("canary", "paused", "gating", "pause_requested"))
        reason = args.reason or f"aborted by {actor}"
        if rel["status"] == "canary":  # a flow is stepping it: it aborts at its next check
            rel = releases.set_status(rel["id"], "abort_requested", reason)
        else:
            abort_actions(rel["id"], rel["ref"], reason, actor)
            rel = releases.get(rel["id"])
    else:  # rollback
        from tasks.release import rollback_production

        result = rollback_production(actor, args.reason or f"rollback by {actor}")
        if args.json:
            _print_json(result)
        else:
            print(f"production is {result['production']} again; {result['rolled_back']} is rolled_back")
        return 0
    _print_release(rel, args.json)
    return 0 if rel is None or rel["status"] not in ("rejected", "aborted", "failed") else 2


def _current(releases, statuses: tuple[str, ...]) -> dict:
    from engine.errors import ModelReferenceError

    rel = releases.latest()
    if rel is None or rel["status"] not in statuses:
        state = f"the latest release is {rel['ref']} {rel['status']}" if rel else "there are no releases"
        raise ModelReferenceError(f"no release in state {'/'.join(statuses)}: {state}")
    return rel


def _registry():
    from engine.artifacts.registry import Registry

    return Registry(_store())


def _when(t: float) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def cmd_registry_list(args) -> int:
    versions = _registry().versions(args.name)
    if args.json:
        _print_json([v.to_json() for v in versions])
        return 0
    for v in versions:
        print(f"{v.ref:<32} {v.status:<12} {v.artifact_id[:19]}  {_when(v.created)}")
    if not versions:
        print("the registry is empty", file=sys.stderr)
    return 0


def cmd_registry_show(args) -> int:
    registry = _registry()
    version = registry.get(args.ref)
    doc = version.to_json()
    doc["aliases"] = sorted(
        a for a, t in registry.aliases().items() if (t["name"], t["version"]) == (version.name, version.version)
    )
    _print_json(doc)
    return 0


def cmd_registry_history(args) -> int:
    events = _registry().history(args.name)
    if args.json:
        _print_json([{**e, "time": _when(e["time"])} for e in events])
        return 0
    for e in events:
        target = f"{e['name']}:{e['version']}" if e.get("name") else "-"
        print(f"{_when(e['time'])}  {e['action']:<18} {target:<28} {e['actor']:<24} {e['reason']}")
    return 0


def cmd_registry_aliases(args) -> int:
    aliases = _registry().aliases()
    if args.json:
        _print_json(aliases)
        return 0
    for alias, target in sorted(aliases.items()):
        print(f"{alias:<12} {target['name']}:{target['version']}")
    return 0


def cmd_gc(args) -> int:
    from engine.artifacts.gc import collect_garbage

    result = collect_garbage(_store(), keep=args.keep, dry_run=args.dry_run)
    if args.json:
        _print_json(result)
    else:
        verb = "would remove" if args.dry_run else "removed"
        for item in result["removed"]:
            print(f"{verb} {item['artifact_id']}  {item['kind']:<10} {item['size']:>12,} B  {item['why']}")
        print(
            f"{verb} {len(result['removed'])} artifacts ({result['bytes']:,} bytes); kept {result['kept']}",
            file=sys.stderr,
        )
    return 0


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


# --- parser ---------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ryz", description="Ryzanstein: ternary LLMs on CPUs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler: Callable, help: str, json_flag: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        if json_flag:
            p.add_argument("--json", action="store_true", help="machine-readable output on stdout")
        p.set_defaults(handler=handler)
        return p

    config = sub.add_parser("config", help="show the effective settings").add_subparsers(
        dest="config_command", required=True
    )
    show = config.add_parser("show", help="print every setting, its value and where it came from")
    show.add_argument("--json", action="store_true")
    show.set_defaults(handler=cmd_config_show)

    p = command("synth", cmd_synth, "write a random-weight Hugging Face BitNet checkpoint of a named shape")
    p.add_argument("--shape", required=True, help="tiny, medium or bitnet-2b4t")
    p.add_argument("-o", "--output", required=True, type=Path, help="output directory")
    p.add_argument("--seed", type=int, default=0)

    p = command("quantize", cmd_quantize, "quantize a Hugging Face checkpoint into a ternary GGUF artifact")
    p.add_argument("model_dir", type=Path)
    p.add_argument("--weights", choices=["tq2_0", "tq1_0"], help="ternary GGUF type (default RYZ_WEIGHTS_TYPE)")
    p.add_argument("--head", choices=["q8_0", "q6_k", "f16"], help="embedding/head type (default RYZ_HEAD_TYPE)")

    p = command("generate", cmd_generate, "greedy-decode (default: the numpy reference forward, slow: the yardstick)")
    p.add_argument("model", help="artifact id or prefix, or a .gguf path")
    p.add_argument("prompt")
    p.add_argument("--max-tokens", type=_positive_int, default=32)
    p.add_argument(
        "--engine",
        choices=["reference", "native"],
        default="reference",
        help="reference: numpy (default); native: the C++ kernels built for this CPU",
    )

    p = command(
        "build-kernels",
        cmd_build_kernels,
        "build (or find cached) native kernels for this CPU; optionally autotune on a model",
    )
    p.add_argument("--model", help="autotune on this model's linear shapes (artifact id or prefix, or a .gguf path)")
    p.add_argument("--force", action="store_true", help="rebuild even if a build with the same key is cached")

    p = command(
        "bench",
        cmd_bench,
        "measure prefill/decode tok/s, TTFT, peak RSS and the roofline fraction (--peers: "
        "against llama.cpp and onnxruntime on the same machine)",
    )
    p.add_argument(
        "target",
        metavar="SHAPE_OR_ARTIFACT",
        help="a shape (tiny, medium, bitnet-2b4t: random weights, synthesized once and cached) or a model reference",
    )
    p.add_argument("--threads", type=int, help="compute threads (default RYZ_THREADS, else all physical cores)")
    p.add_argument("--prompt", type=int, default=512, help="prompt tokens for prefill and TTFT (default 512)")
    p.add_argument("--gen", type=int, default=128, help="decoded tokens (default 128)")
    p.add_argument(
        "--repeats", type=int, default=3, help="measured runs, interleaved with the peers'; medians are reported"
    )
    p.add_argument(
        "--peers", action="store_true", help="also run llama.cpp (TQ2_0 and TQ1_0) and onnxruntime MatMulNBits"
    )
    p.add_argument(
        "--weights", choices=["tq2_0", "tq1_0"], help="ternary type a shape is quantized to (default RYZ_WEIGHTS_TYPE)"
    )
    p.add_argument(
        "--head", choices=["q8_0", "q6_k", "f16"], help="head type a shape is quantized to (default RYZ_HEAD_TYPE)"
    )
    p.add_argument(
        "--ubatch", type=int, default=0, help="prefill chunk in tokens (default 0: the whole prompt in one call)"
    )
    p.add_argument("--library", type=Path, help="a prebuilt native library (default: the kernel build for this CPU)")

    from evaluations import serve_bench

    serve_bench.add_arguments(command("bench-serve", serve_bench.main, serve_bench.HELP))

    from flows.index_cli import add_index_commands

    add_index_commands(sub)

    p = command(
        "serve",
        cmd_serve,
        "serve a model over an OpenAI-compatible HTTP API (continuous batching, canary router)",
        json_flag=False,
    )
    p.add_argument(
        "--model",
        help="model loaded as production: artifact id or prefix, or a .gguf path "
        "(omitted: start empty and load through POST /admin/variants)",
    )
    p.add_argument("--host", help="bind address (default RYZ_HOST, 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default RYZ_PORT, 8000)")
    p.add_argument("--threads", type=int, help="compute threads (default RYZ_THREADS, else all cores)")
    p.add_argument("--max-seqs", type=_positive_int, help="concurrent sequences (default RYZ_MAX_SEQS)")
    p.add_argument("--max-context", type=_positive_int, help="positions per sequence (default RYZ_MAX_CONTEXT)")
    p.add_argument(
        "--bundle", type=Path, help="serve a bundle directory (`ryz bundle REF -o DIR`): verified, no registry or store"
    )

    p = command(
        "mcp",
        cmd_mcp,
        "run a Model Context Protocol server on stdio: tools search_index (the retrieval index) "
        "and generate (the production model)",
        json_flag=False,
    )
    p.add_argument("--model", default="production", help="model for `generate` (default: the production alias)")
    p.add_argument("--index", default="production", help="index for `search_index` (default: the production index)")

    from flows.bundle_cli import add_bundle_arguments, cmd_bundle

    add_bundle_arguments(
        command(
            "bundle",
            cmd_bundle,
            "write a registry version's self-contained serving bundle "
            "(GGUF, kernels, settings, systemd/compose/Kubernetes files)",
        )
    )

    p = command(
        "continue-config",
        cmd_continue_config,
        "write a Continue.dev config pointing at a running `ryz serve`",
        json_flag=False,
    )
    p.add_argument("--url", default=None, help="server base URL (default http://RYZ_HOST:RYZ_PORT)")
    p.add_argument("--api-key", help="key Continue sends (one of RYZ_API_KEYS), if the server needs one")
    p.add_argument("-o", "--output", help="write here (for example ~/.continue/config.yaml) instead of stdout")

    p = command(
        "ci-bench",
        cmd_ci_bench,
        "CI: evaluate a model (suite + speed) and fail on a regression against a "
        "stored baseline record (what .github/workflows/ci-bench.yml runs)",
    )
    p.add_argument(
        "--model",
        default="examples/zoo/ryz-demo-m",
        help="model reference or checkpoint directory (default: the demo zoo's ryz-demo-m)",
    )
    p.add_argument("--suite", default="demo_mc,demo_gen", help="suite or task list (default demo_mc,demo_gen)")
    p.add_argument("--limit", type=int, default=50, help="examples per task (default 50)")
    p.add_argument("--baseline", default="ci/baseline-record.json", help="baseline evaluation record (JSON file)")
    p.add_argument("--write-baseline", action="store_true", help="store this run's record as the new baseline")
    p.add_argument("--shards", type=_positive_int, default=1, help="run the suite's tasks as N concurrent shards")
    p.add_argument(
        "--runner", help="dask (a local cluster of --shards workers) or dask=ADDRESS (an existing scheduler)"
    )

    pipeline = sub.add_parser(
        "pipeline", help="the main job: discover, quantize, build, verify, evaluate, register"
    ).add_subparsers(dest="pipeline_command", required=True)
    p = pipeline.add_parser(
        "run",
        help="run discovery and the candidate pipeline for each new model (Prefect, ephemeral "
        "unless PREFECT_API_URL is set)",
    )
    p.set_defaults(handler=cmd_pipeline_run)
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    p.add_argument(
        "--source", choices=["local", "hf"], default="local", help="where to discover (default local: the demo zoo)"
    )
    p.add_argument(
        "--path", help="local source: a model directory or a folder of them (default RYZ_DISCOVERY_LOCAL_PATHS)"
    )
    p.add_argument("--suite", default="gate", help="evaluation suite (default gate)")
    p.add_argument("--limit", type=int, help="examples per task (default: the suite's own limits)")

    release = sub.add_parser(
        "release", help="canary releases: start, status, pause, resume, promote, abort, rollback"
    ).add_subparsers(dest="release_command", required=True)
    for name, help_ in (
        ("start", "release a registry version: offline gates, canary steps, promotion"),
        ("status", "the latest release (or one by id) and its log"),
        ("pause", "pause the running release at its next check"),
        ("resume", "continue a paused release from its recorded step"),
        ("promote", "promote the current release now (--force skips the remaining steps)"),
        ("abort", "abort the current release: canary weight 0 and unloaded, status rolled_back"),
        ("rollback", "undo the last promotion: `previous` serves as production again"),
    ):
        p = release.add_parser(name, help=help_, description=help_)
        p.set_defaults(handler=cmd_release)
        p.add_argument("--json", action="store_true", help="machine-readable output on stdout")
        if name == "start":
            p.add_argument("ref", help="name:version (or an alias) of a registered candidate")
        if name in ("status", "resume"):
            p.add_argument("id", nargs="?", help="a release id (default: the latest)")
        if name in ("start", "resume"):
            p.add_argument(
                "--synthetic-load", action="store_true", help="drive bounded synthetic traffic during the steps"
            )
        if name == "promote":
            p.add_argument("--force", action="store_true", help="promote without running the remaining canary steps")
        if name in ("abort", "rollback"):
            p.add_argument("--reason", help="recorded in the registry history")

    registry = sub.add_parser("registry", help="model versions, aliases and their history").add_subparsers(
        dest="registry_command", required=True
    )
    for name, handler, help_ in (
        ("list", cmd_registry_list, "every version with its status and artifact"),
        ("history", cmd_registry_history, "the event log: who changed what, when and why"),
        ("aliases", cmd_registry_aliases, "production / canary / previous"),
        ("show", cmd_registry_show, "one version (JSON)"),
    ):
        p = registry.add_parser(name, help=help_, description=help_)
        p.set_defaults(handler=handler)
        p.add_argument("--json", action="store_true", help="machine-readable output on stdout")
        if name == "show":
            p.add_argument("ref", help="name:version, an alias, or a name (its newest version)")
        elif name in ("list", "history"):
            p.add_argument("name", nargs="?", help="only this model name")

    p = command(
        "gc",
        cmd_gc,
        "remove artifacts nothing refers to (registry versions, aliases, bundles), beyond the newest N per name",
    )
    p.add_argument("--keep", type=int, default=2, help="unreferenced model artifacts kept per model name (default 2)")
    p.add_argument("--dry-run", action="store_true", help="list what would be removed, remove nothing")

    p = command(
        "lm-eval",
        cmd_lm_eval,
        "lm-eval's CLI with the `ryzanstein` model and the bundled offline tasks; "
        "arguments pass through (ryz lm-eval --model ryzanstein --model_args model=REF --tasks mmlu_offline)",
        json_flag=False,
    )
    p.add_argument("lm_eval_args", nargs=argparse.REMAINDER, metavar="ARGS", help="lm-eval's own arguments")

    p = command(
        "eval",
        cmd_eval,
        "evaluate a model on a suite plus the speed benchmark, validate the record (Great "
        "Expectations), store it and write an HTML report; exits 1 when the record is invalid",
    )
    p.add_argument(
        "model", metavar="MODEL_REF", help="name:version, an alias, an artifact id or prefix, or a .gguf path"
    )
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

    p = command("artifacts", cmd_artifacts, "list the artifacts in the store")
    p.add_argument("--kind", help="only this kind (model, ...)")
    p = command("artifact", cmd_artifact_show, "print one artifact's manifest (JSON)", json_flag=False)
    p.add_argument("ref", help="artifact id or prefix (>= 12 hex digits)")
    return parser


def main(argv: list[str] | None = None) -> int:
    from engine.errors import RyzError

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["lm-eval"]:  # everything after it is lm-eval's own, options included
        args = argparse.Namespace(handler=cmd_lm_eval, lm_eval_args=argv[1:])
    else:
        args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except RyzError as exc:
        print(f"ryz: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except (ValueError, FileNotFoundError) as exc:
        print(f"ryz: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("ryz: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
