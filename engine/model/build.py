"""The kernel build (DESIGN.md "Kernel build"): native/ compiled by CMake for this CPU, cached by key.

native/ is the checkout's, or in a wheel or sdist install the same files as the `ryz_native` package
(`native_source_dir`): the same bytes hash to the same source hash, hence the same key, from either place.

    key = sha256(source hash, CMake flags, compiler, CPU fingerprint id)[:16]
    $RYZ_HOME/cache/kernels/<key>/    libryz.so, ryz_native_tests, build.log, build.json (the manifest)

A build runs in a temporary directory next to the final one and is renamed into place only when complete,
under a per-key file lock, so a crashed build never looks finished and concurrent builders build once.
Every build proves itself before it is cached: the kernel self-test (engine/model/selftest.py) runs through the new
library's ABI; a build that fails it is rebuilt with the fall-back flags (FALLBACK_FLAGS, then without the failing
SIMD families) or refused with an error naming the kernel and the compiler, never cached as good.
`load_library` finds or builds the library for this CPU and applies RYZ_ISA. Autotune (engine/model/autotune.py)
records its table and winner in the same build.json.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from engine.errors import BuildError, SchemaVersionError, ToolchainNotFoundError
from engine.fsutil import atomic_directory, file_lock
from engine.host import available_cpus, cpu_fingerprint
from engine.model import selftest
from engine.model.native import Library
from engine.settings import Settings, get_settings

SCHEMA = 1
CHECKOUT_NATIVE_DIR = Path(__file__).resolve().parents[2] / "native"  # a source checkout or an editable install
NATIVE_PACKAGE = "ryz_native"  # native/ in a wheel or sdist install (pyproject.toml maps the package to native/)
SOURCE_PARTS = ("CMakeLists.txt", "include", "src", "kernels", "tests")  # what the build reads
MIN_CMAKE = (3, 25)
COMPILERS = ("c++", "g++", "clang++")  # cmake's own search order, minus exotic names
LIBRARY_NAME = "libryz.dylib" if sys.platform == "darwin" else "libryz.so"
TESTS_NAME = "ryz_native_tests"
MANIFEST_NAME = "build.json"
INSTALL_HINT = (
    "apt-get install g++ cmake (Debian/Ubuntu), dnf install gcc-c++ cmake (Fedora), or pip install cmake for CMake "
    "alone"
)

Progress = Callable[[str], None]


def print_to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- sources, toolchain, key ----------------------------------------------------------------------


def _is_native_tree(path: Path) -> bool:
    return (path / "CMakeLists.txt").is_file() and (path / "include" / "ryz.h").is_file()


def native_source_dir() -> Path:
    """The native/ source tree the kernel build compiles and hashes: the checkout's when this engine runs from one
    (a source checkout or an editable install), else the installed `ryz_native` package (a wheel or sdist install).
    Raises BuildError naming both places when neither holds the sources."""
    if _is_native_tree(CHECKOUT_NATIVE_DIR):
        return CHECKOUT_NATIVE_DIR
    try:
        spec = importlib.util.find_spec(NATIVE_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = [Path(p) for p in spec.submodule_search_locations or []] if spec else []
    for location in locations:
        if _is_native_tree(location):
            return location.resolve()
    installed = ", ".join(map(str, locations)) or "not installed"
    raise BuildError(
        f"the native kernel sources are in neither the source checkout ({CHECKOUT_NATIVE_DIR}) nor the installed "
        f"`{NATIVE_PACKAGE}` package ({installed}); reinstall Ryzanstein: pip install of its wheel or sdist, or "
        "pip install -e of a checkout"
    )


try:  # for importers that copy the sources (engine/artifacts/bundle.py); the build calls native_source_dir() itself
    NATIVE_DIR = native_source_dir()
except BuildError:
    NATIVE_DIR = CHECKOUT_NATIVE_DIR  # neither place holds them: a build that needs them says so, naming both


def _native_root(native_dir: str | Path | None) -> Path:
    return Path(native_dir).resolve() if native_dir else native_source_dir()


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
                dirnames[:] = [
                    d for d in dirnames if not (d.startswith((".", "build", "cmake-build")) or d == "__pycache__")
                ]
                for name in filenames:
                    if not (name.startswith(".") or name.endswith(("~", ".swp", ".orig", ".rej", ".o", ".so"))):
                        yield Path(dirpath, name)


def source_hash(native_dir: str | Path | None = None) -> str:
    """sha256 over native/'s sources: sorted relative paths and contents (build dirs excluded)."""
    root = Path(native_dir) if native_dir else native_source_dir()
    if not (root / "CMakeLists.txt").is_file():
        raise BuildError(f"{root} is not the native source tree (no CMakeLists.txt)")
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
        raise ToolchainNotFoundError(
            f"cannot run {exe} --version ({exc}); install a working toolchain: {INSTALL_HINT}"
        ) from None
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
        f"install it: {INSTALL_HINT}"
    )


def _find_compiler(settings: Settings) -> str:
    names = [settings.cxx] if settings.cxx else list(COMPILERS)
    for name in names:
        if found := shutil.which(name):
            # absolute, but not through symlinks: clang++ -> clang-14 would drive the link as C, without libstdc++
            return os.path.abspath(found)
    if settings.cxx:
        raise ToolchainNotFoundError(
            f"RYZ_CXX={settings.cxx!r} is not an executable on PATH; fix RYZ_CXX or unset it to use c++/g++/clang++"
        )
    raise ToolchainNotFoundError(
        f"no C++ compiler found (looked for {', '.join(COMPILERS)} on PATH) to build the native kernels; "
        f"install one: {INSTALL_HINT}"
    )


def _compiler(settings: Settings) -> dict[str, str]:
    cxx = _find_compiler(settings)
    return {"cxx": cxx, "cxx_version": _version_line(cxx)}


def compiler_info(settings: Settings | None = None) -> dict[str, str]:
    """The C++ compiler (passed to CMake explicitly, so the key names what really compiles) and CMake."""
    cmake, cmake_line = _find_cmake()
    return {
        **_compiler(settings or get_settings()),
        "cmake": cmake,
        "cmake_version": ".".join(map(str, _cmake_version(cmake_line))),
    }


def build_flags(source: str, sanitize: bool = False) -> list[str]:
    """The CMake cache entries of a host build (RYZ_SOURCE_HASH is recorded in the library). The test
    executable finds libryz.so next to itself ($ORIGIN), so the build directory can be moved or copied."""
    return [
        "-DCMAKE_BUILD_TYPE=Release",
        f"-DRYZ_SOURCE_HASH={source}",
        "-DRYZ_BUILD_TESTS=ON",
        f"-DRYZ_SANITIZE={'ON' if sanitize else 'OFF'}",
        "-DCMAKE_BUILD_WITH_INSTALL_RPATH=ON",
        "-DCMAKE_INSTALL_RPATH=$ORIGIN",
    ]


def build_key(flags: list[str], source: str, compiler: dict[str, str], fingerprint_id: str) -> str:
    """sha256(sources, flags, compiler, CPU fingerprint)[:16]: equal keys build identical libraries."""
    return _digest(
        {
            "source_hash": source,
            "flags": flags,
            "cxx": compiler["cxx"],
            "cxx_version": compiler["cxx_version"],
            "fingerprint_id": fingerprint_id,
        }
    )[:16]


# --- the build ------------------------------------------------------------------------------------


@dataclass
class KernelBuild:
    """A finished kernel build: its directory, library, key and manifest."""

    path: Path  # the shared library
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
    compiler: dict[str, str]  # cxx, cxx_version (CMake is found at build time: it does not change the output)
    fingerprint: dict[str, Any]
    native_dir: Path


def kernels_dir(settings: Settings | None = None) -> Path:
    return (settings or get_settings()).cache_dir / "kernels"


def plan_build(
    settings: Settings | None = None, native_dir: str | Path | None = None, sanitize: bool = False
) -> BuildPlan:
    """What a build of these sources for this CPU would be called and where it lives (nothing is run but --version)."""
    settings = settings or get_settings()
    root = _native_root(native_dir)
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
        raise SchemaVersionError(
            f"{directory / MANIFEST_NAME} has schema {manifest.get('schema')!r}; this Ryzanstein reads "
            f"schema {SCHEMA}: upgrade Ryzanstein or rebuild with `ryz build-kernels --force`"
        )
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


def locked(directory: Path):
    """Exclusive per-key lock (also taken by autotune when it records into the manifest)."""
    return file_lock(directory.parent / ".locks" / f"{directory.name}.lock")


def write_json_atomic(path: Path, doc: dict) -> None:
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
            progress(
                f"configuring (cmake {cmake_version}, {plan.compiler['cxx_version']}{', ' if extra_flags else ''}"
                f"{' '.join(extra_flags)})"
            )
            _run(
                [
                    cmake,
                    "-S",
                    str(plan.native_dir),
                    "-B",
                    str(tree),
                    *generator,
                    f"-DCMAKE_CXX_COMPILER={plan.compiler['cxx']}",
                    *plan.flags,
                    *extra_flags,
                ],
                log,
            )
            progress(f"compiling with {jobs} jobs")
            _run([cmake, "--build", str(tree), "-j", str(jobs)], log)
        except subprocess.CalledProcessError as exc:
            step = "configure" if exc.cmd[1] == "-S" else "build"
            keep = plan.directory.parent / f"failed-{plan.key}.log"
            shutil.copyfile(log_path, keep)
            raise BuildError(
                f"native kernel {step} failed (exit {exc.returncode}); last lines:\n{_tail(log_path)}\nfull log: {keep}"
            ) from None
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
        "cmake": {"path": cmake, "version": cmake_version, "generator": "Ninja" if generator else "default"},
        "fingerprint": plan.fingerprint,
        "library": {
            "file": LIBRARY_NAME,
            "sha256": _sha256_file(work / LIBRARY_NAME),
            "size": (work / LIBRARY_NAME).stat().st_size,
        },
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
        return {
            "passed": False,
            "families": {},
            "failures": [f"a sanitizer build needs {TESTS_NAME} to prove itself"],
            "seconds": None,
        }
    start = time.perf_counter()
    env = {
        **os.environ,
        "ASAN_OPTIONS": "detect_leaks=1:halt_on_error=1",
        "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
    }
    try:
        proc = subprocess.run([str(tests)], capture_output=True, text=True, timeout=selftest.TIMEOUT_S * 3, env=env)
        ok, out = proc.returncode == 0, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired:
        ok, out = False, f"{TESTS_NAME} did not finish"
    failures = [
        line for line in out.splitlines() if line.startswith("FAIL") or "runtime error" in line or "ERROR" in line
    ]
    return {
        "passed": ok,
        "suite": TESTS_NAME,
        "families": {},
        "failures": failures[:8] or ([] if ok else [out.strip()[-600:]]),
        "seconds": round(time.perf_counter() - start, 3),
    }


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
        progress(
            f"kernel self-test FAILED ({' '.join(extra) or 'standard flags'}): {'; '.join(result['failures'][:2])}"
        )
        if not extra:
            extra = list(FALLBACK_FLAGS)
        elif failing and "scalar" not in failing and len(attempts) == 2:
            extra = [*extra, f"-DRYZ_DISABLE_FAMILIES={';'.join(failing)}"]
        else:
            keep = plan.directory.parent / f"failed-{plan.key}.log"
            shutil.copyfile(work / "build.log", keep)
            tried = "; ".join(" ".join(a["extra_flags"]) or "standard flags" for a in attempts)
            raise BuildError(
                f"the native kernels built by {plan.compiler['cxx']} ({plan.compiler['cxx_version']}) fail their "
                f"self-test with every flag set tried ({tried}), so they are not used. First failures:\n  "
                + "\n  ".join(result["failures"][:6])
                + "\nThis is a compiler or kernel bug: try another compiler (RYZ_CXX=clang++ or RYZ_CXX=g++-13) "
                f"and report it with the build log {keep}"
            )
    manifest["build_seconds"] = round(seconds, 2)  # every attempt's compile time
    manifest["self_test"] = result
    manifest["fallback"] = (
        None
        if not extra
        else {
            "extra_flags": extra,
            "attempts": attempts,
            "reason": f"self-test failed with {' '.join(attempts[-2]['extra_flags']) or 'the standard flags'}: "
            f"{'; '.join(attempts[-2]['failures'][:2])}",
        }
    )
    if extra:
        progress(f"kernel build uses the fall-back flags {' '.join(extra)} ({manifest['fallback']['reason']})")
    return manifest


def build_kernels(
    force: bool = False,
    progress: Progress = print_to_stderr,
    settings: Settings | None = None,
    native_dir: str | Path | None = None,
    sanitize: bool = False,
) -> KernelBuild:
    """The kernel build for these sources, flags, compiler and CPU: from the cache, or built now.

    A complete build directory (build.json plus the library it names, hash-checked, with a passed self-test) is a
    cache hit and runs no cmake; `force` rebuilds it. A new build is self-tested before it is cached (see
    `_compile_proven`). Raises ToolchainNotFoundError without a compiler or CMake, BuildError when the build fails
    or no flag set passes the self-test (its log is kept)."""
    plan = plan_build(settings, native_dir, sanitize)
    if not force and (manifest := _complete(plan.directory)):
        return KernelBuild(plan.directory / manifest["library"]["file"], plan.key, manifest, cache_hit=True)
    plan.directory.parent.mkdir(parents=True, exist_ok=True)
    with locked(plan.directory):
        if not force and (manifest := _complete(plan.directory)):  # another process built it while we waited
            return KernelBuild(plan.directory / manifest["library"]["file"], plan.key, manifest, cache_hit=True)
        for stale in [
            *plan.directory.parent.glob(f".tmp-{plan.key}-*"),
            *plan.directory.parent.glob(f".old-{plan.key}-*"),
        ]:
            shutil.rmtree(stale, ignore_errors=True)  # left by a builder that crashed (we hold its lock now)
        # forced or stale: the old directory is moved aside, never deleted under a process that loaded it
        with atomic_directory(plan.directory, prefix=f".tmp-{plan.key}-") as work:
            manifest = _compile_proven(plan, work, progress, sanitize)
            write_json_atomic(work / MANIFEST_NAME, manifest)
        (plan.directory.parent / f"failed-{plan.key}.log").unlink(missing_ok=True)
    progress(
        f"built native kernels {plan.key} in {manifest['build_seconds']:.1f} s, self-test passed "
        f"({', '.join(manifest['self_test']['families']) or manifest['self_test'].get('suite')}): {plan.directory}"
    )
    return KernelBuild(plan.directory / LIBRARY_NAME, plan.key, manifest, cache_hit=False)


def find_compatible(
    settings: Settings, fingerprint_id: str, native_dir: str | Path | None = None
) -> KernelBuild | None:
    """The newest complete, self-tested build in the cache of these sources and flags for the CPU fingerprint
    `fingerprint_id`, whatever compiler made it: what a host without a compiler can use (e.g. one shipped in a
    serving bundle), and what a bundle for another CPU ships."""
    source = source_hash(_native_root(native_dir))
    flags = build_flags(source)
    found = []
    for directory in kernels_dir(settings).glob("*/"):
        try:
            manifest = _complete(directory)
        except SchemaVersionError:
            continue
        if (
            manifest
            and manifest["source_hash"] == source
            and manifest["flags"] == flags
            and manifest["fingerprint"]["fingerprint_id"] == fingerprint_id
        ):
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
        return find_compatible(settings, cpu_fingerprint()["fingerprint_id"], native_dir)
    manifest = _complete(plan.directory)
    if manifest is None:
        return None
    return KernelBuild(plan.directory / manifest["library"]["file"], plan.key, manifest, cache_hit=True)


_LOADED: dict[Path, Library] = {}  # library path -> the loaded handle (a library loads once per process)
_RESOLVED: dict[tuple[Path, Path], KernelBuild] = {}  # (kernels dir, native dir) -> the build in use


def current_build(settings: Settings | None = None, native_dir: str | Path | None = None) -> KernelBuild | None:
    """The build `load_library` loaded in this process for these settings, if any."""
    settings = settings or get_settings()
    return _RESOLVED.get((kernels_dir(settings), _native_root(native_dir)))


def load_library(
    settings: Settings | None = None,
    build_if_missing: bool = True,
    native_dir: str | Path | None = None,
    progress: Progress = print_to_stderr,
) -> Library:
    """The native library for this CPU (built on first use), with RYZ_ISA applied; loaded once per process.

    Raises BuildError when there is no build and `build_if_missing` is false, ToolchainNotFoundError when one
    must be built and no compiler or CMake is installed, NativeError when RYZ_ISA names an ISA this CPU lacks."""
    settings = settings or get_settings()
    memo = (kernels_dir(settings), _native_root(native_dir))
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
            raise BuildError(
                f"{build.path} reports sources {built_from[:16]!r}, "
                f"its manifest {build.manifest['source_hash'][:16]!r}; "
                "rebuild with `ryz build-kernels --force`"
            )
        _LOADED[build.path] = library
    _RESOLVED[memo] = build
    library.set_isa(settings.isa)
    return library
