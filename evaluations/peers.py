"""Peers for `ryz bench`: llama.cpp's llama-bench and onnxruntime's MatMulNBits, on the same machine.

* **llama.cpp** is built from the `llama-cpp-python` sdist's vendored source (downloaded once with pip,
  the benchmark's only network access) into `<cache>/peers/llama.cpp-<commit>`; only the targets asked
  for (`ensure_llama_cpp`): `llama-bench` here, `llama-server` for `ryz bench-serve`
  (evaluations/serve_bench.py), both in the same tree. It runs on our own GGUF, written once with TQ2_0
  and once with TQ1_0 weights; a `ryz-bitnet` file (relu² FFN, which llama.cpp refuses) is first copied
  with only its architecture renamed to `bitnet` (`write_llama_cpp_copy`). llama.cpp's bitnet graph uses
  a SiLU FFN: the same work, so the same speed, but different outputs.
* **onnxruntime**: one ONNX graph of MatMulNBits (com.microsoft) nodes: per layer the 7 ternary
  matmuls (q, k, v, o, gate, up, down) at bits=2, then an 8-bit MatMulNBits head on the last row.
  Ternary codes -1/0/1 are stored as 2-bit codes 0/1/2 with zero point 1, every block scale is the
  tensor scale. One layer's random ternary weights are generated and every layer gets its own byte
  rotation of them: distinct initializers with distinct bytes (onnxruntime shares identical ones, which
  would keep a single layer's weights in the L3 cache), so each layer streams its weights from memory
  as a real model does. No attention, RoPE or KV cache: its decode and prefill are matmul-only, an
  upper bound for a full onnxruntime model.

Every peer reports `{"error": "..."}` instead of raising when it cannot run.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from engine.fsutil import atomic_directory, file_lock
from engine.host import available_cpus
from evaluations import say

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
# ggml-org/llama.cpp commit vendored by each llama-cpp-python sdist (its CHANGELOG: "update llama.cpp to
# ggml-org/llama.cpp@0c1e57098"). Used to find a cached build without downloading, and as the last resort
# when the sdist carries neither its submodule HEAD nor a matching CHANGELOG line.
KNOWN_LLAMA_CPP_COMMITS = {"0.3.36": "0c1e57098bba43ac29e6e3b677cdceebdd22334f"}
LLAMA_CPP_CMAKE_FLAGS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=ON",  # -march=native: the best llama.cpp can do on this CPU
    "-DBUILD_SHARED_LIBS=OFF",  # self-contained binaries
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_TOOLS=ON",  # llama-bench and llama-server live in tools/
    "-DLLAMA_BUILD_UI=OFF",  # llama-server: no npm build of the web UI ...
    "-DLLAMA_USE_PREBUILT_UI=OFF",  # ... and never download its prebuilt assets (an empty UI is embedded)
    "-DLLAMA_OPENSSL=OFF",  # cpp-httplib without TLS (LLAMA_CURL is gone in this version: no network code)
]
# The configure switch a target needs beyond the common flags (tools/CMakeLists.txt adds tools/server, with
# its vendored cpp-httplib, only when LLAMA_BUILD_SERVER is on). Off otherwise, so a llama-bench-only
# tree configures no more than it builds.
LLAMA_CPP_TARGET_SWITCHES = {"llama-server": "LLAMA_BUILD_SERVER"}


def llama_cpp_cmake_flags(targets, commit: str) -> list[str]:
    """The cmake configure flags of a llama.cpp tree that builds `targets` (the union of everything the
    tree has built, so reconfiguring for a new target keeps the old ones' objects valid)."""
    switches = sorted(set(LLAMA_CPP_TARGET_SWITCHES.values()))
    wanted = {LLAMA_CPP_TARGET_SWITCHES[t] for t in targets if t in LLAMA_CPP_TARGET_SWITCHES}
    # BUILD_COMMIT comes from git, which the sdist lacks: pass the commit so the binaries report it.
    return (
        LLAMA_CPP_CMAKE_FLAGS
        + [f"-D{s}={'ON' if s in wanted else 'OFF'}" for s in switches]
        + [f"-DLLAMA_BUILD_COMMIT={commit[:7]}"]
    )


BUILD_TIMEOUT = 3600
RUN_TIMEOUT = 1800
OWN_ARCH_PREFIX = "ryz-bitnet."


def log(message: str) -> None:
    say(f"[bench] {message}")


# --- measured subprocesses ------------------------------------------------------------------------


@dataclass
class Completed:
    returncode: int
    stdout: str
    stderr: str
    peak_rss_mb: float
    seconds: float


# A minimal parent between us and the measured program. wait4's ru_maxrss of our own child is useless:
# Linux carries the forking process's high-water mark across fork/exec into the child's, so a child of
# this (large) Python process would report at least our peak. This parent is a bare interpreter (-S -I,
# a few MB); the program it forks and execs reports its own peak, which the parent prints to stderr.
_RUSAGE_PARENT = r"""
import os, sys
pid = os.fork()
if pid == 0:
    try:
        os.execvp(sys.argv[1], sys.argv[1:])
    except OSError as exc:
        sys.stderr.write("cannot run %s: %s\n" % (sys.argv[1], exc))
    os._exit(127)
_, status, usage = os.wait4(pid, 0)
sys.stderr.write("\n@@ryz-maxrss-kb=%d\n" % usage.ru_maxrss)
code = os.waitstatus_to_exitcode(status)
sys.exit(code if code >= 0 else 128 - code)
"""
_MAXRSS_MARK = "@@ryz-maxrss-kb="


def run_measured(cmd: list[str], timeout: float, env: dict | None = None, cwd: str | Path | None = None) -> Completed:
    """Run `cmd` with stdout and stderr captured, and measure its own peak RSS (see `_RUSAGE_PARENT`)."""
    wrapped = [sys.executable, "-S", "-I", "-c", _RUSAGE_PARENT, *cmd]
    with tempfile.TemporaryFile() as err_file:
        start = time.perf_counter()
        proc = subprocess.Popen(
            wrapped,
            stdout=subprocess.PIPE,
            stderr=err_file,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
        killed = threading.Event()

        def kill() -> None:
            killed.set()
            try:
                os.killpg(proc.pid, 9)  # the parent and the program it runs
            except OSError:
                pass

        timer = threading.Timer(timeout, kill)
        timer.start()
        try:
            out, _ = proc.communicate()
        finally:
            timer.cancel()
        seconds = time.perf_counter() - start
        err_file.seek(0)
        err = err_file.read().decode(errors="replace")
    peak_kb = 0
    if _MAXRSS_MARK in err:
        head, _, rest = err.rpartition(_MAXRSS_MARK)
        peak_kb = int(rest.split()[0]) if rest.split() else 0
        err = head.rstrip("\n")
    if killed.is_set():
        err += f"\n(killed after the {timeout:.0f} s timeout)"
    return Completed(proc.returncode, out.decode(errors="replace"), err, peak_kb / 1024.0, seconds)


def tail(text: str, lines: int = 12) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


# --- GGUF copies for llama.cpp --------------------------------------------------------------------


def write_llama_cpp_copy(src: str | Path, dst: str | Path, weights: str | None = None) -> Path:
    """Copy a model GGUF for llama.cpp: architecture `bitnet` (the `ryz-bitnet.*` keys renamed to
    `bitnet.*`, nothing else changed), and, if `weights` names the other ternary type, every ternary
    tensor transcoded to it (same codes, same block scale 1.0). Tensor data is streamed from the
    memory-mapped source with gguf's writer; the output is written atomically."""
    import gguf

    from engine.model import quants

    src, dst = Path(src), Path(dst)
    reader = gguf.GGUFReader(src, "r")
    field = reader.get_field(gguf.Keys.General.ARCHITECTURE)
    arch = field.contents() if field else None
    if arch not in ("bitnet", "ryz-bitnet"):
        raise ValueError(f"{src}: architecture {arch!r} is not a BitNet model artifact")
    ternary = {"TQ1_0": "tq1_0", "TQ2_0": "tq2_0"}
    target = None if weights is None else quants.ggml_type(weights)
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        writer = gguf.GGUFWriter(tmp, "bitnet")
        for f in reader.fields.values():
            if f.name == gguf.Keys.General.ARCHITECTURE or f.name.startswith("GGUF."):
                continue
            name = "bitnet." + f.name[len(OWN_ARCH_PREFIX) :] if f.name.startswith(OWN_ARCH_PREFIX) else f.name
            value = f.contents()
            if name == gguf.Keys.General.FILE_TYPE and target is not None:
                value = int(gguf.LlamaFileType.MOSTLY_TQ1_0 if weights == "tq1_0" else gguf.LlamaFileType.MOSTLY_TQ2_0)
            val_type = f.types[0]
            sub_type = f.types[-1] if val_type == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(name, value, val_type, sub_type=sub_type)
        plan: list[tuple[gguf.ReaderTensor, Callable[..., np.ndarray]]] = []  # data() of each tensor, in order
        for t in reader.tensors:
            qtype = t.tensor_type.name
            if target is not None and qtype in ternary and t.tensor_type != target:
                assert weights is not None  # target is set only from weights
                shape = tuple(int(d) for d in reversed(t.shape))  # numpy order (rows, cols)
                plan.append(
                    (
                        t,
                        lambda t=t, shape=shape: quants.pack_ternary(
                            quants.unpack_ternary(np.asarray(t.data), ternary[t.tensor_type.name], shape), weights
                        ),
                    )
                )
                nbytes = int(np.prod(shape[:-1])) * quants.bytes_per_row(weights, shape[-1])
                writer.add_tensor_info(
                    t.name, (*shape[:-1], quants.bytes_per_row(weights, shape[-1])), np.dtype(np.uint8), nbytes, target
                )
            else:
                plan.append((t, lambda t=t: t.data))
                writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t, data in plan:
            writer.write_tensor_data(np.ascontiguousarray(data()), tensor_endianess=reader.endianess)
        writer.close()
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dst


# --- llama.cpp: build llama-bench / llama-server from the llama-cpp-python sdist ---------------------


@dataclass
class LlamaCppBuild:
    """One cached llama.cpp tree (`<cache>/peers/llama.cpp-<commit7>`: `src/`, `build/`, `build.json`,
    `build.log`) and the binaries it has built so far."""

    root: Path
    commit: str
    version: str
    binaries: dict[str, Path]
    cached: bool  # every requested target was already built
    build_seconds: dict[str, float | None]  # per target: the wall time of the build that produced it
    flags: dict[str, list[str]]  # per target: the configure flags it was built with

    def describe(self, target: str) -> dict:
        return {
            "binary": str(self.binaries[target]),
            "commit": self.commit,
            "version": self.version,
            "cached": self.cached,
            "build_seconds": self.build_seconds.get(target),
            "flags": self.flags.get(target, []),
            "source": f"llama-cpp-python=={self.version} sdist, vendor/llama.cpp",
        }


@dataclass
class LlamaBench:
    binary: Path
    commit: str
    version: str
    cached: bool
    build_seconds: float | None
    flags: list[str]

    def describe(self) -> dict:
        d = asdict(self)
        d["binary"] = str(self.binary)
        d["source"] = f"llama-cpp-python=={self.version} sdist, vendor/llama.cpp"
        return d


def sdist_llama_cpp_commit(root: Path, version: str) -> str:
    """The vendored llama.cpp commit: the submodule HEAD recorded in the sdist, else its CHANGELOG entry
    for `version`, else the known mapping."""
    head = root / ".git" / "modules" / "vendor" / "llama.cpp" / "HEAD"
    if head.is_file():
        text = head.read_text().strip()
        if re.fullmatch(r"[0-9a-f]{40}", text):
            return text
    changelog = root / "CHANGELOG.md"
    if changelog.is_file():
        section = re.search(rf"^## \[{re.escape(version)}\]\s*$(.*?)(?=^## |\Z)", changelog.read_text(), re.S | re.M)
        if section:
            m = re.search(r"ggml-org/llama\.cpp@([0-9a-f]{7,40})", section.group(1))
            if m:
                known = KNOWN_LLAMA_CPP_COMMITS.get(version, "")
                return known if known.startswith(m.group(1)) else m.group(1)
    if version in KNOWN_LLAMA_CPP_COMMITS:
        return KNOWN_LLAMA_CPP_COMMITS[version]
    raise RuntimeError(f"cannot tell which llama.cpp commit llama-cpp-python {version} vendors")


def _download_sdist(dest: Path, version: str) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    existing = sorted(dest.glob(f"llama_cpp_python-{version}.tar.gz"))
    if existing:
        return existing[0]
    log(f"downloading the llama-cpp-python {version} sdist with pip")
    done = run_measured(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            "--disable-pip-version-check",
            f"llama-cpp-python=={version}",
            "-d",
            str(dest),
        ],
        timeout=900,
    )
    found = sorted(dest.glob(f"llama_cpp_python-{version}.tar.gz"))
    if done.returncode != 0 or not found:
        raise RuntimeError(f"pip download llama-cpp-python=={version} failed: {tail(done.stderr, 6)}")
    return found[0]


def _extract_sdist(archive: Path, dest: Path) -> Path:
    """Extract the vendored llama.cpp tree plus the sdist's CHANGELOG and submodule HEAD into `dest`."""
    keep = ("vendor/llama.cpp/", "CHANGELOG.md", ".git/modules/vendor/llama.cpp/HEAD")
    with tarfile.open(archive) as tar:
        members = []
        for m in tar.getmembers():
            parts = m.name.split("/", 1)
            if len(parts) == 2 and parts[1].startswith(keep) and (m.isfile() or m.isdir() or m.issym()):
                m.name = parts[1]
                members.append(m)
        if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4
            tar.extractall(dest, members=members, filter="data")
        else:
            tar.extractall(dest, members=members)
    if not (dest / "vendor" / "llama.cpp" / "CMakeLists.txt").is_file():
        raise RuntimeError(f"{archive.name} has no vendor/llama.cpp source tree")
    return dest


def ensure_llama_cpp(
    cache_dir: Path, targets=("llama-bench",), version: str = LLAMA_CPP_PYTHON_VERSION, jobs: int | None = None
) -> LlamaCppBuild:
    """Build (once) and return llama.cpp's `targets` from the llama-cpp-python `version` sdist.

    All targets share one source tree and one build directory per commit: a target added later (say
    llama-server after llama-bench) reconfigures that directory with the union of the targets' switches
    and builds incrementally, reusing ggml, llama and common objects, with no new download."""
    targets = tuple(dict.fromkeys(targets))
    peers = Path(cache_dir) / "peers"
    jobs = jobs or available_cpus()
    with file_lock(peers / ".llama.cpp.lock"):
        known = KNOWN_LLAMA_CPP_COMMITS.get(version)
        if known:
            tree = peers / f"llama.cpp-{known[:7]}"
            found = _cached_build(tree, version, targets)
            if found:
                return found
            if _build_meta(tree) is not None and (tree / "src" / "CMakeLists.txt").is_file():
                return _build(tree, known, version, targets, jobs)  # the same source: no download
        for attempt in (1, 2):
            work = Path(tempfile.mkdtemp(prefix="llama.cpp-src-", dir=peers))
            try:
                archive = _download_sdist(peers / "downloads", version)
                try:
                    _extract_sdist(archive, work)
                except (tarfile.TarError, OSError, EOFError) as exc:
                    archive.unlink(missing_ok=True)  # a truncated download: fetch it again once
                    if attempt == 2:
                        raise RuntimeError(f"cannot unpack {archive.name}: {exc}") from None
                    continue
                commit = sdist_llama_cpp_commit(work, version)
                tree = peers / f"llama.cpp-{commit[:7]}"
                found = _cached_build(tree, version, targets)
                if found:
                    return found
                if not (_build_meta(tree) is not None and (tree / "src" / "CMakeLists.txt").is_file()):
                    if tree.exists():  # no finished build: start over from the fresh source
                        shutil.rmtree(tree)
                    tree.mkdir(parents=True)
                    os.replace(work / "vendor" / "llama.cpp", tree / "src")
                return _build(tree, commit, version, targets, jobs)
            finally:
                shutil.rmtree(work, ignore_errors=True)
    raise AssertionError("unreachable")


def ensure_llama_bench(cache_dir: Path, version: str = LLAMA_CPP_PYTHON_VERSION, jobs: int | None = None) -> LlamaBench:
    """Build (once) and return llama.cpp's llama-bench from the llama-cpp-python `version` sdist."""
    b = ensure_llama_cpp(cache_dir, ("llama-bench",), version, jobs)
    return LlamaBench(
        b.binaries["llama-bench"],
        b.commit,
        b.version,
        b.cached,
        b.build_seconds.get("llama-bench"),
        b.flags.get("llama-bench", []),
    )


def _build_meta(tree: Path) -> dict | None:
    """`build.json` of a tree with at least one finished build, its `targets` filled in for records
    written before there was more than one target (llama-bench only)."""
    info = tree / "build.json"
    if not info.is_file():
        return None
    meta = json.loads(info.read_text())
    if "targets" not in meta:
        meta["targets"] = {"llama-bench": {"flags": meta.get("flags", []), "build_seconds": meta.get("build_seconds")}}
    return meta


def _cached_build(tree: Path, version: str, targets) -> LlamaCppBuild | None:
    meta = _build_meta(tree)
    if meta is None:
        return None
    built = {t: tree / "build" / "bin" / t for t in meta["targets"] if (tree / "build" / "bin" / t).is_file()}
    if not all(t in built for t in targets):
        return None
    return LlamaCppBuild(
        tree,
        meta["commit"],
        meta.get("version", version),
        built,
        True,
        {t: meta["targets"][t].get("build_seconds") for t in built},
        {t: meta["targets"][t].get("flags", []) for t in built},
    )


def _build(tree: Path, commit: str, version: str, targets, jobs: int) -> LlamaCppBuild:
    if not shutil.which("cmake") or not (shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")):
        raise RuntimeError(f"building {', '.join(targets)} needs cmake and a C++ compiler on PATH")
    build = tree / "build"
    meta = _build_meta(tree) or {"targets": {}}
    done_before = {t: v for t, v in meta["targets"].items() if (build / "bin" / t).is_file()}
    missing = [t for t in targets if t not in done_before]
    flags = llama_cpp_cmake_flags(set(done_before) | set(targets), commit)
    start = time.perf_counter()
    log(f"building llama.cpp {commit[:7]} {' '.join(missing)} in {tree} (a few minutes)")
    with (tree / "build.log").open("a") as build_log:
        for cmd in (
            ["cmake", "-S", str(tree / "src"), "-B", str(build), *flags],
            ["cmake", "--build", str(build), "--target", *missing, "-j", str(jobs)],
        ):
            build_log.write("$ " + " ".join(cmd) + "\n")
            build_log.flush()
            done = run_measured(cmd, timeout=BUILD_TIMEOUT)
            build_log.write(done.stdout + done.stderr)
            if done.returncode != 0:
                raise RuntimeError(
                    f"`{' '.join(cmd[:3])} ...` failed (log: {tree / 'build.log'}): "
                    f"{tail(done.stdout + done.stderr, 8)}"
                )
    for t in missing:
        if not (build / "bin" / t).is_file():
            raise RuntimeError(f"the llama.cpp build produced no {build / 'bin' / t}")
    seconds = round(time.perf_counter() - start, 1)
    targets_meta = {**done_before, **{t: {"flags": flags, "build_seconds": seconds} for t in missing}}
    record = {
        "commit": commit,
        "version": version,
        "flags": flags,
        "targets": targets_meta,
        "compiler": _compiler_version(),
        "machine": platform.machine(),
    }
    if "llama-bench" in targets_meta:  # the fields readers of the single-target record know
        record["build_seconds"] = targets_meta["llama-bench"].get("build_seconds")
    tmp = tree / "build.json.tmp"
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, tree / "build.json")
    log(f"built {' '.join(missing)} in {seconds:.0f} s")
    binaries = {t: build / "bin" / t for t in targets_meta}
    return LlamaCppBuild(
        tree,
        commit,
        version,
        binaries,
        False,
        {t: v.get("build_seconds") for t, v in targets_meta.items()},
        {t: v.get("flags", []) for t, v in targets_meta.items()},
    )


def _compiler_version() -> str:
    cxx = shutil.which("c++") or shutil.which("g++") or ""
    try:
        return subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout.splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        return "unknown"


def run_llama_bench(bench: LlamaBench, model: Path, threads: int, prompt: int, gen: int, repetitions: int = 1) -> dict:
    """One llama-bench invocation (pp`prompt` and tg`gen`, `repetitions` each, after its own warm-up)."""
    cmd = [
        str(bench.binary),
        "-m",
        str(model),
        "-p",
        str(prompt),
        "-n",
        str(gen),
        "-t",
        str(threads),
        "-r",
        str(repetitions),
        "-o",
        "json",
    ]
    done = run_measured(cmd, timeout=RUN_TIMEOUT)
    if done.returncode != 0:
        raise RuntimeError(f"llama-bench exited {done.returncode}: {tail(done.stderr, 8)}")
    records = json.loads(done.stdout)
    out: dict = {"peak_rss_mb": round(done.peak_rss_mb, 1), "wall_seconds": round(done.seconds, 2)}
    for r in records:
        if r.get("n_prompt", 0) > 0 and r.get("n_gen", 0) == 0:
            out["prefill_tok_s"] = float(r["avg_ts"])
            out["prefill_samples"] = [float(x) for x in r.get("samples_ts", [r["avg_ts"]])]
            out["ttft_ms"] = float(r["avg_ns"]) / 1e6
        elif r.get("n_gen", 0) > 0 and r.get("n_prompt", 0) == 0:
            out["decode_tok_s"] = float(r["avg_ts"])
            out["decode_samples"] = [float(x) for x in r.get("samples_ts", [r["avg_ts"]])]
        for key in (
            "build_commit",
            "cpu_info",
            "type_k",
            "n_batch",
            "n_ubatch",
            "flash_attn",
            "model_type",
            "model_size",
        ):
            if key in r:
                out.setdefault("info", {})[key] = r[key]
    if "decode_tok_s" not in out or "prefill_tok_s" not in out:
        raise RuntimeError(f"llama-bench printed no pp/tg records: {done.stdout[:300]}")
    return out


# --- onnxruntime: MatMulNBits graph ---------------------------------------------------------------------

ORT_PEER = "onnxruntime-matmulnbits"
ORT_BLOCK_SIZE = 128  # the fastest of 32/64/128 for bits=2 on AVX-512 (256 falls back to a slow path)
ORT_HEAD_BLOCK_SIZE = 32
ORT_GRAPH_VERSION = 2  # part of the cache key: bump when build_layers_model changes
ORT_NOTE = (
    "matmul-only: 7 ternary MatMulNBits (bits=2) per layer x layers + an 8-bit MatMulNBits head on the "
    "last row, with only a LayerNormalization and elementwise Mul/Add per layer to chain them; no "
    "attention, RoPE or KV cache, so an upper bound for a full onnxruntime model. Every layer holds its "
    "own rotation of one layer's random ternary weights (distinct bytes: onnxruntime shares identical "
    "initializers, which would keep them cache-resident)."
)


def pack_nbits(codes: np.ndarray, bits: int, block_size: int) -> np.ndarray:
    """MatMulNBits B: unsigned codes (N, K) -> uint8 (N, K / block_size, block_size * bits / 8), the
    first element of each byte in its lowest bits."""
    n, k = codes.shape
    per = 8 // bits
    c = np.ascontiguousarray(codes, dtype=np.uint8).reshape(n, k // block_size, block_size // per, per)
    packed = np.zeros(c.shape[:-1], dtype=np.uint8)
    for i in range(per):
        packed |= (c[..., i] << np.uint8(bits * i)).astype(np.uint8)
    return packed


def ternary_matmulnbits_inputs(codes: np.ndarray, scale: float, block_size: int = ORT_BLOCK_SIZE):
    """(B, scales, zero_points) of a bits=2 MatMulNBits for ternary `codes` (N, K) in {-1, 0, 1} times
    the per-tensor `scale`: codes t + 1 with zero point 1, every block scale = `scale`."""
    n, k = codes.shape
    if k % block_size:
        raise ValueError(f"K={k} is not a multiple of block_size {block_size}")
    blocks = k // block_size
    b = pack_nbits(np.asarray(codes, np.int8) + 1, 2, block_size)
    scales = np.full(n * blocks, scale, dtype=np.float32)
    zp_cols = -(-blocks // 4) * 4
    zp = np.zeros((n, zp_cols), dtype=np.uint8)
    zp[:, :blocks] = 1
    zero_points = pack_nbits(zp, 2, zp_cols).reshape(-1)
    return b, scales, zero_points


def int8_matmulnbits_inputs(values: np.ndarray, block_size: int = ORT_HEAD_BLOCK_SIZE):
    """(B, scales, zero_points) of a bits=8 MatMulNBits: symmetric absmax per block, zero point 128."""
    n, k = values.shape
    blocks = values.reshape(n, k // block_size, block_size)
    amax = np.maximum(np.abs(blocks).max(-1), 1e-12)
    scales = (amax / 127.0).astype(np.float32)
    q = np.clip(np.rint(blocks / scales[..., None]), -127, 127).astype(np.int16) + 128
    return q.astype(np.uint8), scales.reshape(-1), np.full(n * (k // block_size), 128, dtype=np.uint8)


def matmulnbits_node(
    x: str,
    out: str,
    prefix: str,
    b,
    scales,
    zero_points,
    bits: int,
    block_size: int,
    accuracy_level: int,
    initializers: list,
):
    from onnx import helper, numpy_helper

    n = b.shape[0]
    k = b.shape[1] * block_size
    for suffix, value in (("B", b), ("S", scales), ("Z", zero_points)):
        initializers.append(numpy_helper.from_array(value, f"{prefix}.{suffix}"))
    return helper.make_node(
        "MatMulNBits",
        [x, f"{prefix}.B", f"{prefix}.S", f"{prefix}.Z"],
        [out],
        domain="com.microsoft",
        name=prefix,
        K=k,
        N=n,
        bits=bits,
        block_size=block_size,
        accuracy_level=accuracy_level,
    )


def build_matmulnbits_model(
    matrices: list[tuple[str, np.ndarray, float]], block_size: int = ORT_BLOCK_SIZE, accuracy_level: int = 4
):
    """A graph computing Y_i = X @ (codes_i * scale_i).T for each (name, codes (N, K), scale), all from
    the input X: the builder `tests/test_bench.py` checks against numpy."""
    from onnx import TensorProto, helper

    k = matrices[0][1].shape[1]
    nodes, outputs = [], []
    inits: list[TensorProto] = []
    for name, codes, scale in matrices:
        b, s, z = ternary_matmulnbits_inputs(codes, scale, block_size)
        nodes.append(matmulnbits_node("X", name, name, b, s, z, 2, block_size, accuracy_level, inits))
        outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["M", codes.shape[0]]))
    graph = helper.make_graph(
        nodes, "ternary", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["M", k])], outputs, initializer=inits
    )
    return _model(graph)


def _model(graph):
    from onnx import helper

    return helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
        producer_name="ryzanstein-bench",
    )


def build_layers_model(hp: dict, block_size: int = ORT_BLOCK_SIZE, accuracy_level: int = 4, seed: int = 0):
    """The peer graph for a model shape (`hp`: hidden, layers, heads, kv_heads, head_dim, ffn, vocab).
    Per layer: q, k, v, gate, up from x; o from q; down from gate * up; x' = LayerNorm(x + o + down +
    rowsum(k + v)) (every product feeds the output, values stay bounded); then the last row of x goes
    through the 8-bit head. The only output is that row's logits."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(seed)
    hidden, ffn = hp["hidden"], hp["ffn"]
    q_dim, kv_dim = hp["heads"] * hp["head_dim"], hp["kv_heads"] * hp["head_dim"]
    shapes = {
        "q": (q_dim, hidden),
        "k": (kv_dim, hidden),
        "v": (kv_dim, hidden),
        "o": (hidden, q_dim),
        "gate": (ffn, hidden),
        "up": (ffn, hidden),
        "down": (hidden, ffn),
    }
    packed = {}
    for name, (n, k) in shapes.items():
        codes = rng.integers(-1, 2, size=(n, k), dtype=np.int8)
        packed[name] = ternary_matmulnbits_inputs(codes, float(np.sqrt(1.5 / k)), block_size)
    nodes: list = []
    inits = [
        helper.make_tensor("norm.scale", TensorProto.FLOAT, [hidden], np.ones(hidden, np.float32)),
        helper.make_tensor("rowsum.axes", TensorProto.INT64, [1], [1]),
    ]
    x = "X"
    for layer in range(hp["layers"]):
        p = f"blk.{layer}"

        def mm(inp, name):
            b, s, z = packed[name]
            # distinct bytes per layer (a rotation of the same codes): onnxruntime shares identical
            # initializers, which would leave one layer's weights resident in the L3 cache
            b = np.roll(b.reshape(-1), (layer + 1) * 4099 % b.size).reshape(b.shape)
            nodes.append(
                matmulnbits_node(inp, f"{p}.{name}.out", f"{p}.{name}", b, s, z, 2, block_size, accuracy_level, inits)
            )
            return f"{p}.{name}.out"

        def op(kind, inputs, out, **attrs):
            nodes.append(helper.make_node(kind, inputs, [f"{p}.{out}"], name=f"{p}.{out}", **attrs))
            return f"{p}.{out}"

        q, k, v = mm(x, "q"), mm(x, "k"), mm(x, "v")
        o = mm(q, "o")
        gate, up = mm(x, "gate"), mm(x, "up")
        down = mm(op("Mul", [gate, up], "act"), "down")
        kv = op("ReduceSum", [op("Add", [k, v], "kv"), "rowsum.axes"], "kvsum", keepdims=1)
        y = op("Add", [op("Add", [op("Add", [x, o], "res1"), down], "res2"), kv], "res3")
        x = op("LayerNormalization", [y, "norm.scale"], "norm", axis=-1, epsilon=1e-5)
    inits += [
        helper.make_tensor(n, TensorProto.INT64, [1], [v])
        for n, v in (("last.starts", -1), ("last.ends", 2**62), ("last.axes", 0))
    ]
    nodes.append(helper.make_node("Slice", [x, "last.starts", "last.ends", "last.axes"], ["last"], name="last"))
    parts = [
        int8_matmulnbits_inputs(
            rng.standard_normal((min(16384, hp["vocab"] - r), hidden), dtype=np.float32) * np.float32(0.02)
        )
        for r in range(0, hp["vocab"], 16384)
    ]  # in row chunks: a 128k vocabulary is 1.3 GB as float32
    b, s, z = (np.concatenate(a) for a in zip(*parts))
    del parts
    nodes.append(matmulnbits_node("last", "logits", "output", b, s, z, 8, ORT_HEAD_BLOCK_SIZE, accuracy_level, inits))
    graph = helper.make_graph(
        nodes,
        "ternary-layers",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["M", hidden])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, hp["vocab"]])],
        initializer=inits,
    )
    return _model(graph)


def ensure_ort_model(cache_dir: Path, hp: dict, block_size: int = ORT_BLOCK_SIZE, accuracy_level: int = 4) -> Path:
    """The peer graph for this shape, cached as `<cache>/peers/onnx/<key>/model.onnx` (+ external data)."""
    import onnx

    key = (
        "h{hidden}-l{layers}-a{heads}x{head_dim}-kv{kv_heads}-f{ffn}-v{vocab}".format(**hp)
        + f"-b{block_size}-acc{accuracy_level}-g{ORT_GRAPH_VERSION}"
    )
    root = Path(cache_dir) / "peers" / "onnx"
    target = root / key
    model_path = target / "model.onnx"
    with file_lock(root / ".lock"):
        if model_path.is_file():
            return model_path
        log(f"building the onnxruntime MatMulNBits graph ({hp['layers']} layers)")
        model = build_layers_model(hp, block_size, accuracy_level)
        with atomic_directory(target) as work:
            onnx.save_model(
                model,
                str(work / "model.onnx"),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location="weights.bin",
                size_threshold=1024,
            )
            del model
    return model_path


def run_json_worker(module: str, command: str, spec: dict, timeout: float, what: str, error=RuntimeError) -> dict:
    """`python -m module command SPEC_JSON` in its own measured process: its JSON result plus `peak_rss_mb`."""
    done = run_measured([sys.executable, "-m", module, command, json.dumps(spec)], timeout=timeout)
    if done.returncode != 0:
        raise error(f"{what} exited {done.returncode}: {tail(done.stderr, 12)}")
    out = json.loads(done.stdout)
    out["peak_rss_mb"] = round(done.peak_rss_mb, 1)
    return out


def run_ort(model_path: Path, hidden: int, threads: int, prompt: int, gen: int) -> dict:
    """One measured onnxruntime round in its own process (see `_ort_worker`)."""
    spec = {"model": str(model_path), "hidden": hidden, "threads": threads, "prompt": prompt, "gen": gen}
    return run_json_worker("evaluations.peers", "ort-worker", spec, RUN_TIMEOUT, "onnxruntime worker")


def _ort_worker(spec: dict) -> dict:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = spec["threads"]
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    start = time.perf_counter()
    session = ort.InferenceSession(spec["model"], options, providers=["CPUExecutionProvider"])
    load = time.perf_counter() - start
    rng = np.random.default_rng(0)
    hidden = spec["hidden"]
    one = rng.standard_normal((1, hidden)).astype(np.float32)
    batch = rng.standard_normal((spec["prompt"], hidden)).astype(np.float32)
    outputs = ["logits"]
    for _ in range(3):  # warm-up: first runs allocate and touch every weight
        session.run(outputs, {"X": one})
    session.run(outputs, {"X": batch[: min(16, len(batch))]})
    start = time.perf_counter()
    session.run(outputs, {"X": batch})
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(spec["gen"]):
        session.run(outputs, {"X": one})
    decode = time.perf_counter() - start
    return {
        "decode_tok_s": spec["gen"] / decode,
        "prefill_tok_s": spec["prompt"] / prefill,
        "ttft_ms": prefill * 1e3,
        "load_seconds": round(load, 3),
    }


def worker_main(module: str, command: str, work) -> None:
    """The child side of run_json_worker: `python -m module command SPEC_JSON` prints work(spec) as JSON."""
    if len(sys.argv) == 3 and sys.argv[1] == command:
        print(json.dumps(work(json.loads(sys.argv[2]))))
        sys.exit(0)
    print(f"usage: python -m {module} {command} SPEC_JSON (internal: run by `ryz bench`)", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    worker_main("evaluations.peers", "ort-worker", _ort_worker)
