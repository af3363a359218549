"""Kernel self-test: a freshly built library proves itself through its own C ABI before it is cached or loaded.

Each check runs on a few small shapes (about a second in all):

    scalar vs naive     the spec against numpy's own arithmetic: ternary GEMM and activation quantization bit for
                        bit, dense GEMM and attention within a rounding bound
    family vs scalar    every SIMD family this CPU runs against the scalar spec: bit for bit on integer outputs
                        (ternary GEMM, every token tile), activation quantization and attention; dense GEMM within
                        the bound, and the same bits in every SIMD family (they share one reduction tree)
    GQA kernels         in every family, kv_dot_multi / kv_axpy_multi give each query the bits the single-query
                        kernels give it, and those equal scalar's

The full suite (native/tests/test_kernels.cpp, ~20k checks) stays in `make test`; this is what every build runs.
`run_self_test` executes it in a child process (`python -m engine.model.selftest LIB --json`), so a miscompiled library
that crashes fails its test instead of the builder. The ISA switch is process-wide, which is one more reason to
keep it out of a process that serves.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from engine.model import quants
from engine.model.native import ISAS, KV_TYPES, Library

MAX_FAILURES = 8  # messages kept per family: the first ones say what is wrong
TIMEOUT_S = 300  # a hung kernel is a failure too
# rows, cols, tokens; the last two are AMX's paths in full: 4 row tiles of 16 plus a 4-row tail, 3 token tiles (one
# partial), then its prefill path (128 tokens or more) with an odd number of row tiles and token tiles
TERNARY_CASES = ((4, 256, 1), (12, 1024, 11), (16, 512, 1), (8, 2816, 7), (36, 768, 70), (68, 1280, 33), (52, 512, 131))
TOKEN_TILES = (0, 1, 3, 6)
DENSE_CASES = (("q8_0", 8, 512, 3), ("f16", 5, 256, 2), ("q6_k", 4, 512, 1), ("f32", 3, 96, 1))
KV_HEAD_SIZES = (8, 64, 100, 128)
GQA_QUERIES = 5  # queries per multi-query call (a KV group's heads for a block of tokens)


class _Checks:
    """Counts checks and keeps the first failures of one kernel family."""

    def __init__(self) -> None:
        self.passed = 0
        self.failed = 0
        self.failures: list[str] = []

    def equal(self, got: np.ndarray, want: np.ndarray, what: str) -> None:
        """Bit for bit (floats compared as their bytes, so -0.0 and NaN payloads count)."""
        if got.shape == want.shape and np.array_equal(
            got.view(np.uint8) if got.dtype.kind == "f" else got,
            want.view(np.uint8) if want.dtype.kind == "f" else want,
        ):
            self.passed += 1
            return
        self._fail(got, want, what, "", got != want if got.shape == want.shape else None)

    def close(self, got: np.ndarray, want: np.ndarray, bound: np.ndarray, what: str) -> None:
        bad = np.abs(got.astype(np.float64) - want) > bound if got.shape == want.shape else None
        if bad is not None and not bad.any():
            self.passed += 1
            return
        self._fail(got, want, what, " (beyond the rounding bound)", bad)

    def _fail(self, got: np.ndarray, want: np.ndarray, what: str, why: str, bad: np.ndarray | None) -> None:
        """Count a failure; keep a message naming the first element that is wrong."""
        self.failed += 1
        if len(self.failures) >= MAX_FAILURES:
            return
        if bad is None:
            self.failures.append(f"{what}: shape {got.shape}, want {want.shape}")
            return
        where = np.argwhere(bad)
        at = tuple(int(i) for i in where[0]) if len(where) else (0,) * got.ndim  # bytes differ only (e.g. -0.0)
        self.failures.append(f"{what}: out{list(at)} = {got[at].item()!r}, want {want[at].item()!r}{why}")

    def report(self, seconds: float) -> dict:
        return {
            "passed": self.failed == 0,
            "checks": self.passed + self.failed,
            "failed": self.failed,
            "failures": self.failures,
            "seconds": round(seconds, 3),
        }


def _rounding_bound(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    """|float32 dot - exact| <= 2 gamma_n sum |w x|, gamma_n = n u / (1 - n u): any summation order."""
    n = w.shape[-1] + 1
    u = 2.0**-24
    return 2.0 * (n * u / (1.0 - n * u)) * (np.abs(x.astype(np.float64)) @ np.abs(w.astype(np.float64)).T) + 1e-30


def _quantize_naive(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ryz_quantize_activations' definition in numpy float32 (rint: half to even)."""
    amax = np.max(np.abs(x), axis=1)
    scale = (np.float32(127.0) / np.maximum(amax, np.float32(1e-5))).astype(np.float32)
    q = np.clip(np.rint(x * scale[:, None]), -128, 127).astype(np.int8)
    return q, scale, q.astype(np.int32).sum(axis=1, dtype=np.int32)


def _cases(rng: np.random.Generator):
    """The inputs, made once so that every family sees the same ones."""
    ternary = []
    for rows, cols, n in TERNARY_CASES:
        codes = rng.integers(-1, 2, size=(rows, cols), dtype=np.int8)
        act = rng.integers(-128, 128, size=(n, cols), dtype=np.int8)
        if n > 1:  # the extremes that overflow a careless int16 accumulator
            codes[0, :] = 1
            act[0, :] = -128
            act[1, :] = 127
        ternary.append((rows, cols, codes, act, quants.pack_ternary(codes, "tq2_0")))
    x = rng.standard_normal((6, 1024)).astype(np.float32) * np.float32(3.0)
    x[1, :] = 0.0  # amax below the floor
    x[2, ::2] = np.float32(0.5) / np.float32(127.0) * 4  # ties after scaling
    x[3, :] *= np.float32(1e-30)  # tiny and subnormal values
    dense = []
    for qtype, rows, cols, n in DENSE_CASES:
        w = rng.standard_normal((rows, cols)).astype(np.float32)
        raw = quants.quantize(w, qtype)
        dense.append(
            (
                qtype,
                rows,
                cols,
                raw,
                quants.dequantize(raw, qtype, (rows, cols)),
                rng.standard_normal((n, cols)).astype(np.float32),
            )
        )
    kv = []
    for d in KV_HEAD_SIZES:
        n_pos, stride = 37, d * 2 + 8  # several heads per row, rows not 64-byte aligned
        q = rng.standard_normal(d).astype(np.float32)
        probs = rng.random(n_pos).astype(np.float32)
        cache = rng.standard_normal((n_pos, stride)).astype(np.float32)
        gqa_q = rng.standard_normal((GQA_QUERIES, d)).astype(np.float32)
        gqa_probs = rng.random((GQA_QUERIES, n_pos)).astype(np.float32)
        gqa_n_pos = np.array([n_pos, n_pos - 3, 1, n_pos, 7], np.int32)  # causal: each query its own length
        kv.append((d, n_pos, stride, q, probs, cache, (gqa_q, gqa_probs, gqa_n_pos)))
    return ternary, x, dense, kv


def _family_outputs(library, isa: str, cases) -> dict:
    """Every kernel's outputs on every case, with `isa` forced."""
    ternary, x, dense, kv = cases
    library.set_isa(isa)
    out: dict = {"ternary": [], "quantize": None, "dense": [], "kv": []}
    for rows, cols, _codes, act, raw in ternary:
        packed = library.ternary_pack(raw, "tq2_0", rows, cols)
        out["ternary"].append([library.ternary_gemm(packed, rows, cols, act, token_tile=t) for t in TOKEN_TILES])
    out["quantize"] = library.quantize_activations(x)
    for qtype, rows, cols, raw, _deq, xs in dense:
        out["dense"].append(library.dense_gemm(raw, qtype, rows, cols, xs))
    lib = library.lib
    for d, n_pos, stride, q, probs, cache, gqa in kv:
        per_type = {}
        for kv_name, kv_type in KV_TYPES.items():
            data = np.ascontiguousarray(cache if kv_name == "f32" else cache.astype(np.float16))
            scores, values = np.zeros(n_pos, np.float32), np.zeros(d, np.float32)
            library.check(
                lib.ryz_kv_dot(q.ctypes.data, data.ctypes.data, kv_type, stride, n_pos, d, scores.ctypes.data), "kv_dot"
            )
            library.check(
                lib.ryz_kv_axpy(
                    probs.ctypes.data, data[:, d:].ctypes.data, kv_type, stride, n_pos, d, values.ctypes.data
                ),
                "kv_axpy",
            )
            per_type[kv_name] = (scores, values, _gqa_outputs(library, data, kv_type, stride, n_pos, d, gqa))
        out["kv"].append(per_type)
    return out


def _pointers(rows: np.ndarray):
    return (ctypes.c_void_p * len(rows))(*(row.ctypes.data for row in rows))


def _gqa_outputs(library, data: np.ndarray, kv_type: int, stride: int, n_pos: int, d: int, gqa) -> dict | None:
    """The multi-query kernels' outputs and the single-query kernels' on the same queries; None for a library
    older than ABI 5 (an older serving bundle's), which has no multi-query kernels to test."""
    if library.abi < 5:
        return None
    qs, probs, lengths = gqa
    lib, nq = library.lib, len(qs)
    multi_scores, single_scores = np.zeros((nq, n_pos), np.float32), np.zeros((nq, n_pos), np.float32)
    multi_values, single_values = np.zeros((nq, d), np.float32), np.zeros((nq, d), np.float32)
    keys, values = data.ctypes.data, data[:, d:].ctypes.data
    library.check(
        lib.ryz_kv_dot_multi(_pointers(qs), nq, keys, kv_type, stride, n_pos, d, _pointers(multi_scores)),
        "kv_dot_multi",
    )
    library.check(
        lib.ryz_kv_axpy_multi(
            _pointers(probs), nq, lengths.ctypes.data, values, kv_type, stride, d, _pointers(multi_values)
        ),
        "kv_axpy_multi",
    )
    for j in range(nq):
        library.check(
            lib.ryz_kv_dot(qs[j].ctypes.data, keys, kv_type, stride, n_pos, d, single_scores[j].ctypes.data), "kv_dot"
        )
        library.check(
            lib.ryz_kv_axpy(
                probs[j].ctypes.data, values, kv_type, stride, int(lengths[j]), d, single_values[j].ctypes.data
            ),
            "kv_axpy",
        )
    return {"multi": (multi_scores, multi_values), "single": (single_scores, single_values)}


def _check_gqa(checks: _Checks, isa: str, d: int, kv_name: str, got: dict | None, scalar: dict | None) -> None:
    """Each query of a multi-query call has its single-query bits, and those are scalar's."""
    if got is None or scalar is None:  # an ABI 3/4 library: no multi-query kernels
        return
    for j, (ms, mv, ss, sv) in enumerate(zip(*got["multi"], *got["single"])):
        checks.equal(ms, ss, f"kv_dot_multi {kv_name} {isa} vs kv_dot d={d} query {j}")
        checks.equal(mv, sv, f"kv_axpy_multi {kv_name} {isa} vs kv_axpy d={d} query {j}")
    if got is not scalar:
        checks.equal(got["single"][0], scalar["single"][0], f"kv_dot {kv_name} {isa} vs scalar d={d} (GQA queries)")
        checks.equal(got["single"][1], scalar["single"][1], f"kv_axpy {kv_name} {isa} vs scalar d={d} (GQA queries)")


def _check_scalar(checks: _Checks, cases, got: dict) -> None:
    """The spec against numpy's arithmetic."""
    ternary, x, dense, kv = cases
    for (rows, cols, codes, act, _raw), outs in zip(ternary, got["ternary"]):
        want = act.astype(np.int32) @ codes.astype(np.int32).T
        for tile, out in zip(TOKEN_TILES, outs):
            checks.equal(out, want, f"ternary_gemm scalar vs naive {rows}x{cols} n={len(act)} token_tile={tile}")
    for name, g, w in zip(("q", "scale", "sum"), got["quantize"], _quantize_naive(x)):
        checks.equal(g, w, f"quantize_activations scalar vs naive ({name})")
    for (qtype, rows, cols, _raw, deq, xs), out in zip(dense, got["dense"]):
        exact = xs.astype(np.float64) @ deq.astype(np.float64).T
        checks.close(
            out, exact, _rounding_bound(deq, xs), f"dense_gemm {qtype} scalar vs naive {rows}x{cols} n={len(xs)}"
        )
    for (d, n_pos, stride, q, probs, cache, _gqa), per_type in zip(kv, got["kv"]):
        for kv_name, (scores, values, gqa_out) in per_type.items():
            _check_gqa(checks, "scalar", d, kv_name, gqa_out, gqa_out)
            c = (cache if kv_name == "f32" else cache.astype(np.float16)).astype(np.float64)
            keys, vals = c[:, :d], c[:, d : 2 * d]
            checks.close(
                scores, keys @ q, _rounding_bound(keys, q[None, :])[0], f"kv_dot {kv_name} scalar vs naive d={d}"
            )
            checks.close(
                values,
                probs @ vals,
                _rounding_bound(vals.T, probs[None, :])[0],
                f"kv_axpy {kv_name} scalar vs naive d={d}",
            )


def _check_family(checks: _Checks, isa: str, cases, got: dict, scalar: dict, simd_peer: dict | None) -> None:
    """A SIMD family against the scalar spec (and against the first SIMD family for dense bits)."""
    ternary, _x, dense, kv = cases
    for (rows, cols, _codes, act, _raw), outs, want in zip(ternary, got["ternary"], scalar["ternary"]):
        for tile, out, ref in zip(TOKEN_TILES, outs, want):
            checks.equal(out, ref, f"ternary_gemm {isa} vs scalar {rows}x{cols} n={len(act)} token_tile={tile}")
    for name, g, w in zip(("q", "scale", "sum"), got["quantize"], scalar["quantize"]):
        checks.equal(g, w, f"quantize_activations {isa} vs scalar ({name})")
    for i, (qtype, rows, cols, _raw, deq, xs) in enumerate(dense):
        what = f"dense_gemm {qtype} {isa} vs scalar {rows}x{cols} n={len(xs)}"
        checks.close(got["dense"][i], scalar["dense"][i].astype(np.float64), 2 * _rounding_bound(deq, xs), what)
        if simd_peer is not None:
            checks.equal(got["dense"][i], simd_peer["dense"][i], what.replace("vs scalar", f"vs {simd_peer['isa']}"))
    for (d, *_), per_type, want in zip(kv, got["kv"], scalar["kv"]):
        for kv_name in per_type:
            checks.equal(per_type[kv_name][0], want[kv_name][0], f"kv_dot {kv_name} {isa} vs scalar d={d}")
            checks.equal(per_type[kv_name][1], want[kv_name][1], f"kv_axpy {kv_name} {isa} vs scalar d={d}")
            _check_gqa(checks, isa, d, kv_name, per_type[kv_name][2], want[kv_name][2])


def self_test(library, seed: int = 0) -> dict:
    """Run every check on `library` (an engine.model.native.Library) and restore its ISA afterwards.

    Returns {"passed", "families": {isa: {"passed", "checks", "failed", "failures", "seconds"}}, "failures",
    "seconds"}; "failures" names the first failing checks across families ("ternary_gemm scalar vs naive ...")."""
    start = time.perf_counter()
    before = library.isa
    cases = _cases(np.random.default_rng(seed))
    families: dict[str, dict] = {}
    try:
        t0 = time.perf_counter()
        scalar = _family_outputs(library, "scalar", cases)
        checks = _Checks()
        _check_scalar(checks, cases, scalar)
        families["scalar"] = checks.report(time.perf_counter() - t0)
        simd_peer = None
        for isa in (name for name in ISAS if name != "scalar" and library.isa_supported(name)):
            t0 = time.perf_counter()
            got = _family_outputs(library, isa, cases)
            got["isa"] = isa
            checks = _Checks()
            _check_family(checks, isa, cases, got, scalar, simd_peer)
            families[isa] = checks.report(time.perf_counter() - t0)
            simd_peer = simd_peer or got
    finally:
        library.set_isa(before)
    failures = [f for report in families.values() for f in report["failures"][:3]]  # each failing family named
    return {
        "passed": all(r["passed"] for r in families.values()),
        "families": families,
        "failures": failures,
        "seconds": round(time.perf_counter() - start, 3),
    }


def run_self_test(
    library_path: str | Path,
    timeout: float = TIMEOUT_S,
    runner: Callable[..., subprocess.CompletedProcess] = subprocess.run,
) -> dict:
    """`self_test` on the library at `library_path`, in a child process. A crash, a hang or unreadable output is a
    failed self-test whose "failures" say so."""
    cmd = [sys.executable, "-m", "engine.model.selftest", str(library_path), "--json"]
    try:
        proc = runner(cmd, capture_output=True, text=True, timeout=timeout, cwd=Path(__file__).resolve().parents[2])
    except subprocess.TimeoutExpired:
        return _crashed(f"the self-test did not finish within {timeout:.0f} s (a kernel hangs)")
    try:
        result = json.loads(proc.stdout)
    except ValueError:
        how = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
        return _crashed(f"the self-test process died ({how}): {(proc.stderr or '').strip()[-600:]}")
    return result


def _crashed(message: str) -> dict:
    return {"passed": False, "families": {}, "failures": [message], "seconds": None}


def failing_families(result: dict) -> list[str]:
    return [isa for isa, report in result.get("families", {}).items() if not report["passed"]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.model.selftest", description=__doc__.split("\n\n")[0])
    parser.add_argument("library", help="path of a built libryz.so")
    parser.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    args = parser.parse_args(argv)
    try:
        result = self_test(Library(args.library))
    except Exception as exc:  # noqa: BLE001 - any failure of the library under test is a failed self-test
        result = _crashed(f"{type(exc).__name__}: {exc}")
    if args.json:
        print(json.dumps(result))
    else:
        for isa, report in result["families"].items():
            print(
                f"{isa:8s} {'ok' if report['passed'] else 'FAILED'}: {report['checks'] - report['failed']} of "
                f"{report['checks']} checks passed ({report['seconds']:.2f} s)"
            )
        for failure in result["failures"]:
            print(f"  {failure}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
