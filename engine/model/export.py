"""Export a model artifact as the GGUF another engine computes correctly, or refuse with the reason.

Targets (checked against llama.cpp in llama-cpp-python 0.3.36 and ik_llama.cpp in ik-llama-cpp-python 0.1.5):

  llama.cpp  arch `bitnet`: SiLU FFN, sub-norms, tied head. Our artifact for such a model already is that file
             (TQ2_0/TQ1_0 codes, block scale 1, exact per-tensor `.scale` the graph multiplies in): copied as is.
  ik_llama   arch `bitnet-25` (`build_bitnet_158`: relu² FFN, sub-norms, tied or separate head) or `bitnet`
             (`build_bitnet`: SiLU, sub-norms, tied head). ik_llama.cpp has no TQ types, so every ternary linear is
             transcoded to its IQ2_BN type with the per-tensor scale in each row's f32 scale; `bitnet-25` creates no
             `.scale` tensors (an extra tensor fails its loader's tensor count), so none are written for either.
             Its IQ2_BN kernels need activation rows of at least 512 values: smaller models are refused.

IQ2_BN (ik_llama.cpp GGML type 135; ggml-common.h `block_iq2_bn`, iqk_quantize.cpp `quantize_one_row_2bn`,
`dequantize_row_iq2_bn`; row_meta_size 4 in ggml.c's type traits). A row of n values (n a multiple of 64) takes
4 + n/4 bytes:

  bytes 0..3          float32 little-endian row scale d; weight = d * (q - 1)
  bytes 4 + 16b ..    block b (values 64b .. 64b+63), 16 bytes: byte j (0..15) holds the 2-bit codes q = w + 1
                      in {0, 1, 2} of values 64b + j (bits 0-1), +16 (bits 2-3), +32 (bits 4-5), +48 (bits 6-7)

ggml_row_size counts the 4 meta bytes, so a tensor's data is rows x (4 + n/4) bytes; its GGUF shape is in values.
The IQK matrix kernels multiply each row's integer dot product by d (`BaseDequantizer::new_row`).
"""

from __future__ import annotations

import hashlib
import mmap
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.errors import ExportError
from engine.fsutil import atomic_file
from engine.model import quants
from engine.model.ggufio import GGUF_MAGIC, LLAMA_CPP_ARCH, TERNARY_TYPES, Hyperparams, ModelFile

TARGETS = ("llama.cpp", "ik_llama")
IK_RELU2_ARCH = "bitnet-25"  # ik_llama.cpp LLM_ARCH_BITNET_25 (llama-arch.cpp)
IK_SILU_ARCH = "bitnet"  # ik_llama.cpp LLM_ARCH_BITNET
IQ2_BN_TYPE = 135  # GGML_TYPE_IQ2_BN in ik_llama.cpp's ggml.h; mainline ggml and gguf-py do not know it
IQ2_BN_BLOCK = 64  # QK_IQ1BN
IQ2_BN_ROW_META = 4  # bytes of the f32 row scale before the blocks
IK_MIN_ROW = 512  # 8 * QK_IQ1BN: quantize_row_q8_K64 (iqk_quantize.cpp) asserts activation rows at least this long
IK_FILE_TYPE_IQ2_BN = 137  # LLAMA_FTYPE_MOSTLY_IQ2_BN (ik_llama.cpp llama.h), for general.file_type


@dataclass(frozen=True)
class ExportPlan:
    target: str
    arch: str  # general.architecture of the written file
    transcode: bool  # ternary linears rewritten as IQ2_BN (ik_llama) or the artifact copied byte for byte


def plan_export(hp: Hyperparams, target: str) -> ExportPlan:
    """The architecture `target` computes this model with, or ExportError naming why none does."""
    if target not in TARGETS:
        raise ExportError(f"unknown export target {target!r}; choose one of {', '.join(TARGETS)}")
    shape = (
        f"FFN {'relu²' if hp.ffn_act == 'relu2' else 'SiLU'}, {'with' if hp.sub_norms else 'without'} sub-norms, "
        f"{'tied' if hp.tied else 'separate'} output head"
    )
    if target == "llama.cpp":
        if hp.ffn_act == "silu" and hp.sub_norms and hp.tied:
            return ExportPlan(target, LLAMA_CPP_ARCH, transcode=False)
        reasons = []
        if hp.ffn_act != "silu":
            reasons.append("its bitnet graph applies SiLU in the FFN (LLM_FFN_SILU) and this model uses relu²")
        if not hp.sub_norms:
            reasons.append("its bitnet graph requires the attn_sub_norm/ffn_sub_norm tensors, which this model lacks")
        if not hp.tied:
            reasons.append("its bitnet graph always multiplies by token_embd and has no separate output head")
        hint = (
            "; export it with --to ik_llama (ik_llama.cpp's bitnet-25 graph computes relu² with sub-norms)"
            if hp.ffn_act == "relu2" and hp.sub_norms
            else "; no llama.cpp architecture computes this model, serve it with `ryz serve`"
        )
        raise ExportError(f"llama.cpp cannot compute this model ({shape}): {'; '.join(reasons)}{hint}")
    square = hp.heads * hp.head_dim == hp.hidden  # both ik graphs size attn_sub_norm by the hidden size
    wide = min(hp.hidden, hp.ffn) >= IK_MIN_ROW
    if hp.sub_norms and square and wide and hp.ffn_act == "relu2":
        return ExportPlan(target, IK_RELU2_ARCH, transcode=True)
    if hp.sub_norms and square and wide and hp.tied:
        return ExportPlan(target, IK_SILU_ARCH, transcode=True)
    if not wide:
        reason = (
            f"its IQ2_BN matrix multiply quantizes activations as Q8_K64, which needs rows of at least {IK_MIN_ROW} "
            f"values (GGML_ASSERT(k >= 8*QK_IQ1BN) aborts the process), and this model's hidden / FFN sizes are "
            f"{hp.hidden} / {hp.ffn}"
        )
    elif not hp.sub_norms:
        reason = "both its BitNet graphs (bitnet, bitnet-25) require the attn_sub_norm/ffn_sub_norm tensors"
    elif not square:
        reason = (
            f"its BitNet graphs need heads x head size ({hp.heads} x {hp.head_dim}) equal to the hidden size "
            f"({hp.hidden}): they size attn_sub_norm by it"
        )
    else:
        reason = "its bitnet graph (SiLU) has no separate output head and its bitnet-25 graph applies relu²"
    raise ExportError(
        f"ik_llama.cpp cannot compute this model ({shape}): {reason}; no ik_llama.cpp architecture computes it, "
        "serve it with `ryz serve`"
    )


def iq2_bn_row_bytes(cols: int) -> int:
    return IQ2_BN_ROW_META + cols // 4


def encode_iq2_bn(codes: np.ndarray, scale: float) -> np.ndarray:
    """int8 ternary codes (rows, cols), cols % 64 == 0, and the per-tensor scale -> IQ2_BN rows (uint8, rows x
    (4 + cols/4)), laid out as the module docstring documents."""
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[1] % IQ2_BN_BLOCK:
        raise ValueError(f"IQ2_BN needs a matrix with rows of whole {IQ2_BN_BLOCK}-value blocks, got {codes.shape}")
    if codes.size and (codes.min() < -1 or codes.max() > 1):
        raise ValueError("IQ2_BN encodes ternary codes in {-1, 0, 1} only")
    rows, cols = codes.shape
    q = (codes.astype(np.int16) + 1).astype(np.uint8).reshape(rows, cols // IQ2_BN_BLOCK, 4, IQ2_BN_BLOCK // 4)
    packed = q[:, :, 0] | (q[:, :, 1] << np.uint8(2)) | (q[:, :, 2] << np.uint8(4)) | (q[:, :, 3] << np.uint8(6))
    out = np.empty((rows, iq2_bn_row_bytes(cols)), dtype=np.uint8)
    out[:, :IQ2_BN_ROW_META] = np.frombuffer(np.array([scale], dtype="<f4").tobytes(), dtype=np.uint8)
    out[:, IQ2_BN_ROW_META:] = packed.reshape(rows, -1)
    return out


def check_output_path(source: Path, out_path: Path) -> None:
    """Refuse an output path the export could not end at, before any work is done."""
    if out_path.suffix != ".gguf":
        raise ExportError(f"output {str(out_path)!r} must be a .gguf file path; pass -o NAME.gguf")
    if out_path.is_dir() or not out_path.parent.is_dir():
        raise ExportError(
            f"cannot write {str(out_path)!r}: "
            + ("it is a directory" if out_path.is_dir() else f"directory {str(out_path.parent)!r} does not exist")
            + "; pass -o with a file path in an existing directory"
        )
    if out_path.exists() and out_path.resolve() == Path(source).resolve():
        raise ExportError(f"output {str(out_path)!r} is the source model itself; choose another -o path")


def export_model(
    source: str | Path, target: str, out_path: str | Path, progress: Callable[[int], None] | None = None
) -> dict:
    """Write `source` (a model artifact GGUF) for `target` to `out_path`, atomically; returns what was written."""
    source, out_path = Path(source), Path(out_path)
    check_output_path(source, out_path)
    model = ModelFile(source)
    plan = plan_export(model.hparams, target)
    with atomic_file(out_path) as tmp:
        if plan.transcode:
            transcoded = _write_ik_llama(model, plan.arch, tmp, progress)
        else:
            shutil.copyfile(source, tmp)
            transcoded = 0
            if progress:
                progress(source.stat().st_size)
        digest = _sha256(tmp)
    return {
        "path": str(out_path.resolve()),
        "target": target,
        "architecture": plan.arch,
        "source": str(source),
        "source_architecture": model.arch,
        "transcoded_tensors": transcoded,
        "ternary_type": "iq2_bn" if plan.transcode else model.tensor_type("blk.0.attn_q.weight"),
        "size": out_path.stat().st_size,
        "sha256": digest,
    }


def _write_ik_llama(model: ModelFile, arch: str, out: Path, progress: Callable[[int], None] | None) -> int:
    """Metadata copied byte for byte with the architecture prefix renamed; ternary linears as IQ2_BN with the
    `.scale` tensors folded into their rows; every other tensor's bytes unchanged. Written directly rather than
    through gguf-py, which knows neither IQ2_BN nor how to copy a value without decoding it (its reader takes a
    minute over a 128k vocabulary)."""
    prefix = f"{model.arch}."
    skip = {"general.architecture", "general.alignment", "general.file_type", "ryz.schema"}
    kv = [_string("general.architecture") + _STRING_TYPE + _string(arch)]
    for key, value in _metadata_values(model.path):
        if key not in skip:
            kv.append(_string(arch + "." + key[len(prefix) :] if key.startswith(prefix) else key) + value)
    kv.append(_string("general.file_type") + struct.pack("<II", _UINT32_TYPE, IK_FILE_TYPE_IQ2_BN))
    kv.append(_string("ryz.exported_from") + _STRING_TYPE + _string(f"sha256:{_sha256(model.path)}"))

    names = [n for n in model.tensors if not _is_scale(model, n)]
    infos: list[bytes] = []
    offset = 0
    for name in names:
        shape = model.shape(name)
        if model.tensor_type(name) in TERNARY_TYPES:
            type_id, nbytes = IQ2_BN_TYPE, shape[0] * iq2_bn_row_bytes(shape[1])
        else:
            type_id, nbytes = int(model.tensors[name].tensor_type), model.tensors[name].n_bytes
        dims = tuple(reversed(shape))  # GGUF lists ggml's ne0 (the row length) first
        infos.append(_string(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, type_id, offset))
        offset += _padded(nbytes)
    transcoded = 0
    with out.open("wb") as handle:
        handle.write(GGUF_MAGIC + struct.pack("<IQQ", 3, len(names), len(kv)))
        handle.write(b"".join(kv) + b"".join(infos))
        handle.write(bytes(_padded(handle.tell()) - handle.tell()))
        for name in names:
            raw = np.asarray(model.raw(name))
            kind = model.tensor_type(name)
            if kind in TERNARY_TYPES:
                codes = quants.unpack_ternary(raw, kind, model.shape(name))
                scale = float(np.asarray(model.raw(name.removesuffix(".weight") + ".scale")).ravel()[0])
                data = encode_iq2_bn(codes, scale)
                transcoded += 1
            else:
                data = np.ascontiguousarray(raw).view(np.uint8)
            handle.write(data.tobytes())
            handle.write(bytes(_padded(data.nbytes) - data.nbytes))
            if progress:
                progress(data.nbytes)
    return transcoded


_ALIGNMENT = 32  # GGUF's default general.alignment, which the written file keeps
_UINT32_TYPE, _STRING_TYPE_ID, _ARRAY_TYPE = 4, 8, 9
_STRING_TYPE = struct.pack("<I", _STRING_TYPE_ID)
_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def _padded(n: int) -> int:
    return (n + _ALIGNMENT - 1) // _ALIGNMENT * _ALIGNMENT


def _string(text: str) -> bytes:
    data = text.encode()
    return struct.pack("<Q", len(data)) + data


def _metadata_values(path: Path) -> list[tuple[str, bytes]]:
    """Each metadata key of a GGUF with its value's bytes as stored (type id and payload). The file has passed
    ModelFile's checks (every length inside the file, arrays of numbers, booleans or strings only)."""
    with path.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        return _scan_values(mapped)


def _scan_values(buf: mmap.mmap) -> list[tuple[str, bytes]]:
    (n_kv,) = struct.unpack_from("<Q", buf, 16)
    pos, values = 24, []
    for _ in range(n_kv):
        (length,) = struct.unpack_from("<Q", buf, pos)
        key = buf[pos + 8 : pos + 8 + length].decode()
        start = pos = pos + 8 + length
        (vtype,) = struct.unpack_from("<I", buf, pos)
        pos += 4
        if vtype == _ARRAY_TYPE:
            elem, count = struct.unpack_from("<IQ", buf, pos)
            pos += 12
            if elem == _STRING_TYPE_ID:
                for _ in range(count):
                    pos += 8 + struct.unpack_from("<Q", buf, pos)[0]
            else:
                pos += count * _SCALAR_BYTES[elem]
        elif vtype == _STRING_TYPE_ID:
            pos += 8 + struct.unpack_from("<Q", buf, pos)[0]
        else:
            pos += _SCALAR_BYTES[vtype]
        values.append((key, buf[start:pos]))
    return values


def _is_scale(model: ModelFile, name: str) -> bool:
    """A per-tensor `.scale` beside a ternary linear (folded into the IQ2_BN rows)."""
    weight = name.removesuffix(".scale") + ".weight"
    return name.endswith(".scale") and weight in model.tensors and model.tensor_type(weight) in TERNARY_TYPES


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def planned_bytes(source: str | Path, target: str) -> int:
    """Bytes `export_model` writes as tensor data (for progress bars); raises ExportError as it would."""
    model = ModelFile(source)
    plan = plan_export(model.hparams, target)
    if not plan.transcode:
        return Path(source).stat().st_size
    total = 0
    for name, info in model.tensors.items():
        if _is_scale(model, name):
            continue
        shape = model.shape(name)
        total += shape[0] * iq2_bn_row_bytes(shape[1]) if model.tensor_type(name) in TERNARY_TYPES else info.n_bytes
    return total
