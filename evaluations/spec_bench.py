"""`ryz bench-spec`: what speculative decoding (engine/serving/speculative.py) costs and buys.

On one model (a named shape, synthesized once and cached like `ryz bench`'s, or any model reference):

* **verify**: the median time of one forward over k new tokens with logits for each (a verification step of
  k - 1 drafts) for k = 1..`kmax`, on one sequence `prompt` positions deep, relative to k = 1 (a decode step);
* **decode**: end-to-end tok/s of `gen` greedy tokens through the engine core: plain, with a replay drafter that
  proposes the model's own recorded greedy continuation (every draft accepted: the machinery's ceiling) and with
  prompt lookup; the output of every run is checked equal to the plain one.

And, unless --no-zoo, **acceptance** on the demo zoo (examples/zoo) with an editing workload: prompts that
contain most of the answer (a demo document, then one of its lines started again), per zoo model with prompt
lookup, and ryz-demo-m with ryz-demo-s as draft model: drafts accepted, tokens per verification step, same output.
The zoo's 1.7M-parameter models time only Python overhead, so their speed is not reported.
"""

from __future__ import annotations

import json
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from engine.serving.core import Delta

HELP = (
    "speculative decoding: verification cost per k, decode tok/s plain vs replay (ceiling) vs prompt lookup, "
    "acceptance on the demo zoo"
)
ZOO = Path(__file__).resolve().parents[1] / "examples" / "zoo"


def add_arguments(p) -> None:
    p.add_argument(
        "target",
        metavar="SHAPE_OR_MODEL",
        help="a shape (tiny, medium, bitnet-2b4t) or a model reference: name:version, an alias (production, canary, "
        "previous), an artifact id or prefix, or a .gguf path",
    )
    p.add_argument("--threads", type=int, help="compute threads (default RYZ_THREADS, else all physical cores)")
    p.add_argument("--prompt", type=int, default=128, help="positions before the measured steps (default 128)")
    p.add_argument("--gen", type=int, default=128, help="decoded tokens per run (default 128)")
    p.add_argument("--kmax", type=int, default=8, help="largest verification width measured (default 8)")
    p.add_argument("--spec-tokens", type=int, default=4, help="drafts per step in the decode runs (default 4)")
    p.add_argument("--repeats", type=int, default=5, help="repeats of each verification width (medians)")
    p.add_argument("--no-zoo", action="store_true", help="skip the acceptance measurement on the demo zoo")
    p.add_argument("--zoo-prompts", type=int, default=12, help="editing prompts per zoo model (default 12)")
    p.add_argument("--library", type=Path, help="a prebuilt native library (default: the kernel build for this CPU)")
    p.add_argument("-o", "--output", type=Path, help="also write the JSON result here")


def main(args) -> int:
    result = run_spec_bench(
        args.target,
        threads=args.threads,
        prompt=args.prompt,
        gen=args.gen,
        kmax=args.kmax,
        spec_tokens=args.spec_tokens,
        repeats=args.repeats,
        zoo=None if args.no_zoo else ZOO,
        zoo_prompts=args.zoo_prompts,
        library=args.library,
    )
    if args.output:
        args.output.write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_report(result))
    return 0 if all(r["same_output"] for r in result["decode"]["runs"]) else 1


def run_spec_bench(
    target: str,
    threads: int | None = None,
    prompt: int = 128,
    gen: int = 128,
    kmax: int = 8,
    spec_tokens: int = 4,
    repeats: int = 5,
    zoo: Path | None = ZOO,
    zoo_prompts: int = 12,
    library: Path | None = None,
) -> dict:
    from engine import host
    from engine.model.loader import default_threads, open_model
    from engine.model.tokenizer import ModelTokenizer
    from engine.settings import get_settings
    from evaluations.bench import _load_library, resolve_target

    settings = get_settings()
    lib = _load_library(library, settings)
    resolved = resolve_target(target, settings)
    threads = threads or default_threads(settings)
    load_start = host.loadavg()
    model = open_model(
        resolved.path, "bench", library=lib, threads=threads, max_positions=max(prompt + kmax, prompt + gen) + 8
    )
    rng = np.random.default_rng(0)
    prompt_ids = rng.integers(0, model.hp.vocab, size=prompt).tolist()
    verify = verify_cost(model, prompt_ids, kmax, repeats)
    decode = decode_runs(model, ModelTokenizer(model.file), prompt_ids, gen, spec_tokens)
    out = {
        "target": resolved.label,
        "model": str(resolved.path),
        "threads": threads,
        "isa": lib.isa,
        "prompt": prompt,
        "gen": gen,
        "verify": verify,
        "decode": decode,
        "zoo": zoo_acceptance(zoo, lib, zoo_prompts, spec_tokens) if zoo is not None else None,
        "machine": {**host.machine_info(), "loadavg_start": load_start, "loadavg_end": host.loadavg()},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    model.close()
    return out


def verify_cost(model, prompt_ids: list[int], kmax: int, repeats: int) -> list[dict]:
    """Median seconds of one forward over k tokens (logits for each) at `len(prompt_ids)` positions, k = 1..kmax,
    widths interleaved per repeat so load drift hits them alike; the KV is cut back after each."""
    n = len(prompt_ids)
    model.truncate_seq(0, 0)
    model.forward_batch(np.asarray(prompt_ids, np.int32), np.zeros(n, np.int32))
    rng = np.random.default_rng(1)
    times: dict[int, list[float]] = {k: [] for k in range(1, kmax + 1)}
    for _ in range(repeats + 1):  # the first round warms up
        for k in range(1, kmax + 1):
            tokens = rng.integers(0, model.hp.vocab, size=k).astype(np.int32)
            start = time.perf_counter()
            model.forward_batch(tokens, np.zeros(k, np.int32), np.ones(k, np.uint8))
            times[k].append(time.perf_counter() - start)
            model.truncate_seq(0, n)
    model.truncate_seq(0, 0)  # the engine core that decodes next expects its slots empty
    one = statistics.median(times[1][1:])
    return [
        {"k": k, "ms": round(1e3 * statistics.median(t[1:]), 3), "relative": round(statistics.median(t[1:]) / one, 3)}
        for k, t in times.items()
    ]


def decode_runs(model, tokenizer, prompt_ids: list[int], gen: int, spec_tokens: int) -> dict:
    """Greedy decode of `gen` tokens through one engine core: plain (recording the continuation), replay of that
    continuation, prompt lookup; each run after the first reuses the prompt's KV (prefix cache), so all time decode."""
    from engine.serving.core import GenerationRequest, batch_engine
    from engine.serving.sampling import SamplingParams
    from engine.serving.speculative import SpecConfig

    core = batch_engine(model, tokenizer)
    core.model = _Unclosed(model)  # the caller closes the model, not the core

    def run(spec: SpecConfig) -> tuple[float, Delta]:
        request = GenerationRequest(
            list(prompt_ids), SamplingParams(temperature=0), max_tokens=gen, ignore_eos=True, speculative=spec
        )
        start = time.perf_counter()
        result = core.run([request])[0]
        return time.perf_counter() - start, result

    try:
        _, warm = run(SpecConfig())  # prefill and warm-up; records the greedy continuation
        recorded = tuple(warm.token_ids)
        runs = []
        for name, spec in [
            ("plain", SpecConfig()),
            (f"replay k={spec_tokens}", SpecConfig("replay", spec_tokens, replay=recorded)),
            ("replay k=8", SpecConfig("replay", 8, replay=recorded)),
            (f"ngram k={spec_tokens}", SpecConfig("ngram", spec_tokens)),
        ]:
            seconds, result = run(spec)
            counts = result.speculative or {}
            runs.append(
                {
                    "run": name,
                    "tokens": len(result.token_ids),
                    "seconds": round(seconds, 4),
                    "tok_s": round(len(result.token_ids) / seconds, 3),
                    "same_output": tuple(result.token_ids) == recorded,
                    **_rates(counts),
                }
            )
    finally:
        core.close()
    plain = runs[0]["tok_s"]
    for r in runs:
        r["speedup"] = round(r["tok_s"] / plain, 3)
    return {"spec_tokens": spec_tokens, "runs": runs}


class _Unclosed:
    """A model whose close() is left to its owner (EngineCore.close closes its model)."""

    def __init__(self, model):
        self._model = model

    def __getattr__(self, name):
        return getattr(self._model, name)

    def close(self) -> None:
        pass


def _rates(counts: dict) -> dict:
    if not counts or not counts.get("steps"):
        return {}
    return {
        "drafted": counts["drafted"],
        "accepted": counts["accepted"],
        "acceptance": round(counts["accepted"] / max(1, counts["drafted"]), 3),
        "tokens_per_step": round(counts["emitted"] / counts["steps"], 3),
    }


def editing_prompts(n: int, seed: int = 0) -> list[str]:
    """Demo-language documents followed by one of their own lines started again (up to its ':' or its first three
    words): the line's rest is in the prompt, as most of an edited file is in a code-edit prompt."""
    from evaluations.demo import corpus

    rng = random.Random(seed)
    prompts = []
    for doc in corpus.documents(corpus.HELDOUT_SEED, n):
        lines = [line for line in doc.split("\n") if line.strip()]
        line = rng.choice(lines)
        head = line[: line.index(":") + 1] if ":" in line else " ".join(line.split()[:3])
        prompts.append("\n".join(lines) + "\n" + head)
    return prompts


def zoo_acceptance(zoo: Path, library, n_prompts: int, spec_tokens: int, gen: int = 32) -> list[dict]:
    """Per zoo model: prompt lookup's acceptance on the editing prompts; ryz-demo-m also with ryz-demo-s drafting."""
    from engine.model.loader import open_model
    from engine.model.quantize import quantize_checkpoint
    from engine.model.tokenizer import ModelTokenizer
    from engine.serving.core import GenerationRequest, batch_engine
    from engine.serving.sampling import SamplingParams
    from engine.serving.speculative import DraftModel, SpecConfig
    from evaluations.demo.score import zoo_models

    prompts = editing_prompts(n_prompts)
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        ggufs = {}
        for directory in zoo_models(zoo):
            ggufs[directory.name] = Path(tmp) / f"{directory.name}.gguf"
            quantize_checkpoint(directory, ggufs[directory.name])
        cases: list[tuple[str, str, str | None]] = [(name, "ngram", None) for name in ggufs]
        if {"ryz-demo-m", "ryz-demo-s"} <= set(ggufs):
            cases.append(("ryz-demo-m", "draft", "ryz-demo-s"))
        for name, method, draft_name in cases:
            model = open_model(ggufs[name], "bench", library=library, threads=1, max_seqs=4, max_positions=512)
            tok = ModelTokenizer(model.file)
            draft = None
            if draft_name:
                draft_native = open_model(
                    ggufs[draft_name], "bench", library=library, threads=1, max_seqs=4, max_positions=512
                )
                draft = DraftModel(draft_native, ModelTokenizer(draft_native.file), model.hp.vocab, tok)
            core = batch_engine(model, tok, draft_model=draft)
            try:

                def run(spec: SpecConfig):
                    return core.run(
                        [
                            GenerationRequest(tok.encode(p), SamplingParams(temperature=0), gen, speculative=spec)
                            for p in prompts
                        ]
                    )

                plain, spec = run(SpecConfig()), run(SpecConfig(method, spec_tokens))
            finally:
                core.close()
            totals = {key: sum((r.speculative or {}).get(key, 0) for r in spec) for key in ("drafted", "accepted")}
            totals.update({key: sum((r.speculative or {}).get(key, 0) for r in spec) for key in ("steps", "emitted")})
            out.append(
                {
                    "model": name,
                    "method": method,
                    **({"draft_model": draft_name} if draft_name else {}),
                    "prompts": len(prompts),
                    "gen": gen,
                    "tokens": sum(len(r.token_ids) for r in spec),
                    "same_output": [r.token_ids for r in spec] == [r.token_ids for r in plain],
                    **_rates(totals),
                }
            )
    return out


def format_report(r: dict) -> str:
    lines = [f"{r['target']}, {r['threads']} threads, {r['isa']} (load {r['machine'].get('loadavg_start')})", ""]
    lines.append(f"verification step at {r['prompt']} positions (k tokens, logits for each), relative to k = 1:")
    lines += [f"  k={v['k']}  {v['ms']:9.2f} ms  x{v['relative']:.2f}" for v in r["verify"]]
    lines += ["", f"greedy decode of {r['gen']} tokens:"]
    for run in r["decode"]["runs"]:
        extra = (
            f"  acceptance {run['acceptance']:.0%}, {run['tokens_per_step']:.2f} tokens/step"
            if "acceptance" in run
            else ""
        )
        same = "" if run["same_output"] else "  OUTPUT DIFFERS"
        lines.append(f"  {run['run']:<12} {run['tok_s']:9.2f} tok/s  x{run['speedup']:.2f}{extra}{same}")
    if r.get("zoo"):
        lines += ["", "demo zoo, editing prompts (greedy):"]
        for z in r["zoo"]:
            via = f" (draft {z['draft_model']})" if "draft_model" in z else ""
            lines.append(
                f"  {z['model']:<14} {z['method']}{via}: acceptance {z.get('acceptance', 0):.0%}, "
                f"{z.get('tokens_per_step', 0):.2f} tokens/step, same output {z['same_output']}"
            )
    return "\n".join(lines)
