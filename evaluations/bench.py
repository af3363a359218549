"""The performance benchmark harness behind `ryz bench` (DESIGN.md "Performance targets").

For one model (a named shape, synthesized once and cached, or any model reference) it measures, in a
fresh subprocess per repeat so nothing pollutes the numbers of another run:

* **prefill** tok/s (pp`prompt`): one `NativeModel.forward_batch` over the whole prompt (or `ubatch`
  chunks) on an empty KV cache; **TTFT** = that prefill plus picking the first token (argmax);
* **decode** tok/s (tg`gen`): token-by-token `forward_batch`, greedy, from an empty KV cache that grows
  to `gen` positions (llama-bench's tg definition, so the two compare);
* **load** seconds (GGUF mmap + repack of the ternary weights + context) and **peak RSS** (the worker's
  own rusage, from wait4);
* this machine's **read bandwidth** (`ryz_read_bandwidth`, >= 1 GiB streamed, the run's thread count);
* **bytes per token** the engine reads to decode one token: the repacked ternary weights (T2P: 64 bytes
  per 256 weights, as `ryz_model_repacked_bytes` reports), norms, scales, the whole head and, untied, one
  embedding row; KV-cache reads are reported apart (`kv_bytes_per_token`);
* **roofline fraction** = decode tok/s x bytes per token / bandwidth, per round against the mean of the
  probes run just before and just after that round's decode (this host's bandwidth swings 45-82 GB/s
  from one minute to the next with its neighbours' load), then the median over rounds; the fraction of
  the medians is kept beside it (`roofline_fraction_of_medians`).

Repeats are interleaved with the peers' (evaluations/peers.py): bandwidth, ours, llama.cpp TQ2_0,
llama.cpp TQ1_0, onnxruntime, then again; the reported numbers are medians, the samples are kept.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from engine import host
from engine.errors import RyzError
from engine.fsutil import file_lock
from engine.model import loader
from engine.model.autotune import token_tile_for
from evaluations import peers as peers_mod
from evaluations.peers import log, run_json_worker

SCHEMA = 1
DEFAULT_PROMPT = 512
DEFAULT_GEN = 128
DEFAULT_REPEATS = 3
BANDWIDTH_BYTES = 1 << 30  # DESIGN.md: the probe streams at least 1 GiB
BANDWIDTH_REPEATS = 3  # passes per probe (the probe keeps its best)
WORKER_TIMEOUT = 3600
WARMUP_TOKENS = 8
LLAMA_CPP_PEERS = {"llama.cpp-tq2_0": "tq2_0", "llama.cpp-tq1_0": "tq1_0"}


class BenchError(RyzError, RuntimeError):
    """Our own measurement failed (peers never raise: they report an error)."""


# --- the model under test -------------------------------------------------------------------------


@dataclass
class Target:
    path: Path
    label: str  # the shape name or the reference as given
    shape: str | None  # set when synthesized from a named shape
    weights: str
    head: str
    manifest: dict | None = None
    extra: dict = field(default_factory=dict)


def bench_dir(settings) -> Path:
    return settings.cache_dir / "bench"


def ensure_shape_gguf(shape_name: str, weights: str, head: str, settings, seed: int = 0) -> tuple[Path, dict]:
    """`<cache>/bench/<shape>-<weights>-<head>.gguf` (+ `.manifest.json`), synthesized and quantized on
    first use. The random bf16 checkpoint is kept under `<cache>/bench/checkpoints/` so the other
    ternary type (a peer's) quantizes from the very same weights."""
    from engine.model.quantize import quantize_checkpoint
    from engine.model.shapes import get_shape
    from engine.model.synth import write_synthetic_checkpoint

    shape = get_shape(shape_name)
    root = bench_dir(settings)
    path = root / f"{shape_name}-{weights}-{head}.gguf"
    manifest_path = path.with_name(path.name + ".manifest.json")
    with file_lock(root / ".lock"):
        if path.is_file() and manifest_path.is_file():
            return path, json.loads(manifest_path.read_text())
        checkpoint = root / "checkpoints" / f"{shape_name}-seed{seed}"
        if not (checkpoint / "config.json").is_file():
            log(f"synthesizing a random {shape_name} checkpoint (seed {seed}) in {checkpoint}")
            write_synthetic_checkpoint(shape, checkpoint, seed=seed)
        log(f"quantizing it to {path.name}")
        start = time.perf_counter()
        manifest = quantize_checkpoint(
            checkpoint,
            path,
            weights=weights,
            head=head,
            source={"type": "synthetic", "shape": shape_name, "seed": seed},
        )
        manifest["quantize_seconds"] = round(time.perf_counter() - start, 1)
        tmp = manifest_path.with_name(manifest_path.name + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, manifest_path)
    return path, manifest


def ternary_type(path: Path) -> str:
    from engine.model.ggufio import ModelFile

    file = ModelFile(path)
    return file.tensor_type("blk.0.attn_q.weight")


def head_type(path: Path) -> str:
    from engine.model.ggufio import ModelFile

    file = ModelFile(path)
    return file.tensor_type("output.weight" if not file.hparams.tied else "token_embd.weight")


def resolve_target(spec: str, settings, weights: str | None = None, head: str | None = None) -> Target:
    """A named shape (synthesized, cached) or a model reference (artifact id/prefix or GGUF path)."""
    from engine.model.shapes import SHAPES

    manifest: dict | None
    if spec in SHAPES:
        weights = weights or settings.weights_type
        head = head or settings.head_type
        path, manifest = ensure_shape_gguf(spec, weights, head, settings)
        return Target(path, spec, spec, weights, head, manifest)
    if weights or head:
        raise ValueError("--weights/--head choose how a shape is quantized; a model reference is benchmarked as it is")
    from engine.artifacts.refs import resolve_model
    from engine.artifacts.store import open_store

    store = open_store(settings=settings)
    path = resolve_model(spec, store)
    manifest = None
    sidecar = path.with_name(path.name + ".manifest.json")
    if sidecar.is_file():
        manifest = json.loads(sidecar.read_text())
    elif not path.suffix == ".gguf":
        try:
            manifest = store.get_manifest(store.resolve(spec))
        except Exception:  # noqa: BLE001 - the manifest is optional: bytes are computed from the file
            manifest = None
    return Target(path, spec, None, ternary_type(path), head_type(path), manifest)


# --- bytes per token ----------------------------------------------------------------------------


def decode_bytes(path: Path, repacked_bytes: int | None = None) -> dict:
    """Bytes read to decode one token, from the GGUF's tensor table.

    `bytes_per_token`: what the engine reads (ternary linears in its repacked T2P layout: `repacked_bytes`
    when the worker measured it, else 64 bytes per 256 weights); `bytes_per_token_gguf`: the same with the
    file's own ternary blocks (TQ2_0: 66 bytes per 256), as the artifact manifest counts it. A tied
    embedding is read once, as the head; untied, the embedding adds one row."""
    from engine.model import quants
    from engine.model.ggufio import ModelFile

    file = ModelFile(path)
    hp = file.hparams
    head_name = "token_embd.weight" if hp.tied else "output.weight"
    ternary_gguf = ternary_t2p = other = 0
    for name, tensor in file.tensors.items():
        qtype = file.tensor_type(name)
        nbytes = int(tensor.n_bytes)
        if name == "token_embd.weight" and not hp.tied:
            other += quants.bytes_per_row(qtype, hp.hidden)
        elif qtype in ("tq1_0", "tq2_0"):
            rows, cols = file.shape(name)
            ternary_gguf += nbytes
            ternary_t2p += rows * cols // 4
        else:
            other += nbytes
    engine_ternary = repacked_bytes if repacked_bytes else ternary_t2p
    kv_per_position = 2 * hp.layers * hp.kv_heads * hp.head_dim * 2  # K and V, f16
    return {
        "bytes_per_token": int(other + engine_ternary),
        "bytes_per_token_gguf": int(other + ternary_gguf),
        "ternary_bytes_engine": int(engine_ternary),
        "ternary_bytes_gguf": int(ternary_gguf),
        "head_bytes": int(file.tensors[head_name].n_bytes),
        "kv_bytes_per_position": kv_per_position,
        "hparams": {
            "hidden": hp.hidden,
            "layers": hp.layers,
            "heads": hp.heads,
            "kv_heads": hp.kv_heads,
            "head_dim": hp.head_dim,
            "ffn": hp.ffn,
            "vocab": hp.vocab,
            "tied": hp.tied,
            "ffn_act": hp.ffn_act,
        },
    }


# --- our engine: one measured run per subprocess ----------------------------------------------------


def _load_library(library: str | Path | None, settings):
    if library:
        from engine.model.native import Library

        return Library(library)
    from engine.model.build import load_library

    return load_library(settings=settings)


def _vm_hwm_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _worker(spec: dict) -> dict:
    """One measured run of our engine (in its own process): load, warm up, prefill, decode."""
    from engine.model.native import Library

    library = Library(spec["library"])
    if spec.get("isa") and spec["isa"] != "auto":
        library.set_isa(spec["isa"])
    prompt, gen, ubatch = spec["prompt"], spec["gen"], spec.get("ubatch") or spec["prompt"]
    start = time.perf_counter()
    model = loader.open_model(
        spec["model"],
        "bench",
        library=library,
        threads=spec["threads"],
        max_positions=max(prompt, gen + 1) + WARMUP_TOKENS,
        token_tile=spec.get("token_tile") or 0,
    )
    load = time.perf_counter() - start
    rng = np.random.default_rng(spec.get("seed", 0))
    tokens = rng.integers(0, model.hp.vocab, size=prompt, dtype=np.int32)
    seq = np.zeros(max(prompt, 1), np.int32)

    # Warm-up, as llama-bench's run before it times: the thread pool, first touch of the mapped head, caches, and
    # scratch buffers grown to the timed batch (a first 512-token call faulted in ~115 MB of them inside the timing,
    # 0.2-0.3 s more "other" when the page cache was full from the peers' runs).
    model.new_cache(0)
    model.forward_batch(tokens[:ubatch], seq[:ubatch])

    profiling = model.can_profile  # an older (ABI 4) library still benchmarks, without the per-part profile
    model.new_cache(0)
    if profiling:
        model.set_profiling(True)
    start = time.perf_counter()
    for i in range(0, prompt, ubatch):
        logits = model.forward_batch(tokens[i : i + ubatch], seq[: len(tokens[i : i + ubatch])])
    prefill = time.perf_counter() - start
    first = int(np.argmax(logits[-1]))
    ttft = time.perf_counter() - start

    prefill_profile = model.profile() if profiling else None

    model.new_cache(0)
    if profiling:
        model.set_profiling(True)
    token = np.array([first], np.int32)
    one = np.zeros(1, np.int32)
    start = time.perf_counter()
    for _ in range(gen):
        logits = model.forward_batch(token, one)
        token[0] = int(np.argmax(logits[-1]))
    decode = time.perf_counter() - start
    decode_profile = model.profile() if profiling else None
    out = {
        "prefill_tok_s": prompt / prefill,
        "ttft_ms": ttft * 1e3,
        "decode_tok_s": gen / decode,
        "load_seconds": load,
        "repack_seconds": float(model.repack_seconds),
        "repacked_bytes": int(library.lib.ryz_model_repacked_bytes(model.model)),
        "kv_bytes": int(library.lib.ryz_context_kv_bytes(model.context)),
        "isa": library.isa,
        "vm_hwm_mb": _vm_hwm_mb(),
        "profile": {"prefill": prefill_profile, "decode": decode_profile} if profiling else None,
    }
    model.close()
    return out


def part_profile(samples: list[dict], sizes: dict) -> dict | None:
    """Where a step's time goes: per part, the median over runs of its seconds per call (ms), its share of the
    step, and for the two weight-streaming parts the rate they read their bytes at (decode only)."""
    runs = [s["profile"] for s in samples if s.get("profile")]
    if not runs:
        return None
    out = {}
    for phase in ("decode", "prefill"):
        per_run = [r[phase] for r in runs if r.get(phase) and r[phase]["calls"]]
        if not per_run:
            continue
        parts = list(per_run[0]["seconds"])
        ms = {p: float(statistics.median(r["seconds"][p] / r["calls"] * 1e3 for r in per_run)) for p in parts}
        total = sum(ms.values())
        entry = {
            "ms_per_call": {p: _round(v, 3) for p, v in ms.items()},
            "share": {p: _round(v / total, 3) for p, v in ms.items()},
        }
        if phase == "decode":
            read = {"ternary_linears": sizes["ternary_bytes_engine"], "head": sizes["head_bytes"]}
            entry["gb_s"] = {p: _round(b / (ms[p] / 1e3) / 1e9, 2) for p, b in read.items() if ms.get(p)}
        out[phase] = entry
    return out


def run_ours(spec: dict) -> dict:
    return run_json_worker("evaluations.bench", "worker", spec, WORKER_TIMEOUT, "the benchmark worker", BenchError)


# --- the benchmark ----------------------------------------------------------------------------------


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(statistics.median(present)) if present else None


def _round(value, digits: int = 3):
    return None if value is None else round(float(value), digits)


def _best(samples: list[dict]) -> dict:
    """Best-of-repeats: on a shared machine the fastest run is the least disturbed one."""
    out = {}
    for key, pick in (("decode_tok_s", max), ("prefill_tok_s", max), ("ttft_ms", min)):
        values = [s[key] for s in samples if s.get(key) is not None]
        if values:
            out[key] = _round(pick(values))
    return out


class _Peer:
    """A peer's per-round runner, its setup metadata and its samples (or the error that stopped it)."""

    def __init__(self, name: str):
        self.name = name
        self.run: Callable[[], dict] | None = None
        self.meta: dict = {}
        self.samples: list[dict] = []
        self.error: str | None = None

    def round(self) -> None:
        if self.error or self.run is None:
            return
        try:
            self.samples.append(self.run())
        except Exception as exc:  # noqa: BLE001 - a peer never stops the benchmark
            self.error = f"{type(exc).__name__}: {exc}"
            log(f"peer {self.name} failed: {self.error}")

    def summary(self, round_bandwidth: list[float]) -> dict:
        if self.error and not self.samples:
            return {"error": self.error, **self.meta}
        keys = ("decode_tok_s", "prefill_tok_s", "ttft_ms", "peak_rss_mb", "load_seconds")
        out = {k: _round(_median([s.get(k) for s in self.samples])) for k in keys if any(k in s for s in self.samples)}
        bpt = self.meta.get("bytes_per_token")
        if bpt and round_bandwidth and out.get("decode_tok_s"):
            out["roofline_fraction"] = roofline(bpt, [s.get("decode_tok_s") for s in self.samples], round_bandwidth)
        out["best"] = _best(self.samples)
        out["samples"] = {k: [_round(s.get(k)) for s in self.samples] for k in ("decode_tok_s", "prefill_tok_s")}
        if self.error:
            out["error"] = self.error
        out.update(self.meta)
        return out


def _setup_llama_cpp(target: Target, settings, threads: int, prompt: int, gen: int, tmp: Path) -> list[_Peer]:
    """Build llama-bench (once) and write the two llama.cpp copies of the model."""
    result = [_Peer(name) for name in LLAMA_CPP_PEERS]
    try:
        bench = peers_mod.ensure_llama_bench(settings.cache_dir)
    except Exception as exc:  # noqa: BLE001
        for p in result:
            p.error = f"llama-bench unavailable: {type(exc).__name__}: {exc}"
        return result
    for p in result:
        weights = LLAMA_CPP_PEERS[p.name]
        try:
            if target.shape:  # quantized from the very same random checkpoint
                src, _ = ensure_shape_gguf(target.shape, weights, target.head, settings)
                transcode = None
            else:
                src, transcode = target.path, weights
            log(f"writing the llama.cpp copy ({weights}, architecture bitnet)")
            copy = peers_mod.write_llama_cpp_copy(src, tmp / f"{p.name}.gguf", transcode)
            sizes = decode_bytes(copy)
            p.meta = {
                "weights": weights,
                "head": target.head,
                "llama_cpp_commit": bench.commit,
                "llama_cpp_python_sdist": bench.version,
                "bytes_per_token": sizes["bytes_per_token_gguf"],
                "note": "llama.cpp's bitnet graph (SiLU FFN) on the same tensors, architecture key renamed",
            }
            p.run = lambda copy=copy: peers_mod.run_llama_bench(bench, copy, threads, prompt, gen, 1)
        except Exception as exc:  # noqa: BLE001
            p.error = f"{type(exc).__name__}: {exc}"
    return result


def _setup_ort(target: Target, settings, threads: int, prompt: int, gen: int, block_size: int) -> _Peer:
    p = _Peer(peers_mod.ORT_PEER)
    try:
        import onnx  # noqa: F401
        import onnxruntime

        hp = decode_bytes(target.path)["hparams"]
        model = peers_mod.ensure_ort_model(settings.cache_dir, hp, block_size)
        weights_file = model.with_name("weights.bin")
        p.meta = {
            "note": peers_mod.ORT_NOTE,
            "onnxruntime": onnxruntime.__version__,
            "block_size": block_size,
            "accuracy_level": 4,
            "bytes_per_token": weights_file.stat().st_size if weights_file.is_file() else None,
        }
        p.run = lambda: peers_mod.run_ort(model, hp["hidden"], threads, prompt, gen)
    except ImportError as exc:
        p.error = f"onnxruntime/onnx not installed ({exc.name}): pip install '.[bench]'"
    except Exception as exc:  # noqa: BLE001
        p.error = f"{type(exc).__name__}: {exc}"
    return p


def round_fractions(bytes_per_token: int, decode_tok_s: list, round_bandwidth: list) -> list[tuple[float, float]]:
    """(roofline fraction, bandwidth GB/s) per round: decode x bytes per token / that round's bandwidth; rounds
    missing either are skipped."""
    return [(d * bytes_per_token / (b * 1e9), b) for d, b in zip(decode_tok_s, round_bandwidth) if d and b]


def roofline(bytes_per_token: int, decode_tok_s: list, round_bandwidth: list[float]) -> float | None:
    """The median over rounds of each round's roofline fraction."""
    fractions = [f for f, _ in round_fractions(bytes_per_token, decode_tok_s, round_bandwidth)]
    return _round(statistics.median(fractions), 4) if fractions else None


def run_bench(
    spec: str,
    threads: int | None = None,
    prompt: int = DEFAULT_PROMPT,
    gen: int = DEFAULT_GEN,
    repeats: int = DEFAULT_REPEATS,
    peers: bool = False,
    weights: str | None = None,
    head: str | None = None,
    library: str | Path | None = None,
    ubatch: int = 0,
    ort_block_size: int = peers_mod.ORT_BLOCK_SIZE,
    settings=None,
) -> dict:
    """Benchmark `spec` (a shape name or a model reference); returns the `ryz bench --json` record."""
    from engine.settings import get_settings

    settings = settings or get_settings()
    if prompt < 1 or gen < 1 or repeats < 1:
        raise ValueError("--prompt, --gen and --repeats must be positive")
    started = datetime.now(timezone.utc)
    wall = time.perf_counter()
    load_start = host.loadavg()
    threads = threads or loader.default_threads(settings)
    target = resolve_target(spec, settings, weights, head)
    lib = _load_library(library, settings)

    worker_spec = {
        "library": str(lib.path),
        "model": str(target.path),
        "threads": threads,
        "prompt": prompt,
        "gen": gen,
        "ubatch": ubatch,
        "isa": settings.isa,
        "token_tile": token_tile_for(lib, target.path),
    }

    peer_list: list[_Peer] = []
    tmp_root = settings.cache_dir / "tmp"
    tmp_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-", dir=tmp_root) as tmp:
        if peers:
            peer_list += _setup_llama_cpp(target, settings, threads, prompt, gen, Path(tmp))
            peer_list.append(_setup_ort(target, settings, threads, prompt, gen, ort_block_size))
        ours: list[dict] = []
        bandwidth: list[float] = []  # every probe
        round_bandwidth: list[float] = []  # per round: mean of the probes around our run
        for r in range(repeats):
            log(f"round {r + 1}/{repeats}: bandwidth probe ({threads} threads)")
            bandwidth.append(lib.read_bandwidth(BANDWIDTH_BYTES, threads, BANDWIDTH_REPEATS))
            log(f"round {r + 1}/{repeats}: ryzanstein pp{prompt} tg{gen}")
            ours.append(run_ours(worker_spec))
            bandwidth.append(lib.read_bandwidth(BANDWIDTH_BYTES, threads, BANDWIDTH_REPEATS))
            round_bandwidth.append((bandwidth[-2] + bandwidth[-1]) / 2)
            log(
                f"  decode {ours[-1]['decode_tok_s']:.2f} tok/s, prefill {ours[-1]['prefill_tok_s']:.1f} tok/s, "
                f"bandwidth {bandwidth[-2]:.1f} / {bandwidth[-1]:.1f} GB/s before / after"
            )
            for p in peer_list:
                if p.run and not p.error:
                    log(f"round {r + 1}/{repeats}: {p.name}")
                    p.round()
                    if p.samples and not p.error:
                        s = p.samples[-1]
                        log(f"  decode {s['decode_tok_s']:.2f} tok/s, prefill {s['prefill_tok_s']:.1f} tok/s")

    sizes = decode_bytes(target.path, ours[0].get("repacked_bytes"))
    bw = _median(bandwidth)
    decode = _median([o["decode_tok_s"] for o in ours])
    kv_avg = sizes["kv_bytes_per_position"] * (gen - 1) / 2  # mean positions attended over tg`gen`
    result = {
        "schema": SCHEMA,
        "decode_tok_s": _round(decode),
        "prefill_tok_s": _round(_median([o["prefill_tok_s"] for o in ours])),
        "ttft_ms": _round(_median([o["ttft_ms"] for o in ours])),
        "peak_rss_mb": _round(_median([o["peak_rss_mb"] for o in ours]), 1),
        "bandwidth_gb_s": _round(bw),
        "bytes_per_token": sizes["bytes_per_token"],
        "roofline_fraction": roofline(sizes["bytes_per_token"], [o["decode_tok_s"] for o in ours], round_bandwidth),
        "roofline_fraction_of_medians": _round(decode * sizes["bytes_per_token"] / (bw * 1e9), 4) if bw else None,
        "threads": threads,
        "peers": {p.name: p.summary(round_bandwidth) for p in peer_list},
        "best": _best(ours),
        "load_seconds": _round(_median([o["load_seconds"] for o in ours])),
        "repack_seconds": _round(_median([o["repack_seconds"] for o in ours])),
        "profile": part_profile(ours, sizes),
        "bytes_per_token_gguf": sizes["bytes_per_token_gguf"],
        "kv_bytes_per_token": int(kv_avg),
        "kv_bytes_per_position": sizes["kv_bytes_per_position"],
        "isa": ours[0]["isa"],
        "target": target.label,
        "shape": target.shape,
        "file": str(target.path),
        "file_bytes": target.path.stat().st_size,
        "weights": target.weights,
        "head": target.head,
        "hparams": sizes["hparams"],
        "prompt": prompt,
        "gen": gen,
        "ubatch": ubatch or prompt,
        "repeats": repeats,
        "tuning": {"gemm_token_tile": worker_spec["token_tile"]},
        "library": str(lib.path),
        "samples": {
            k: [_round(o[k]) for o in ours]
            for k in ("decode_tok_s", "prefill_tok_s", "ttft_ms", "load_seconds", "peak_rss_mb")
        },
        "bandwidth_samples": [_round(b) for b in bandwidth],
        "round_bandwidth": [_round(b) for b in round_bandwidth],
        "definitions": {
            "prefill": f"pp{prompt}: one forward_batch over the prompt (ubatch {ubatch or prompt}) on an empty KV "
            f"cache",
            "decode": f"tg{gen}: greedy token-by-token forward_batch from an empty KV cache (llama-bench's tg)",
            "ttft_ms": "prefill of the prompt + argmax of the first token",
            "bytes_per_token": "weights the engine reads per decoded token (repacked T2P ternary, norms, scales, "
            "head); KV reads apart",
            "roofline_fraction": "per round: decode tok/s x bytes_per_token / round_bandwidth (the mean of the probes "
            "just before and "
            "just after our decode); median over rounds. Peers: their round's sample against the same round_bandwidth",
            "roofline_fraction_of_medians": "median decode_tok_s x bytes_per_token / bandwidth_gb_s",
            "bandwidth_gb_s": f"ryz_read_bandwidth: {BANDWIDTH_BYTES >> 30} GiB streamed with SIMD loads on `threads` "
            f"threads, best of {BANDWIDTH_REPEATS}; median over all probes (two per round)",
            "profile": "ryz_context_profile over the timed prefill and decode: wall ms per forward call in the ternary "
            "linears (activation quantization, GEMMs, rescale), the head (final norm + dense GEMM), attention and the "
            "rest; share of the call; gb_s = the part's weight bytes / its time (decode); medians over repeats",
            "peak_rss_mb": "max RSS of the measured process alone (a fresh process per run, its rusage via a minimal "
            "parent), median over repeats",
        },
        "machine": {**host.machine_info(), "loadavg_start": load_start, "loadavg_end": host.loadavg()},
        "started": started.isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - wall, 1),
    }
    return result


def format_report(r: dict) -> str:
    """The human table `ryz bench` prints without --json."""
    lines = [
        f"{r['target']} ({r['weights']}/{r['head']}, {r['isa']}, {r['threads']} threads, pp{r['prompt']} tg{r['gen']}, "
        f"median of {r['repeats']})",
        f"{'engine':<26}{'decode tok/s':>14}{'prefill tok/s':>15}{'TTFT ms':>10}{'RSS MB':>9}{'roofline':>10}",
    ]

    def row(name, d):
        if "error" in d and d.get("decode_tok_s") is None:
            return f"{name:<26}  error: {d['error']}"
        rf = d.get("roofline_fraction")
        return (
            f"{name:<26}{d.get('decode_tok_s') or 0:>14.2f}{d.get('prefill_tok_s') or 0:>15.1f}"
            f"{d.get('ttft_ms') or 0:>10.0f}"
            f"{d.get('peak_rss_mb') or 0:>9.0f}{'' if rf is None else f'{rf:.2f}':>10}"
        )

    lines.append(row("ryzanstein", r))
    for name, d in r["peers"].items():
        lines.append(row(name, d))
    lines.append(
        f"bandwidth {r['bandwidth_gb_s']} GB/s; {r['bytes_per_token']:,} bytes/token (engine), "
        f"{r['bytes_per_token_gguf']:,} (GGUF); load {r['load_seconds']} s (repack {r['repack_seconds']} s)"
    )
    decode_profile = (r.get("profile") or {}).get("decode")
    if decode_profile:
        parts = ", ".join(
            f"{p} {decode_profile['ms_per_call'][p]:.2f} ms ({decode_profile['share'][p]:.0%})"
            for p in decode_profile["share"]
        )
        lines.append(f"decode step: {parts}")
    return "\n".join(lines)


if __name__ == "__main__":
    from evaluations.peers import worker_main

    worker_main("evaluations.bench", "worker", _worker)
