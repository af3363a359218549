"""Autotune (docs/kernels.md "Autotune"): the tuning knobs timed on a model's linear shapes, the table and the
winner recorded in the kernel build's manifest, and the lookup every loader makes (`token_tile_for`).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from engine.errors import BuildError, RyzError
from engine.host import cpu_fingerprint, loadavg, physical_cores
from engine.model import quants
from engine.model.build import MANIFEST_NAME, Progress, locked, print_to_stderr, read_manifest, write_json_atomic
from engine.model.ggufio import Hyperparams, ModelFile, add_hyperparams, tensor_name
from engine.model.native import Library, NativeModel
from engine.model.shapes import Shape, get_shape

TOKEN_TILES = (1, 2, 3, 4, 5, 6)  # the kernels cap the tile at 6 (x86) or 4 (NEON)
DEFAULT_TOKEN_TILE = 6  # native/src/forward.cpp passes 0 -> the kernel family default (6 on AVX-512)
DECODE_TOKENS = 1
PREFILL_TOKENS = 64
TUNE_VOCAB = 256  # the synthetic model's vocabulary: the head must not dominate the timing
MAX_TUNE_LAYERS = 16


@dataclass(frozen=True)
class TuneShape:
    """The dimensions that decide a model's ternary linear shapes."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    layers: int = 0  # the model's layer count (0: unknown); decides how many the sweep runs, not the signature

    @property
    def signature(self) -> str:
        return f"h{self.hidden}-q{self.heads}x{self.head_dim}-kv{self.kv_heads}-ffn{self.ffn}"

    def linears(self) -> dict[str, tuple[int, int]]:
        """GGUF stem -> (rows, cols) of one layer's ternary linears."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {
            "attn_q": (q, self.hidden),
            "attn_k": (kv, self.hidden),
            "attn_v": (kv, self.hidden),
            "attn_output": (self.hidden, q),
            "ffn_gate": (self.ffn, self.hidden),
            "ffn_up": (self.ffn, self.hidden),
            "ffn_down": (self.hidden, self.ffn),
        }

    @classmethod
    def from_shape(cls, shape: Shape) -> TuneShape:
        return cls(shape.hidden, shape.heads, shape.kv_heads, shape.hidden // shape.heads, shape.ffn, shape.layers)

    @classmethod
    def from_hparams(cls, hp: Hyperparams) -> TuneShape:
        return cls(hp.hidden, hp.heads, hp.kv_heads, hp.head_dim, hp.ffn, hp.layers)

    @classmethod
    def from_gguf(cls, path: str | Path) -> TuneShape:
        return cls.from_hparams(ModelFile(path).hparams)


def _tune_shape(model: str | Path | TuneShape | Shape | None) -> tuple[TuneShape, str]:
    if model is None:
        return TuneShape.from_shape(get_shape("bitnet-2b4t")), "shape bitnet-2b4t"
    if isinstance(model, TuneShape):
        return model, "dims"
    if isinstance(model, Shape):
        return TuneShape.from_shape(model), "dims"
    return TuneShape.from_gguf(model), f"gguf {Path(model).name}"


def _thread_counts(max_threads: int) -> list[int]:
    counts = {1, max_threads}
    n = 2
    while n < max_threads:
        counts.add(n)
        n *= 2
    return sorted(counts)


class _Clock:
    """Times a callable: one warm-up, then repeats for about `target_s` (at least 2, or 3 when each is quicker
    than the target), stopping early at the deadline."""

    def __init__(self, budget_s: float, target_s: float, max_repeats: int):
        self.deadline = time.perf_counter() + budget_s
        self.target_s, self.max_repeats = target_s, max_repeats
        self.truncated = False

    @property
    def expired(self) -> bool:
        return time.perf_counter() > self.deadline

    def measure(self, fn: Callable[[], Any], setup: Callable[[], Any] | None = None) -> tuple[float, float, int]:
        """(median s, min s, repeats)."""

        def once() -> float:
            if setup:
                setup()
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0

        first = once()  # warm-up: page faults, thread start, caches
        repeats = int(min(self.max_repeats, max(2 if first > self.target_s else 3, self.target_s / max(first, 1e-9))))
        samples = []
        for _ in range(repeats):
            samples.append(once())
            if self.expired:
                self.truncated = True
                break
        return float(np.median(samples)), float(min(samples)), len(samples)


def _random_codes(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    return (rng.integers(0, 3, size=(rows, cols), dtype=np.int8) - 1).astype(np.int8)


def write_tuning_model(path: str | Path, shape: TuneShape, layers: int = 1, seed: int = 0) -> Path:
    """A random GGUF with `shape`'s linears (every layer the same weights) and a tiny vocabulary: what the knob
    sweep runs."""
    rng = np.random.default_rng(seed)
    hp = Hyperparams(
        hidden=shape.hidden,
        layers=layers,
        heads=shape.heads,
        kv_heads=shape.kv_heads,
        head_dim=shape.head_dim,
        ffn=shape.ffn,
        vocab=TUNE_VOCAB,
        context=PREFILL_TOKENS * 2,
        rope_theta=500000.0,
        rms_eps=1e-5,
        ffn_act="relu2",
        sub_norms=True,
        tied=True,
    )
    path = Path(path)
    writer = gguf.GGUFWriter(path, hp.arch)
    add_hyperparams(writer, hp)

    def add(name: str, data: np.ndarray, qtype: str) -> None:
        writer.add_tensor(name, data, raw_dtype=None if qtype == "f32" else quants.ggml_type(qtype))

    embd = rng.standard_normal((hp.vocab, hp.hidden), dtype=np.float32) * 0.02
    add("token_embd.weight", quants.quantize(embd, "q8_0").view(np.uint8).reshape(hp.vocab, -1), "q8_0")
    add("output_norm.weight", np.ones(hp.hidden, np.float32), "f32")
    norms = {
        "attn_norm": hp.hidden,
        "ffn_norm": hp.hidden,
        "attn_sub_norm": hp.heads * hp.head_dim,
        "ffn_sub_norm": hp.ffn,
    }
    linears = {
        stem: quants.pack_ternary(_random_codes(rng, rows, cols), "tq2_0")
        for stem, (rows, cols) in shape.linears().items()
    }
    for layer in range(layers):
        for stem, n in norms.items():
            add(tensor_name(layer, stem), np.ones(n, np.float32), "f32")
        for stem, packed in linears.items():
            add(tensor_name(layer, stem), packed, "tq2_0")
            add(tensor_name(layer, stem, "scale"), np.array([1.0 / np.sqrt(packed.shape[1] * 4)], np.float32), "f32")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def tuning_layers(layer_bytes: int, l3_bytes: int | None, model_layers: int = 0) -> int:
    """Layers for the knob sweep's model: enough that the weights overflow twice the L3, so decode streams
    from memory as a real model's does, but no more than the model has (a model that fits in cache is timed
    in cache) and at most MAX_TUNE_LAYERS."""
    overflow = -(-2 * (l3_bytes or 32 << 20) // max(layer_bytes, 1))
    return max(1, min(overflow, model_layers or MAX_TUNE_LAYERS, MAX_TUNE_LAYERS))


def _kernel_table(library: Library, shape: TuneShape, clock: _Clock, rng: np.random.Generator) -> list[dict]:
    """Single-threaded ryz_ternary_gemm per distinct linear shape at decode and prefill token counts."""
    groups: dict[tuple[int, int], list[str]] = {}
    for stem, dims in shape.linears().items():
        groups.setdefault(dims, []).append(stem)
    rows_out: list[dict] = []
    for (rows, cols), stems in groups.items():
        packed = library.ternary_pack(quants.pack_ternary(_random_codes(rng, rows, cols), "tq2_0"), "tq2_0", rows, cols)
        for n in (DECODE_TOKENS, PREFILL_TOKENS):
            if clock.expired:
                clock.truncated = True
                return rows_out
            act = rng.integers(-127, 128, size=(n, cols), dtype=np.int8)
            median, best, repeats = clock.measure(lambda: library.ternary_gemm(packed, rows, cols, act))
            rows_out.append(
                {
                    "linears": stems,
                    "rows": rows,
                    "cols": cols,
                    "n_tokens": n,
                    "threads": 1,
                    "median_us": round(median * 1e6, 1),
                    "min_us": round(best * 1e6, 1),
                    "repeats": repeats,
                    "gbps": round(packed.nbytes / median / 1e9, 3),
                    "gmacs": round(rows * cols * n / median / 1e9, 3),
                }
            )
    return rows_out


def _layer_bytes(library: Library, shape: TuneShape) -> int:
    """Packed ternary bytes one layer's linears occupy (what decode reads per layer)."""
    return sum(int(library.lib.ryz_ternary_packed_bytes(r, c)) for r, c in shape.linears().values())


def _knob_table(
    library: Library,
    shape: TuneShape,
    layers: int,
    thread_counts: list[int],
    clock: _Clock,
    rng: np.random.Generator,
    work: Path,
) -> list[dict]:
    """A synthetic model's forward (NativeModel.forward_batch) per (threads, token tile) at 64 tokens, and at
    1 token per thread count (the tile cannot matter for one token), in time per layer. Most threads first:
    if the budget runs out, the configurations a server would use are the ones measured."""
    layer_bytes = _layer_bytes(library, shape)
    layer_macs = sum(r * c for r, c in shape.linears().values())
    model_path = write_tuning_model(work / "tune.gguf", shape, layers)
    tokens = rng.integers(0, TUNE_VOCAB, size=PREFILL_TOKENS, dtype=np.int32)
    tiles = [DEFAULT_TOKEN_TILE] + [t for t in TOKEN_TILES if t != DEFAULT_TOKEN_TILE]
    out: list[dict] = []
    for threads in sorted(thread_counts, reverse=True):
        for tile in tiles:
            if clock.expired:
                clock.truncated = True
                return out
            # the tile is a context setting: one model per (threads, tile), closed before the next so no idle
            # pool spins beside the one being timed; loading and repacking take milliseconds
            model = NativeModel(
                model_path,
                library,
                threads=threads,
                max_seqs=1,
                max_positions=PREFILL_TOKENS * 2,
                kv_type="f16",
                token_tile=tile,
            )
            try:
                for n in (DECODE_TOKENS, PREFILL_TOKENS) if tile == DEFAULT_TOKEN_TILE else (PREFILL_TOKENS,):
                    batch, seqs = tokens[:n], np.zeros(n, np.int32)
                    median, best, repeats = clock.measure(
                        lambda: model.forward_batch(batch, seqs), setup=lambda: model.new_cache(0)
                    )
                    median, best = median / layers, best / layers
                    out.append(
                        {
                            "phase": "decode" if n == DECODE_TOKENS else "prefill",
                            "n_tokens": n,
                            "threads": threads,
                            "gemm_token_tile": tile if n > 1 else None,
                            "median_us": round(median * 1e6, 1),
                            "min_us": round(best * 1e6, 1),
                            "repeats": repeats,
                            "gbps": round(layer_bytes / median / 1e9, 3),
                            "gmacs": round(layer_macs * n / median / 1e9, 3),
                        }
                    )
            finally:
                model.close()
    return out


def _winner(knobs: list[dict]) -> dict:
    decode = [r for r in knobs if r["phase"] == "decode"]
    prefill = [r for r in knobs if r["phase"] == "prefill"]
    winner: dict[str, Any] = {}
    if decode:
        best = min(decode, key=lambda r: r["median_us"])
        winner.update(threads_decode=best["threads"], decode_layer_us=best["median_us"], decode_gbps=best["gbps"])
    if prefill:
        best = min(prefill, key=lambda r: r["median_us"])
        winner.update(
            gemm_token_tile=best["gemm_token_tile"],
            threads_prefill=best["threads"],
            prefill_layer_us=best["median_us"],
            prefill_gmacs=best["gmacs"],
        )
    return winner


def autotune(
    library: Library,
    model: str | Path | TuneShape | Shape | None = None,
    threads: int | None = None,
    *,
    budget_s: float = 30.0,
    record: bool = True,
    progress: Progress = print_to_stderr,
    seed: int = 0,
) -> dict:
    """Time the tuning knobs on a model's linear shapes; record the table and winner in the build manifest.

    `model`: a GGUF path, a Shape/TuneShape, or None for bitnet-2b4t. Two tables: the single-threaded
    `ryz_ternary_gemm` per distinct linear shape (the ISA's raw speed), and a synthetic model's forward per
    (threads in 1..`threads`, gemm_token_tile) at 1 token (decode) and 64 tokens (prefill), per layer; the
    model has enough layers to overflow twice the L3, so decode reads memory as a real model does. Medians
    over repeats; the sweep stops at `budget_s` (`"truncated": true`). Returns the entry stored under the shape
    signature in build.json's "autotune" (when `record` and the library sits in a build directory)."""
    shape, source = _tune_shape(model)
    max_threads = threads or physical_cores()
    thread_counts = _thread_counts(max_threads)
    target_s = min(0.3, budget_s / 60)
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    progress(f"autotuning {shape.signature} on {library.isa}, threads {thread_counts}, budget {budget_s:.0f} s")
    kernel_clock = _Clock(0.3 * budget_s, target_s, max_repeats=15)  # the knob sweep gets the rest
    kernels = _kernel_table(library, shape, kernel_clock, rng)
    knob_clock = _Clock(budget_s - (time.perf_counter() - start), target_s, max_repeats=15)
    layers = tuning_layers(_layer_bytes(library, shape), cpu_fingerprint()["cache"]["l3"], shape.layers)
    with tempfile.TemporaryDirectory(prefix="ryz-tune-") as tmp:
        knobs = _knob_table(library, shape, layers, thread_counts, knob_clock, rng, Path(tmp))
    truncated = kernel_clock.truncated or knob_clock.truncated
    entry: dict[str, Any] = {
        "signature": shape.signature,
        "shape": {
            "hidden": shape.hidden,
            "heads": shape.heads,
            "kv_heads": shape.kv_heads,
            "head_dim": shape.head_dim,
            "ffn": shape.ffn,
        },
        "source": source,
        "isa": library.isa,
        "linears": {stem: list(dims) for stem, dims in shape.linears().items()},
        "layers": layers,
        "thread_counts": thread_counts,
        "token_tiles": list(TOKEN_TILES),
        "kernels": kernels,
        "table": knobs,
        "winner": _winner(knobs),
        "truncated": truncated,
        "loadavg": loadavg(),  # other work on the machine shows up here: rerun on a quiet one if high
        "seconds": round(time.perf_counter() - start, 2),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if record and (library.path.parent / MANIFEST_NAME).is_file():
        record_autotune(library.path.parent, entry)
    w = entry["winner"]
    progress(
        f"autotune winner: token tile {w.get('gemm_token_tile')}, threads decode {w.get('threads_decode')} / "
        f"prefill {w.get('threads_prefill')} ({entry['seconds']:.1f} s{', truncated' if truncated else ''})"
    )
    return entry


def autotune_key(signature: str, isa: str) -> str:
    return f"{signature}/{isa}"


def record_autotune(directory: Path, entry: dict) -> dict:
    """Add `entry` to build.json's "autotune" under signature/ISA (other entries are kept); returns the manifest."""
    with locked(directory):
        manifest = read_manifest(directory)
        if manifest is None:
            raise BuildError(f"{directory} holds no build manifest; run `ryz build-kernels`")
        manifest.setdefault("autotune", {})[autotune_key(entry["signature"], entry["isa"])] = entry
        write_json_atomic(directory / MANIFEST_NAME, manifest)
    return manifest


def token_tile_for(library: Library, model: str | Path | TuneShape) -> int:
    """The autotuned GEMM token tile recorded in `library`'s build for this model's shape (a GGUF path, or its
    TuneShape when the caller has read the file already); 0 (the kernel default) when the build was not tuned on it."""
    try:
        manifest = read_manifest(Path(library.path).parent)
        return int(
            ((tuned_parameters(manifest, model, library.isa) if manifest else None) or {}).get("gemm_token_tile") or 0
        )
    except (OSError, ValueError, KeyError, RyzError):  # tuning is optional: an unreadable record means defaults
        return 0


def tuned_parameters(manifest: dict, model: str | Path | TuneShape | Shape, isa: str) -> dict | None:
    """The recorded autotune winner for this model's shape and ISA, or None (engine defaults apply)."""
    entry = recorded_entry(manifest, model, isa)
    return entry["winner"] if entry else None


def recorded_entry(manifest: dict, model: str | Path | TuneShape | Shape, isa: str) -> dict | None:
    """The whole autotune entry build.json holds for this model's shape and ISA, or None."""
    shape, _ = _tune_shape(model)
    return manifest.get("autotune", {}).get(autotune_key(shape.signature, isa))
