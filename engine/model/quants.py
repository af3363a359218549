"""GGML block quantization in numpy: the one place the rest of the code goes for block formats.

* `quantize_q6_k` is a numpy port of ggml's reference quantizer (`quantize_row_q6_K_ref` with its
  `make_qx_quants(16, 32, x, L, rmse_type=1, NULL)` scale search). It is bit-exact with the C reference
  as built by llama.cpp (ggml-base on x86-64 is compiled without FMA contraction): every float32
  operation is done in the same order as the C code, the sums over a 16-value sub-block are
  accumulated left to right, and `nearest_int` is the same magic-number trick (round half to even on
  float32; outside its +-2**22 domain, and for NaN, we reproduce the trick's bit arithmetic instead of
  rounding). It is vectorized over sub-blocks and processed in chunks of blocks to bound memory.
* `quantize` / `dequantize` / `ggml_type` / `bytes_per_row` wrap the `gguf` package's quantizers
  (F32, F16, Q8_0, TQ1_0, TQ2_0) and `quantize_q6_k` (which `gguf` does not implement).
* `pack_ternary` / `unpack_ternary` turn int8 ternary codes {-1, 0, 1} into GGML TQ1_0 / TQ2_0 blocks
  and back. Every block carries the fp16 scale 1.0 exactly (even an all-zero block, where ggml's and
  gguf's quantizers would write d = max|x| = 0): the model keeps its exact per-tensor scale in a
  separate F32 tensor, so decoding is uniformly `code * 1.0`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gguf_quants

__all__ = [
    "SUPPORTED_QTYPES",
    "block_size",
    "bytes_per_row",
    "dequantize",
    "ggml_type",
    "pack_ternary",
    "quantize",
    "quantize_q6_k",
    "unpack_ternary",
]

QK_K = 256
Q6_K_BLOCK_BYTES = 210  # ql[128] + qh[64] + scales[16] (int8) + d (fp16)

_QTYPES: dict[str, GGMLQuantizationType] = {
    "f32": GGMLQuantizationType.F32,
    "f16": GGMLQuantizationType.F16,
    "q8_0": GGMLQuantizationType.Q8_0,
    "q6_k": GGMLQuantizationType.Q6_K,
    "tq1_0": GGMLQuantizationType.TQ1_0,
    "tq2_0": GGMLQuantizationType.TQ2_0,
}
SUPPORTED_QTYPES: tuple[str, ...] = tuple(_QTYPES)
_TERNARY = ("tq1_0", "tq2_0")


# --- type table -----------------------------------------------------------------------------------


def _name(qtype: str) -> str:
    name = str(qtype).lower() if isinstance(qtype, str) else None
    if name not in _QTYPES:
        raise ValueError(f"unsupported quantization type {qtype!r}; supported: {', '.join(SUPPORTED_QTYPES)}")
    return name


def ggml_type(qtype: str) -> GGMLQuantizationType:
    """The `gguf.GGMLQuantizationType` of a qtype name (`"q6_k"` -> `GGMLQuantizationType.Q6_K`)."""
    return _QTYPES[_name(qtype)]


def block_size(qtype: str) -> int:
    """Number of values per block (1 for f32/f16, 32 for q8_0, 256 for q6_k/tq1_0/tq2_0)."""
    return GGML_QUANT_SIZES[ggml_type(qtype)][0]


def _check_cols(name: str, cols: int, shape: Sequence[int] | None = None) -> None:
    bs = GGML_QUANT_SIZES[_QTYPES[name]][0]
    if cols <= 0 or cols % bs:
        where = f" (shape {tuple(shape)})" if shape is not None else ""
        raise ValueError(
            f"{name} needs the row length (last dimension) to be a positive multiple of its block size {bs}; "
            f"got {cols}{where}"
        )


def bytes_per_row(qtype: str, cols: int) -> int:
    """Bytes of one row of `cols` values stored as `qtype`."""
    name = _name(qtype)
    _check_cols(name, int(cols))
    bs, ts = GGML_QUANT_SIZES[_QTYPES[name]]
    return int(cols) // bs * ts


def _as_rows(x: np.ndarray, name: str) -> tuple[np.ndarray, tuple[int, ...]]:
    x = np.asarray(x)
    if x.ndim == 0:
        raise ValueError(f"{name}: need an array with at least one dimension, got a scalar")
    _check_cols(name, x.shape[-1], x.shape)
    return x.reshape(-1, x.shape[-1]), x.shape


# --- generic wrappers -----------------------------------------------------------------------------


def quantize(x: np.ndarray, qtype: str) -> np.ndarray:
    """Quantize `x` (rows along the last axis) to `qtype`.

    Returns what the GGUF writer takes: a float32 (f32) or float16 (f16) array of `x`'s shape, or for
    block types a uint8 array of shape `(*x.shape[:-1], bytes_per_row(qtype, x.shape[-1]))`.
    For ternary codes with an exact unit block scale use `pack_ternary` instead of tq1_0/tq2_0 here
    (which, like ggml, sets each block's scale to its max |x|).
    """
    name = _name(qtype)
    rows, shape = _as_rows(x, name)
    if name == "q6_k":
        out = quantize_q6_k(rows)
    else:
        out = gguf_quants.quantize(rows.astype(np.float32, copy=False), _QTYPES[name])
    return out.reshape(*shape[:-1], out.shape[-1])


def dequantize(data: np.ndarray, qtype: str, shape: Sequence[int]) -> np.ndarray:
    """Decode `data` (raw bytes as uint8, or the float array `quantize` returned for f32/f16) of a
    tensor of logical `shape` stored as `qtype`; returns float32 of that shape."""
    name = _name(qtype)
    shape = tuple(int(s) for s in shape)
    if not shape:
        raise ValueError(f"{name}: need a shape with at least one dimension")
    _check_cols(name, shape[-1], shape)
    n_rows = int(np.prod(shape[:-1], dtype=np.int64))
    row_bytes = bytes_per_row(name, shape[-1])
    raw = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
    if raw.size != n_rows * row_bytes:
        raise ValueError(
            f"{name} data for shape {shape} must be {n_rows * row_bytes} bytes "
            f"({n_rows} rows x {row_bytes}), got {raw.size}"
        )
    out = gguf_quants.dequantize(raw.reshape(n_rows, row_bytes), _QTYPES[name])
    return np.asarray(out, dtype=np.float32).reshape(shape)


# --- Q6_K (port of ggml's quantize_row_q6_K_ref) -------------------------------------------------

_F32 = np.float32
_MAGIC = _F32(12582912.0)  # 1.5 * 2**23: nearest_int's rounding constant
_GROUP_MAX_EPS = _F32(1e-15)
_NMAX = 32
# iscale numerators of make_qx_quants' search, in the C loop order: -nmax, then -(nmax + 0.1f*is)
# for is = -9..9 (is != 0), each rounded to float32 exactly as the C expression is.
_CANDIDATES = [_F32(-_NMAX)] + [-(_F32(_NMAX) + _F32(0.1) * _F32(i)) for i in range(-9, 10) if i != 0]
_CHUNK_BLOCKS = 1024  # super-blocks per chunk: 256k values, ~1 MiB per float32 work array


def _nearest_int(t: np.ndarray) -> np.ndarray:
    """ggml's nearest_int, bit for bit (including its wrap-around outside +-2**22 and NaN -> 0)."""
    v = (t.astype(_F32, copy=False) + _MAGIC).view(np.int32)
    return (v & np.int32(0x007FFFFF)) - np.int32(0x00400000)


def _fp32_to_fp16_bits(f: np.ndarray) -> np.ndarray:
    """ggml_compute_fp32_to_fp16 (round to nearest even, NaN -> 0x7E00 with sign) as uint16 bits."""
    f = np.ascontiguousarray(f, dtype=_F32)
    with np.errstate(over="ignore"):
        base = (np.abs(f) * _F32(2.0**112)) * _F32(2.0**-110)
    w = f.view(np.uint32)
    shl1_w = w + w
    sign = w & np.uint32(0x80000000)
    bias = np.maximum(shl1_w & np.uint32(0xFF000000), np.uint32(0x71000000))
    base = ((bias >> np.uint32(1)) + np.uint32(0x07800000)).view(_F32) + base
    bits = base.view(np.uint32)
    nonsign = ((bits >> np.uint32(13)) & np.uint32(0x7C00)) + (bits & np.uint32(0x0FFF))
    out = (sign >> np.uint32(16)) | np.where(shl1_w > np.uint32(0xFF000000), np.uint32(0x7E00), nonsign)
    return out.astype(np.uint16)


def _seq_sum(p: np.ndarray) -> np.ndarray:
    """Sum a (16, M) array over axis 0 left to right in float32, as `s = 0; s += p[i]` does in C."""
    s = p[0] + _F32(0.0)
    for i in range(1, p.shape[0]):
        s += p[i]
    return s


def _make_qx_quants(X: np.ndarray, exact_rounding: bool) -> tuple[np.ndarray, np.ndarray]:
    """make_qx_quants(n=16, nmax=32, rmse_type=1, qw=NULL) for every column of X (16, M).

    Returns (scale (M,) float32, L (16, M) int32 in [0, 63]). With exact_rounding=False the
    candidate search rounds with np.rint, which equals nearest_int whenever |iscale*x| <= 2**22:
    always the case for finite x, since |iscale| <= 32.9 / max|x|.
    """
    n, m = X.shape
    cols = np.arange(m)
    ax = np.abs(X)
    if exact_rounding:
        ax[np.isnan(ax)] = 0  # `if (ax > amax)` never picks a NaN
    imax = np.argmax(ax, axis=0)  # first index of the largest |x|: the C loop's strict '>'
    amax = ax[imax, cols]
    vmax = X[imax, cols]
    zero = amax < _GROUP_MAX_EPS  # also False for NaN, like the C comparison
    vmax = np.where(zero, _F32(1.0), vmax)  # placeholder so zero columns raise no warnings

    with np.errstate(all="ignore"):  # |x| > 1.8e19 overflows x*x to inf, as it does in C
        w = X * X  # rmse_type 1: weight x^2
        wx = w * X  # C: w*x[i]*l == (w*x[i])*l
    t = np.empty_like(X)
    lf = np.empty_like(X)
    p = np.empty_like(X)

    def sums(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        np.multiply(iscale, X, out=t)
        if exact_rounding:
            lf[...] = np.clip(_nearest_int(t), -_NMAX, _NMAX - 1)
        else:
            np.rint(t, out=lf)
            np.maximum(lf, _F32(-_NMAX), out=lf)
            np.minimum(lf, _F32(_NMAX - 1), out=lf)
        np.multiply(wx, lf, out=p)
        sumlx = _seq_sum(p)
        np.multiply(w, lf, out=p)  # suml2 += w*l*l == (w*l)*l
        np.multiply(p, lf, out=p)
        suml2 = _seq_sum(p)
        return sumlx, suml2

    with np.errstate(all="ignore"):
        best_iscale = _CANDIDATES[0] / vmax
        sumlx, suml2 = sums(best_iscale)
        scale = np.where(suml2 != 0, sumlx / suml2, _F32(0.0)).astype(_F32, copy=False)
        best = scale * sumlx
        for num in _CANDIDATES[1:]:
            iscale = num / vmax
            sumlx, suml2 = sums(iscale)
            better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            if better.any():
                new_scale = sumlx / suml2
                scale = np.where(better, new_scale, scale)
                best = np.where(better, new_scale * sumlx, best)
                best_iscale = np.where(better, iscale, best_iscale)
        L = np.clip(_nearest_int(best_iscale * X), -_NMAX, _NMAX - 1) + _NMAX
    L[:, zero] = 0
    scale[zero] = 0
    return scale, L


def _quantize_q6_k_blocks(blocks: np.ndarray) -> np.ndarray:
    """(nb, 256) float32 -> (nb, 210) uint8 block_q6_K."""
    nb = blocks.shape[0]
    exact = not np.isfinite(blocks).all()
    X = np.ascontiguousarray(blocks.reshape(nb * 16, 16).T)  # (16, sub-blocks): column = sub-block
    sub_scale, L = _make_qx_quants(X, exact)

    scales = sub_scale.reshape(nb, 16)
    abs_scales = np.abs(scales)
    abs_scales[np.isnan(abs_scales)] = 0
    imax = np.argmax(abs_scales, axis=1)
    rows = np.arange(nb)
    max_abs = abs_scales[rows, imax]
    max_scale = scales[rows, imax]
    zero_block = max_abs < _GROUP_MAX_EPS

    with np.errstate(all="ignore"):
        iscale = _F32(-128.0) / np.where(zero_block, _F32(1.0), max_scale)
        d_bits = _fp32_to_fp16_bits(_F32(1.0) / iscale)
        q_scales = np.minimum(_nearest_int(iscale[:, None] * scales), 127).astype(np.int8)
        d_sub = (d_bits.view(np.float16).astype(_F32)[:, None] * q_scales.astype(_F32)).reshape(-1)
        redo = d_sub != 0  # C: `if (!d) continue;` keeps make_qx_quants' L (NaN counts as nonzero)
        redo &= np.repeat(~zero_block, 16)
        if redo.any():
            l_new = np.clip(_nearest_int(X[:, redo] / d_sub[redo]), -32, 31) + 32
            L[:, redo] = l_new

    Lb = L.T.astype(np.uint8).reshape(nb, 2, 4, 32)  # [block, 128-half, 32-quarter, l]
    lo = Lb & np.uint8(0x0F)
    hi = Lb >> np.uint8(4)
    ql = np.concatenate(
        [lo[:, :, 0] | (lo[:, :, 2] << np.uint8(4)), lo[:, :, 1] | (lo[:, :, 3] << np.uint8(4))], axis=2
    ).reshape(nb, 128)
    qh = (
        hi[:, :, 0] | (hi[:, :, 1] << np.uint8(2)) | (hi[:, :, 2] << np.uint8(4)) | (hi[:, :, 3] << np.uint8(6))
    ).reshape(nb, 64)

    out = np.empty((nb, Q6_K_BLOCK_BYTES), dtype=np.uint8)
    out[:, 0:128] = ql
    out[:, 128:192] = qh
    out[:, 192:208] = q_scales.view(np.uint8)
    out[:, 208:210] = d_bits.astype("<u2").reshape(nb, 1).view(np.uint8)
    out[zero_block] = 0  # memset(&y[i], 0, ...) and d = fp16(0)
    return out


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """Q6_K-quantize float rows, bit-exact with ggml's quantize_row_q6_K_ref.

    `x` has shape (rows, cols) (or any shape, rows along the last axis) with cols % 256 == 0; returns
    uint8 of shape (rows, cols // 256 * 210), each 210-byte block laid out as ggml's block_q6_K.
    """
    rows, shape = _as_rows(x, "q6_k")
    blocks = rows.reshape(-1, QK_K)  # a view when x is contiguous; rows are whole blocks
    out = np.empty((blocks.shape[0], Q6_K_BLOCK_BYTES), dtype=np.uint8)
    for start in range(0, blocks.shape[0], _CHUNK_BLOCKS):
        chunk = blocks[start : start + _CHUNK_BLOCKS].astype(_F32, copy=False)
        out[start : start + _CHUNK_BLOCKS] = _quantize_q6_k_blocks(chunk)
    return out.reshape(*shape[:-1], shape[-1] // QK_K * Q6_K_BLOCK_BYTES)


# --- ternary packing ------------------------------------------------------------------------------

_FP16_ONE = np.frombuffer(np.array([1.0], dtype="<f2").tobytes(), dtype=np.uint8)  # 00 3c
_POW3_5 = np.array([81, 27, 9, 3, 1], dtype=np.uint16)
_POW3_4 = np.array([81, 27, 9, 3], dtype=np.uint16)


def _ternary_qtype(qtype: str) -> str:
    name = _name(qtype)
    if name not in _TERNARY:
        raise ValueError(f"ternary packing supports {' and '.join(_TERNARY)}, not {qtype!r}")
    return name


def pack_ternary(codes: np.ndarray, qtype: str) -> np.ndarray:
    """Pack int8 ternary codes {-1, 0, 1} of shape (rows, cols), cols % 256 == 0, into GGML TQ1_0 or
    TQ2_0 blocks whose fp16 scale is exactly 1.0. Returns uint8 (rows, bytes_per_row(qtype, cols))."""
    name = _ternary_qtype(qtype)
    codes = np.asarray(codes)
    rows, shape = _as_rows(codes, name)
    if not np.issubdtype(rows.dtype, np.integer):
        raise ValueError(f"pack_ternary needs integer codes in {{-1, 0, 1}}, got dtype {rows.dtype}")
    if rows.size and (rows.min() < -1 or rows.max() > 1):
        raise ValueError(f"pack_ternary needs codes in {{-1, 0, 1}}; got values in [{rows.min()}, {rows.max()}]")
    q = (rows.reshape(-1, QK_K) + 1).astype(np.uint8)  # -1, 0, 1 -> 0, 1, 2
    nb = q.shape[0]
    if name == "tq2_0":
        # qs[32*j + m] holds x[128*j + 32*n + m] in bits 2n..2n+1 (n = 0..3)
        g = q.reshape(nb, 2, 4, 32)
        qs = (
            g[:, :, 0] | (g[:, :, 1] << np.uint8(2)) | (g[:, :, 2] << np.uint8(4)) | (g[:, :, 3] << np.uint8(6))
        ).reshape(nb, 64)
    else:
        # 5 trits per byte (most significant first), stored as ceil(v * 256 / 243): first 160 values
        # along 32 bytes, next 80 along 16 bytes, last 16 as 4 trits (shifted by one) in 4 bytes.
        q16 = q.astype(np.uint16)
        qs0 = np.einsum("bnm,n->bm", q16[:, :160].reshape(nb, 5, 32), _POW3_5)
        qs1 = np.einsum("bnm,n->bm", q16[:, 160:240].reshape(nb, 5, 16), _POW3_5)
        qh = np.einsum("bnm,n->bm", q16[:, 240:].reshape(nb, 4, 4), _POW3_4)
        v = np.concatenate([qs0, qs1, qh], axis=1)
        qs = ((v * 256 + 242) // 243).astype(np.uint8)
    out = np.empty((nb, qs.shape[1] + 2), dtype=np.uint8)
    out[:, :-2] = qs
    out[:, -2:] = _FP16_ONE
    return out.reshape(*shape[:-1], shape[-1] // QK_K * out.shape[1])


def unpack_ternary(data: np.ndarray, qtype: str, shape: Sequence[int]) -> np.ndarray:
    """Inverse of `pack_ternary`: TQ1_0/TQ2_0 bytes of a tensor of logical `shape` -> int8 codes.

    Raises ValueError if a block's scale is not exactly 1.0 (the bytes were not written by
    `pack_ternary`, so they are not bare codes).
    """
    name = _ternary_qtype(qtype)
    shape = tuple(int(s) for s in shape)
    if not shape:
        raise ValueError(f"{name}: need a shape with at least one dimension")
    _check_cols(name, shape[-1], shape)
    type_size = GGML_QUANT_SIZES[_QTYPES[name]][1]
    n_values = int(np.prod(shape, dtype=np.int64))
    nb = n_values // QK_K
    raw = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
    if raw.size != nb * type_size:
        raise ValueError(f"{name} data for shape {shape} must be {nb * type_size} bytes, got {raw.size}")
    blocks = raw.reshape(nb, type_size)
    bad = (blocks[:, -2] != _FP16_ONE[0]) | (blocks[:, -1] != _FP16_ONE[1])
    if bad.any():
        i = int(np.argmax(bad))
        d = float(blocks[i, -2:].copy().view("<f2")[0])
        raise ValueError(
            f"{name} block {i} has scale {d!r}, not 1.0: not ternary codes written by pack_ternary "
            f"({int(bad.sum())} of {nb} blocks)"
        )
    qs = blocks[:, :-2]
    if name == "tq2_0":
        g = qs.reshape(nb, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
        q = (g & np.uint8(3)).reshape(nb, QK_K)
    else:
        # trit n of byte v: ((v * 3**n) mod 256) * 3 >> 8
        qs0 = qs[:, :32].reshape(nb, 1, 32) * np.array([1, 3, 9, 27, 81], dtype=np.uint8).reshape(1, 5, 1)
        qs1 = qs[:, 32:48].reshape(nb, 1, 16) * np.array([1, 3, 9, 27, 81], dtype=np.uint8).reshape(1, 5, 1)
        qh = qs[:, 48:52].reshape(nb, 1, 4) * np.array([1, 3, 9, 27], dtype=np.uint8).reshape(1, 4, 1)
        v = np.concatenate([qs0.reshape(nb, -1), qs1.reshape(nb, -1), qh.reshape(nb, -1)], axis=1)
        q = ((v.astype(np.uint16) * 3) >> 8).astype(np.uint8)
    if q.max(initial=0) > 2:
        raise ValueError(f"{name} data holds an invalid ternary digit (3): corrupt block bytes")
    return (q.astype(np.int8) - np.int8(1)).reshape(shape)
