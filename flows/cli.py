"""`ryz`: the command line. Each subcommand imports what it needs lazily, so engine commands
(`serve`, `generate`, `bench`, `quantize`) never import Prefect.

Conventions (DESIGN.md): `--json` prints machine-readable output on stdout and nothing else there;
progress and logs go to stderr; a failed check exits non-zero.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from flows.cli_common import EXIT_ERROR, EXIT_USAGE, MODEL_REF_HELP
from flows.cli_common import positive_int as _positive_int
from flows.cli_common import print_json as _print_json
from flows.cli_common import store as _store

if TYPE_CHECKING:
    from engine.model.native import NativeModel


@contextmanager
def _progress(total: int, desc: str, enabled: bool = True):
    """A byte-counting tqdm bar on stderr; yields the update callback."""
    from tqdm import tqdm

    with tqdm(
        total=total, desc=desc, unit="B", unit_scale=True, file=sys.stderr, disable=not enabled, leave=False
    ) as bar:
        yield bar.update


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
    """One completion through the engine core (the server's sampling, stops and limits) on the native engine, or on
    the numpy reference behind the same core (`--engine reference`, the yardstick)."""
    from engine.artifacts.refs import resolve_model
    from engine.model.loader import open_model
    from engine.model.reference import ReferenceModel, ReferenceSlots
    from engine.model.tokenizer import ModelTokenizer
    from engine.serving.core import GenerationRequest, batch_engine
    from engine.serving.speculative import SpecConfig
    from flows.run_cli import sampling_options

    params = sampling_options(args).sampling()
    path = resolve_model(args.model, _store())
    native = args.engine == "native" or args.speculative != "off"  # speculation runs on the native engine
    model: NativeModel | ReferenceSlots
    model = open_model(path, "generate", threads=args.threads) if native else ReferenceSlots(ReferenceModel(path))
    tokenizer = ModelTokenizer(model.file)
    prompt_ids = tokenizer.encode(args.prompt)
    draft = _draft_model(args, model, tokenizer) if args.speculative == "draft" else None
    core = batch_engine(model, tokenizer, speculative=SpecConfig(args.speculative, args.spec_tokens), draft_model=draft)
    try:
        max_tokens = min(args.max_tokens, model.max_positions - len(prompt_ids))
        request = GenerationRequest(prompt_ids, params, max_tokens=max(max_tokens, 1), stop=list(args.stop))
        result = core.run([request])[0]
    finally:
        core.close()
    spec = result.speculative if args.speculative != "off" else None
    if args.json:
        out = {
            "text": result.text,
            "token_ids": result.token_ids,
            "prompt_token_ids": prompt_ids,
            "finish_reason": result.finish_reason,
            "engine": "native" if native else "reference",
        }
        _print_json({**out, "speculative": spec} if spec else out)
    else:
        print(result.text)
    if spec:
        rate = spec["accepted"] / spec["drafted"] if spec["drafted"] else 0.0
        per_step = spec["emitted"] / spec["steps"] if spec["steps"] else 0.0
        print(
            f"speculative {spec['method']}: {spec['accepted']} of {spec['drafted']} drafted tokens accepted "
            f"({rate:.0%}), {per_step:.2f} tokens per verification step ({spec['steps']} steps)",
            file=sys.stderr,
        )
    return 0


def _draft_model(args, model, tokenizer):
    """--speculative draft: the --draft-model beside the target (same tokenizer, checked by DraftModel)."""
    from engine.artifacts.refs import resolve_model
    from engine.model.loader import open_model
    from engine.model.tokenizer import ModelTokenizer
    from engine.serving.speculative import DraftModel

    if not args.draft_model:
        raise SystemExit("ryz generate: --speculative draft needs --draft-model REF")
    draft_native = open_model(resolve_model(args.draft_model, _store()), "generate", threads=args.threads)
    return DraftModel(
        draft_native, ModelTokenizer(draft_native.file), model.hp.vocab, tokenizer, f"draft model {args.draft_model!r}"
    )


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
    from engine.serving.app import serve
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
    # The temporary Prefect server gets 20 s to start by default: too few on a busy 2-core machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    from flows.progress import console

    with console(verbose=args.verbose):  # before Prefect and lm-eval are imported: they read it at import
        from flows.run import pipeline_run

        result = pipeline_run(
            source=args.source,
            path=str(Path(args.path).resolve()) if args.path else None,
            suite=args.suite,
            limit=args.limit,
        )
    if args.json:  # the JSON alone on stdout (it holds the report's path)
        _print_json(result)
        print(f"report: {result['report']}", file=sys.stderr)
        return 0
    for r in result["candidates"]:
        print(f"{r['repo']:<40} {r.get('version') or '-':<28} {r['status']:<10} {r['reason']}")
    if not result["candidates"]:
        print("nothing new since the last run")
    print(f"report: {result['report']}")
    return 0


# --- parser ---------------------------------------------------------------------------------------


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

    p = command(
        "generate",
        cmd_generate,
        "complete a prompt once (no chat template: see `ryz run`) on the native engine, sampling as ollama and "
        "llama-cli do by default; --temperature 0 is greedy",
    )
    p.add_argument("model", metavar="MODEL_REF", help=MODEL_REF_HELP)
    p.add_argument("prompt", metavar="PROMPT", help="the text to complete (no chat template)")
    from flows.run_cli import add_sampling_arguments

    add_sampling_arguments(p, max_tokens=32)
    p.add_argument(
        "--engine",
        choices=["native", "reference"],
        default="native",
        help="native: the C++ kernels built for this CPU (default); reference: the numpy forward (slow: the yardstick)",
    )
    p.add_argument(
        "--threads", type=_positive_int, help="native compute threads (default RYZ_THREADS, else all physical cores)"
    )
    p.add_argument(
        "--speculative",
        choices=["off", "ngram", "draft"],
        default="off",
        help="speculative decoding (native engine, same output): ngram drafts from the prompt (prompt lookup), "
        "draft from --draft-model; acceptance is printed on stderr",
    )
    p.add_argument(
        "--draft-model", help=f"--speculative draft: a smaller model with the same tokenizer; {MODEL_REF_HELP}"
    )
    p.add_argument("--spec-tokens", type=_positive_int, default=4, help="tokens drafted per step (default 4)")

    p = command(
        "build-kernels",
        cmd_build_kernels,
        "build (or find cached) native kernels for this CPU; optionally autotune on a model",
    )
    p.add_argument("--model", help=f"autotune on this model's linear shapes: {MODEL_REF_HELP}")
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
        help=f"a shape (tiny, medium, bitnet-2b4t: random weights, synthesized once and cached) or {MODEL_REF_HELP}",
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

    from evaluations import spec_bench

    spec_bench.add_arguments(command("bench-spec", spec_bench.main, spec_bench.HELP))

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
        help=f"model loaded as production: {MODEL_REF_HELP} (omitted: follow the registry: its production and, "
        "during a release, the canary at the release's weight; docs/release.md)",
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
    p.add_argument(
        "--model", default="production", help=f"model for `generate`: {MODEL_REF_HELP} (default: production)"
    )
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
    p.add_argument(
        "--verbose",
        action="store_true",
        help="Prefect's INFO logs, our evaluation/benchmark progress and progress bars on the console (default: "
        "one line per stage per model, warnings and errors; bars only on a terminal)",
    )

    p = command(
        "lm-eval",
        cmd_lm_eval,
        "lm-eval's CLI with the `ryzanstein` model and the bundled offline tasks; "
        "arguments pass through (ryz lm-eval --model ryzanstein --model_args model=REF --tasks mmlu_offline)",
        json_flag=False,
    )
    p.add_argument("lm_eval_args", nargs=argparse.REMAINDER, metavar="ARGS", help="lm-eval's own arguments")

    from flows.eval_cli import add_eval_commands
    from flows.export_cli import add_export_command
    from flows.ps_cli import add_ps_command
    from flows.pull_cli import add_pull_command
    from flows.registry_cli import add_registry_commands
    from flows.release_cli import add_release_commands
    from flows.run_cli import add_run_command

    add_pull_command(sub, command)
    add_run_command(sub, command)
    add_export_command(sub, command)
    add_ps_command(sub, command)

    add_release_commands(sub, command)
    add_registry_commands(sub, command)
    add_eval_commands(sub, command)

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
