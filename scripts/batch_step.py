#!/usr/bin/env python3
"""Time one batched decode step of the native engine: one token from each of N sequences.

    python scripts/batch_step.py [--seqs 1,2,4,8,16] [--positions 128] [--repeats 10] [--threads 2] [MODEL]

MODEL defaults to the cached bitnet-2b4t GGUF that `ryz bench bitnet-2b4t` synthesizes. Every sequence
is prefilled to `--positions` tokens first; each timed step is truncated back, so all steps attend over
the same number of positions. Prints the median ms per step and the aggregate tok/s per batch size
(docs/benchmarks.md, serving: "What changed").
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from engine.model.loader import open_model
from engine.settings import get_settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", help="a GGUF path (default: the cached bitnet-2b4t shape)")
    parser.add_argument("--seqs", default="1,2,4,8,16", help="comma-separated batch sizes")
    parser.add_argument("--positions", type=int, default=128, help="KV positions each sequence attends over")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    settings = get_settings()
    path = args.model or str(settings.cache_dir / "bench" / "bitnet-2b4t-tq2_0-q8_0.gguf")
    sizes = [int(v) for v in args.seqs.split(",")]
    model = open_model(
        path, "bench", settings=settings, threads=args.threads, max_seqs=max(sizes), max_positions=args.positions + 1
    )
    rng = np.random.default_rng(0)
    for seq in range(max(sizes)):
        model.forward_batch(
            rng.integers(0, 1000, args.positions).astype(np.int32), np.full(args.positions, seq, np.int32)
        )
    for n in sizes:
        times = []
        for _ in range(args.repeats):
            seqs = np.arange(n, dtype=np.int32)
            start = time.perf_counter()
            model.forward_batch(rng.integers(0, 1000, n).astype(np.int32), seqs, np.ones(n, np.uint8))
            times.append(time.perf_counter() - start)
            for seq in range(n):
                model.truncate_seq(seq, args.positions)
        ms = float(np.median(times)) * 1e3
        print(f"{n:3d} sequences: {ms:7.1f} ms/step  {n / ms * 1e3:6.1f} tok/s", flush=True)
    model.close()


if __name__ == "__main__":
    main()
