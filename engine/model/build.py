"""The kernel build (DESIGN.md "Kernel build"): native/ compiled by CMake for this CPU, cached by key.

    key = sha256(source hash, CMake flags, compiler, CPU fingerprint id)[:16]
    $RYZ_HOME/cache/kernels/<key>/    libryz.so, ryz_native_tests, build.log, build.json (the manifest)

A build runs in a temporary directory next to the final one and is renamed into place only when complete,
under a per-key file lock, so a crashed build never looks finished and concurrent builders build once.
Every build proves itself before it is cached: the kernel self-test (engine/model/selftest.py) runs through the new
library's ABI; a build that fails it is rebuilt with the fall-back flags (FALLBACK_FLAGS, then without the failing
SIMD families) or refused with an error naming the kernel and the compiler, never cached as good.
`load_library` finds or builds the library for this CPU and applies RYZ_ISA; `autotune` times the tuning
knobs on a model's linear shapes and records the table and the winner in build.json.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.model import selftest
from engine.errors import BuildError, SchemaVersionError, ToolchainNotFoundError
from engine.fsutil import file_lock
from engine.settings import Settings, get_settings

if TYPE_CHECKING:
    from engine.model.native import Library
    from engine.model.shapes import Shape

SCHEMA = 1
NATIVE_DIR = Path(__file__).resolve().parents[2] / "native"
SOURCE_PARTS = ("CMakeLists.txt", "include", "src", "kernels", "tests")  # what the build reads
MIN_CMAKE = (3, 25)
COMPILERS = ("c++", "g++", "clang++")          # cmake's own search order, minus exotic names
LIBRARY_NAME = "libryz.dylib" if sys.platform == "darwin" else "libryz.so"
TESTS_NAME = "ryz_native_tests"
MANIFEST_NAME = "build.json"
INSTALL_HINT = "apt-get install g++ cmake (Debian/Ubuntu), dnf install gcc-c++ cmake (Fedora), or pip install cmake for CMake alone"

# /proc/cpuinfo flag -> our name, for the features the kernels (or their compiler flags) use.
_X86_FLAGS = {"avx2": "avx2", "fma": "fma", "f16c": "f16c", "avx512f": "avx512f", "avx512bw": "avx512bw",
              "avx512vl": "avx512vl", "avx512dq": "avx512dq", "avx512_vnni": "avx512vnni", "avx_vnni": "avxvnni"}
_ARM_FLAGS = {"asimd": "neon", "asimddp": "asimddp", "asimdhp": "asimdhp", "fphp": "fphp"}

Progress = Callable[[str], None]


def print_to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- CPU fingerprint ------------------------------------------------------------------------------

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
    for name, conf in (("l1d", "SC_LEVEL1_DCACHE_SIZE"), ("l2", "SC_LEVEL2_CACHE_SIZE"), ("l3", "SC_LEVEL3_CACHE_SIZE")):
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
    fingerprint["fingerprint_id"] = _digest(codegen)[:16]
    return fingerprint


def physical_cores() -> int:
    """Physical cores this process can use (the default thread count)."""
    fp = cpu_fingerprint()
    return max(1, min(fp["physical_cores"], fp["available_cpus"]))


# --- sources, toolchain, key ----------------------------------------------------------------------

def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _source_files(native_dir: Path) -> Iterator[Path]:
    for part in SOURCE_PARTS:
        path = native_dir / part
        if path.is_file():
            yield path
        elif path.is_dir():
            for dirpath, dirnames, filenames in os.walk(path):
                # build trees and editor/VCS leftovers never count as sources
                dirnames[:] = [d for d in dirnames if not (d.startswith((".", "build", "cmake-build")) or d == "__pycache__")]
                for name in filenames:
                    if not (name.startswith(".") or name.endswith(("~", ".swp", ".orig", ".rej", ".o", ".so"))):
                        yield Path(dirpath, name)


def source_hash(native_dir: str | Path | None = None) -> str:
    """sha256 over native/'s sources: sorted relative paths and contents (build dirs excluded)."""
    root = Path(native_dir) if native_dir else NATIVE_DIR
    if not (root / "CMakeLists.txt").is_file():
        raise BuildError(f"{root} is not the native source tree (no CMakeLists.txt); reinstall Ryzanstein from its source checkout")
    h = hashlib.sha256()
    for path in sorted(_source_files(root), key=lambda p: p.relative_to(root).as_posix()):
        data = path.read_bytes()
        h.update(f"{path.relative_to(root).as_posix()}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()


def _version_line(exe: str) -> str:
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ToolchainNotFoundError(f"cannot run {exe} --version ({exc}); install a working toolchain: {INSTALL_HINT}") from None
    lines = (out.stdout or out.stderr).strip().splitlines()
    return lines[0].strip() if lines else ""


def _cmake_version(line: str) -> tuple[int, ...]:
    m = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", line)
    return tuple(int(x) for x in m.groups(default="0")) if m else (0,)


def _find_cmake() -> tuple[str, str]:
    """(path, version line) of CMake >= 3.25: the system one first, else the `cmake` PyPI package's."""
    candidates = []
    if found := shutil.which("cmake"):
        candidates.append(found)
    try:
        import cmake as cmake_pkg  # the PyPI package ships a binary

        candidates.append(str(Path(cmake_pkg.CMAKE_BIN_DIR) / "cmake"))
    except (ImportError, AttributeError):
        pass
    seen = []
    for exe in candidates:
        if not Path(exe).is_file():
            continue
        line = _version_line(exe)
        seen.append(f"{exe}: {line or 'unknown version'}")
        if _cmake_version(line) >= MIN_CMAKE:
            return exe, line
    have = f" (found {'; '.join(seen)})" if seen else ""
    raise ToolchainNotFoundError(
        f"CMake >= {'.'.join(map(str, MIN_CMAKE))} is needed to build the native kernels{have}; "
        f"install it: {INSTALL_HINT}")


def _find_compiler(settings: Settings) -> str:
    names = [settings.cxx] if settings.cxx else list(COMPILERS)
    for name in names:
        if found := shutil.which(name):
            # absolute, but not through symlinks: clang++ -> clang-14 would drive the link as C, without libstdc++
            return os.path.abspath(found)
    if settings.cxx:
        raise ToolchainNotFoundError(f"RYZ_CXX={settings.cxx!r} is not an executable on PATH; fix RYZ_CXX or unset it to use c++/g++/clang++")
    raise ToolchainNotFoundError(
        f"no C++ compiler found (looked for {', '.join(COMPILERS)} on PATH) to build the native kernels; install one: {INSTALL_HINT}")


def _compiler(settings: Settings) -> dict[str, str]:
    cxx = _find_compiler(settings)
    return {"cxx": cxx, "cxx_version": _version_line(cxx)}


def compiler_info(settings: Settings | None = None) -> dict[str, str]:
    """The C++ compiler (passed to CMake explicitly, so the key names what really compiles) and CMake."""
    cmake, cmake_line = _find_cmake()
    return {**_compiler(settings or get_settings()), "cmake": cmake, "cmake_version": ".".join(map(str, _cmake_version(cmake_line)))}


def build_flags(source: str, sanitize: bool = False) -> list[str]:
    """The CMake cache entries of a host build (RYZ_SOURCE_HASH is recorded in the library). The test
    executable finds libryz.so next to itself ($ORIGIN), so the build directory can be moved or copied."""
    return ["-DCMAKE_BUILD_TYPE=Release", f"-DRYZ_SOURCE_HASH={source}", "-DRYZ_BUILD_TESTS=ON",
            f"-DRYZ_SANITIZE={'ON' if sanitize else 'OFF'}", "-DCMAKE_BUILD_WITH_INSTALL_RPATH=ON", "-DCMAKE_INSTALL_RPATH=$ORIGIN"]


def build_key(flags: list[str], source: str, compiler: dict[str, str], fingerprint_id: str) -> str:
    """sha256(sources, flags, compiler, CPU fingerprint)[:16]: equal keys build identical libraries."""
    return _digest({"source_hash": source, "flags": flags, "cxx": compiler["cxx"], "cxx_version": compiler["cxx_version"],
                    "fingerprint_id": fingerprint_id})[:16]


# --- the build ------------------------------------------------------------------------------------

@dataclass
class KernelBuild:
    """A finished kernel build: its directory, library, key and manifest."""

    path: Path              # the shared library
    key: str
    manifest: dict
    cache_hit: bool

    @property
    def directory(self) -> Path:
        return self.path.parent

    @property
    def tests_executable(self) -> Path | None:
        name = self.manifest.get("tests_executable")
        return self.directory / name if name else None


@dataclass(frozen=True)
class BuildPlan:
    key: str
    directory: Path
    flags: list[str]
    source_hash: str
    compiler: dict[str, str]     # cxx, cxx_version (CMake is found at build time: it does not change the output)
    fingerprint: dict[str, Any]
    native_dir: Path


def kernels_dir(settings: Settings | None = None) -> Path:
    return (settings or get_settings()).cache_dir / "kernels"


def plan_build(settings: Settings | None = None, native_dir: str | Path | None = None, sanitize: bool = False) -> BuildPlan:
    """What a build of these sources for this CPU would be called and where it lives (nothing is run but --version)."""
    settings = settings or get_settings()
    root = Path(native_dir).resolve() if native_dir else NATIVE_DIR
    source = source_hash(root)
    compiler = _compiler(settings)
    fingerprint = cpu_fingerprint()
    flags = build_flags(source, sanitize)
    key = build_key(flags, source, compiler, fingerprint["fingerprint_id"])
    return BuildPlan(key, kernels_dir(settings) / key, flags, source, compiler, fingerprint, root)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(directory: Path) -> dict | None:
    """The build manifest in `directory`, or None when absent or unreadable (an incomplete build)."""
    try:
        manifest = json.loads((directory / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("schema") != SCHEMA:
        raise SchemaVersionError(f"{directory / MANIFEST_NAME} has schema {manifest.get('schema')!r}; this Ryzanstein reads "
                                 f"schema {SCHEMA}: upgrade Ryzanstein or rebuild with `ryz build-kernels --force`")
    return manifest


def _complete(directory: Path) -> dict | None:
    """The manifest if `directory` holds a complete, intact build that passed its self-test."""
    manifest = read_manifest(directory)
    if manifest is None or not (manifest.get("self_test") or {}).get("passed"):
        return None
    lib = directory / manifest.get("library", {}).get("file", LIBRARY_NAME)
    if not lib.is_file() or _sha256_file(lib) != manifest.get("library", {}).get("sha256"):
        return None
    return manifest


def _locked(directory: Path):
    """Exclusive per-key lock."""
    return file_lock(directory.parent / ".locks" / f"{directory.name}.lock")


def _write_json_atomic(path: Path, doc: dict) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        tmp.write_text(json.dumps(doc, indent=2) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _run(cmd: list[str], log, cwd: Path | None = None) -> None:
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    proc = subprocess.run(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, cmd)


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _compile(plan: BuildPlan, work: Path, progress: Progress, extra_flags: list[str]) -> dict:
    """Configure and build into `work` with the plan's flags plus `extra_flags`; copy the outputs there; return the
    manifest (without self-test and autotune). Each attempt appends to build.log."""
    tree = work / "cmake-build"
    shutil.rmtree(tree, ignore_errors=True)
    log_path = work / "build.log"
    cmake, cmake_line = _find_cmake()
    cmake_version = ".".join(map(str, _cmake_version(cmake_line)))
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    jobs = available_cpus()
    start = time.perf_counter()
    with open(log_path, "a") as log:
        try:
            progress(f"configuring (cmake {cmake_version}, {plan.compiler['cxx_version']}{', ' if extra_flags else ''}"
                     f"{' '.join(extra_flags)})")
            _run([cmake, "-S", str(plan.native_dir), "-B", str(tree), *generator,
                  f"-DCMAKE_CXX_COMPILER={plan.compiler['cxx']}", *plan.flags, *extra_flags], log)
            progress(f"compiling with {jobs} jobs")
            _run([cmake, "--build", str(tree), "-j", str(jobs)], log)
        except subprocess.CalledProcessError as exc:
            step = "configure" if exc.cmd[1] == "-S" else "build"
            keep = plan.directory.parent / f"failed-{plan.key}.log"
            shutil.copyfile(log_path, keep)
            raise BuildError(f"native kernel {step} failed (exit {exc.returncode}); last lines:\n{_tail(log_path)}\n"
                             f"full log: {keep}") from None
    seconds = time.perf_counter() - start
    lib = tree / LIBRARY_NAME
    if not lib.is_file():
        raise BuildError(f"cmake finished but produced no {LIBRARY_NAME} in {tree}; see {log_path}")
    shutil.copy2(lib, work / LIBRARY_NAME)
    tests = tree / TESTS_NAME
    (work / TESTS_NAME).unlink(missing_ok=True)
    if tests.is_file():
        shutil.copy2(tests, work / TESTS_NAME)
    shutil.rmtree(tree, ignore_errors=True)
    return {
        "schema": SCHEMA,
        "kind": "kernel-build",
        "key": plan.key,
        "source_hash": plan.source_hash,
        "flags": plan.flags,
        "extra_flags": extra_flags,
        "compiler": {"path": plan.compiler["cxx"], "version": plan.compiler["cxx_version"]},
        "cmake": {"path": cmake, "version": cmake_version,
                  "generator": "Ninja" if generator else "default"},
        "fingerprint": plan.fingerprint,
        "library": {"file": LIBRARY_NAME, "sha256": _sha256_file(work / LIBRARY_NAME), "size": (work / LIBRARY_NAME).stat().st_size},
        "tests_executable": TESTS_NAME if (work / TESTS_NAME).is_file() else None,
        "build_seconds": round(seconds, 2),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "autotune": {},
    }


FALLBACK_FLAGS = ["-DRYZ_CONSERVATIVE=ON"]  # -O2, no auto-vectorization anywhere (native/CMakeLists.txt)


def _prove(library: Path, sanitize: bool) -> dict:
    """The self-test of a fresh build. A sanitizer build cannot be loaded into an uninstrumented Python, so it runs
    its own test executable (the full kernel suite, linked with the sanitizer runtime) instead."""
    if not sanitize:
        return selftest.run_self_test(library)
    tests = library.parent / TESTS_NAME
    if not tests.is_file():
        return {"passed": False, "families": {}, "failures": [f"a sanitizer build needs {TESTS_NAME} to prove itself"],
                "seconds": None}
    start = time.perf_counter()
    env = {**os.environ, "ASAN_OPTIONS": "detect_leaks=1:halt_on_error=1", "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1"}
    try:
        proc = subprocess.run([str(tests)], capture_output=True, text=True, timeout=selftest.TIMEOUT_S * 3, env=env)
        ok, out = proc.returncode == 0, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired:
        ok, out = False, f"{TESTS_NAME} did not finish"
    failures = [line for line in out.splitlines() if line.startswith("FAIL") or "runtime error" in line or "ERROR" in line]
    return {"passed": ok, "suite": TESTS_NAME, "families": {}, "failures": failures[:8] or ([] if ok else [out.strip()[-600:]]),
            "seconds": round(time.perf_counter() - start, 3)}


def _compile_proven(plan: BuildPlan, work: Path, progress: Progress, sanitize: bool) -> dict:
    """Compile and self-test; on failure compile again with the fall-back flags, then also without the SIMD
    families that still fail. Returns the manifest of the first build that passes (with "self_test" and, when a
    fall-back was needed, "fallback": the flags added and why); raises BuildError when none does."""
    extra: list[str] = []
    attempts: list[dict] = []
    seconds = 0.0
    while True:
        manifest = _compile(plan, work, progress, extra)
        seconds += manifest["build_seconds"]
        result = _prove(work / LIBRARY_NAME, sanitize)
        attempts.append({"extra_flags": list(extra), "passed": result["passed"], "failures": result["failures"]})
        if result["passed"]:
            break
        failing = selftest.failing_families(result)
        progress(f"kernel self-test FAILED ({' '.join(extra) or 'standard flags'}): {'; '.join(result['failures'][:2])}")
        if not extra:
            extra = list(FALLBACK_FLAGS)
        elif failing and "scalar" not in failing and len(attempts) == 2:
            extra = [*extra, f"-DRYZ_DISABLE_FAMILIES={';'.join(failing)}"]
        else:
            keep = plan.directory.parent / f"failed-{plan.key}.log"
            shutil.copyfile(work / "build.log", keep)
            tried = "; ".join(" ".join(a["extra_flags"]) or "standard flags" for a in attempts)
            raise BuildError(
                f"the native kernels built by {plan.compiler['cxx']} ({plan.compiler['cxx_version']}) fail their self-test "
                f"with every flag set tried ({tried}), so they are not used. First failures:\n  "
                + "\n  ".join(result["failures"][:6])
                + f"\nThis is a compiler or kernel bug: try another compiler (RYZ_CXX=clang++ or RYZ_CXX=g++-13) and report it "
                  f"with the build log {keep}")
    manifest["build_seconds"] = round(seconds, 2)  # every attempt's compile time
    manifest["self_test"] = result
    manifest["fallback"] = None if not extra else {
        "extra_flags": extra, "attempts": attempts,
        "reason": f"self-test failed with {' '.join(attempts[-2]['extra_flags']) or 'the standard flags'}: "
                  f"{'; '.join(attempts[-2]['failures'][:2])}"}
    if extra:
        progress(f"kernel build uses the fall-back flags {' '.join(extra)} ({manifest['fallback']['reason']})")
    return manifest


def build_kernels(force: bool = False, progress: Progress = print_to_stderr, settings: Settings | None = None,
                  native_dir: str | Path | None = None, sanitize: bool = False) -> KernelBuild:
    """The kernel build for these sources, flags, compiler and CPU: from the cache, or built now.

    A complete build directory (build.json plus the library it names, hash-checked, with a passed self-test) is a
    cache hit and runs no cmake; `force` rebuilds it. A new build is self-tested before it is cached (see
    `_compile_proven`). Raises ToolchainNotFoundError without a compiler or CMake, BuildError when the build fails
    or no flag set passes the self-test (its log is kept)."""
    plan = plan_build(settings, native_dir, sanitize)
    if not force and (manifest := _complete(plan.directory)):
        return KernelBuild(plan.directory / manifest["library"]["file"], plan.key, manifest, cache_hit=True)
    plan.directory.parent.mkdir(parents=True, exist_ok=True)
    with _locked(plan.directory):
        if not force and (manifest := _complete(plan.directory)):  # another process built it while we waited
            return KernelBuild(plan.directory / manifest["library"]["file"], plan.key, manifest, cache_hit=True)
        for stale in [*plan.directory.parent.glob(f".tmp-{plan.key}-*"), *plan.directory.parent.glob(f".old-{plan.key}-*")]:
            shutil.rmtree(stale, ignore_errors=True)  # left by a builder that crashed (we hold its lock now)
        work = Path(tempfile.mkdtemp(prefix=f".tmp-{plan.key}-", dir=plan.directory.parent))
        try:
            manifest = _compile_proven(plan, work, progress, sanitize)
            _write_json_atomic(work / MANIFEST_NAME, manifest)
            os.chmod(work, 0o755)  # mkdtemp made it private; the cache is as readable as its parent
            old = None
            if plan.directory.exists():  # forced or stale: move aside, never delete under a running reader
                old = plan.directory.with_name(f".old-{plan.key}-{secrets.token_hex(4)}")
                os.replace(plan.directory, old)
            os.replace(work, plan.directory)
            if old:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            if work.exists():
                shutil.rmtree(work, ignore_errors=True)
        (plan.directory.parent / f"failed-{plan.key}.log").unlink(missing_ok=True)
    progress(f"built native kernels {plan.key} in {manifest['build_seconds']:.1f} s, self-test passed "
             f"({', '.join(manifest['self_test']['families']) or manifest['self_test'].get('suite')}): {plan.directory}")
    return KernelBuild(plan.directory / LIBRARY_NAME, plan.key, manifest, cache_hit=False)


def _scan_compatible(settings: Settings, root: Path) -> KernelBuild | None:
    """Without a compiler the key cannot be computed: accept any complete build of the same sources and
    flags for this CPU fingerprint (e.g. one shipped in a serving bundle), newest first."""
    source, fingerprint_id = source_hash(root), cpu_fingerprint()["fingerprint_id"]
    flags = build_flags(source)
    found = []
    for directory in kernels_dir(settings).glob("*/"):
        try:
            manifest = _complete(directory)
        except SchemaVersionError:
            continue
        if (manifest and manifest["source_hash"] == source and manifest["flags"] == flags
                and manifest["fingerprint"]["fingerprint_id"] == fingerprint_id):
            found.append((manifest["created"], directory, manifest))
    if not found:
        return None
    _, directory, manifest = max(found, key=lambda f: f[0])
    return KernelBuild(directory / manifest["library"]["file"], manifest["key"], manifest, cache_hit=True)


def find_build(settings: Settings | None = None, native_dir: str | Path | None = None) -> KernelBuild | None:
    """The cached build for this CPU and these sources, or None (never builds)."""
    settings = settings or get_settings()
    try:
        plan = plan_build(settings, native_dir)
    except ToolchainNotFoundError:
        return _scan_compatible(settings, Path(native_dir).resolve() if native_dir else NATIVE_DIR)
    manifest = _complete(plan.directory)
    if manifest is None:
        return None
    return KernelBuild(plan.directory / manifest["library"]["file"], plan.key, manifest, cache_hit=True)


_LOADED: dict[Path, Library] = {}          # library path -> the loaded handle (a library loads once per process)
_RESOLVED: dict[tuple[Path, Path], KernelBuild] = {}   # (kernels dir, native dir) -> the build in use


def current_build(settings: Settings | None = None, native_dir: str | Path | None = None) -> KernelBuild | None:
    """The build `load_library` loaded in this process for these settings, if any."""
    settings = settings or get_settings()
    return _RESOLVED.get((kernels_dir(settings), Path(native_dir).resolve() if native_dir else NATIVE_DIR))


def load_library(settings: Settings | None = None, build_if_missing: bool = True, native_dir: str | Path | None = None,
                 progress: Progress = print_to_stderr) -> Library:
    """The native library for this CPU (built on first use), with RYZ_ISA applied; loaded once per process.

    Raises BuildError when there is no build and `build_if_missing` is false, ToolchainNotFoundError when one
    must be built and no compiler or CMake is installed, NativeError when RYZ_ISA names an ISA this CPU lacks."""
    from engine.model.native import Library

    settings = settings or get_settings()
    memo = (kernels_dir(settings), Path(native_dir).resolve() if native_dir else NATIVE_DIR)
    build = _RESOLVED.get(memo) or find_build(settings, native_dir)
    if build is None:
        if not build_if_missing:
            raise BuildError("no native kernel build for this CPU and these sources; run `ryz build-kernels`")
        progress("building native kernels for this CPU (first use, ~30 s)...")
        build = build_kernels(progress=progress, settings=settings, native_dir=native_dir)
    library = _LOADED.get(build.path)
    if library is None:
        library = Library(build.path)
        built_from = (library.lib.ryz_source_hash() or b"").decode()
        if built_from != build.manifest["source_hash"]:
            raise BuildError(f"{build.path} reports sources {built_from[:16]!r}, its manifest {build.manifest['source_hash'][:16]!r}; "
                             "rebuild with `ryz build-kernels --force`")
        _LOADED[build.path] = library
    _RESOLVED[memo] = build
    library.set_isa(settings.isa)
    return library


# --- autotune -------------------------------------------------------------------------------------

TOKEN_TILES = (1, 2, 3, 4, 5, 6)  # the kernels cap the tile at 6 (x86) or 4 (NEON)
DEFAULT_TOKEN_TILE = 6      # native/src/forward.cpp passes 0 -> the kernel family default (6 on AVX-512)
DECODE_TOKENS = 1
PREFILL_TOKENS = 64
TUNE_VOCAB = 256            # the synthetic model's vocabulary: the head must not dominate the timing
MAX_TUNE_LAYERS = 16


@dataclass(frozen=True)
class TuneShape:
    """The dimensions that decide a model's ternary linear shapes."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    layers: int = 0     # the model's layer count (0: unknown); decides how many the sweep runs, not the signature

    @property
    def signature(self) -> str:
        return f"h{self.hidden}-q{self.heads}x{self.head_dim}-kv{self.kv_heads}-ffn{self.ffn}"

    def linears(self) -> dict[str, tuple[int, int]]:
        """GGUF stem -> (rows, cols) of one layer's ternary linears."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {"attn_q": (q, self.hidden), "attn_k": (kv, self.hidden), "attn_v": (kv, self.hidden),
                "attn_output": (self.hidden, q), "ffn_gate": (self.ffn, self.hidden), "ffn_up": (self.ffn, self.hidden),
                "ffn_down": (self.hidden, self.ffn)}

    @classmethod
    def from_shape(cls, shape: Shape) -> TuneShape:
        return cls(shape.hidden, shape.heads, shape.kv_heads, shape.hidden // shape.heads, shape.ffn, shape.layers)

    @classmethod
    def from_gguf(cls, path: str | Path) -> TuneShape:
        from engine.model.ggufio import ModelFile

        hp = ModelFile(path).hparams
        return cls(hp.hidden, hp.heads, hp.kv_heads, hp.head_dim, hp.ffn, hp.layers)


def _tune_shape(model: str | Path | TuneShape | Shape | None) -> tuple[TuneShape, str]:
    from engine.model.shapes import Shape, get_shape

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


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _random_codes(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    return (rng.integers(0, 3, size=(rows, cols), dtype=np.int8) - 1).astype(np.int8)


def write_tuning_model(path: str | Path, shape: TuneShape, layers: int = 1, seed: int = 0) -> Path:
    """A random GGUF with `shape`'s linears (every layer the same weights) and a tiny vocabulary: what the knob
    sweep runs."""
    import gguf

    from engine.model import quants
    from engine.model.ggufio import Hyperparams, add_hyperparams, tensor_name

    rng = np.random.default_rng(seed)
    hp = Hyperparams(hidden=shape.hidden, layers=layers, heads=shape.heads, kv_heads=shape.kv_heads, head_dim=shape.head_dim,
                     ffn=shape.ffn, vocab=TUNE_VOCAB, context=PREFILL_TOKENS * 2, rope_theta=500000.0, rms_eps=1e-5,
                     ffn_act="relu2", sub_norms=True, tied=True)
    path = Path(path)
    writer = gguf.GGUFWriter(path, hp.arch)
    add_hyperparams(writer, hp)

    def add(name: str, data: np.ndarray, qtype: str) -> None:
        writer.add_tensor(name, data, raw_dtype=None if qtype == "f32" else quants.ggml_type(qtype))

    embd = rng.standard_normal((hp.vocab, hp.hidden), dtype=np.float32) * 0.02
    add("token_embd.weight", quants.quantize(embd, "q8_0").view(np.uint8).reshape(hp.vocab, -1), "q8_0")
    add("output_norm.weight", np.ones(hp.hidden, np.float32), "f32")
    norms = {"attn_norm": hp.hidden, "ffn_norm": hp.hidden, "attn_sub_norm": hp.heads * hp.head_dim, "ffn_sub_norm": hp.ffn}
    linears = {stem: quants.pack_ternary(_random_codes(rng, rows, cols), "tq2_0") for stem, (rows, cols) in shape.linears().items()}
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
    from engine.model import quants

    groups: dict[tuple[int, int], list[str]] = {}
    for stem, dims in shape.linears().items():
        groups.setdefault(dims, []).append(stem)
    rows_out = []
    for (rows, cols), stems in groups.items():
        packed = library.ternary_pack(quants.pack_ternary(_random_codes(rng, rows, cols), "tq2_0"), "tq2_0", rows, cols)
        for n in (DECODE_TOKENS, PREFILL_TOKENS):
            if clock.expired:
                clock.truncated = True
                return rows_out
            act = rng.integers(-127, 128, size=(n, cols), dtype=np.int8)
            median, best, repeats = clock.measure(lambda: library.ternary_gemm(packed, rows, cols, act))
            rows_out.append({"linears": stems, "rows": rows, "cols": cols, "n_tokens": n, "threads": 1,
                             "median_us": round(median * 1e6, 1), "min_us": round(best * 1e6, 1), "repeats": repeats,
                             "gbps": round(packed.nbytes / median / 1e9, 3), "gmacs": round(rows * cols * n / median / 1e9, 3)})
    return rows_out


def _layer_bytes(library: Library, shape: TuneShape) -> int:
    """Packed ternary bytes one layer's linears occupy (what decode reads per layer)."""
    return sum(int(library.lib.ryz_ternary_packed_bytes(r, c)) for r, c in shape.linears().values())


def _knob_table(library: Library, shape: TuneShape, layers: int, thread_counts: list[int], clock: _Clock,
                rng: np.random.Generator, work: Path) -> list[dict]:
    """A synthetic model's forward (NativeModel.forward_batch) per (threads, token tile) at 64 tokens, and at
    1 token per thread count (the tile cannot matter for one token), in time per layer. Most threads first:
    if the budget runs out, the configurations a server would use are the ones measured."""
    from engine.model.native import NativeModel

    layer_bytes = _layer_bytes(library, shape)
    layer_macs = sum(r * c for r, c in shape.linears().values())
    model_path = write_tuning_model(work / "tune.gguf", shape, layers)
    tokens = rng.integers(0, TUNE_VOCAB, size=PREFILL_TOKENS, dtype=np.int32)
    tiles = [DEFAULT_TOKEN_TILE] + [t for t in TOKEN_TILES if t != DEFAULT_TOKEN_TILE]
    out = []
    for threads in sorted(thread_counts, reverse=True):
        for tile in tiles:
            if clock.expired:
                clock.truncated = True
                return out
            # the tile is a context setting: one model per (threads, tile), closed before the next so no idle
            # pool spins beside the one being timed; loading and repacking take milliseconds
            model = NativeModel(model_path, library, threads=threads, max_seqs=1, max_positions=PREFILL_TOKENS * 2,
                                kv_type="f16", token_tile=tile)
            try:
                for n in ((DECODE_TOKENS, PREFILL_TOKENS) if tile == DEFAULT_TOKEN_TILE else (PREFILL_TOKENS,)):
                    batch, seqs = tokens[:n], np.zeros(n, np.int32)
                    median, best, repeats = clock.measure(lambda: model.forward_batch(batch, seqs), setup=lambda: model.new_cache(0))
                    median, best = median / layers, best / layers
                    out.append({"phase": "decode" if n == DECODE_TOKENS else "prefill", "n_tokens": n, "threads": threads,
                                "gemm_token_tile": tile if n > 1 else None, "median_us": round(median * 1e6, 1),
                                "min_us": round(best * 1e6, 1), "repeats": repeats, "gbps": round(layer_bytes / median / 1e9, 3),
                                "gmacs": round(layer_macs * n / median / 1e9, 3)})
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
        winner.update(gemm_token_tile=best["gemm_token_tile"], threads_prefill=best["threads"],
                      prefill_layer_us=best["median_us"], prefill_gmacs=best["gmacs"])
    return winner


def autotune(library: Library, model: str | Path | TuneShape | Shape | None = None, threads: int | None = None, *,
             budget_s: float = 30.0, record: bool = True, progress: Progress = print_to_stderr, seed: int = 0) -> dict:
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
    entry = {
        "signature": shape.signature,
        "shape": {"hidden": shape.hidden, "heads": shape.heads, "kv_heads": shape.kv_heads, "head_dim": shape.head_dim, "ffn": shape.ffn},
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
        "loadavg": _loadavg(),  # other work on the machine shows up here: rerun on a quiet one if high
        "seconds": round(time.perf_counter() - start, 2),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if record and (library.path.parent / MANIFEST_NAME).is_file():
        record_autotune(library.path.parent, entry)
    w = entry["winner"]
    progress(f"autotune winner: token tile {w.get('gemm_token_tile')}, threads decode {w.get('threads_decode')} / "
             f"prefill {w.get('threads_prefill')} ({entry['seconds']:.1f} s{', truncated' if truncated else ''})")
    return entry


def autotune_key(signature: str, isa: str) -> str:
    return f"{signature}/{isa}"


def record_autotune(directory: Path, entry: dict) -> dict:
    """Add `entry` to build.json's "autotune" under signature/ISA (other entries are kept); returns the manifest."""
    with _locked(directory):
        manifest = read_manifest(directory)
        if manifest is None:
            raise BuildError(f"{directory} holds no build manifest; run `ryz build-kernels`")
        manifest.setdefault("autotune", {})[autotune_key(entry["signature"], entry["isa"])] = entry
        _write_json_atomic(directory / MANIFEST_NAME, manifest)
    return manifest


def token_tile_for(library, model_path: str | Path) -> int:
    """The autotuned GEMM token tile recorded in `library`'s build for this model's shape; 0 (the kernel default)
    when the build was not tuned on it."""
    try:
        manifest = read_manifest(Path(library.path).parent)
        return int(((tuned_parameters(manifest, model_path, library.isa) if manifest else None) or {}).get("gemm_token_tile") or 0)
    except Exception:  # noqa: BLE001 - tuning is optional
        return 0


def tuned_parameters(manifest: dict, model: str | Path | TuneShape | Shape, isa: str) -> dict | None:
    """The recorded autotune winner for this model's shape and ISA, or None (engine defaults apply)."""
    shape, _ = _tune_shape(model)
    entry = manifest.get("autotune", {}).get(autotune_key(shape.signature, isa))
    return entry["winner"] if entry else None
