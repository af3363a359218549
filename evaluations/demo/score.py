"""Quick scoring of a model on the demo_* suites, independent of lm-eval: a sanity check for the demo
model zoo (examples/zoo) through our engine, and the metric code scripts/train_demo.py uses in torch.

The metrics follow lm-eval 0.4's definitions for the task YAMLs in evaluations/tasks/demo/:
demo_mc (context = query, continuation = " " + choice; acc = argmax of the summed log-likelihood,
acc_norm = argmax of log-likelihood / len(choice)), demo_gen (greedy until a newline, exact match after
stripping surrounding whitespace) and demo_ppl (log-likelihood of every token of the text after BOS;
word_perplexity, byte_perplexity, bits_per_byte). The model side is two callables, so any backend works:

    loglikelihood(pairs: list[(context ids, continuation ids)]) -> list[float]   summed log p(continuation)
    generate(prompts: list[list[int]], max_tokens: int, stop_ids: set[int]) -> list[list[int]]   greedy

Our engine's side is its synchronous batch API (EngineCore.score / run, the server's scheduler); torch's is
in scripts/train_demo.py.

    python -m evaluations.demo.score examples/zoo/ryz-demo-m --engine reference --limit 100
    python -m evaluations.demo.score --zoo examples/zoo     # all of zoo.json; fills the README's engine table
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from engine.model.loader import open_model
from engine.model.native import NativeModel
from engine.model.quantize import quantize_checkpoint
from engine.model.reference import ReferenceModel, ReferenceSlots
from engine.model.tokenizer import ModelTokenizer
from engine.serving.core import GenerationRequest, batch_engine
from engine.serving.sampling import SamplingParams
from evaluations.demo.corpus import TASK_DIR, read_jsonl

LoglikelihoodFn = Callable[[list[tuple[list[int], list[int]]]], list[float]]
GenerateFn = Callable[[list[list[int]], int, set[int]], list[list[int]]]
MAX_NEW_TOKENS = 24
CHANCE_MC = 0.25


def _mean_stderr(values: Sequence[float]) -> float:
    """lm-eval's stderr of a mean: sample standard deviation / sqrt(n)."""
    n = len(values)
    if n < 2:
        return float("nan")
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def score_mc(items: list[dict], encode: Callable[[str], list[int]], loglikelihood: LoglikelihoodFn) -> dict:
    pairs = []
    for item in items:
        context = encode(item["query"])
        for choice in item["choices"]:
            full = encode(item["query"] + " " + choice)
            if full[: len(context)] != context:
                raise ValueError(f"item {item['id']}: context tokens are not a prefix of context + choice")
            pairs.append((context, full[len(context) :]))
    lls = loglikelihood(pairs)
    acc: list[float] = []
    acc_norm: list[float] = []
    by_kind: dict[str, list[float]] = {}
    pos = 0
    for item in items:
        ll = np.array(lls[pos : pos + len(item["choices"])])
        pos += len(item["choices"])
        lengths = np.array([len(c) for c in item["choices"]], dtype=np.float64)
        hit = float(int(np.argmax(ll)) == item["gold"])
        acc.append(hit)
        acc_norm.append(float(int(np.argmax(ll / lengths)) == item["gold"]))
        by_kind.setdefault(item.get("kind", "all"), []).append(hit)
    return {
        "acc": sum(acc) / len(acc),
        "acc_stderr": _mean_stderr(acc),
        "acc_norm": sum(acc_norm) / len(acc_norm),
        "acc_norm_stderr": _mean_stderr(acc_norm),
        "n": len(items),
        "acc_by_kind": {k: round(sum(v) / len(v), 4) for k, v in sorted(by_kind.items())},
    }


def newline_ids(vocab: dict[str, int], decode: Callable[[list[int]], str]) -> set[int]:
    """Every token whose text contains a newline (generation stops there, as lm-eval's until: ["\\n"])."""
    return {i for i in vocab.values() if "\n" in decode([i])}


def score_gen(
    items: list[dict],
    encode: Callable[[str], list[int]],
    decode: Callable[[list[int]], str],
    generate: GenerateFn,
    stop_ids: set[int],
    max_new_tokens: int = MAX_NEW_TOKENS,
) -> dict:
    hits: list[float] = []
    by_kind: dict[str, list[float]] = {}
    samples: list[dict[str, str]] = []
    outputs = generate([encode(item["prompt"]) for item in items], max_new_tokens, stop_ids)
    for item, out in zip(items, outputs):
        text = decode(out).split("\n")[0].strip()
        hit = float(text == item["answer"].strip())
        hits.append(hit)
        by_kind.setdefault(item.get("kind", "all"), []).append(hit)
        if len(samples) < 4:
            samples.append({"prompt": item["prompt"], "answer": item["answer"], "output": text})
    return {
        "exact_match": sum(hits) / len(hits),
        "exact_match_stderr": _mean_stderr(hits),
        "n": len(items),
        "exact_match_by_kind": {k: round(sum(v) / len(v), 4) for k, v in sorted(by_kind.items())},
        "samples": samples,
    }


def score_ppl(items: list[dict], encode: Callable[[str], list[int]], loglikelihood: LoglikelihoodFn) -> dict:
    seqs = [encode(item["text"]) for item in items]
    total_ll = sum(loglikelihood([(ids[:1], ids[1:]) for ids in seqs]))  # every token after BOS
    words = sum(len(item["text"].split()) for item in items)
    nbytes = sum(len(item["text"].encode("utf-8")) for item in items)
    return {
        "word_perplexity": math.exp(-total_ll / words),
        "byte_perplexity": math.exp(-total_ll / nbytes),
        "bits_per_byte": -total_ll / nbytes / math.log(2),
        "n": len(items),
    }


def load_suites(task_dir: str | Path = TASK_DIR, limit: int | None = None) -> dict[str, list[dict]]:
    task_dir = Path(task_dir)
    suites = {name: read_jsonl(task_dir / f"{name}.jsonl") for name in ("demo_mc", "demo_gen", "demo_ppl")}
    return {k: v[:limit] if limit else v for k, v in suites.items()}


def score_all(
    suites: dict[str, list[dict]],
    encode,
    decode,
    loglikelihood: LoglikelihoodFn,
    generate: GenerateFn,
    stop_ids: set[int],
) -> dict:
    out = {}
    if suites.get("demo_mc"):
        out["demo_mc"] = score_mc(suites["demo_mc"], encode, loglikelihood)
    if suites.get("demo_gen"):
        out["demo_gen"] = score_gen(suites["demo_gen"], encode, decode, generate, stop_ids)
    if suites.get("demo_ppl"):
        out["demo_ppl"] = score_ppl(suites["demo_ppl"], encode, loglikelihood)
    return out


# --- our engine as the backend --------------------------------------------------------------------------


def engine_backend(gguf_path: str | Path, engine: str = "reference", threads: int = 1):
    """(encode, decode, loglikelihood, generate, stop_ids) over a GGUF on the numpy reference or the native
    engine, both behind the engine core's synchronous batch API."""
    model: ReferenceSlots | NativeModel
    if engine == "reference":
        model = ReferenceSlots(ReferenceModel(gguf_path), max_seqs=4, max_positions=512)
    elif engine == "native":
        model = open_model(gguf_path, "eval", threads=threads, max_seqs=4, max_positions=512)
    else:
        raise ValueError(f"engine must be 'reference' or 'native', not {engine!r}")
    tok = ModelTokenizer(model.file)
    core = batch_engine(model, tok, model_id=Path(gguf_path).name)

    def loglikelihood(pairs: list[tuple[list[int], list[int]]]) -> list[float]:
        return [logprob for logprob, _greedy in core.score(pairs)]

    def generate(prompts: list[list[int]], max_tokens: int, stop_ids: set[int]) -> list[list[int]]:
        requests = [
            GenerationRequest(p, SamplingParams(temperature=0.0), max_tokens, stop_token_ids=stop_ids) for p in prompts
        ]
        return [result.token_ids for result in core.run(requests)]

    def decode(ids: list[int]) -> str:
        return tok.tokenizer.decode(ids, skip_special_tokens=True)

    stop = newline_ids(tok.tokenizer.get_vocab(), decode) | tok.stop_ids
    return tok.encode, decode, loglikelihood, generate, stop


def score_checkpoint(
    model_dir: str | Path,
    engine: str = "reference",
    limit: int | None = None,
    task_dir: str | Path = TASK_DIR,
    gguf_dir: str | Path | None = None,
) -> dict:
    """Quantize a checkpoint directory (TQ2_0 + Q8_0 head, `ryz quantize`'s defaults) and score it."""
    with tempfile.TemporaryDirectory(dir=gguf_dir) as tmp:
        path = Path(tmp) / (Path(model_dir).name + ".gguf")
        quantize_checkpoint(model_dir, path)
        return score_gguf(path, engine, limit, task_dir)


def score_gguf(
    gguf_path: str | Path, engine: str = "reference", limit: int | None = None, task_dir: str | Path = TASK_DIR
) -> dict:
    encode, decode, loglikelihood, generate, stop = engine_backend(gguf_path, engine)
    start = time.perf_counter()
    result = score_all(load_suites(task_dir, limit), encode, decode, loglikelihood, generate, stop)
    result["engine"], result["seconds"] = engine, round(time.perf_counter() - start, 2)
    return result


ENGINE_BEGIN, ENGINE_END = "<!-- engine-scores -->", "<!-- /engine-scores -->"


def zoo_models(zoo_dir: str | Path) -> list[Path]:
    """The checkpoint directories zoo.json lists, in its order."""
    zoo_dir = Path(zoo_dir)
    doc = json.loads((zoo_dir / "zoo.json").read_text())
    if doc.get("schema") != 1:
        raise ValueError(f"{zoo_dir / 'zoo.json'}: unknown schema {doc.get('schema')!r}; this reader knows schema 1")
    return [zoo_dir / m["path"] for m in doc["models"]]


def engine_table(results: dict[str, dict], engine: str, limit: int | None) -> str:
    rows = [
        f"| `{Path(name).name}` | {r['demo_mc']['acc']:.3f} ± {r['demo_mc']['acc_stderr']:.3f} | "
        f"{r['demo_mc']['acc_norm']:.3f} | "
        f"{r['demo_gen']['exact_match']:.3f} ± {r['demo_gen']['exact_match_stderr']:.3f} | "
        f"{r['demo_ppl']['word_perplexity']:.3f} | "
        f"{r['demo_ppl']['bits_per_byte']:.4f} |"
        for name, r in results.items()
    ]
    scope = f"the first {limit} items of each suite" if limit else "the full suites"
    return (
        f"{ENGINE_BEGIN}\nEach checkpoint quantized with `ryz quantize`'s defaults (TQ2_0 weights, Q8_0 "
        f"embedding/head) and "
        f"scored on {scope} by `python -m evaluations.demo.score --zoo examples/zoo --engine {engine}` "
        f"({'the numpy reference, engine/model/reference.py' if engine == 'reference' else 'the native engine'}):\n\n"
        "| model | demo_mc acc | acc_norm | demo_gen exact match | demo_ppl word ppl | bits/byte |\n"
        "| --- | --- | --- | --- | --- | --- |\n" + "\n".join(rows) + f"\n{ENGINE_END}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="score checkpoints or GGUFs on the demo_* suites through our engine")
    parser.add_argument("models", nargs="*", help="HF checkpoint directories (quantized on the fly) or .gguf files")
    parser.add_argument(
        "--zoo", metavar="DIR", help="score every model of DIR/zoo.json and update DIR/README.md's engine table"
    )
    parser.add_argument("--engine", choices=("reference", "native"), default="reference")
    parser.add_argument("--limit", type=int, default=None, help="first N items of each suite")
    parser.add_argument("--task-dir", default=str(TASK_DIR))
    args = parser.parse_args(argv)
    models = [str(m) for m in zoo_models(args.zoo)] if args.zoo else args.models
    if not models:
        parser.error("give model directories / .gguf files, or --zoo DIR")
    results = {}
    for model in models:
        if str(model).endswith(".gguf"):
            results[model] = score_gguf(model, args.engine, args.limit, args.task_dir)
        else:
            results[model] = score_checkpoint(model, args.engine, args.limit, args.task_dir)
        print(f"{model}: {json.dumps(results[model])}", file=sys.stderr)
    print(json.dumps(results, indent=2))
    if args.zoo:
        readme = Path(args.zoo) / "README.md"
        text = readme.read_text() if readme.is_file() else f"{ENGINE_BEGIN}\n{ENGINE_END}\n"
        if ENGINE_BEGIN not in text or ENGINE_END not in text:
            text += f"\n## Through our engine\n\n{ENGINE_BEGIN}\n{ENGINE_END}\n"
        head, rest = text.split(ENGINE_BEGIN, 1)
        readme.write_text(head + engine_table(results, args.engine, args.limit) + rest.split(ENGINE_END, 1)[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
