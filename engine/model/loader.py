"""`open_model`: the one way to load a model on the native engine.

It reads the GGUF's hyperparameters once, picks the thread count for its purpose, looks up the GEMM token tile the
kernel build was tuned to for this shape, sizes the KV cache, and returns the loaded `NativeModel`. References
(name:version, aliases, artifact ids) become a path in `engine.artifacts.refs` before this is called.

    purpose    threads                         KV cache   sequences
    serve      RYZ_THREADS, else physical cores  f16        RYZ_MAX_SEQS within RYZ_KV_BUDGET_MB, RYZ_MAX_CONTEXT long
    generate   RYZ_THREADS, else physical cores  f16        1
    eval       RYZ_THREADS, else physical cores  f16        as asked
    bench      as asked (else as generate)       f16        1
    parity     1                                 f32        1 (fp32 KV: the reference's float operations)
"""

from __future__ import annotations

from pathlib import Path

from engine.host import physical_cores
from engine.model.autotune import TuneShape, token_tile_for
from engine.model.build import load_library
from engine.model.ggufio import Hyperparams, ModelFile
from engine.model.native import KV_TYPES, Library, NativeModel, kv_bytes_per_position
from engine.settings import Settings, get_settings

PURPOSES = ("serve", "generate", "eval", "bench", "parity")


def slots_for_budget(settings: Settings, hp: Hyperparams, kv_type: str = "f16") -> int:
    """Sequence slots: RYZ_MAX_SEQS, capped so every slot's full KV cache (RYZ_MAX_CONTEXT positions) fits
    RYZ_KV_BUDGET_MB; at least one."""
    per_seq = kv_bytes_per_position(hp, kv_type) * settings.max_context
    return max(1, min(settings.max_seqs, (settings.kv_budget_mb << 20) // max(per_seq, 1)))


def default_threads(settings: Settings) -> int:
    """RYZ_THREADS, else every physical core this process may run on."""
    return settings.threads or physical_cores()


def open_model(
    path: str | Path,
    purpose: str = "serve",
    *,
    settings: Settings | None = None,
    library: Library | None = None,
    threads: int | None = None,
    max_seqs: int | None = None,
    max_positions: int | None = None,
    kv_type: str | None = None,
    token_tile: int | None = None,
) -> NativeModel:
    """The model at `path` loaded for `purpose` (see the module docstring); any keyword given wins over the
    purpose's default. `library` defaults to the kernel build for this CPU (built on first use)."""
    if purpose not in PURPOSES:
        raise ValueError(f"unknown purpose {purpose!r}; choose one of {', '.join(PURPOSES)}")
    settings = settings or get_settings()
    library = library or load_library(settings)
    file = ModelFile(path)
    hp = file.hparams
    parity = purpose == "parity"
    kv_type = kv_type or ("f32" if parity else "f16")
    if kv_type not in KV_TYPES:
        raise ValueError(f"unknown KV cache type {kv_type!r}; choose one of {', '.join(KV_TYPES)}")
    if threads is None:
        threads = 1 if parity else default_threads(settings)
    if max_seqs is None:
        max_seqs = slots_for_budget(settings, hp, kv_type) if purpose == "serve" else 1
    if max_positions is None and purpose == "serve":
        max_positions = settings.max_context
    if token_tile is None:
        token_tile = token_tile_for(library, TuneShape.from_hparams(hp))
    return NativeModel(
        path,
        library,
        threads=threads,
        max_seqs=max_seqs,
        max_positions=max_positions,
        kv_type=kv_type,
        token_tile=token_tile,
        file=file,
    )
