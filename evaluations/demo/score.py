"""Quick scoring of a model on the demo_* suites, independent of lm-eval: a sanity check for the demo
model zoo (examples/zoo) through our engine, and the metric code scripts/train_demo.py uses in torch.

The metrics follow lm-eval 0.4's definitions for the task YAMLs in evaluations/tasks/demo/:
demo_mc (context = query, continuation = " " + choice; acc = argmax of the summed log-likelihood,
acc_norm = argmax of log-likelihood / len(choice)), demo_gen (greedy until a newline, exact match after
stripping surrounding whitespace) and demo_ppl (log-likelihood of every token of the text after BOS;
word_perplexity, byte_perplexity, bits_per_byte). The model side is two callables, so any backend works:

    logprobs(batch: list[list[int]]) -> list[np.ndarray]   per sequence, (len, vocab) log-softmax rows
    generate(prompt: list[int], max_tokens: int, stop_ids: set[int]) -> list[int]   greedy

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

from evaluations.demo.corpus import TASK_DIR, read_jsonl

LogprobsFn = Callable[[list[list[int]]], list[np.ndarray]]
GenerateFn = Callable[[list[int], int, set[int]], list[int]]
MAX_NEW_TOKENS = 24
CHANCE_MC = 0.25


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _mean_stderr(values: Sequence[float]) -> float:
    """lm-eval's stderr of a mean: sample standard deviation / sqrt(n)."""
    n = len(values)
    if n < 2:
        return float("nan")
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def _continuation_ll(lp: np.ndarray, ids: list[int], start: int) -> float:
    """Sum of log p(ids[t] | ids[:t]) for t >= start (row t-1 predicts token t)."""
    return float(sum(lp[t - 1, ids[t]] for t in range(start, len(ids))))


def score_mc(items: list[dict], encode: Callable[[str], list[int]], logprobs: LogprobsFn, batch: int = 64) -> dict:
    requests = []  # (item index, full ids, context length)
    for i, item in enumerate(items):
        context = encode(item["query"])
        for choice in item["choices"]:
            full = encode(item["query"] + " " + choice)
            if full[: len(context)] != context:
                raise ValueError(f"item {item['id']}: context tokens are not a prefix of context + choice")
            requests.append((i, full, len(context)))
    lls = []
    for start in range(0, len(requests), batch):
        chunk = requests[start : start + batch]
        for (_, ids, ctx), lp in zip(chunk, logprobs([ids for _, ids, _ in chunk])):
            lls.append(_continuation_ll(lp, ids, ctx))
    acc, acc_norm, by_kind = [], [], {}
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
    hits, by_kind, samples = [], {}, []
    for item in items:
        out = generate(encode(item["prompt"]), max_new_tokens, stop_ids)
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


def score_ppl(items: list[dict], encode: Callable[[str], list[int]], logprobs: LogprobsFn, batch: int = 16) -> dict:
    total_ll, words, nbytes = 0.0, 0, 0
    seqs = [encode(item["text"]) for item in items]
    for start in range(0, len(seqs), batch):
        chunk = seqs[start : start + batch]
        for ids, lp in zip(chunk, logprobs(chunk)):
            total_ll += _continuation_ll(lp, ids, 1)  # every token after BOS
    for item in items:
        words += len(item["text"].split())
        nbytes += len(item["text"].encode("utf-8"))
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
    suites: dict[str, list[dict]], encode, decode, logprobs: LogprobsFn, generate: GenerateFn, stop_ids: set[int]
) -> dict:
    out = {}
    if suites.get("demo_mc"):
        out["demo_mc"] = score_mc(suites["demo_mc"], encode, logprobs)
    if suites.get("demo_gen"):
        out["demo_gen"] = score_gen(suites["demo_gen"], encode, decode, generate, stop_ids)
    if suites.get("demo_ppl"):
        out["demo_ppl"] = score_ppl(suites["demo_ppl"], encode, logprobs)
    return out


# --- our engine as the backend --------------------------------------------------------------------------


def engine_backend(gguf_path: str | Path, engine: str = "reference", threads: int = 1):
    """(encode, decode, logprobs, generate, stop_ids) over a GGUF on the numpy reference or native engine."""
    from engine.model.ggufio import ModelFile
    from engine.model.tokenizer import ModelTokenizer

    if engine == "reference":
        from engine.model.reference import KVCache, ReferenceModel

        model = ReferenceModel(gguf_path)
        new_cache = KVCache

        def truncate(cache, n: int) -> None:
            cache.keys[:] = [k[:n] for k in cache.keys]
            cache.values[:] = [v[:n] for v in cache.values]
    elif engine == "native":
        from engine.model.loader import open_model

        model = open_model(gguf_path, "eval", threads=threads, max_seqs=2, max_positions=512)
        new_cache = lambda: model.new_cache(1)  # noqa: E731 - slot 1; generate() uses slot 0

        def truncate(cache, n: int) -> None:
            model.truncate_seq(cache.seq, n)
    else:
        raise ValueError(f"engine must be 'reference' or 'native', not {engine!r}")
    tok = ModelTokenizer(ModelFile(gguf_path))
    last: dict = {"ids": [], "lp": None, "cache": None}

    def logprobs(batch: list[list[int]]) -> list[np.ndarray]:
        """Consecutive requests share prefixes (one MC context, four choices): keep the previous
        sequence's KV cache and rows, truncated to the common prefix, and run only the new tokens."""
        out = []
        for ids in batch:
            prev, n = last["ids"], 0
            while n < min(len(prev), len(ids) - 1) and prev[n] == ids[n]:
                n += 1
            if n == 0:
                last["cache"] = new_cache()
                lp = log_softmax(model.forward(ids, last["cache"]))
            else:
                truncate(last["cache"], n)
                lp = np.concatenate([last["lp"][:n], log_softmax(model.forward(ids[n:], last["cache"]))])
            last.update(ids=list(ids), lp=lp)
            out.append(lp)
        return out

    def decode(ids: list[int]) -> str:
        return tok.tokenizer.decode(ids, skip_special_tokens=True)

    stop = newline_ids(tok.tokenizer.get_vocab(), decode) | tok.stop_ids
    return tok.encode, decode, logprobs, model.generate, stop


def score_checkpoint(
    model_dir: str | Path,
    engine: str = "reference",
    limit: int | None = None,
    task_dir: str | Path = TASK_DIR,
    gguf_dir: str | Path | None = None,
) -> dict:
    """Quantize a checkpoint directory (TQ2_0 + Q8_0 head, `ryz quantize`'s defaults) and score it."""
    from engine.model.quantize import quantize_checkpoint

    with tempfile.TemporaryDirectory(dir=gguf_dir) as tmp:
        path = Path(tmp) / (Path(model_dir).name + ".gguf")
        quantize_checkpoint(model_dir, path)
        return score_gguf(path, engine, limit, task_dir)


def score_gguf(
    gguf_path: str | Path, engine: str = "reference", limit: int | None = None, task_dir: str | Path = TASK_DIR
) -> dict:
    encode, decode, logprobs, generate, stop = engine_backend(gguf_path, engine)
    start = time.perf_counter()
    result = score_all(load_suites(task_dir, limit), encode, decode, logprobs, generate, stop)
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
