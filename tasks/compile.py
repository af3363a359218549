"""Prefect tasks for the kernel build: detect the CPU, compile native/ for it, autotune on a model."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import CacheKeyFnPolicy

from engine import host
from engine.errors import RyzError
from engine.model import build
from engine.model.autotune import autotune, recorded_entry


def _build_cache_key(context: Any, parameters: dict[str, Any]) -> str | None:
    """The build key, the library's hash and its path while that build is on disk; None (run the task) when
    it is missing, forced, or cannot be planned, so a cached result never names a deleted library."""
    if parameters.get("force"):
        return None
    try:
        cached = build.find_build()
    except RyzError:
        return None
    if cached is None:
        return None
    where = hashlib.sha256(str(cached.path).encode()).hexdigest()[:8]  # the result is the path: key it too
    return f"ryz-kernel-build-{cached.key}-{cached.manifest['library']['sha256'][:16]}-{where}"


@task(name="detect-cpu")
def detect_cpu() -> dict:
    """Fingerprint this CPU: ISA flags, caches, cores and the id that keys kernel builds."""
    fingerprint = host.cpu_fingerprint()
    get_run_logger().info(
        "CPU %s (%s), %d cores, fingerprint %s",
        fingerprint["model_name"],
        fingerprint["arch"],
        fingerprint["physical_cores"],
        fingerprint["fingerprint_id"],
    )
    return fingerprint


@task(name="compile-kernels", cache_policy=CacheKeyFnPolicy(cache_key_fn=_build_cache_key))
def compile_kernels(force: bool = False) -> str:
    """Build the native kernels for this CPU (a cached build is reused) and return the library path. A new build
    passes the kernel self-test before it is cached, or falls back to safer flags, or fails (engine/model/build.py).

    Args:
        force: rebuild even if a build with the same key exists.

    Returns:
        The path of libryz.so; its directory name is the build key.

    Example:
        >>> path = compile_kernels()          # ~/.ryzanstein/cache/kernels/<key>/libryz.so
    """
    logger = get_run_logger()
    result = build.build_kernels(force=force, progress=logger.info)
    logger.info(
        "kernel build %s (%s): %s",
        result.key,
        "cache hit" if result.cache_hit else f"built in {result.manifest['build_seconds']:.1f} s",
        result.path,
    )
    families = result.manifest["self_test"]["families"]
    logger.info(
        "kernel self-test passed: %s", ", ".join(f"{isa} ({r['checks']} checks)" for isa, r in families.items())
    )
    if fallback := result.manifest.get("fallback"):
        logger.warning(
            "kernel build needed the fall-back flags %s: %s", " ".join(fallback["extra_flags"]), fallback["reason"]
        )
    return str(result.path)


@task(name="autotune-kernels")
def autotune_kernels(model_artifact_path: str) -> dict:
    """Sweep the tuning knobs on a model's linear shapes; record and return the winner. A build already tuned on
    this shape (a complete sweep in its build.json) is not swept again: `ryz build-kernels --model` re-tunes.

    Args:
        model_artifact_path: local path of the model's GGUF (e.g. `store.local_path(artifact_id)`).

    Returns:
        {"build_key", "signature", "isa", "winner", "truncated", "seconds", "reused"}; the whole table is in
        build.json; seconds is the sweep's (the recorded one's when reused).
    """
    logger = get_run_logger()
    library = build.load_library(progress=logger.info)
    manifest = build.read_manifest(library.path.parent) or {}
    entry = recorded_entry(manifest, Path(model_artifact_path), library.isa)
    reused = entry is not None and not entry["truncated"]
    if entry is None or not reused:
        entry = autotune(library, Path(model_artifact_path), progress=logger.info)
    logger.info(
        "autotune %s on %s: %s%s", entry["signature"], entry["isa"], entry["winner"], " (recorded)" if reused else ""
    )
    return {
        "reused": reused,
        "build_key": library.path.parent.name,
        "signature": entry["signature"],
        "isa": entry["isa"],
        "winner": entry["winner"],
        "truncated": entry["truncated"],
        "seconds": entry["seconds"],
    }
