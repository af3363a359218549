"""This host, as the kernel build, the thread defaults and every benchmark record see it: CPU model and ISA flags,
cache sizes, physical cores, the CPUs this process may use, load, memory. One place, read from /proc and /sys.

`cpu_fingerprint()["fingerprint_id"]` covers what changes generated code (architecture, the ISA flags the kernels
use, cache sizes), so it keys kernel builds; core counts and the model name are recorded, not keyed.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
from pathlib import Path
from typing import Any

# /proc/cpuinfo flag -> our name, for the features the kernels (or their compiler flags) use.
_X86_FLAGS = {
    "avx2": "avx2",
    "fma": "fma",
    "f16c": "f16c",
    "avx512f": "avx512f",
    "avx512bw": "avx512bw",
    "avx512vl": "avx512vl",
    "avx512dq": "avx512dq",
    "avx512_vnni": "avx512vnni",
    "avx_vnni": "avxvnni",
    "avx512vbmi": "avx512vbmi",
    "amx_tile": "amxtile",  # the AMX family needs the tiles, their int8 products, and the OS's permission (run time)
    "amx_int8": "amxint8",
    "amx_bf16": "amxbf16",
}
_ARM_FLAGS = {"asimd": "neon", "asimddp": "asimddp", "asimdhp": "asimdhp", "fphp": "fphp"}


def _read(path: str | Path) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def _parse_size(text: str) -> int | None:
    """'48K' / '1024K' / '32M' (sysfs cache sizes) -> bytes."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMG]?)i?B?\s*", text or "", re.IGNORECASE)
    if not m:
        return None
    return int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[m.group(2).upper()]


def _cache_sizes() -> dict[str, int | None]:
    sizes: dict[str, int | None] = {"l1d": None, "l2": None, "l3": None}
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    for index in sorted(base.glob("index*")) if base.is_dir() else []:
        level, kind, size = (_read(index / f) for f in ("level", "type", "size"))
        if not (level and kind and size):
            continue
        name = {("1", "Data"): "l1d", ("2", "Unified"): "l2", ("3", "Unified"): "l3"}.get((level.strip(), kind.strip()))
        if name:
            sizes[name] = _parse_size(size)
    for name, conf in (
        ("l1d", "SC_LEVEL1_DCACHE_SIZE"),
        ("l2", "SC_LEVEL2_CACHE_SIZE"),
        ("l3", "SC_LEVEL3_CACHE_SIZE"),
    ):
        if sizes[name] is None and conf in os.sysconf_names:
            try:
                value = os.sysconf(conf)
            except (OSError, ValueError):
                value = 0
            sizes[name] = value if value and value > 0 else None
    return sizes


def _cpuinfo() -> tuple[dict[str, str], set[str], int | None]:
    """(first processor's fields, its flags, physical core count) from /proc/cpuinfo."""
    text = _read("/proc/cpuinfo") or ""
    first: dict[str, str] = {}
    cores: set[tuple[str, str]] = set()
    block: dict[str, str] = {}
    for line in text.splitlines() + [""]:
        if not line.strip():
            if block:
                first = first or block
                if "core id" in block:
                    cores.add((block.get("physical id", "0"), block["core id"]))
                block = {}
            continue
        key, _, value = line.partition(":")
        block[key.strip()] = value.strip()
    flags = set((first.get("flags") or first.get("Features") or "").split())
    return first, flags, len(cores) or None


def _physical_cores_sysfs() -> int | None:
    seen = set()
    for path in Path("/sys/devices/system/cpu").glob("cpu[0-9]*/topology/core_cpus_list"):
        seen.add((_read(path.parent / "physical_package_id") or "0").strip() + "/" + (_read(path) or "").strip())
    if not seen:
        for path in Path("/sys/devices/system/cpu").glob("cpu[0-9]*/topology/thread_siblings_list"):
            seen.add((_read(path) or "").strip())
    return len(seen) or None


def available_cpus() -> int:
    """Logical CPUs this process may run on (its affinity mask)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cpu_fingerprint() -> dict[str, Any]:
    """This CPU as the build and the autotuner see it; `fingerprint_id` covers what changes generated code."""
    info, raw_flags, cores = _cpuinfo()
    arch = platform.machine().lower()
    table = _ARM_FLAGS if arch in ("aarch64", "arm64") else _X86_FLAGS
    isa = {ours: theirs in raw_flags for theirs, ours in table.items()}
    logical = os.cpu_count() or 1
    physical = cores or _physical_cores_sysfs() or logical
    vendor = info.get("vendor_id") or info.get("CPU implementer") or platform.processor() or "unknown"
    model = info.get("model name") or info.get("Model") or info.get("CPU part") or platform.processor() or "unknown"
    fingerprint = {
        "arch": arch,
        "vendor": vendor,
        "model_name": model,
        "isa": isa,
        "cache": _cache_sizes(),
        "physical_cores": min(physical, logical),
        "logical_cpus": logical,
        "available_cpus": available_cpus(),
    }
    codegen = {"arch": arch, "isa": isa, "cache": fingerprint["cache"]}
    fingerprint["fingerprint_id"] = hashlib.sha256(
        json.dumps(codegen, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()[:16]
    return fingerprint


def physical_cores() -> int:
    """Physical cores this process can use (the default thread count)."""
    fp = cpu_fingerprint()
    return max(1, min(fp["physical_cores"], fp["available_cpus"]))


def loadavg() -> list[float] | None:
    """1/5/15-minute load averages: other work on a shared machine shows up here (noise in any timing)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info(fp: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a benchmark or evaluation record says about the machine it ran on (`fp`: a fingerprint the caller has
    already read)."""
    fp = fp or cpu_fingerprint()
    info: dict[str, Any] = {
        "kernel": platform.release(),
        "python": platform.python_version(),
        "arch": platform.machine(),
        "cpu": fp["model_name"],
        "logical_cpus": fp["logical_cpus"],
        "available_cpus": fp["available_cpus"],
        "physical_cores": fp["physical_cores"],
        "cache": fp["cache"],
        "isa_flags": sorted(k for k, v in fp["isa"].items() if v),
    }
    for line in (_read("/proc/meminfo") or "").splitlines():
        if line.startswith("MemTotal:"):
            info["ram_gb"] = round(int(line.split()[1]) / 1024**2, 1)
    return info
