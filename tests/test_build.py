"""The kernel build (engine/model/build.py): fingerprint, source hash, key, cache hits, forced and failed builds,
a missing toolchain, `ryz build-kernels`, and autotune records."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.errors import BuildError, ToolchainNotFoundError
from engine.host import cpu_fingerprint
from engine.model import autotune as tuning
from engine.model import build
from engine.model.autotune import TOKEN_TILES, TuneShape, autotune, tuned_parameters, write_tuning_model
from engine.model.build import NATIVE_DIR, build_kernels, find_build, load_library, read_manifest, source_hash
from engine.model.shapes import get_shape
from engine.settings import Settings

HEX16 = re.compile(r"^[0-9a-f]{16}$")


def _ryz_env(home: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RYZ_")}
    env.update(RYZ_HOME=str(home), **extra)
    return env


def _copy_native(dst: Path) -> Path:
    return Path(shutil.copytree(NATIVE_DIR, dst, ignore=shutil.ignore_patterns("build*", ".*")))


# --- fingerprint and source hash (no compiler needed) --------------------------------------------


def test_fingerprint_fields():
    fp = cpu_fingerprint()
    assert {
        "arch",
        "vendor",
        "model_name",
        "isa",
        "cache",
        "physical_cores",
        "logical_cpus",
        "available_cpus",
        "fingerprint_id",
    } <= set(fp)
    assert HEX16.match(fp["fingerprint_id"])
    assert set(fp["cache"]) == {"l1d", "l2", "l3"}
    assert 1 <= fp["physical_cores"] <= fp["logical_cpus"]
    if fp["arch"] in ("x86_64", "amd64"):
        assert {
            *("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512vnni", "avxvnni"),
            *("avx512vbmi", "amxtile", "amxint8", "amxbf16"),
        } == set(fp["isa"])
    elif fp["arch"] in ("aarch64", "arm64"):
        assert "asimddp" in fp["isa"]
    assert all(isinstance(v, bool) for v in fp["isa"].values())
    assert cpu_fingerprint()["fingerprint_id"] == fp["fingerprint_id"]  # stable


def test_source_hash_follows_sources_only(tmp_path):
    native = _copy_native(tmp_path / "native")
    base = source_hash(native)
    assert base == source_hash(NATIVE_DIR) and re.fullmatch(r"[0-9a-f]{64}", base)
    os.utime(native / "src" / "api.cpp", (1, 1))  # mtime is not content
    (native / "build").mkdir()
    (native / "build" / "junk.o").write_bytes(b"\0")  # build trees and editor leftovers are not sources
    (native / "src" / ".api.cpp.swp").write_text("x")
    (native / "README.md").write_text("docs are not compiled")
    assert source_hash(native) == base
    api = native / "src" / "api.cpp"
    api.write_text(api.read_text() + "\n// one more line\n")
    changed = source_hash(native)
    assert changed != base
    (native / "kernels" / "extra.cpp").write_text("// new file\n")
    assert source_hash(native) not in (base, changed)
    with pytest.raises(BuildError, match="CMakeLists.txt"):
        source_hash(tmp_path)


def test_tuning_layers_overflow_the_l3():
    assert tuning.tuning_layers(17 << 20, 32 << 20, 30) == 4  # 2B4T-sized layers, 32 MiB L3: 4 x 17 MiB > 64 MiB
    assert tuning.tuning_layers(1 << 30, 32 << 20, 30) == 1
    assert tuning.tuning_layers(200 << 10, 32 << 20, 2) == 2  # a model that fits in cache is timed in cache
    assert tuning.tuning_layers(1 << 10, None) == tuning.MAX_TUNE_LAYERS
    assert TuneShape.from_shape(get_shape("bitnet-2b4t")).layers == 30


def test_key_depends_on_each_input():
    compiler = {"cxx": "/usr/bin/g++", "cxx_version": "g++ 12"}
    flags = build.build_flags("a" * 64)
    key = build.build_key(flags, "a" * 64, compiler, "f" * 16)
    assert HEX16.match(key)
    assert build.build_key(flags, "a" * 64, compiler, "f" * 16) == key
    others = {
        build.build_key(build.build_flags("a" * 64, sanitize=True), "a" * 64, compiler, "f" * 16),
        build.build_key(flags, "b" * 64, compiler, "f" * 16),
        build.build_key(flags, "a" * 64, {**compiler, "cxx_version": "g++ 13"}, "f" * 16),
        build.build_key(flags, "a" * 64, compiler, "e" * 16),
    }
    assert key not in others and len(others) == 4


# --- missing toolchain ------------------------------------------------------------------------------


def test_missing_compiler_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(build.shutil, "which", lambda name: None)
    with pytest.raises(ToolchainNotFoundError, match=r"no C\+\+ compiler found .*apt-get install g\+\+ cmake"):
        build_kernels(settings=Settings(home=tmp_path))
    assert not (tmp_path / "cache" / "kernels").exists() or not any((tmp_path / "cache" / "kernels").glob("[0-9a-f]*"))
    with pytest.raises(ToolchainNotFoundError, match="RYZ_CXX"):
        build_kernels(settings=Settings(home=tmp_path, cxx="no-such-compiler"))


def test_missing_cmake_names_the_fix(tmp_path, monkeypatch):
    real_which = shutil.which
    monkeypatch.setattr(build.shutil, "which", lambda name: None if name == "cmake" else real_which(name))
    monkeypatch.setitem(sys.modules, "cmake", None)  # and no `cmake` PyPI package
    if real_which("c++") is None and real_which("g++") is None and real_which("clang++") is None:
        pytest.skip("no C++ compiler on this machine")
    with pytest.raises(ToolchainNotFoundError, match=r"CMake >= 3\.25 .*pip install cmake"):
        build_kernels(settings=Settings(home=tmp_path), progress=lambda m: None)
    kernels = tmp_path / "cache" / "kernels"
    assert not [p for p in kernels.iterdir() if p.name[0] != "."], "a failed build must leave no build directory"


def test_cli_without_compiler(tmp_path):
    empty = tmp_path / "bin"
    empty.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "build-kernels"],
        env=_ryz_env(tmp_path / "home", PATH=str(empty)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1 and proc.stdout == ""
    assert "ryz: error: no C++ compiler found" in proc.stderr and "apt-get install g++ cmake" in proc.stderr


# --- real builds ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("ryz-home")


@pytest.fixture(scope="module")
def cold(home):
    """Two `ryz build-kernels --json` started together on an empty cache: one builds, the other waits on the
    lock and finds the finished build."""
    if not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        pytest.skip("no C++ compiler on this machine")
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "build-kernels", "--json"],
            env=_ryz_env(home),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err
    return {"outs": outs, "seconds": time.perf_counter() - start}


def test_concurrent_cold_builds_build_once(cold, home):
    manifests = [json.loads(out) for out, _ in cold["outs"]]
    assert manifests[0] == manifests[1]
    m = manifests[0]
    assert m["schema"] == 1 and m["kind"] == "kernel-build" and HEX16.match(m["key"])
    assert sum(err.count("configuring") for _, err in cold["outs"]) == 1
    assert m["source_hash"] == source_hash() and f"-DRYZ_SOURCE_HASH={m['source_hash']}" in m["flags"]
    assert {"-DCMAKE_BUILD_TYPE=Release", "-DRYZ_BUILD_TESTS=ON"} <= set(m["flags"]) and not any(
        "NATIVE" in f for f in m["flags"]
    )
    assert m["self_test"]["passed"] and m["fallback"] is None and m["extra_flags"] == []
    assert m["fingerprint"]["fingerprint_id"] == cpu_fingerprint()["fingerprint_id"]
    assert m["compiler"]["version"] and m["cmake"]["version"] and m["build_seconds"] > 0 and m["created"]
    kernels = home / "cache" / "kernels"
    directory = kernels / m["key"]
    assert (directory / m["library"]["file"]).is_file() and (directory / "build.log").is_file()
    assert build._sha256_file(directory / m["library"]["file"]) == m["library"]["sha256"]
    assert not [p.name for p in kernels.iterdir() if p.name.startswith((".tmp-", ".old-", "failed-"))]


def test_second_call_is_a_cache_hit(cold, home, monkeypatch):
    def no_cmake(*args, **kwargs):
        raise AssertionError("a cache hit must not run cmake")

    monkeypatch.setattr(build, "_compile", no_cmake)
    monkeypatch.setattr(build, "_run", no_cmake)
    start = time.perf_counter()
    result = build_kernels(settings=Settings(home=home))
    assert result.cache_hit and time.perf_counter() - start < 2.0
    assert result.path == home / "cache" / "kernels" / result.key / "libryz.so"
    assert result.manifest == read_manifest(result.directory)


def test_cli_human_output(cold, home):
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "build-kernels"],
        env=_ryz_env(home, RYZ_ISA="scalar"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert HEX16.match(proc.stdout.strip())
    assert "cache     hit" in proc.stderr and "isa       scalar (RYZ_ISA=scalar)" in proc.stderr


def test_a_copied_build_is_found_and_a_corrupt_one_is_not(cold, home, tmp_path):
    key = find_build(Settings(home=home)).key
    other = tmp_path / "home"
    shutil.copytree(home / "cache" / "kernels" / key, other / "cache" / "kernels" / key)
    assert find_build(Settings(home=other)).key == key  # the key, not the place, names a build
    with pytest.MonkeyPatch.context() as mp:  # a host without a compiler still finds a build for its CPU
        mp.setattr(build.shutil, "which", lambda name: None)
        assert find_build(Settings(home=other)).key == key
    lib = other / "cache" / "kernels" / key / "libryz.so"
    data = lib.read_bytes()
    lib.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    assert find_build(Settings(home=other)) is None  # hash mismatch: rebuilt on next use
    with pytest.raises(BuildError, match="ryz build-kernels"):
        load_library(Settings(home=other), build_if_missing=False)


def test_failed_build_keeps_its_log_and_no_half_build(tmp_path):
    native = _copy_native(tmp_path / "native")
    (native / "CMakeLists.txt").write_text((native / "CMakeLists.txt").read_text() + '\nmessage(FATAL_ERROR "boom")\n')
    settings = Settings(home=tmp_path / "home")
    with pytest.raises(BuildError, match=r"(?s)configure failed .*boom.*full log: .*failed-[0-9a-f]{16}\.log"):
        build_kernels(settings=settings, native_dir=native, progress=lambda m: None)
    kernels = settings.cache_dir / "kernels"
    assert [p.name for p in kernels.iterdir() if not p.name.startswith(".locks")] == [
        f"failed-{build.plan_build(settings, native).key}.log"
    ]


def test_autotune_records_table_and_winner(cold, home):
    settings = Settings(home=home)
    library = load_library(settings, build_if_missing=False)
    entry = autotune(library, get_shape("tiny"), budget_s=15, progress=lambda m: None)
    manifest = read_manifest(library.path.parent)
    stored = manifest["autotune"][f"{entry['signature']}/{library.isa}"]
    assert stored == entry and entry["signature"] == "h256-q4x64-kv2-ffn768" and not entry["truncated"]
    assert entry["layers"] == 2  # the tiny model has 2 layers: it is timed in cache, as it runs
    phases = {(r["phase"], r["threads"], r["gemm_token_tile"]) for r in entry["table"]}
    for threads in entry["thread_counts"]:
        assert ("decode", threads, None) in phases
        assert {("prefill", threads, tile) for tile in TOKEN_TILES} <= phases
    assert {(r["rows"], r["cols"], r["n_tokens"]) for r in entry["kernels"]} == {
        (rows, cols, n) for rows, cols in {(256, 256), (128, 256), (768, 256), (256, 768)} for n in (1, 64)
    }
    assert all(
        r["median_us"] > 0 and r["gbps"] > 0 and r["gmacs"] > 0 and r["repeats"] >= 1
        for r in entry["table"] + entry["kernels"]
    )
    w = entry["winner"]
    assert w["gemm_token_tile"] in TOKEN_TILES and w["threads_decode"] in entry["thread_counts"]
    assert w["threads_prefill"] in entry["thread_counts"]
    assert tuned_parameters(manifest, get_shape("tiny"), library.isa) == w

    # a second model shape adds its own entry and keeps the first
    other = autotune(
        library, TuneShape(hidden=512, heads=8, kv_heads=2, head_dim=64, ffn=1024), budget_s=5, progress=lambda m: None
    )
    entries = read_manifest(library.path.parent)["autotune"]
    assert {f"{entry['signature']}/{library.isa}", f"{other['signature']}/{library.isa}"} <= set(entries)


def test_autotune_stops_at_its_budget(cold, home):
    library = load_library(Settings(home=home), build_if_missing=False)
    # A budget well under the sweep's minimum: at 0.05 s the whole tiny sweep (2-3 repeats per row, each
    # microseconds) sometimes finished inside it and was, correctly, not truncated.
    entry = autotune(library, get_shape("tiny"), budget_s=0.001, record=False, progress=lambda m: None)
    assert entry["truncated"], {k: entry.get(k) for k in ("seconds", "loadavg", "table")}
    assert entry["seconds"] < 5, {k: entry.get(k) for k in ("seconds", "loadavg", "table")}


def test_cli_autotune_on_a_gguf(cold, home, tmp_path):
    gguf = write_tuning_model(
        tmp_path / "small.gguf", TuneShape(hidden=256, heads=2, kv_heads=1, head_dim=128, ffn=512)
    )
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "build-kernels", "--model", str(gguf), "--json"],
        env=_ryz_env(home),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads(proc.stdout)
    (entry,) = [e for key, e in manifest["autotune"].items() if key.startswith("h256-q2x128-kv1-ffn512/")]
    assert entry["source"] == "gguf small.gguf" and entry["winner"]["gemm_token_tile"] in TOKEN_TILES


def test_force_rebuilds(cold, home):
    settings = Settings(home=home)
    before = find_build(settings)
    crashed = home / "cache" / "kernels" / f".tmp-{before.key}-crashed"  # what a killed builder leaves
    crashed.mkdir()
    (crashed / "libryz.so").write_bytes(b"half")
    again = build_kernels(force=True, settings=settings, progress=lambda m: None)
    assert not again.cache_hit and again.key == before.key
    assert again.manifest["created"] >= before.manifest["created"] and again.manifest["autotune"] == {}
    assert read_manifest(again.directory) == again.manifest
    kernels = home / "cache" / "kernels"
    assert not [p.name for p in kernels.iterdir() if p.name.startswith((".tmp-", ".old-"))]


# --- where the sources are: a checkout or an installed wheel ------------------------------------------


def _copy_sources_as_installed(site: Path) -> Path:
    """The hashed native sources laid out as a wheel installs them: site/ryz_native/..."""
    installed = site / build.NATIVE_PACKAGE
    for path in build._source_files(NATIVE_DIR):
        target = installed / path.relative_to(NATIVE_DIR)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    return installed


def test_native_sources_resolve_from_the_installed_package(tmp_path, monkeypatch):
    """Without a checkout next to the engine, the sources are the installed `ryz_native` package's, with the
    checkout's source hash (hence the same build key); with neither, the error names both places."""
    # Under its own package name: an editable install of this checkout maps `ryz_native` itself with a meta-path
    # finder that wins over sys.path, so the real name would always resolve to the checkout.
    monkeypatch.setattr(build, "NATIVE_PACKAGE", "ryz_native_as_installed")
    installed = _copy_sources_as_installed(tmp_path / "site-packages")
    checkout = tmp_path / "wheel-install" / "native"  # what parents[2] / "native" is in site-packages: absent
    monkeypatch.setattr(build, "CHECKOUT_NATIVE_DIR", checkout)
    monkeypatch.syspath_prepend(str(tmp_path / "site-packages"))
    assert build.native_source_dir() == installed.resolve()
    assert source_hash() == source_hash(installed) == source_hash(NATIVE_DIR)
    assert build._native_root(None) == installed.resolve()

    (installed / "CMakeLists.txt").unlink()  # a broken install
    with pytest.raises(BuildError, match=rf"(?s){re.escape(str(checkout))}.*ryz_native.*{re.escape(str(installed))}"):
        build.native_source_dir()
    with pytest.raises(BuildError, match="neither the source checkout"):
        source_hash()


def test_setuptools_lists_every_package():
    """pyproject.toml lists its packages (`ryz_native` is native/ under another name, which `packages.find` cannot
    do): every directory under each listed top-level package must be listed too, or the wheel lacks it."""
    import tomllib

    setuptools = pytest.importorskip("setuptools")
    root = Path(__file__).resolve().parents[1]
    config = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = set()
    for top in {p for p in listed if "." not in p}:
        where = root / config.get("package-dir", {}).get(top, top)
        found |= {top, *(f"{top}.{sub}" for sub in setuptools.find_namespace_packages(where=str(where)))}
    assert listed == found


def test_a_wheel_carries_the_native_sources(tmp_path):
    """pip wheel of this project, unpacked and imported outside the checkout: the kernel build's sources are the
    wheel's `ryz_native`, with the checkout's source hash."""
    import zipfile

    pytest.importorskip("setuptools")
    root = Path(__file__).resolve().parents[1]
    src = tmp_path / "src"
    for name in ("engine", "flows", "tasks", "evaluations", "deployments"):
        shutil.copytree(root / name, src / name, ignore=shutil.ignore_patterns("__pycache__", ".*"))
    _copy_native(src / "native")
    for name in ("pyproject.toml", "README.md"):
        shutil.copyfile(root / name, src / name)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q"]
        + ["-w", str(tmp_path / "dist"), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        zf.extractall(tmp_path / "site")
    carried = {n for n in names if n.startswith("ryz_native/")}
    assert {f"ryz_native/{p.relative_to(NATIVE_DIR).as_posix()}" for p in build._source_files(NATIVE_DIR)} <= carried
    assert "ryz_native/CMakeLists.txt" in carried and not [n for n in carried if n.endswith((".o", ".so"))]
    probe = (
        "import json, engine; from engine.model import build; d = build.native_source_dir(); "
        "print(json.dumps([engine.__file__, str(d), build.source_hash(), str(build.NATIVE_DIR)]))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path,
        env=_ryz_env(tmp_path / "home", PYTHONPATH=str(tmp_path / "site")),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    engine_file, native, digest, native_dir = json.loads(proc.stdout)
    site = (tmp_path / "site").resolve()
    assert Path(engine_file).resolve().is_relative_to(site)  # the wheel's engine, not the checkout's
    assert Path(native) == Path(native_dir) == site / "ryz_native" and (Path(native) / "CMakeLists.txt").is_file()
    assert digest == source_hash(NATIVE_DIR)
