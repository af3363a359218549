"""Weight formats side by side: decode, prefill and bytes per token of one shape in each ternary type x head type,
interleaved round by round (every format sees the same background load), with ryz bench's own worker and profile.

    python scripts/bench_formats.py bitnet-2b4t --threads 2 --repeats 3 > docs/bench/formats-bitnet-2b4t-t2.json

The medians decide the default formats (docs/benchmarks.md "Weight formats"); `ryz bench --peers` then measures
llama.cpp on the chosen file (it is given the same head type).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from datetime import datetime, timezone

from engine import host
from engine.model.autotune import token_tile_for
from engine.settings import get_settings
from evaluations.bench import (
    BANDWIDTH_BYTES,
    BANDWIDTH_REPEATS,
    _load_library,
    decode_bytes,
    part_profile,
    resolve_target,
    roofline,
    run_ours,
)
from evaluations.peers import log

FORMATS = [("tq2_0", "q8_0"), ("tq1_0", "q8_0"), ("tq2_0", "q6_k"), ("tq1_0", "q6_k")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shape")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--gen", type=int, default=128)
    args = parser.parse_args(argv)
    settings = get_settings()
    lib = _load_library(None, settings)
    targets = {f"{w}+{h}": resolve_target(args.shape, settings, w, h) for w, h in FORMATS}
    specs = {
        name: {
            "library": str(lib.path),
            "model": str(t.path),
            "threads": args.threads,
            "prompt": args.prompt,
            "gen": args.gen,
            "ubatch": 0,
            "isa": settings.isa,
            "token_tile": token_tile_for(lib, t.path),
        }
        for name, t in targets.items()
    }
    started, load_start = datetime.now(timezone.utc), host.loadavg()
    samples: dict[str, list[dict]] = {name: [] for name in specs}
    round_bandwidth: list[float] = []
    for r in range(args.repeats):
        before = lib.read_bandwidth(BANDWIDTH_BYTES, args.threads, BANDWIDTH_REPEATS)
        for name, spec in specs.items():
            samples[name].append(run_ours(spec))
            s = samples[name][-1]
            log(f"round {r + 1}: {name} decode {s['decode_tok_s']:.2f} tok/s, prefill {s['prefill_tok_s']:.1f} tok/s")
        after = lib.read_bandwidth(BANDWIDTH_BYTES, args.threads, BANDWIDTH_REPEATS)
        round_bandwidth.append((before + after) / 2)
    baseline = statistics.median(s["decode_tok_s"] for s in samples["tq2_0+q8_0"])
    formats = {}
    for name, runs in samples.items():
        sizes = decode_bytes(targets[name].path, runs[0].get("repacked_bytes"))
        decode = [s["decode_tok_s"] for s in runs]
        formats[name] = {
            "weights": targets[name].weights,
            "head": targets[name].head,
            "bytes_per_token": sizes["bytes_per_token"],
            "ternary_bytes": sizes["ternary_bytes_engine"],
            "head_bytes": sizes["head_bytes"],
            "decode_tok_s": round(statistics.median(decode), 3),
            "decode_vs_tq2_0_q8_0": round(statistics.median(decode) / baseline, 3),
            "prefill_tok_s": round(statistics.median(s["prefill_tok_s"] for s in runs), 2),
            "load_seconds": round(statistics.median(s["load_seconds"] for s in runs), 3),
            "peak_rss_mb": round(statistics.median(s["peak_rss_mb"] for s in runs), 1),
            "roofline_fraction": roofline(sizes["bytes_per_token"], decode, round_bandwidth),
            "profile": part_profile(runs, sizes),
            "samples": {k: [round(s[k], 3) for s in runs] for k in ("decode_tok_s", "prefill_tok_s")},
            "isa": runs[0]["isa"],
        }
    json.dump(
        {
            "shape": args.shape,
            "threads": args.threads,
            "prompt": args.prompt,
            "gen": args.gen,
            "repeats": args.repeats,
            "formats": formats,
            "round_bandwidth": [round(b, 2) for b in round_bandwidth],
            "machine": {**host.machine_info(), "loadavg_start": load_start, "loadavg_end": host.loadavg()},
            "started": started.isoformat(timespec="seconds"),
            "library": str(lib.path),
        },
        sys.stdout,
        indent=1,
    )
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
