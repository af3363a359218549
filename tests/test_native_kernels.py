"""native/tests/test_kernels.cpp (every SIMD family against scalar, through the C ABI), run as the
executable CMake builds: once from the normal build, once under AddressSanitizer + UBSan."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from engine.errors import ToolchainNotFoundError
from engine.model.build import build_kernels
from engine.settings import Settings

SANITIZER_ENV = {
    "ASAN_OPTIONS": "abort_on_error=0:halt_on_error=1:detect_leaks=1:detect_stack_use_after_return=1",
    "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
}


def _run_tests(executable, env=None, timeout=600) -> subprocess.CompletedProcess:
    if executable is None or not executable.is_file():
        pytest.skip("the build produced no ryz_native_tests (RYZ_BUILD_TESTS=OFF or native/tests/ missing)")
    proc = subprocess.run(
        [str(executable)], capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )
    assert proc.returncode == 0, (
        f"ryz_native_tests exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    )
    return proc


def test_native_kernel_tests(kernel_build):
    proc = _run_tests(kernel_build.tests_executable)
    assert proc.stdout.rstrip().endswith(" 0 failed"), proc.stdout[-2000:]


@pytest.mark.slow
def test_native_kernel_tests_under_sanitizers():
    """A RYZ_SANITIZE=ON build (its own key, cached like any build) runs the same tests with ASan + UBSan:
    out-of-bounds reads in ragged tails, misaligned loads and signed overflow fail here."""
    try:
        sanitized = build_kernels(settings=Settings(), sanitize=True)
    except ToolchainNotFoundError as exc:
        pytest.skip(f"cannot build the native kernels: {exc}")
    assert "-DRYZ_SANITIZE=ON" in sanitized.manifest["flags"]
    proc = _run_tests(sanitized.tests_executable, SANITIZER_ENV, timeout=900)
    assert "runtime error" not in proc.stderr  # UBSan reports that survived halt_on_error


@pytest.mark.slow
def test_clang_builds_and_passes_the_kernel_tests():
    """Both GCC and Clang build kernels that pass the full suite (a Clang build has its own key: the compiler is
    part of it). Clang is not on these machines by default (Debian's `clang` package installs it)."""
    if shutil.which("clang++") is None:
        pytest.skip("clang++ is not installed (apt-get install clang)")
    clang = build_kernels(settings=Settings(cxx="clang++"), progress=lambda m: None)
    assert "clang" in clang.manifest["compiler"]["version"] and clang.manifest["self_test"]["passed"]
    proc = _run_tests(clang.tests_executable)
    assert proc.stdout.rstrip().endswith(" 0 failed"), proc.stdout[-2000:]
