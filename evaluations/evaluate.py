"""`ryz eval`: one model on one suite, plus the speed benchmark, as an evaluation record (DESIGN.md
"Evaluation record") validated by a Great Expectations suite before anything may attach it to a version.

    record = evaluate_model("ryz-demo-s:1", suite="gate")      # lm-eval in-process + bench, then validated
    record["valid"], record["failures"]                         # validate_record(record) filled these
    record_id = store_record(record, open_store())              # kind "evaluation", refers_to the model

The record (schema 1, JSON; docs/evaluation.md has every field):

    {"schema": 1, "model": {"ref", "artifact_id", "path", "name", "version"}, "suite", "limit", "plan", "skipped",
     "tasks": {TASK: {"metrics": {METRIC: {"value": v, "stderr": s | null}}, "n": n, "limit": l, "size": N,
                      "higher_is_better": {METRIC: bool}, "group": bool}},
     "bench": {"prefill_tok_s", "decode_tok_s", "decode_tok_s_runs", "ttft_ms", "peak_rss_mb", "threads",
               "roofline_fraction", ...} | null,
     "environment": {...}, "started", "seconds", "valid": bool, "failures": [str]}

Metric names are bare (lm-eval's `,none` filter suffix dropped; another filter keeps its suffix as
`metric,filter`), and `stderr` is null where lm-eval reports "N/A" (perplexities are not bootstrapped).

The benchmark here is deliberately small (BENCH_PROMPT=128 prompt tokens, BENCH_GEN=32 decoded tokens,
BENCH_REPEATS=3 fresh worker processes, each between two >= 1 GiB bandwidth probes): the gate compares versions on
one machine, it is not `ryz bench`'s publication run (pp512 tg128, median of 3, peers). `decode_tok_s` is the
median over the repeats and `decode_tok_s_runs` every repeat's figure, in run order: the gates
(evaluations/gates.py) take the speed noise from those runs instead of an absolute ms-per-token floor.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from engine import host
from engine.errors import EvaluationRecordError, SchemaVersionError
from evaluations import say

SCHEMA = 1
KIND = "evaluation"
BENCH_PROMPT = 128  # prompt tokens of the eval's benchmark (prefill, TTFT)
BENCH_GEN = 32  # decoded tokens (decode tok/s)
# Measured worker processes (each its own process, between two bandwidth probes): the record keeps every run's
# decode tok/s (decode_tok_s_runs) so the gate sees the measured spread. ~3 s per repeat on the demo models,
# mostly the two bandwidth probes (docs/evaluation.md "The record").
BENCH_REPEATS = 3
BENCH_FIELDS = (
    "prefill_tok_s",
    "decode_tok_s",
    "decode_tok_s_runs",
    "ttft_ms",
    "peak_rss_mb",
    "threads",
    "roofline_fraction",
    "roofline_fraction_of_medians",
    "bandwidth_gb_s",
    "bytes_per_token",
    "kv_bytes_per_token",
    "load_seconds",
    "prompt",
    "gen",
    "repeats",
    "isa",
    "library",
    "seconds",
)
BENCH_POSITIVE = ("prefill_tok_s", "decode_tok_s", "ttft_ms", "peak_rss_mb", "threads")
TTFT_SLACK = 0.95  # ttft_ms >= 0.95 x the prefill time the prefill rate implies (TTFT = prefill + first token)
# A fraction above this means the bytes or the bandwidth are wrong (bits for bytes is 8x). Not tighter: on a busy
# 2-core host the bandwidth probe, descheduled mid-pass, read low enough for honest fractions of 1.6-2.0.
ROOFLINE_MAX = 3.0
ROOFLINE_TOLERANCE = 0.02  # roofline_fraction_of_medians vs decode x bytes / bandwidth, relative (field rounding)
RUNS_MEDIAN_TOLERANCE = 0.001  # decode_tok_s vs the median of decode_tok_s_runs, relative (rounding)

# Metric kinds and their ranges. A metric's kind comes from its bare name (before any `,filter`).
ACCURACY_METRICS = {
    "acc",
    "acc_norm",
    "exact_match",
    "em",
    "f1",
    "mc1",
    "mc2",
    "pass@1",
    "pass@10",
    "pass@100",
    "pass_at_1",
    "contains",
    "brier_score",
}
PERPLEXITY_METRICS = {"perplexity", "word_perplexity", "byte_perplexity", "token_perplexity"}
NONNEGATIVE_METRICS = {"bits_per_byte", "bleu", "chrf", "ter"}
HEADLINE_ORDER = ("acc", "exact_match", "pass@1", "acc_norm", "f1", "mc2")  # a task's headline accuracy metric


def log(message: str) -> None:
    say(f"ryz eval: {message}")


def metric_kind(metric: str) -> str:
    """accuracy (in [0, 1]), perplexity (>= 1), nonnegative or other (finite)."""
    base = metric.split(",", 1)[0]
    if base in ACCURACY_METRICS or base.startswith(("acc", "exact_match", "pass@")):
        return "accuracy"
    if base in PERPLEXITY_METRICS or base.endswith("perplexity"):
        return "perplexity"
    if base in NONNEGATIVE_METRICS:
        return "nonnegative"
    return "other"


# --- the model ------------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"


def describe_model(ref: str, store) -> dict:
    """{"ref", "artifact_id", "path", "name", "version"} for any model reference (a GGUF path's artifact id is
    the sha256 of its bytes, whether or not the store holds it)."""
    from engine.artifacts.refs import resolve_artifact, resolve_model
    from engine.artifacts.registry import Registry, is_registry_ref

    path = resolve_model(ref, store)
    version = None
    if ref.endswith(".gguf") or Path(ref).expanduser().is_file():
        artifact_id = sha256_file(path)
        name = path.stem
    else:
        artifact_id = resolve_artifact(ref, store)
        name = None
        try:
            v = Registry(store).get(ref) if is_registry_ref(ref) else None
        except Exception:  # noqa: BLE001 - the registry is optional for an artifact id
            v = None
        if v is not None:
            version, name = v.ref, v.name
        else:
            from engine.artifacts.gc import _model_name

            manifest = store.get_manifest(artifact_id)
            name = _model_name(manifest)
            name = None if name == "-" else name
        name = name or artifact_id[:19]
    return {"ref": ref, "artifact_id": artifact_id, "path": str(path), "name": name, "version": version}


# --- the suite ------------------------------------------------------------------------------------


def plan_suite(
    suite: str, limit: int | None = None, allow_unsafe_code: bool = False
) -> tuple[dict, list[dict], list[dict]]:
    """(suite description, lm-eval calls, skipped tasks) for a suite name (`gate`, `full`) or task names
    (`demo_mc`, `demo_mc,demo_ppl`: an ad-hoc suite, all documents unless `limit`). `limit` overrides every
    task's own limit. Hub tasks are skipped when the Hub is unreachable, code-executing ones unless allowed."""
    from evaluations import suites

    if suite in suites.SUITES:
        base = suites.SUITES[suite]
    else:
        names = [n.strip() for n in suite.split(",") if n.strip()]
        if not names:
            raise ValueError(f"no suite or task named {suite!r}; suites: {', '.join(suites.SUITES)}")
        base = suites.Suite(suite, "ad-hoc: the named tasks", tuple(suites.SuiteTask(n) for n in names))
    tasks = tuple(
        suites.SuiteTask(t.name, limit if limit is not None else t.limit, t.num_fewshot, t.hub, t.unsafe_code)
        for t in base.tasks
    )
    chosen = suites.Suite(base.name, base.description, tasks)
    offline_reason = None
    if any(t.hub for t in tasks):
        from evaluations.tasks import hub_offline_reason

        offline_reason = hub_offline_reason()
    skipped = []
    for t in tasks:
        if t.hub and offline_reason:
            skipped.append({"task": t.name, "why": f"Hub data unreachable ({offline_reason})"})
        elif t.unsafe_code and not allow_unsafe_code:
            skipped.append({"task": t.name, "why": "executes model-written code: needs allow_unsafe_code"})
    calls = suites.runs(chosen, offline=bool(offline_reason), allow_unsafe_code=allow_unsafe_code)
    return {"name": chosen.name, "description": chosen.description}, calls, skipped


# --- lm-eval results -> record tasks ----------------------------------------------------------------


def _number(value: Any) -> float | None:
    """lm-eval's stderr: a number, or "N/A" (and friends) -> None."""
    if value is None or isinstance(value, str):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def tasks_from_results(out: dict, limit: int | None) -> dict:
    """The record's `tasks` from one simple_evaluate result: bare metric names, stderr null for N/A, n the
    documents evaluated (a group: the sum over its subtasks), size the task's documents, limit as asked."""
    results, samples = out.get("results", {}), out.get("n-samples", {})
    groups = out.get("group_subtasks", {})
    higher = out.get("higher_is_better", {})
    tasks: dict[str, dict] = {}
    for task, entry in results.items():
        metrics: dict[str, dict] = {}
        for key, value in entry.items():
            if "," not in key or "_stderr," in key or key in ("name", "alias", "sample_len"):
                continue
            metric, _, filt = key.partition(",")
            name = metric if filt == "none" else f"{metric},{filt}"
            stderr = entry.get(f"{metric}_stderr,{filt}")
            metrics[name] = {"value": _number(value), "stderr": _number(stderr)}
        if task in groups and groups[task]:
            leaves = _leaves(task, groups)
            n = sum(int(samples.get(t, {}).get("effective", 0)) for t in leaves)
            size = sum(int(samples.get(t, {}).get("original", 0)) for t in leaves)
            expected = sum(
                int(samples.get(t, {}).get("original", 0))
                if limit is None
                else min(limit, int(samples.get(t, {}).get("original", 0)))
                for t in leaves
            )
            tasks[task] = {
                "metrics": metrics,
                "n": n,
                "limit": limit,
                "size": size,
                "n_expected": expected,
                "group": True,
                "subtasks": len(leaves),
                "higher_is_better": {k: bool(v) for k, v in (higher.get(task) or {}).items()},
            }
        else:
            s = samples.get(task, {})
            n = s.get("effective", entry.get("sample_len"))
            tasks[task] = {
                "metrics": metrics,
                "n": None if n is None else int(n),
                "limit": limit,
                "size": None if s.get("original") is None else int(s["original"]),
                "group": False,
                "higher_is_better": {k: bool(v) for k, v in (higher.get(task) or {}).items()},
            }
    for group, subtasks in groups.items():  # leaves name their group: gates judge the group's aggregate
        for leaf in _leaves(group, groups) if subtasks else []:
            if leaf in tasks and not tasks[leaf].get("group"):
                tasks[leaf]["parent"] = group
    return tasks


def _leaves(group: str, groups: dict) -> list[str]:
    out: list[str] = []
    for sub in groups.get(group, []):
        out += _leaves(sub, groups) if groups.get(sub) else [sub]
    return out


# --- environment ------------------------------------------------------------------------------------


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def describe_environment(settings, library_path: str | None = None) -> dict:
    """Everything that can change a number: interpreter, packages, CPU fingerprint, kernel build."""
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "ryzanstein": _version("ryzanstein"),
        "lm_eval": _version("lm_eval"),
        "numpy": _version("numpy"),
        "great_expectations": _version("great_expectations"),
        "isa_setting": settings.isa,
    }
    fingerprint = host.cpu_fingerprint()
    info = host.machine_info(fingerprint)
    env["cpu_fingerprint"] = fingerprint["fingerprint_id"]
    env.update({k: info[k] for k in ("cpu", "logical_cpus", "available_cpus", "physical_cores", "ram_gb") if k in info})
    try:
        from engine.model.build import current_build, find_build, read_manifest

        if library_path:
            manifest = read_manifest(Path(library_path).parent)
            env["kernel_build"] = manifest.get("key") if manifest else None
        else:
            build = current_build(settings) or find_build(settings)
            env["kernel_build"] = build.key if build else None
    except Exception as exc:  # noqa: BLE001
        env["kernel_build"] = None
        env["kernel_build_error"] = f"{type(exc).__name__}: {exc}"
    return env


# --- evaluate ---------------------------------------------------------------------------------------


def run_suite_bench(path: Path, threads: int | None, library, settings) -> dict:
    """The eval's small benchmark (BENCH_PROMPT, BENCH_GEN, BENCH_REPEATS) through evaluations.bench."""
    from engine.model.ggufio import ModelFile
    from evaluations.bench import WARMUP_TOKENS, run_bench

    context = int(ModelFile(path).hparams.context or 4096)
    prompt = max(8, min(BENCH_PROMPT, context - WARMUP_TOKENS))
    gen = max(1, min(BENCH_GEN, context - WARMUP_TOKENS - 1))
    result = run_bench(
        str(path), threads=threads, prompt=prompt, gen=gen, repeats=BENCH_REPEATS, library=library, settings=settings
    )
    # run_bench's decode_tok_s is the median over its repeats; its samples keep each repeat's figure.
    result["decode_tok_s_runs"] = list((result.get("samples") or {}).get("decode_tok_s") or [])
    return {k: result.get(k) for k in BENCH_FIELDS}


def paired_bench(paths: list[Path], rounds: int, library, settings) -> list[dict]:
    """Decode speed of several models measured now, interleaved (A B A B ...), `rounds` runs each: a change of host
    load between two evaluation sessions (measured: 23 of 240 same-speed record pairs told apart by it on a shared
    host) hits every model alike here. Each entry has `decode_tok_s` (median) and `decode_tok_s_runs`."""
    from engine.model.ggufio import ModelFile
    from evaluations.bench import WARMUP_TOKENS, run_bench

    runs: list[list[float]] = [[] for _ in paths]
    for _ in range(rounds):
        for i, path in enumerate(paths):
            context = int(ModelFile(path).hparams.context or 4096)
            result = run_bench(
                str(path),
                prompt=max(8, min(BENCH_PROMPT, context - WARMUP_TOKENS)),
                gen=max(1, min(BENCH_GEN, context - WARMUP_TOKENS - 1)),
                repeats=1,
                library=library,
                settings=settings,
            )
            runs[i].append(float(result["decode_tok_s"]))
    return [{"decode_tok_s": float(statistics.median(r)), "decode_tok_s_runs": r} for r in runs]


def evaluate_model(
    model: str,
    suite: str = "gate",
    limit: int | None = None,
    bench: bool = True,
    engine: str = "native",
    threads: int | None = None,
    *,
    library: str | Path | None = None,
    allow_unsafe_code: bool = False,
    store=None,
    settings=None,
    validate: bool = True,
    only_tasks: list[str] | None = None,
) -> dict:
    """Run `suite` on `model` (any model reference) with lm-eval in-process (one call per distinct limit),
    then the speed benchmark unless `bench` is false; returns the schema-1 record with `valid`/`failures`
    filled by validate_record (unless `validate` is false). `library`: a prebuilt native library.
    `only_tasks`: run just these of the suite's tasks, with the suite's limits (one shard; see merge_records)."""
    from engine.artifacts.store import open_store
    from engine.settings import get_settings

    settings = settings or get_settings()
    store = store or open_store(settings=settings)
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be at least 1, got {limit}")
    started = datetime.now(timezone.utc)
    wall = time.perf_counter()
    described = describe_model(model, store)
    suite_info, calls, skipped = plan_suite(suite, limit, allow_unsafe_code)
    if only_tasks is not None:
        calls = [{**c, "tasks": [t for t in c["tasks"] if t in only_tasks]} for c in calls]
        calls = [c for c in calls if c["tasks"]]
    for s in skipped:
        log(f"skipping {s['task']}: {s['why']}")

    from lm_eval import simple_evaluate

    from evaluations.lm_eval_model import RyzansteinLM
    from evaluations.tasks import install, task_manager

    install()
    lib = None
    if engine == "native":
        from engine.model.build import load_library
        from engine.model.native import Library

        lib = Library(library) if library else load_library(settings=settings)
    lm = RyzansteinLM(model=described["path"], engine=engine, threads=threads, library=lib)
    manager = task_manager(include_defaults=False)
    if not {t for call in calls for t in call["tasks"]} <= set(manager.all_tasks):
        # Indexing lm-eval's own thousands of task files takes ~10 s of CPU: only when a planned task needs them.
        manager = task_manager()
    tasks: dict[str, dict] = {}
    lm_eval_seconds = 0.0
    for call in calls:
        log(f"lm-eval {', '.join(call['tasks'])} (limit {call['limit'] or 'all'}, engine {engine})")
        start = time.perf_counter()
        out = simple_evaluate(
            model=lm,
            tasks=list(call["tasks"]),
            task_manager=manager,
            limit=call["limit"],
            num_fewshot=call["num_fewshot"],
            log_samples=False,
            confirm_run_unsafe_code=allow_unsafe_code,
        )
        lm_eval_seconds += time.perf_counter() - start
        for name, entry in tasks_from_results(out, call["limit"]).items():
            entry["num_fewshot"] = call["num_fewshot"]
            tasks[name] = entry
    close = getattr(lm.engine, "close", None)
    if close:
        close()

    bench_record = None
    if bench:
        log(f"benchmark pp{BENCH_PROMPT} tg{BENCH_GEN}, {BENCH_REPEATS} run(s)")
        bench_record = run_suite_bench(
            Path(described["path"]), threads, library or (lib.path if lib else None), settings
        )

    record = {
        "schema": SCHEMA,
        "model": described,
        "suite": suite_info["name"],
        "suite_description": suite_info["description"],
        "limit": limit,
        "engine": engine,
        "plan": [{"tasks": c["tasks"], "limit": c["limit"], "num_fewshot": c["num_fewshot"]} for c in calls],
        "skipped": skipped,
        "tasks": tasks,
        "bench": bench_record,
        "environment": describe_environment(settings, str(library or (lib.path if lib else "")) or None),
        "started": started.isoformat(timespec="seconds"),
        "lm_eval_seconds": round(lm_eval_seconds, 2),
        "seconds": round(time.perf_counter() - wall, 2),
    }
    return _validated(record) if validate else record


def _validated(record: dict) -> dict:
    """`failures`, `valid` and `validation_seconds` filled in by validate_record."""
    start = time.perf_counter()
    record["failures"] = validate_record(record)
    record["valid"] = not record["failures"]
    record["validation_seconds"] = round(time.perf_counter() - start, 3)
    return record


def shard_tasks(suite: str, limit: int | None, shards: int, allow_unsafe_code: bool = False) -> list[list[str]]:
    """The suite's tasks dealt round-robin into at most `shards` groups (each an `only_tasks` list)."""
    _, calls, _ = plan_suite(suite, limit, allow_unsafe_code)
    names = [t for c in calls for t in c["tasks"]]
    groups = [names[i :: max(1, shards)] for i in range(max(1, shards))]
    return [g for g in groups if g]


def merge_records(parts: list[dict], bench: dict | None, validate: bool = True) -> dict:
    """One record from shard records of the same model and suite (plans, tasks and timings joined) plus the
    benchmark, validated as a whole: the result equals what one serial evaluate_model would have produced."""
    if not parts:
        raise ValueError("merge_records needs at least one shard")
    record = {**parts[0], "tasks": {}, "plan": [], "bench": bench, "lm_eval_seconds": 0.0, "shards": len(parts)}
    for part in parts:
        if (part["model"]["artifact_id"], part["suite"]) != (record["model"]["artifact_id"], record["suite"]):
            raise ValueError("shards of different models or suites cannot be merged")
        record["tasks"].update(part["tasks"])
        record["plan"] += part["plan"]
        record["lm_eval_seconds"] = round(record["lm_eval_seconds"] + part.get("lm_eval_seconds", 0.0), 2)
    record["seconds"] = round(max(p.get("seconds", 0.0) for p in parts) + ((bench or {}).get("seconds") or 0.0), 2)
    for key in ("valid", "failures", "validation_seconds"):
        record.pop(key, None)
    return _validated(record) if validate else record


def suite_task_names(record: dict) -> list[str]:
    """The top-level tasks the record's plan ran (what must have results)."""
    return [t for call in record.get("plan") or [] for t in call.get("tasks", [])]


# --- validation (Great Expectations) ------------------------------------------------------------------


def _state(value: Any, allow_null: bool) -> str:
    if value is None:
        return "null" if allow_null else "missing"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "not a number"
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf"
    if allow_null and value < 0:
        return "negative"
    return "finite"


def metric_rows(record: dict) -> list[dict]:
    """The flat table the expectations run on: one row per task x metric (declared by lm-eval's
    higher_is_better or present), with derived columns: kind, value_state, stderr_state, n_expected."""
    rows = []
    for task, entry in (record.get("tasks") or {}).items():
        entry = entry if isinstance(entry, dict) else {}
        metrics = entry.get("metrics")
        if not isinstance(metrics, dict):
            metrics = {}
        names = list(metrics) + [m for m in (entry.get("higher_is_better") or {}) if m not in metrics]
        n, limit, size = entry.get("n"), entry.get("limit"), entry.get("size")
        if entry.get("n_expected") is not None:  # a group: the sum over its subtasks of min(limit, size)
            expected = entry["n_expected"]
        elif limit is not None and size is not None:
            expected = min(limit, size)
        else:
            expected = limit if limit is not None else size
        for metric in names or [None]:
            m = metrics.get(metric) if metric is not None else None
            value = m.get("value") if isinstance(m, dict) else None
            stderr = m.get("stderr") if isinstance(m, dict) else None
            rows.append(
                {
                    "task": task,
                    "metric": metric,
                    "kind": metric_kind(metric) if metric else "none",
                    "value": value if _state(value, False) == "finite" else None,
                    "value_state": _state(value, False),
                    "stderr": stderr if _state(stderr, True) == "finite" else None,
                    "stderr_state": _state(stderr, True),
                    "n": n if isinstance(n, int) else None,
                    "n_expected": expected,
                    "limit": limit,
                    "size": size,
                }
            )
    return rows


def bench_row(bench: dict) -> dict:
    """The benchmark as one row plus the consistency columns the expectations compare."""
    row = {
        k: bench.get(k) for k in BENCH_POSITIVE + ("roofline_fraction", "prompt", "bandwidth_gb_s", "bytes_per_token")
    }
    for k in BENCH_POSITIVE + ("roofline_fraction",):
        row[f"{k}_state"] = _state(row[k], False)
        if row[f"{k}_state"] != "finite":
            row[k] = None
    prefill, prompt = row["prefill_tok_s"], row["prompt"]
    row["ttft_floor_ms"] = (TTFT_SLACK * 1000.0 * prompt / prefill) if prefill and prefill > 0 and prompt else None
    decode, bpt, bw, rf = row["decode_tok_s"], row["bytes_per_token"], row["bandwidth_gb_s"], row["roofline_fraction"]
    # roofline_fraction is the median over runs of each run's fraction (against the probes around that run); what
    # decode x bytes / bandwidth of the medians must reproduce is roofline_fraction_of_medians. With one run (older
    # records, which lack the latter) the two are the same number.
    row["roofline_checked"] = "roofline_fraction"
    if "roofline_fraction_of_medians" in bench:
        row["roofline_checked"] = "roofline_fraction_of_medians"
        rf = bench["roofline_fraction_of_medians"]
        rf = rf if _state(rf, False) == "finite" else math.inf
    row["roofline_checked_value"] = rf
    if decode and bpt and bw and rf is not None and bw > 0:
        implied = decode * bpt / (bw * 1e9)
        row["roofline_error"] = abs(rf - implied) / implied if implied > 0 else None
    else:
        row["roofline_error"] = None
    row["decode_tok_s_runs_state"], runs = _runs_state(bench.get("decode_tok_s_runs"), bench.get("repeats"))
    shown = [f"{v:.6g}" if isinstance(v, float) else repr(v) for v in runs] if isinstance(runs, list) else None
    row["decode_tok_s_runs"] = ", ".join(shown) if shown is not None else _show(runs)
    if row["decode_tok_s_runs_state"] == "finite" and decode:
        row["runs_median_error"] = abs(float(statistics.median(runs)) - decode) / decode
    else:
        row["runs_median_error"] = None
    return row


def _runs_state(runs: Any, repeats: Any) -> tuple[str, Any]:
    """(state, runs) of bench.decode_tok_s_runs: "absent" (older records), "finite" (one finite tok/s > 0 per
    repeat), else what is wrong with it."""
    if runs is None:
        return "absent", runs
    if not isinstance(runs, list):
        return "not a list", runs
    if not runs:
        return "empty", runs
    for value in runs:
        state = _state(value, True)
        if state != "finite":
            return state, runs
        if value <= 0:
            return "not > 0", runs
    if isinstance(repeats, int) and not isinstance(repeats, bool) and len(runs) != repeats:
        return f"{len(runs)} runs for repeats {repeats}", runs
    return "finite", runs


def _expectations(record: dict):
    """(metric expectations, bench expectations), each a list of (expectation, what it checks in words)."""
    import great_expectations.expectations as gxe
    from great_expectations.expectations.row_conditions import Column

    kind = Column("kind")
    metric_checks = [
        (gxe.ExpectTableRowCountToBeBetween(min_value=1), "the record has at least one task metric"),
        (
            gxe.ExpectColumnValuesToBeInSet(column="value_state", value_set=["finite"]),
            "every task has every metric it declares, with a finite value",
        ),
        (
            gxe.ExpectColumnValuesToBeBetween(
                column="value", min_value=0, max_value=1, row_condition=kind == "accuracy"
            ),
            "accuracy-like metrics in [0, 1]",
        ),
        (
            gxe.ExpectColumnValuesToBeBetween(column="value", min_value=1, row_condition=kind == "perplexity"),
            "perplexities >= 1",
        ),
        (
            gxe.ExpectColumnValuesToBeBetween(column="value", min_value=0, row_condition=kind == "nonnegative"),
            "bits per byte, BLEU, chrF, TER >= 0",
        ),
        (
            gxe.ExpectColumnValuesToBeInSet(column="stderr_state", value_set=["finite", "null"]),
            "stderr finite and >= 0, or null where lm-eval reports N/A",
        ),
        (gxe.ExpectColumnValuesToNotBeNull(column="n"), "every task reports n, the documents evaluated"),
        (gxe.ExpectColumnValuesToBeBetween(column="n", min_value=1), "n >= 1"),
        (
            gxe.ExpectColumnPairValuesToBeEqual(
                column_A="n", column_B="n_expected", ignore_row_if="either_value_is_missing"
            ),
            "n equals the limit (or the dataset size when smaller or unlimited)",
        ),
    ]
    if tasks := suite_task_names(record):
        metric_checks.append(
            (
                gxe.ExpectColumnDistinctValuesToContainSet(column="task", value_set=tasks),
                "every task of the suite has results",
            )
        )
    bench_checks: list[tuple[gxe.Expectation, str]] = []
    if record.get("bench") is not None:
        for k in BENCH_POSITIVE:
            bench_checks.append(
                (
                    gxe.ExpectColumnValuesToBeInSet(column=f"{k}_state", value_set=["finite"]),
                    f"bench.{k} present and finite",
                )
            )
            bench_checks.append(
                (gxe.ExpectColumnValuesToBeBetween(column=k, min_value=0, strict_min=True), f"bench.{k} > 0")
            )
        bench_checks += [
            (
                gxe.ExpectColumnValuesToBeInSet(column="roofline_fraction_state", value_set=["finite"]),
                "bench.roofline_fraction present and finite",
            ),
            (
                gxe.ExpectColumnValuesToBeBetween(
                    column="roofline_fraction", min_value=0, max_value=ROOFLINE_MAX, strict_min=True
                ),
                f"bench.roofline_fraction in (0, {ROOFLINE_MAX}]",
            ),
            (
                gxe.ExpectColumnPairValuesAToBeGreaterThanB(
                    column_A="ttft_ms", column_B="ttft_floor_ms", or_equal=True, ignore_row_if="either_value_is_missing"
                ),
                f"bench.ttft_ms >= {TTFT_SLACK} x 1000 x prompt / prefill_tok_s (TTFT includes the prefill)",
            ),
            (
                gxe.ExpectColumnValuesToBeBetween(column="roofline_error", max_value=ROOFLINE_TOLERANCE),
                "bench.roofline_fraction_of_medians (older one-run records: roofline_fraction) = "
                f"decode_tok_s x bytes_per_token / bandwidth (within {ROOFLINE_TOLERANCE:.0%})",
            ),
            (
                gxe.ExpectColumnValuesToBeInSet(column="decode_tok_s_runs_state", value_set=["finite", "absent"]),
                "bench.decode_tok_s_runs absent (older records) or one finite decode tok/s > 0 per repeat",
            ),
            (
                gxe.ExpectColumnValuesToBeBetween(column="runs_median_error", max_value=RUNS_MEDIAN_TOLERANCE),
                f"bench.decode_tok_s = the median of decode_tok_s_runs (within {RUNS_MEDIAN_TOLERANCE:.1%})",
            ),
        ]
    return metric_checks, bench_checks


def _gx_context():
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        progress_bars=ProgressBarsConfig(globally=False),
        analytics_enabled=False,
    )
    return gx.get_context(mode="ephemeral", project_config=config)


def _run_checks(context, name: str, rows: list[dict], checks: list, describe) -> list[str]:
    """Validate `rows` (a DataFrame) against `checks`; one message per failing expectation, naming the rows."""
    import great_expectations as gx
    import pandas as pd

    if not checks:
        return []
    frame = pd.DataFrame(rows)
    source = context.data_sources.add_pandas(f"ryz-{name}")
    batch = (
        source.add_dataframe_asset(name)
        .add_batch_definition_whole_dataframe("all")
        .get_batch(batch_parameters={"dataframe": frame})
    )
    suite = gx.ExpectationSuite(name=f"ryz-evaluation-{name}")
    for expectation, text in checks:
        expectation.meta = {**(expectation.meta or {}), "check": text}
        suite.add_expectation(expectation)
    result = batch.validate(suite, result_format="COMPLETE")
    failures = []
    for r in result.results:
        if r.success:
            continue
        config = r.expectation_config
        text = (config.meta or {}).get("check", config.type)
        details = r.result or {}
        if r.exception_info and r.exception_info.get("raised_exception"):
            failures.append(f"{text}: could not be checked ({r.exception_info.get('exception_message')})")
            continue
        if config.type == "expect_column_distinct_values_to_contain_set":
            missing = details.get("partial_missing_list") or sorted(
                set(config.kwargs["value_set"]) - set(frame["task"])
            )
            failures.append(f"{text}: no results for {', '.join(missing)}")
            continue
        if config.type == "expect_table_row_count_to_be_between":
            failures.append(f"{text}: the record has no task metrics")
            continue
        indexes = details.get("unexpected_index_list") or []
        shown = list(
            dict.fromkeys(describe(frame.loc[i["index"] if isinstance(i, dict) else i], config.kwargs) for i in indexes)
        )
        more = f" (and {len(shown) - 20} more)" if len(shown) > 20 else ""
        failures.append(
            f"{text}: "
            + ("; ".join(shown[:20]) + more if shown else f"{details.get('unexpected_count', '?')} rows fail")
        )
    return failures


def _describe_metric(row, kwargs) -> str:
    what = f"{row['task']}/{row['metric']}" if row["metric"] is not None else f"{row['task']} (no metrics)"
    column = kwargs.get("column") or kwargs.get("column_A")
    if column == "value_state":
        return f"{what} is {row['value_state']}"
    if column == "stderr_state":
        return f"{what} stderr is {row['stderr_state']}"
    if column in ("n", "n_expected"):
        return (
            f"{row['task']}: n = {_show(row['n'])}, expected {_show(row['n_expected'])} "
            f"(limit {_show(row['limit'])}, size {_show(row['size'])})"
        )
    return f"{what} = {_show(row[column])}"


def _describe_bench(row, kwargs) -> str:
    column = kwargs.get("column") or kwargs.get("column_A")
    if column == "decode_tok_s_runs_state":
        return f"bench.decode_tok_s_runs [{row['decode_tok_s_runs']}] is {row[column]}"
    if column.endswith("_state"):
        return f"bench.{column[:-6]} is {row[column]}"
    if column == "ttft_ms":
        return f"ttft_ms = {_show(row['ttft_ms'])} < {_show(row['ttft_floor_ms'])}"
    if column == "roofline_error":
        checked = row["roofline_checked"]
        return f"{checked} {_show(row['roofline_checked_value'])} is off by {_show(row['roofline_error'])}"
    if column == "runs_median_error":
        return (
            f"decode_tok_s {_show(row['decode_tok_s'])} vs the median of runs [{row['decode_tok_s_runs']}]: "
            f"off by {_show(row['runs_median_error'])}"
        )
    return f"bench.{column} = {_show(row[column])}"


def _show(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "null"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def structural_failures(record: dict) -> list[str]:
    """What the table checks cannot see: the schema, the model's id, the shape of tasks and bench."""
    out = []
    if record.get("schema") != SCHEMA:
        out.append(f"record schema is {record.get('schema')!r}, expected {SCHEMA}")
    model = record.get("model") or {}
    if not str(model.get("artifact_id") or "").startswith("sha256:"):
        out.append("model.artifact_id missing (expected sha256:<64 hex>)")
    if not isinstance(record.get("tasks"), dict):
        out.append("tasks is not an object of task -> {metrics, n}")
    bench = record.get("bench")
    if bench is not None and not isinstance(bench, dict):
        out.append("bench is neither an object nor null")
    return out


def validate_record(record: dict) -> list[str]:
    """The failing expectations of `record`, in words (empty: valid). Great Expectations runs an in-memory
    suite over the flat metric table (metric_rows) and the benchmark row (bench_row); see docs/evaluation.md."""
    failures = structural_failures(record)
    if any(f.startswith(("tasks is", "bench is")) for f in failures):
        return failures
    import logging

    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    context = _gx_context()
    metric_checks, bench_checks = _expectations(record)
    rows = metric_rows(record)
    if rows:
        failures += _run_checks(context, "metrics", rows, metric_checks, _describe_metric)
    else:
        failures.append("the record has no task metrics")
        missing = suite_task_names(record)
        if missing:
            failures.append(f"every task of the suite has results: no results for {', '.join(missing)}")
    if record.get("bench") is not None:
        failures += _run_checks(context, "bench", [bench_row(record["bench"])], bench_checks, _describe_bench)
    return failures


def require_valid(record: dict) -> None:
    """Raise EvaluationRecordError listing the failing expectations unless `record` is valid (call before
    attaching a record to a registry version)."""
    failures = record.get("failures")
    if failures is None or "valid" not in record:
        failures = validate_record(record)
    if failures:
        who = (record.get("model") or {}).get("version") or (record.get("model") or {}).get("ref") or "the model"
        raise EvaluationRecordError(
            f"evaluation record of {who} is invalid ({len(failures)} failing expectations): " + "; ".join(failures)
        )


# --- the store --------------------------------------------------------------------------------------


def store_record(record: dict, store) -> str:
    """Store the record (kind "evaluation"); its manifest names the model (`refers_to`, so `ryz gc` keeps the
    model while the record is kept), the suite and whether it is valid. Returns its artifact id."""
    model = record.get("model") or {}
    model_id = model.get("artifact_id")
    refers_to = [model_id] if model_id and store.exists(model_id) else []
    data = json.dumps(record, indent=1, sort_keys=False, allow_nan=True).encode()
    manifest = {
        "name": model.get("name"),
        "model": model_id,
        "model_version": model.get("version"),
        "suite": record.get("suite"),
        "valid": record.get("valid"),
        "record_schema": record.get("schema"),
        "refers_to": refers_to,
    }
    return store.put_bytes(data, KIND, manifest)


def load_record(artifact_id: str, store) -> dict:
    """The evaluation record stored as `artifact_id` (full id or prefix); refuses other kinds and schemas."""
    artifact_id = store.resolve(artifact_id)
    manifest = store.get_manifest(artifact_id)
    if manifest.get("kind") != KIND:
        raise EvaluationRecordError(f"{artifact_id} is a {manifest.get('kind')!r} artifact, not an evaluation record")
    with store.open_read(artifact_id) as f:
        data = f.read()
    if f"sha256:{hashlib.sha256(data).hexdigest()}" != artifact_id:
        raise EvaluationRecordError(
            f"evaluation record {artifact_id} is corrupt (its bytes hash differently); re-run `ryz eval`"
        )
    record = json.loads(data)
    if record.get("schema") != SCHEMA:
        raise SchemaVersionError(
            f"evaluation record {artifact_id} has schema {record.get('schema')!r}; this Ryzanstein "
            f"reads schema {SCHEMA} only: upgrade Ryzanstein to read it"
        )
    record.setdefault("record_id", artifact_id)
    return record


def newest_record_for(model_id: str, store) -> str | None:
    """The newest stored evaluation record of the model artifact `model_id`, or None."""
    for manifest in store.list_artifacts(kind=KIND):  # newest first
        if manifest.get("model") == model_id or model_id in (manifest.get("refers_to") or []):
            return manifest["artifact_id"]
    return None


def resolve_record(ref: str, store) -> tuple[str, dict]:
    """(record id, record) for a registry version (its evaluation record, else its model's newest), an
    evaluation record id or prefix, a model artifact id or prefix, or a GGUF path (their newest record)."""
    from engine.artifacts.registry import Registry, is_registry_ref
    from engine.errors import ArtifactNotFoundError

    model_id = None
    if is_registry_ref(ref):
        version = Registry(store).get(ref)
        if version.evaluation:
            return version.evaluation, load_record(version.evaluation, store)
        model_id = version.artifact_id
    elif ref.endswith(".gguf") or Path(ref).expanduser().is_file():
        model_id = sha256_file(Path(ref).expanduser())
    else:
        try:
            artifact_id = store.resolve(ref)
        except (ArtifactNotFoundError, ValueError):
            version = Registry(store).get(ref)  # a bare model name: its newest version
            if version.evaluation:
                return version.evaluation, load_record(version.evaluation, store)
            artifact_id = version.artifact_id
        if store.get_manifest(artifact_id).get("kind") == KIND:
            return artifact_id, load_record(artifact_id, store)
        model_id = artifact_id
    found = newest_record_for(model_id, store)
    if found is None:
        raise EvaluationRecordError(
            f"{ref} ({model_id[:19]}) has no stored evaluation record; run `ryz eval {ref}` first"
        )
    return found, load_record(found, store)


def registry_records(store) -> list[dict]:
    """The evaluation records of every registry version that has one (the report's chart)."""
    from engine.artifacts.registry import Registry

    out = []
    for v in Registry(store).versions():
        if v.evaluation:
            try:
                rec = load_record(v.evaluation, store)
            except Exception as exc:  # noqa: BLE001 - one unreadable record must not stop the report
                log(f"skipping {v.ref}'s evaluation record {v.evaluation[:19]}: {exc}")
                continue
            rec.setdefault("model", {})["version"] = rec["model"].get("version") or v.ref
            out.append(rec)
    return out
