"""BitNet b1.58 weight quantization: master weights or transformers' packed format -> ternary codes and
one exact float32 scale per tensor (real weight = code * scale)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SCALE_EPS = 1e-5  # transformers' and BitNet's clamp on mean|W|
PACK_VALUES_PER_BYTE = 4


@dataclass(frozen=True)
class TernaryTensor:
    codes: np.ndarray  # int8 in {-1, 0, 1}, shape (out, in)
    scale: np.float32  # real weight = codes * scale
    rel_error: float | None  # ||W - codes*scale|| / ||W||, when master weights were given

    @property
    def zero_fraction(self) -> float:
        return float(np.count_nonzero(self.codes == 0) / self.codes.size)


def quantize_absmean(weight: np.ndarray) -> TernaryTensor:
    """scale = mean|W|, codes = clip(round(W / scale), -1, 1), computed as transformers does
    (multiply by the float32 inverse scale, round half to even) so borderline weights round alike."""
    w = np.asarray(weight, dtype=np.float32)
    # Mean in float64 then rounded once: the correctly rounded float32 mean, independent of summation order.
    mean = np.float32(np.abs(w, dtype=np.float64).mean() if w.size else 0.0)
    inverse = np.float32(1.0) / max(mean, np.float32(SCALE_EPS))
    codes = np.clip(np.rint(w * inverse), -1, 1).astype(np.int8)
    scale = np.float32(np.float32(1.0) / inverse)
    err = np.linalg.norm((w - codes.astype(np.float32) * scale).ravel()) / max(float(np.linalg.norm(w.ravel())), 1e-30)
    return TernaryTensor(codes, scale, float(err))


def unpack_hf_ternary(packed: np.ndarray, weight_scale: np.ndarray) -> TernaryTensor:
    """transformers' offline BitNet format: uint8 [out/4, in], value v of row r stored as (v + 1) in
    bits 2i..2i+1 of byte row r mod (out/4), with i = r // (out/4). Its BitLinear divides the
    output by `weight_scale`, so our multiplicative scale is 1 / weight_scale."""
    packed = np.asarray(packed, dtype=np.uint8)
    rows = packed.shape[0]
    codes = np.empty((rows * PACK_VALUES_PER_BYTE, *packed.shape[1:]), dtype=np.int8)
    for i in range(PACK_VALUES_PER_BYTE):
        codes[i * rows : (i + 1) * rows] = ((packed >> (2 * i)) & 3).astype(np.int8) - 1
    if np.any(codes > 1):
        raise ValueError("packed ternary weights contain the unused code 3; the tensor is corrupt")
    ws = np.asarray(weight_scale, dtype=np.float32).ravel()
    if ws.size != 1 or not np.isfinite(ws[0]) or ws[0] == 0:
        raise ValueError(f"weight_scale must be one finite non-zero value, got {ws[:4]}")
    return TernaryTensor(codes, np.float32(np.float32(1.0) / ws[0]), None)


def pack_hf_ternary(codes: np.ndarray) -> np.ndarray:
    """Inverse of unpack_hf_ternary's code layout (tests and fixtures)."""
    out = codes.shape[0]
    if out % PACK_VALUES_PER_BYTE:
        raise ValueError(f"output dimension {out} is not a multiple of {PACK_VALUES_PER_BYTE}")
    rows = out // PACK_VALUES_PER_BYTE
    shifted = (codes.astype(np.int16) + 1).astype(np.uint8)
    packed = np.zeros((rows, *codes.shape[1:]), dtype=np.uint8)
    for i in range(PACK_VALUES_PER_BYTE):
        packed |= shifted[i * rows : (i + 1) * rows] << (2 * i)
    return packed
