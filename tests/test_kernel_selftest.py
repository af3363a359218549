"""Every kernel build proves itself (engine/model/selftest.py, engine/model/build.py): the self-test passes on a good
build,
catches a wrong kernel injected into a copy of native/, and the build then falls back or is refused, never
cached as good; the parity check runs on every kernel family, not only the dispatched one."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from engine.errors import BuildError
from engine.model import build
from engine.model.build import NATIVE_DIR, build_kernels, find_build, read_manifest
from engine.model.native import ISAS, Library
from engine.model.parity import check_parity
from engine.model.quantize import quantize_checkpoint
from engine.model.selftest import run_self_test
from engine.settings import Settings
from tests import checkpoints

FAMILY_FILES = {"scalar": "scalar.cpp", "avx2": "avx2.cpp", "avx512": "avx512.cpp", "neon": "neon.cpp"}


def _faulty_tree(dst: Path, family: str) -> Path:
    """A copy of native/ whose `family` ternary GEMM flips the lowest bit of its first output: the wrong code a
    miscompile would produce, in one kernel family only."""
    tree = Path(shutil.copytree(NATIVE_DIR, dst, ignore=shutil.ignore_patterns("build*", ".*")))
    source = tree / "kernels" / FAMILY_FILES[family]
    text = source.read_text()
    table = f"static const Kernels k{{RYZ_ISA_{family.upper()}, ternary_gemm_{family},"
    assert table in text, f"the {family} kernel table moved; update this test"
    wrapper = (
        f"static void faulty_gemm(const uint8_t *p, int64_t rb, int64_t re, int64_t c, const int8_t *a, const int32_t "
        f"*s,\n"
        f"                        int32_t n, int32_t tt, int32_t *out, int64_t os) {{\n"
        f"    ternary_gemm_{family}(p, rb, re, c, a, s, n, tt, out, os);\n"
        f"    out[rb] ^= 1;\n}}\n\n"
    )
    lines = text.splitlines(keepends=True)
    at = next(n for n, line in enumerate(lines) if table in line)
    while not lines[at].startswith("const Kernels"):  # the function that returns the table
        at -= 1
    lines.insert(at, wrapper)
    source.write_text("".join(lines).replace(table, f"static const Kernels k{{RYZ_ISA_{family.upper()}, faulty_gemm,"))
    return tree


def _best_simd(library) -> str:
    # not amx: its table is AVX-512's, copied at run time (no table literal to break); a wrong AVX-512 GEMM fails both
    for name in ("avx512", "avx2", "neon"):
        if library.isa_supported(name):
            return name
    pytest.skip("this CPU runs no SIMD kernel family")


@pytest.fixture()
def lean_builds(monkeypatch):
    """Builds without the test executable: these tests only need the library."""
    flags = build.build_flags
    monkeypatch.setattr(
        build,
        "build_flags",
        lambda *a, **k: [f.replace("RYZ_BUILD_TESTS=ON", "RYZ_BUILD_TESTS=OFF") for f in flags(*a, **k)],
    )


def test_the_session_build_passed_its_self_test(kernel_build, native_library):
    test = kernel_build.manifest["self_test"]
    supported = {isa for isa in ISAS if native_library.isa_supported(isa)}
    assert test["passed"] and set(test["families"]) == supported, test
    assert all(r["passed"] and r["checks"] >= 40 for r in test["families"].values())
    again = run_self_test(kernel_build.path)  # and it passes again, in a child process, in about a second
    assert again["passed"] and again["seconds"] < 30, again
    best = next((isa for isa in ("amx", "avx512") if isa in supported), native_library.isa)
    assert native_library.isa == best  # ISA left as it was


def test_a_library_that_will_not_load_fails_the_self_test(tmp_path):
    junk = tmp_path / "libryz.so"
    junk.write_bytes(b"\x7fELF not really")
    result = run_self_test(junk)
    assert not result["passed"] and result["failures"][0].startswith("NativeError: cannot load the native library"), (
        result
    )


@pytest.mark.slow
def test_a_wrong_spec_is_refused_and_not_cached(tmp_path, lean_builds):
    native = _faulty_tree(tmp_path / "native", "scalar")
    # A wrong spec is refused whatever the SIMD families do: leaving them out (CMake's own RYZ_DISABLE_FAMILIES;
    # avx512 and amx go with avx2) halves both builds' compile time.
    cmake = native / "CMakeLists.txt"
    default = 'set(RYZ_DISABLE_FAMILIES "" CACHE STRING'
    assert default in cmake.read_text(), "RYZ_DISABLE_FAMILIES moved; update this test"
    cmake.write_text(cmake.read_text().replace(default, 'set(RYZ_DISABLE_FAMILIES "avx2;neon" CACHE STRING'))
    settings = Settings(home=tmp_path / "home")
    with pytest.raises(BuildError) as err:
        build_kernels(settings=settings, native_dir=native, progress=lambda m: None)
    message = str(err.value)
    assert "fail their self-test with every flag set tried (standard flags; -DRYZ_CONSERVATIVE=ON)" in message
    assert re.search(r"ternary_gemm scalar vs naive \d+x\d+ n=\d+ token_tile=\d+: out\[0, 0\]", message), message
    compiler = build.plan_build(settings, native).compiler
    assert compiler["cxx"] in message and compiler["cxx_version"] in message and "RYZ_CXX" in message
    kernels = settings.cache_dir / "kernels"
    key = build.plan_build(settings, native).key
    assert [p.name for p in kernels.iterdir() if not p.name.startswith(".locks")] == [f"failed-{key}.log"]
    assert find_build(settings, native) is None
    with pytest.raises(BuildError, match="no native kernel build"):
        build.load_library(settings, build_if_missing=False, native_dir=native)


@pytest.mark.slow
def test_a_wrong_simd_family_falls_back_to_a_build_without_it(tmp_path, native_library, lean_builds):
    family = _best_simd(native_library)
    native = _faulty_tree(tmp_path / "native", family)
    settings = Settings(home=tmp_path / "home")
    messages: list[str] = []
    result = build_kernels(settings=settings, native_dir=native, progress=messages.append)
    manifest = read_manifest(result.directory)
    fallback = manifest["fallback"]
    # AMX runs AVX-512's kernels below 8 tokens and for row tails, so a wrong AVX-512 GEMM fails it too
    failing = [family, *(["amx"] if family == "avx512" and native_library.isa_supported("amx") else [])]
    assert fallback["extra_flags"] == ["-DRYZ_CONSERVATIVE=ON", f"-DRYZ_DISABLE_FAMILIES={';'.join(failing)}"], fallback
    assert [a["passed"] for a in fallback["attempts"]] == [False, False, True]
    assert f"ternary_gemm {family} vs scalar" in fallback["reason"] and "-DRYZ_CONSERVATIVE=ON" in fallback["reason"]
    assert manifest["self_test"]["passed"] and family not in manifest["self_test"]["families"]
    assert any("kernel self-test FAILED" in m for m in messages) and any("fall-back flags" in m for m in messages)
    library = Library(result.path)
    assert not library.isa_supported(family) and library.isa_supported("scalar")
    assert build_kernels(settings=settings, native_dir=native, progress=lambda m: None).cache_hit  # proven: cached


@pytest.mark.slow
def test_parity_runs_on_every_family_and_names_a_wrong_one(tmp_path, native_library):
    family = _best_simd(native_library)
    tiny = checkpoints.synth(tmp_path / "tiny", seed=3)
    model = tmp_path / "tiny.gguf"
    quantize_checkpoint(tiny, model)
    supported = [isa for isa in ISAS if native_library.isa_supported(isa)]

    good = check_parity(model, native_library, new_tokens=4)
    assert good["passed"] and set(good["isas"]) == set(supported) and good["isa"] == native_library.isa, good
    assert all(r["rel_l2"] < 1e-5 for r in good["isas"].values())

    tree = _faulty_tree(tmp_path / "native", family)  # built directly: build_kernels would refuse it
    subprocess.run(
        [
            build._find_cmake()[0],
            "-S",
            str(tree),
            "-B",
            str(tmp_path / "b"),
            "-DRYZ_BUILD_TESTS=OFF",
            "-DCMAKE_BUILD_TYPE=Release",
        ],
        check=True,
        capture_output=True,
    )
    subprocess.run([build._find_cmake()[0], "--build", str(tmp_path / "b"), "-j", "2"], check=True, capture_output=True)
    faulty = Library(tmp_path / "b" / build.LIBRARY_NAME)
    faulty.set_isa("scalar")  # dispatch something else: the wrong family must be found all the same
    bad = check_parity(model, faulty, new_tokens=4)
    assert not bad["passed"] and not bad["isas"][family]["passed"] and bad["isas"]["scalar"]["passed"], bad
    assert bad["reason"].startswith(f"{family}: logits differ by") and faulty.isa == "scalar"


def test_failure_messages_name_the_first_wrong_element():
    from engine.model.selftest import _Checks

    checks = _Checks()
    got, want = np.array([1.0, 2.0, 3.5], np.float32), np.array([1.0, 2.0000001, 3.0])
    checks.close(got, want, np.full(3, 1e-3), "dense_gemm f16 avx2 vs scalar")  # 2.0 is inside the bound, 3.5 is not
    checks.equal(np.array([0.0], np.float32), np.array([-0.0], np.float32), "kv_dot f32 avx2 vs scalar")  # bits differ
    checks.equal(np.array([1, 2], np.int32), np.array([1, 2], np.int32), "ternary_gemm")
    report = checks.report(0.0)
    assert (report["checks"], report["failed"], report["passed"]) == (3, 2, False)
    assert report["failures"] == [
        "dense_gemm f16 avx2 vs scalar: out[2] = 3.5, want 3.0 (beyond the rounding bound)",
        "kv_dot f32 avx2 vs scalar: out[0] = 0.0, want -0.0",
    ]
