"""engine.model.quants: ternary TQ packing, the numpy Q6_K port, and the gguf wrappers."""

from __future__ import annotations

import ctypes

import gguf
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from engine.model import quants
from engine.model.quants import (
    bytes_per_row,
    dequantize,
    ggml_type,
    pack_ternary,
    quantize,
    quantize_q6_k,
    unpack_ternary,
)

QT = gguf.GGMLQuantizationType


def _q6k_dequant(data: np.ndarray) -> np.ndarray:
    return gguf.quants.dequantize(data, QT.Q6_K)


# --- ternary packing ------------------------------------------------------------------------------


@st.composite
def ternary_matrices(draw):
    rows = draw(st.integers(1, 8))
    cols = 256 * draw(st.integers(1, 4))
    codes = draw(hnp.arrays(np.int8, (rows, cols), elements=st.sampled_from([-1, 0, 1])))
    # Random fills are almost never uniform, so force the edge cases explicitly.
    for r in range(rows):
        mode = draw(st.sampled_from(["keep", "keep", "zero_row", "ones_row", "minus_row", "zero_block"]))
        if mode == "zero_row":
            codes[r] = 0
        elif mode == "ones_row":
            codes[r] = 1
        elif mode == "minus_row":
            codes[r] = -1
        elif mode == "zero_block":
            b = draw(st.integers(0, cols // 256 - 1))
            codes[r, 256 * b : 256 * (b + 1)] = 0
    return codes


@pytest.mark.parametrize("qtype", ["tq1_0", "tq2_0"])
@settings(max_examples=200, deadline=None)
@given(codes=ternary_matrices())
def test_pack_unpack_ternary_roundtrip(qtype, codes):
    packed = pack_ternary(codes, qtype)
    assert packed.dtype == np.uint8
    assert packed.shape == (codes.shape[0], bytes_per_row(qtype, codes.shape[1]))
    back = unpack_ternary(packed, qtype, codes.shape)
    assert back.dtype == np.int8
    np.testing.assert_array_equal(back, codes)
    # ggml's own decoder (gguf's port of dequantize_row_tq*_0) sees code * 1.0 everywhere,
    # including all-zero blocks: every block scale is exactly fp16 1.0.
    decoded = gguf.quants.dequantize(packed, ggml_type(qtype))
    np.testing.assert_array_equal(decoded, codes.astype(np.float32))
    block_bytes = gguf.GGML_QUANT_SIZES[ggml_type(qtype)][1]
    d = packed.reshape(-1, block_bytes)[:, -2:].copy().view("<f2")
    assert (d == 1.0).all()


@pytest.mark.parametrize("qtype", ["tq1_0", "tq2_0"])
def test_pack_ternary_matches_ggml_layout(qtype):
    """Same bytes as gguf's (ggml-faithful) TQ quantizer on blocks with a nonzero code, where its
    d = max|x| is also 1.0; on all-zero blocks only d differs (gguf/ggml write 0)."""
    rng = np.random.default_rng(1)
    codes = rng.integers(-1, 2, size=(6, 1024), dtype=np.int8)
    codes[0] = 0
    codes[1, 256:512] = 0
    ours = pack_ternary(codes, qtype)
    theirs = gguf.quants.quantize(codes.astype(np.float32), ggml_type(qtype))
    bs = gguf.GGML_QUANT_SIZES[ggml_type(qtype)][1]
    ours_b, theirs_b = ours.reshape(-1, bs), theirs.reshape(-1, bs)
    zero_block = (codes.reshape(-1, 256) == 0).all(axis=1)
    np.testing.assert_array_equal(ours_b[:, :-2], theirs_b[:, :-2])
    np.testing.assert_array_equal(ours_b[~zero_block], theirs_b[~zero_block])
    assert (theirs_b[zero_block, -2:] == 0).all()


def test_pack_ternary_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\{-1, 0, 1\}"):
        pack_ternary(np.full((1, 256), 2, np.int8), "tq2_0")
    with pytest.raises(ValueError, match="integer"):
        pack_ternary(np.zeros((1, 256), np.float32), "tq2_0")
    with pytest.raises(ValueError, match="block size 256.*100"):
        pack_ternary(np.zeros((1, 100), np.int8), "tq1_0")
    with pytest.raises(ValueError, match="tq1_0 and tq2_0"):
        pack_ternary(np.zeros((1, 256), np.int8), "q8_0")


def test_unpack_ternary_rejects_scaled_blocks_and_wrong_sizes():
    x = np.zeros((1, 512), np.float32)
    x[0, :256] = 0.5
    scaled = gguf.quants.quantize(x, QT.TQ2_0)  # d = 0.5, then d = 0 on the all-zero block
    with pytest.raises(ValueError, match="not 1.0"):
        unpack_ternary(scaled, "tq2_0", x.shape)
    good = pack_ternary(np.zeros((1, 512), np.int8), "tq2_0")
    with pytest.raises(ValueError, match="bytes"):
        unpack_ternary(good[:, :-1], "tq2_0", (1, 512))


# --- Q6_K -----------------------------------------------------------------------------------------


def test_q6_k_layout_and_accuracy_on_gaussian():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 1024)).astype(np.float32)
    q = quantize_q6_k(x)
    assert q.dtype == np.uint8 and q.shape == (64, 1024 // 256 * 210)
    y = _q6k_dequant(q)
    # Error budget: each 16-value sub-block uses a step of about max|x|/32 (6-bit codes -32..31);
    # for 16 gaussian draws max|x| ~ 2 sigma, so the step is ~ sigma/16 and uniform rounding noise has
    # RMS step/sqrt(12) ~ 0.018 sigma. The 8-bit sub-scales and fp16 super-scale add well under 1%
    # of that, and the rmse search only lowers it (measured: 0.0178). 0.025 leaves margin for seeds.
    rel_rmse = np.sqrt(np.mean((y - x) ** 2)) / np.sqrt(np.mean(x**2))
    assert rel_rmse < 0.025
    # Same bound per row, so no row is left badly quantized.
    per_row = np.sqrt(np.mean((y - x) ** 2, axis=1)) / np.sqrt(np.mean(x**2, axis=1))
    assert per_row.max() < 0.025


def test_q6_k_exact_zeros_stay_zero():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((8, 512)).astype(np.float32)
    x[rng.random(x.shape) < 0.3] = 0.0
    x[3] = 0.0  # an all-zero row
    x[5, 256:] = 0.0  # an all-zero block
    q = quantize_q6_k(x)
    y = _q6k_dequant(q)
    assert (y[x == 0] == 0).all()
    assert (q[3] == 0).all()  # zero block: all 210 bytes zero, like ggml's memset
    assert (q[5, 210:] == 0).all()


@pytest.mark.parametrize("c", [1.0, -3.0, 123.456, 0.02, 1e6])
def test_q6_k_constant_rows(c):
    x = np.full((2, 512), c, np.float32)
    y = _q6k_dequant(quantize_q6_k(x))
    assert np.isfinite(y).all()
    assert (y == y[0, 0]).all()  # every value quantized the same way
    # a constant sits on a code exactly; only the fp16 super-scale and 8-bit sub-scale round it
    assert abs(y[0, 0] - c) <= 1e-3 * abs(c)


@pytest.mark.parametrize("magnitude", [1e-30, 1e30])
def test_q6_k_extreme_magnitudes_stay_finite(magnitude):
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((4, 512)) * magnitude).astype(np.float32)
    x[0, :256] = magnitude
    with np.errstate(all="raise"):  # no floating point warnings escape the quantizer
        q = quantize_q6_k(x)
    y = _q6k_dequant(q)
    assert np.isfinite(y).all()
    # ggml drops both: 1e-30 is below GROUP_MAX_EPS (1e-15); at 1e30, x*x overflows the weights of
    # the rmse search to inf, every sub-scale becomes NaN and the block is written as zeros.
    assert (y == 0).all()


def test_q6_k_overflowing_super_scale_is_ggml_behaviour():
    """Blocks with max|x| above ~2.6e8 need a super-scale max|x|/4096 beyond fp16's 65504: ggml (and
    this port) stores d = inf. Our models' tensors are orders of magnitude below that."""
    x = np.full((1, 256), 1e10, np.float32)
    d = quantize_q6_k(x)[0, 208:210].copy().view("<f2")[0]
    assert np.isinf(d)


def test_q6_k_accepts_float64_non_contiguous_and_nd():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 2, 512))
    expected = quantize_q6_k(np.ascontiguousarray(x.astype(np.float32)).reshape(6, 512))
    got = quantize(x, "q6_k")
    assert got.shape == (3, 2, 420)
    np.testing.assert_array_equal(got.reshape(6, 420), expected)
    xt = np.asfortranarray(x.reshape(6, 512).astype(np.float32))
    np.testing.assert_array_equal(quantize_q6_k(xt), expected)
    np.testing.assert_array_equal(quantize_q6_k(x[0, 0]), expected[0])


def test_q6_k_chunking_is_invisible(monkeypatch):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((5, 768)).astype(np.float32)
    whole = quantize_q6_k(x)
    monkeypatch.setattr(quants, "_CHUNK_BLOCKS", 2)
    np.testing.assert_array_equal(quantize_q6_k(x), whole)


# --- wrappers -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "qtype,tol", [("f32", 0.0), ("f16", 1e-3), ("q8_0", 0.01), ("q6_k", 0.025), ("tq1_0", None), ("tq2_0", None)]
)
def test_quantize_dequantize_roundtrip(qtype, tol):
    rng = np.random.default_rng(6)
    if tol is None:  # ternary types: exact on values that are already {-d, 0, d} per block
        x = rng.integers(-1, 2, size=(4, 512)).astype(np.float32) * 0.5
        tol = 0.0
    else:
        x = rng.standard_normal((4, 512)).astype(np.float32)
    q = quantize(x, qtype)
    if qtype not in ("f32", "f16"):
        assert q.dtype == np.uint8 and q.shape == (4, bytes_per_row(qtype, 512))
    assert q.nbytes == 4 * bytes_per_row(qtype, 512)
    y = dequantize(q, qtype, x.shape)
    assert y.dtype == np.float32 and y.shape == x.shape
    assert np.sqrt(np.mean((y - x) ** 2)) <= tol * np.sqrt(np.mean(x**2))
    # raw bytes work too
    np.testing.assert_array_equal(dequantize(np.frombuffer(q.tobytes(), np.uint8), qtype, x.shape), y)


def test_type_table():
    assert ggml_type("q6_k") is QT.Q6_K and ggml_type("TQ2_0") is QT.TQ2_0
    assert bytes_per_row("f32", 10) == 40
    assert bytes_per_row("f16", 10) == 20
    assert bytes_per_row("q8_0", 64) == 68
    assert bytes_per_row("q6_k", 512) == 420
    assert bytes_per_row("tq1_0", 256) == 54
    assert bytes_per_row("tq2_0", 2560) == 660


def test_errors():
    with pytest.raises(ValueError, match="supported: f32, f16, q8_0, q6_k, tq1_0, tq2_0"):
        ggml_type("q4_k")
    with pytest.raises(ValueError, match="q4_0"):
        quantize(np.zeros((1, 32), np.float32), "q4_0")
    with pytest.raises(ValueError, match="block size 256; got 300"):
        quantize(np.zeros((2, 300), np.float32), "q6_k")
    with pytest.raises(ValueError, match="block size 32; got 48"):
        bytes_per_row("q8_0", 48)
    with pytest.raises(ValueError, match="block size 256; got 128"):
        dequantize(np.zeros(105, np.uint8), "q6_k", (1, 128))
    with pytest.raises(ValueError, match="must be 210 bytes"):
        dequantize(np.zeros(200, np.uint8), "q6_k", (1, 256))


# --- bit-exactness against ggml's C reference (through llama-cpp-python's libggml) ----------------


def _ggml_quantize_chunk():
    pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed (pip install ryzanstein[interop])")
    try:
        from llama_cpp._ggml import libggml

        fn = libggml.ggml_quantize_chunk
    except (ImportError, OSError, AttributeError) as e:
        pytest.skip(f"llama_cpp does not expose ggml_quantize_chunk from its libggml: {e}")
    fn.argtypes = [
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_void_p,
    ]
    fn.restype = ctypes.c_size_t

    def run(x: np.ndarray, qtype: QT) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        bs, ts = gguf.GGML_QUANT_SIZES[qtype]
        out = np.zeros((x.shape[0], x.shape[1] // bs * ts), dtype=np.uint8)
        # imatrix NULL: Q6_K goes through quantize_row_q6_K_ref, Q8_0 through quantize_row_q8_0_ref
        n = fn(int(qtype), x.ctypes.data, out.ctypes.data, 0, x.shape[0], x.shape[1], None)
        assert n == out.nbytes
        return out

    return run


def _hard_rows(rng) -> np.ndarray:
    """Rows that exercise every branch of the C code: ties, zeros, tiny/huge values, outliers."""
    n = 512
    gauss = rng.standard_normal((400, n)) * 10.0 ** rng.uniform(-8, 8, (400, 1))
    ints = rng.integers(-40, 40, (100, n)).astype(np.float64)  # many exact .5 ties in x/d
    half = rng.integers(-64, 64, (100, n)) * 0.5
    sparse = rng.standard_normal((100, n)) * (rng.random((100, n)) < 0.05)
    outliers = rng.laplace(size=(100, n)) * np.where(rng.random((100, n)) < 0.01, 100.0, 1.0)
    edges = np.zeros((12, n))
    edges[1] = 1.0
    edges[2, :16] = -7.0
    edges[3] = 1e-30
    edges[4] = 1e-16  # just below GROUP_MAX_EPS
    edges[5] = 2e-15  # just above it
    edges[6, 0], edges[6, 1:] = 1.0, 1e-10
    edges[7] = 3e-4  # fp16 subnormal super-scale
    edges[8] = 1e30
    edges[9, ::2], edges[9, 1::2] = 1e30, -1e-3
    edges[10] = 3.0e8  # super-scale overflows fp16
    edges[11] = -0.0
    return np.concatenate([gauss, ints, half, sparse, outliers, edges]).astype(np.float32)


@pytest.mark.interop
def test_q6_k_bit_exact_with_ggml():
    run = _ggml_quantize_chunk()
    x = _hard_rows(np.random.default_rng(7))
    with np.errstate(all="ignore"):
        ours = quantize_q6_k(x)
    theirs = run(x, QT.Q6_K)
    bad = np.nonzero((ours != theirs).any(axis=1))[0]
    assert bad.size == 0, f"{bad.size} of {len(x)} rows differ from ggml, first rows {bad[:10].tolist()}"


@pytest.mark.interop
def test_q8_0_bit_exact_with_ggml():
    run = _ggml_quantize_chunk()
    x = _hard_rows(np.random.default_rng(8))[:, :512]
    with np.errstate(all="ignore"):
        ours = quantize(x, "q8_0")
    theirs = run(x, QT.Q8_0)
    bad = np.nonzero((ours != theirs).any(axis=1))[0]
    assert bad.size == 0, f"{bad.size} of {len(x)} rows differ from ggml, first rows {bad[:10].tolist()}"


@pytest.mark.interop
@pytest.mark.parametrize("qtype", ["tq1_0", "tq2_0"])
def test_pack_ternary_matches_ggml_tq_reference(qtype):
    """On ternary input with a nonzero code in every block ggml also writes d = 1.0, so its bytes
    must equal ours exactly."""
    run = _ggml_quantize_chunk()
    rng = np.random.default_rng(9)
    codes = rng.integers(-1, 2, size=(32, 1024), dtype=np.int8)
    codes[:, ::256] = 1  # no all-zero block
    codes[1] = -1
    np.testing.assert_array_equal(pack_ternary(codes, qtype), run(codes.astype(np.float32), ggml_type(qtype)))
