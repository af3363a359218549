"""Retrieval recall evaluation behind `ryz index eval`: recall@10 of the quantized Qdrant index
against exact float search, and query latency, for each quantization setting.

Method (every number in a row is measured here, on this machine):

* **Queries**: held-out excerpts of the corpus: `n` chunks drawn with a seeded RNG, and from each a window of
  1-3 consecutive non-blank lines (at most 300 characters) that is not the chunk itself; embedded with the
  index's own embedder. The neighbours are *not* taken from the query's chunk: the ground truth is exact search.
* **Ground truth**: exact top-10 by cosine over the index's float vectors (numpy brute force). recall@10 is
  tie-aware, as in ann-benchmarks: a hit counts if its exact score reaches the exact 10th score (minus 1e-5), so
  duplicate chunks (licence headers, repeated snippets) cannot turn an equally good answer into a miss.
* **Per setting**: the same vectors are loaded into a fresh Qdrant Edge shard with that quantization (and the
  index's HNSW/plain choice, or both with `--index both`), optimized, then each query is searched one at a
  time (oversampling + rescoring unless disabled, payloads returned, as `/v1/retrieve` will). recall@10 is
  averaged over queries; p50/p95 latency of the search call (the query embedding is timed
  separately, `embed_ms_p50`).
* **Bytes per vector**: measured from the optimized shard's files: quantized codes + HNSW links are what search
  holds in RAM (`ram_bytes_per_vector`; `compression` = float32 bytes / that); the original float vectors stay
  on disk and are read only to rescore candidates (`disk_bytes_per_vector`, reported, never hidden).
* **Dims** (`--dims 384,256,128`): Matryoshka-style truncation (first k components, renormalised); MiniLM is not
  MRL-trained, so `recall_at_10_vs_full` (against exact search at the full dims) shows what truncation costs.
"""

from __future__ import annotations

import json
import random
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

HELP = (
    "measure recall@10 against exact float search and p50/p95 query latency of an index for each "
    "quantization (none, int8, binary1, binary1.5, binary2)"
)
K = 10
WARMUP = 10
EXCERPT_CHARS = 300
TIE_EPS = 1e-5  # cosine slack when comparing a hit's exact score with the k-th exact score


def log(message: str) -> None:
    print(f"[index eval] {message}", file=sys.stderr, flush=True)


def make_queries(payloads: list[dict], n: int, seed: int = 0) -> list[str]:
    """n held-out excerpts: from n distinct seeded-random chunks, 1-3 consecutive non-blank lines each."""
    rng = random.Random(seed)
    order = list(range(len(payloads)))
    rng.shuffle(order)
    queries = []
    for i in order:
        lines = [ln.strip() for ln in (payloads[i].get("text") or "").splitlines() if len(ln.strip()) >= 8]
        if len(lines) < 3:
            continue
        width = rng.randint(1, 3)
        start = rng.randrange(0, len(lines) - width + 1)
        text = " ".join(lines[start : start + width])[:EXCERPT_CHARS]
        if len(text) >= 20:
            queries.append(text)
        if len(queries) == n:
            break
    return queries


def exact_top_k(queries: np.ndarray, vectors: np.ndarray, k: int = K) -> np.ndarray:
    """Indices of the exact top-k by dot product (vectors are unit length), best first."""
    scores = queries @ vectors.T
    top = np.argpartition(-scores, min(k, scores.shape[1] - 1), axis=1)[:, :k]
    return np.take_along_axis(top, np.argsort(-np.take_along_axis(scores, top, 1), axis=1), 1)


def _unit(x: np.ndarray, dims: int) -> np.ndarray:
    from engine.retrieval.embedder import truncate_dims

    return truncate_dims(x, dims)


def kth_scores(queries: np.ndarray, vectors: np.ndarray, exact: np.ndarray) -> np.ndarray:
    """The exact score of each query's k-th neighbour (the recall threshold)."""
    return np.einsum("qd,qd->q", queries, vectors[exact[:, -1]])


def recall_of(hit_rows: list[int], query: np.ndarray, vectors: np.ndarray, threshold: float, k: int = K) -> float:
    """Tie-aware recall@k (as ann-benchmarks): a hit counts if its exact score reaches the exact k-th score
    (minus TIE_EPS), so duplicate chunks (licence headers, repeated snippets) cannot turn equal answers into misses."""
    if not hit_rows:
        return 0.0
    scores = vectors[hit_rows] @ query
    return min(int((scores >= threshold - TIE_EPS).sum()), k) / k


def measure_index(
    idx, queries: np.ndarray, vectors: np.ndarray, row_of: dict[str, int], thresholds: np.ndarray, k: int = K
) -> dict:
    """recall@k against exact search and search latency (one query at a time, after WARMUP queries)."""
    for q in queries[:WARMUP]:
        idx.search(q, k)
    recalls, latencies = [], []
    for q, threshold in zip(queries, thresholds):
        started = time.perf_counter()
        hits = idx.search(q, k, with_payload=True)
        latencies.append(time.perf_counter() - started)
        recalls.append(recall_of([row_of[h["id"]] for h in hits], q, vectors, threshold, k))
    return {
        "recall_at_10": round(float(np.mean(recalls)), 4),
        "p50_ms": round(float(np.percentile(latencies, 50)) * 1e3, 3),
        "p95_ms": round(float(np.percentile(latencies, 95)) * 1e3, 3),
    }


def evaluate_vectors(
    ids: list[str],
    vectors: np.ndarray,
    payloads: list[dict],
    query_vectors: np.ndarray,
    base_cfg,
    quantizations: list[str],
    dims_list: list[int],
    index_kinds: list[bool],
    workdir: Path,
) -> list[dict]:
    """One row per (dims, index kind, quantization): the vectors loaded into a fresh Edge shard, measured."""
    from engine.retrieval.index import EdgeIndex

    full_dims = vectors.shape[1]
    row_of = {i: n for n, i in enumerate(ids)}
    x_full, q_full = _unit(vectors, full_dims), _unit(query_vectors, full_dims)
    thresholds_full = kth_scores(q_full, x_full, exact_top_k(q_full, x_full))
    rows = []
    for dims in dims_list:
        if dims > full_dims:
            raise ValueError(f"cannot evaluate {dims} dims: the index holds {full_dims}-dim vectors")
        x, q = _unit(vectors, dims), _unit(query_vectors, dims)
        thresholds = kth_scores(q, x, exact_top_k(q, x))
        for hnsw in index_kinds:
            for quantization in quantizations:
                cfg = replace(base_cfg, dims=dims, quantization=quantization, hnsw=hnsw)
                path = Path(tempfile.mkdtemp(prefix="eval-", dir=workdir))
                try:
                    started = time.perf_counter()
                    idx = EdgeIndex.create(path / "shard", cfg)
                    try:
                        idx.upsert(ids, x, payloads)
                        idx.optimize()
                        build_s = time.perf_counter() - started
                        result = measure_index(idx, q, x, row_of, thresholds)
                        hits_full = (
                            [[row_of[h["id"]] for h in idx.search(v, K, with_payload=False)] for v in q]
                            if dims != full_dims
                            else None
                        )
                        size = idx.ram_bytes()
                    finally:
                        idx.close()
                finally:
                    shutil.rmtree(path, ignore_errors=True)
                ram = size["ram"]
                row = {
                    "quantization": quantization,
                    "compression": round(dims * 4 / ram, 2),
                    **result,
                    "dims": dims,
                    "index": f"hnsw m={cfg.hnsw_m}" if hnsw else "plain",
                    "hnsw_ef": cfg.hnsw_ef if hnsw else None,
                    "rescore": cfg.rescore and quantization != "none",
                    "oversampling": cfg.oversampling if quantization != "none" else None,
                    "ram_bytes_per_vector": round(ram, 2),
                    "code_bytes_per_vector": round(size["quantized"], 2),
                    "hnsw_bytes_per_vector": None if size["hnsw"] is None else round(size["hnsw"], 2),
                    "disk_bytes_per_vector": round(size["originals"], 2) if quantization != "none" else 0.0,
                    "bytes_measured": size["measured"],
                    "points": len(ids),
                    "queries": len(q),
                    "build_s": round(build_s, 2),
                }
                if hits_full is not None:
                    row["recall_at_10_vs_full"] = round(
                        float(
                            np.mean(
                                [recall_of(h, qf, x_full, t) for h, qf, t in zip(hits_full, q_full, thresholds_full)]
                            )
                        ),
                        4,
                    )
                log(
                    f"{quantization:>9} dims {dims} {row['index']}: recall@10 {row['recall_at_10']:.4f}, "
                    f"{row['compression']}x, p50 {row['p50_ms']} ms, p95 {row['p95_ms']} ms"
                )
                rows.append(row)
    return rows


def evaluate_index(
    index_dir: Path,
    embedder,
    quantizations: list[str] | None = None,
    dims_list: list[int] | None = None,
    index_kinds: list[bool] | None = None,
    n_queries: int = 200,
    seed: int = 0,
    search_overrides: dict | None = None,
    workdir: Path | None = None,
) -> dict:
    """Evaluate a built index directory: its vectors re-loaded under each setting. Returns {"rows", "summary"}."""
    from engine.errors import RetrievalIndexError
    from engine.retrieval.index import QUANTIZATIONS, open_index, read_payloads_text

    idx, state = open_index(index_dir, search_overrides=search_overrides)
    try:
        ids, vectors, payloads = read_payloads_text(idx)
        cfg = idx.cfg
    finally:
        idx.close()
    if state["embedder"]["onnx_sha256"] != embedder.onnx_sha256:
        raise RetrievalIndexError(
            f"the index was embedded with {state['embedder']['onnx_sha256']} but this embedder is "
            f"{embedder.onnx_sha256}; queries must use the same ONNX model: rebuild the index"
        )
    if len(ids) < 2 * K:
        raise RetrievalIndexError(f"the index holds {len(ids)} chunks; recall@{K} needs at least {2 * K}")
    texts = make_queries(payloads, n_queries, seed)
    started = time.perf_counter()
    embed_lat = []
    encoded = []
    for text in texts:
        t = time.perf_counter()
        encoded.append(embedder.encode([text])[0])
        embed_lat.append(time.perf_counter() - t)
    query_vectors = np.stack(encoded)
    log(f"{len(ids)} chunks, {len(texts)} held-out queries embedded in {time.perf_counter() - started:.1f}s")
    workdir = Path(workdir or tempfile.gettempdir())
    workdir.mkdir(parents=True, exist_ok=True)
    rows = evaluate_vectors(
        ids,
        vectors,
        payloads,
        query_vectors,
        cfg,
        list(quantizations or QUANTIZATIONS),
        list(dims_list or [cfg.dims]),
        list(index_kinds if index_kinds is not None else [cfg.hnsw]),
        workdir,
    )
    summary = {
        "chunks": len(ids),
        "queries": len(texts),
        "seed": seed,
        "dims": cfg.dims,
        "embedder": state["embedder"],
        "corpus": {k: v for k, v in state["corpus"].items() if k != "unreadable"},
        "embed_ms_p50": round(float(np.percentile(embed_lat, 50)) * 1e3, 3),
        "embed_ms_p95": round(float(np.percentile(embed_lat, 95)) * 1e3, 3),
        "config": cfg.to_json(),
    }
    return {"rows": rows, "summary": summary}


def own_row(result: dict, cfg) -> dict | None:
    """The row measuring the index's own configuration."""
    for row in result["rows"]:
        if (
            row["quantization"] == cfg.quantization
            and row["dims"] == cfg.dims
            and row["index"].startswith("hnsw" if cfg.hnsw else "plain")
        ):
            return row
    return None


def format_table(rows: list[dict]) -> str:
    """A markdown table of the rows."""
    head = (
        "| quantization | dims | index | compression | RAM B/vec | disk B/vec (rescore) | recall@10 | "
        "recall@10 vs 384 | p50 ms | p95 ms |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['quantization']} | {r['dims']} | {r['index']} | {r['compression']}x | {r['ram_bytes_per_vector']} | "
            f"{r['disk_bytes_per_vector']} | {r['recall_at_10']:.4f} | {r.get('recall_at_10_vs_full', '')} | "
            f"{r['p50_ms']} | {r['p95_ms']} |"
        )
    return "\n".join(lines)


def _csv(kind):
    def parse(text: str) -> list:
        return [kind(p) for p in text.split(",") if p.strip()]

    return parse


def add_arguments(parser) -> None:
    """The `ryz index eval` arguments (adds `--json` unless the parser has it already)."""
    parser.add_argument(
        "ref",
        nargs="?",
        default="production",
        help="index reference: index:N, an alias (default production), an artifact id/prefix, or an index directory",
    )
    parser.add_argument(
        "--quantization",
        type=_csv(str),
        default=None,
        help="comma-separated settings to measure (default: none,int8,binary1,binary1.5,binary2)",
    )
    parser.add_argument(
        "--dims", type=_csv(int), default=None, help="comma-separated dims, e.g. 384,256,128 (default: the index's)"
    )
    parser.add_argument(
        "--index",
        choices=["hnsw", "plain", "both"],
        default=None,
        help="HNSW graph, plain scan or both (default: the index's)",
    )
    parser.add_argument("--queries", type=int, default=None, help="held-out queries (default RYZ_INDEX_EVAL_QUERIES)")
    parser.add_argument("--oversampling", type=float, default=None, help="search oversampling (default the index's)")
    parser.add_argument(
        "--hnsw-m", type=int, default=None, help="HNSW links per node of the evaluated shards (default the index's)"
    )
    parser.add_argument(
        "--hnsw-ef",
        type=int,
        default=None,
        help="HNSW search beam width (default the index's, RYZ_INDEX_HNSW_EF at build)",
    )
    parser.add_argument(
        "--no-rescore", dest="rescore", action="store_false", default=None, help="do not rescore with float vectors"
    )
    parser.add_argument("--seed", type=int, default=0)
    if not any("--json" in a.option_strings for a in parser._actions):
        parser.add_argument("--json", action="store_true", help="print the rows as a JSON array")


def index_kinds_arg(value: str | None) -> list[bool] | None:
    return None if value is None else {"hnsw": [True], "plain": [False], "both": [True, False]}[value]


def main(args) -> int:
    """`ryz index eval` without Prefect: resolve the index, evaluate, print the table (or JSON rows)."""
    from engine.retrieval.index import embedder_for, resolve_index

    with resolve_index(args.ref) as index_dir:
        state = json.loads((Path(index_dir) / "ryz-index.json").read_text())
        result = evaluate_index(
            index_dir,
            embedder_for(state),
            args.quantization,
            args.dims,
            index_kinds_arg(args.index),
            args.queries or _settings().index_eval_queries,
            args.seed,
            {
                k: v
                for k, v in {
                    "oversampling": args.oversampling,
                    "rescore": args.rescore,
                    "hnsw_m": args.hnsw_m,
                    "hnsw_ef": args.hnsw_ef,
                }.items()
                if v is not None
            },
        )
    if args.json:
        sys.stdout.write(json.dumps(result["rows"], indent=2) + "\n")
    else:
        print(format_table(result["rows"]))
        s = result["summary"]
        print(
            f"\n{s['chunks']} chunks, {s['queries']} held-out queries; query embedding p50 {s['embed_ms_p50']} ms "
            f"(p95 {s['embed_ms_p95']} ms); embedder {s['embedder']['model']} {s['embedder']['precision']} "
            f"{s['embedder']['onnx_sha256'][:19]}"
        )
    return 0


def _settings():
    from engine.settings import get_settings

    return get_settings()
