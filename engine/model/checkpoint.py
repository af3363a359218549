"""Hugging Face model directories: config, (sharded) safetensors, tokenizer, chat template.

Safetensors are parsed here directly (header + memory map) so that bf16 works without torch, a
truncated or corrupt file is caught before anything is written, and no tensor is read until asked.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engine.errors import CheckpointError, UnsupportedArchitectureError

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": np.uint16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor's bytes are: file, safetensors dtype, shape, absolute byte range."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


class _DuplicateKeyError(ValueError):
    """A JSON object with a key twice (json.loads would keep the last one silently)."""


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKeyError(key)
        out[key] = value
    return out


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_safetensors_header(path: Path) -> dict[str, TensorRef]:
    """Validate one .safetensors file's header against its size and return its tensors.

    Untrusted input: the header must be a JSON object with unique names; each tensor a known dtype, a shape of
    non-negative integers and integer data offsets whose length is exactly dtype x shape (Python integers: no
    overflow); and the tensors must tile the data section from its start to the end of the file with no overlap and
    no hole, as the safetensors format requires. Any violation is a CheckpointError naming the tensor and field."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header); re-download it")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > MAX_HEADER or 8 + header_len > size:
            raise CheckpointError(
                f"{path}: corrupt or truncated safetensors header (claims {header_len} bytes, file has {size}); "
                f"re-download it"
            )
        try:
            header = json.loads(handle.read(header_len), object_pairs_hook=_unique_keys)
        except _DuplicateKeyError as exc:
            raise CheckpointError(f"{path}: safetensors header has the key {exc.args[0]!r} twice") from None
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise CheckpointError(
                f"{path}: safetensors header is not valid JSON ({exc}); the file is corrupt, re-download it"
            ) from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object; the file is corrupt, re-download it")
    base = 8 + header_len
    tensors: dict[str, TensorRef] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        where = f"{path}: tensor {name!r}"
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            raise CheckpointError(f"{where}: malformed header entry (needs dtype, shape and data_offsets)")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise CheckpointError(f"{where} has unsupported dtype {dtype!r} (supported: {', '.join(_DTYPES)})")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise CheckpointError(f"{where} has shape {shape!r}: it must be a list of non-negative integers")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(_is_int(o) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise CheckpointError(f"{where} has data_offsets {offsets!r}: they must be two integers, begin <= end")
        begin, end = offsets
        expected = math.prod(shape) * np.dtype(_DTYPES[dtype]).itemsize
        if end - begin != expected:
            raise CheckpointError(f"{where} {dtype}{shape} should take {expected} bytes, header says {end - begin}")
        tensors[name] = TensorRef(path, dtype, tuple(shape), base + begin, base + end)
    data_end = 0
    for name, ref in sorted(tensors.items(), key=lambda item: (item[1].start, item[1].end)):
        where = f"{path}: tensor {name!r}"
        if ref.start < base + data_end:
            raise CheckpointError(f"{where}: its data_offsets overlap another tensor's; the file is corrupt or crafted")
        if ref.start > base + data_end:
            raise CheckpointError(
                f"{where}: a hole of {ref.start - base - data_end} bytes before its data (safetensors allows none); "
                "the file is corrupt or crafted"
            )
        data_end = ref.end - base
    if base + data_end > size:
        raise CheckpointError(
            f"{path}: truncated: tensors need {base + data_end} bytes but the file has {size}; re-download it"
        )
    if base + data_end < size:
        raise CheckpointError(
            f"{path}: {size - base - data_end} bytes after the last tensor (safetensors allows none); the file is "
            "corrupt or crafted"
        )
    return tensors


def safetensors_header(entries: list[tuple[str, str, tuple[int, ...]]]) -> bytes:
    """The length-prefixed header for tensors (name, safetensors dtype, shape) laid out in order."""
    header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, shape in entries:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(_DTYPES[dtype]).itemsize
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
    return struct.pack("<Q", len(blob)) + blob


def write_safetensors(
    path: str | Path, tensors: dict[str, np.ndarray], bf16: frozenset[str] | set[str] = frozenset()
) -> None:
    """Write numpy arrays as one safetensors file; names in `bf16` hold uint16 bf16 bit patterns."""
    dtype_names = {np.dtype(v): k for k, v in _DTYPES.items() if k != "BF16"}
    entries = [
        (name, "BF16" if name in bf16 else dtype_names[array.dtype], array.shape) for name, array in tensors.items()
    ]
    with Path(path).open("wb") as handle:
        handle.write(safetensors_header(entries))
        for array in tensors.values():
            np.ascontiguousarray(array).tofile(handle)


def load_tensor(ref: TensorRef) -> np.ndarray:
    """The tensor as a numpy array (memory-mapped; bf16 widened to float32)."""
    raw = np.memmap(ref.file, dtype=np.uint8, mode="r", offset=ref.start, shape=(ref.end - ref.start,))
    if ref.dtype == "BF16":
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(ref.shape)
    return raw.view(_DTYPES[ref.dtype]).reshape(ref.shape)


def _check_finite(array: np.ndarray, what: str, rows: int = 4096) -> None:
    """CheckpointError at the first NaN or Inf of a float tensor (checked a block of rows at a time)."""
    if array.dtype.kind != "f":
        return
    flat = array.reshape(array.shape[0], -1) if array.ndim > 1 else array.reshape(-1, 1)
    for start in range(0, flat.shape[0], rows):
        block = np.asarray(flat[start : start + rows])
        bad = ~np.isfinite(block)
        if bad.any():
            row, col = (int(i) for i in np.argwhere(bad)[0])
            index = np.unravel_index((start + row) * flat.shape[1] + col, array.shape)
            raise CheckpointError(
                f"{what} holds {block[row, col]} at index {tuple(int(i) for i in index)}: the checkpoint is broken "
                "(re-download or re-export it)"
            )


# --- architectures ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Architecture:
    """How one family names its tensors and what its forward computes."""

    hf_class: str
    default_act: str  # FFN activation when config.json has no hidden_act
    attn_sub_norm: str | None  # tensor suffix within a layer, None if the family has no sub-norms
    ffn_sub_norm: str | None


ARCHITECTURES = {
    # transformers' BitNet (microsoft/bitnet-b1.58-2B-4T): relu² FFN, sub-norms.
    "BitNetForCausalLM": Architecture("BitNetForCausalLM", "relu2", "self_attn.attn_sub_norm", "mlp.ffn_sub_norm"),
    # 1bitLLM/bitnet_b1_58-* (remote code, no transformers class): SiLU FFN, sub-norms with other names.
    "BitnetForCausalLM": Architecture("BitnetForCausalLM", "silu", "self_attn.inner_attn_ln", "mlp.ffn_layernorm"),
    # Falcon3-*-1.58bit: a Llama with a bitnet quantization_config; no sub-norms.
    "LlamaForCausalLM": Architecture("LlamaForCausalLM", "silu", None, None),
}
_ACTIVATIONS = {"relu2": "relu2", "silu": "silu", "swish": "silu"}
LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
TERNARY_BLOCK = 256


@dataclass
class Checkpoint:
    path: Path
    config: dict
    arch: Architecture
    tensors: dict[str, TensorRef]
    tokenizer_json: str
    tokenizer_config: dict
    generation_config: dict = field(default_factory=dict)

    # Hyperparameters, named once.
    @property
    def hidden(self) -> int:
        return int(self.config["hidden_size"])

    @property
    def layers(self) -> int:
        return int(self.config["num_hidden_layers"])

    @property
    def heads(self) -> int:
        return int(self.config["num_attention_heads"])

    @property
    def kv_heads(self) -> int:
        return int(self.config.get("num_key_value_heads") or self.heads)

    @property
    def ffn(self) -> int:
        return int(self.config["intermediate_size"])

    @property
    def vocab(self) -> int:
        return int(self.config["vocab_size"])

    @property
    def head_dim(self) -> int:
        return int(self.config.get("head_dim") or self.hidden // self.heads)

    @property
    def rope_theta(self) -> float:
        rope = self.config.get("rope_parameters") or {}
        return float(self.config.get("rope_theta") or rope.get("rope_theta") or 10000.0)

    @property
    def rms_eps(self) -> float:
        return float(self.config.get("rms_norm_eps", 1e-6))

    @property
    def context(self) -> int:
        return int(self.config.get("max_position_embeddings", 2048))

    @property
    def ffn_act(self) -> str:
        act = self.config.get("hidden_act") or self.arch.default_act
        if act not in _ACTIVATIONS:
            raise UnsupportedArchitectureError(
                f"{self.path}: hidden_act {act!r} is not supported; BitNet FFNs use relu2 or silu"
            )
        return _ACTIVATIONS[act]

    @property
    def tied(self) -> bool:
        return "lm_head.weight" not in self.tensors

    @property
    def packed(self) -> bool:
        return self.tensors[f"model.layers.0.{LINEARS[0]}.weight"].dtype == "U8"

    def load(self, name: str) -> np.ndarray:
        """The tensor, checked to be finite: a NaN or Inf is named with its first index, here, rather than found
        later as logits that differ "by nan"."""
        try:
            array = load_tensor(self.tensors[name])
        except KeyError:
            raise CheckpointError(f"{self.path}: tensor {name!r} is missing from the safetensors files") from None
        _check_finite(array, f"{self.path}: tensor {name!r}")
        return array

    def linear_names(self) -> list[str]:
        return [f"model.layers.{i}.{lin}" for i in range(self.layers) for lin in LINEARS]


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Open and validate a Hugging Face model directory; reads headers only, never the weights."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(
            f"{path}: not a directory; pass a Hugging Face model directory (config.json + *.safetensors + "
            f"tokenizer.json)"
        )
    config = _read_json(path / "config.json", "config.json")
    arch = _architecture(path, config)
    tensors = _read_weights(path)
    # tokenizer.json (required), tokenizer_config.json and special_tokens_map.json: sizes, shapes, ids and the chat
    # template checked (TokenizerFileError, a CheckpointError, naming the file and field)
    from engine.model.tokenizer import read_tokenizer_files

    vocab = config.get("vocab_size")
    if not isinstance(vocab, int) or isinstance(vocab, bool) or vocab < 1:
        raise CheckpointError(f"{path}: config.json vocab_size must be a positive integer, got {vocab!r}")
    tokenizer_json, tokenizer_config = read_tokenizer_files(path, vocab)
    generation_config = (
        _read_json(path / "generation_config.json", "generation_config.json")
        if (path / "generation_config.json").is_file()
        else {}
    )
    ckpt = Checkpoint(path, config, arch, tensors, tokenizer_json, tokenizer_config, generation_config)
    _check_shapes(ckpt)
    ckpt.ffn_act  # noqa: B018 - validate the activation before anything is written
    return ckpt


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path.parent}: {what} is missing; is this a Hugging Face model directory?")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: invalid JSON ({exc})") from None


def _architecture(path: Path, config: dict) -> Architecture:
    names = config.get("architectures") or []
    name = names[0] if names else config.get("model_type", "<none>")
    supported = ", ".join(ARCHITECTURES)
    if name not in ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"{path}: architecture {name!r} is not supported; Ryzanstein quantizes {supported} "
            "(LlamaForCausalLM only with a bitnet quantization_config)"
        )
    if name == "LlamaForCausalLM" and (config.get("quantization_config") or {}).get("quant_method") != "bitnet":
        raise UnsupportedArchitectureError(
            f"{path}: LlamaForCausalLM without a bitnet quantization_config is a full-precision model; "
            "only ternary-trained checkpoints (e.g. Falcon3-*-1.58bit) can be quantized without destroying them"
        )
    return ARCHITECTURES[name]


def _read_weights(path: Path) -> dict[str, TensorRef]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index, "model.safetensors.index.json").get("weight_map") or {}
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (path / f).is_file()]
        if missing:
            raise CheckpointError(
                f"{path}: shards listed in model.safetensors.index.json are missing: {', '.join(missing)}"
            )
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(
                f"{path}: no *.safetensors weights found (PyTorch .bin checkpoints are not read; convert them with "
                f"safetensors first)"
            )
    tensors: dict[str, TensorRef] = {}
    for name in files:
        tensors.update(read_safetensors_header(path / name))
    if index.is_file():
        absent = sorted(set(weight_map) - set(tensors))
        if absent:
            raise CheckpointError(f"{path}: index lists tensors not found in their shard: {', '.join(absent[:5])}")
    return tensors


def _check_shapes(ckpt: Checkpoint) -> None:
    """Every tensor the forward needs is present with the shape the config implies."""
    h, f, hd = ckpt.hidden, ckpt.ffn, ckpt.head_dim
    q_out, kv_out = ckpt.heads * hd, ckpt.kv_heads * hd
    linear_shapes = {
        "self_attn.q_proj": (q_out, h),
        "self_attn.k_proj": (kv_out, h),
        "self_attn.v_proj": (kv_out, h),
        "self_attn.o_proj": (h, q_out),
        "mlp.gate_proj": (f, h),
        "mlp.up_proj": (f, h),
        "mlp.down_proj": (h, f),
    }
    expected: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (ckpt.vocab, h), "model.norm.weight": (h,)}
    if not ckpt.tied:
        expected["lm_head.weight"] = (ckpt.vocab, h)
    for i in range(ckpt.layers):
        prefix = f"model.layers.{i}."
        expected[prefix + "input_layernorm.weight"] = (h,)
        expected[prefix + "post_attention_layernorm.weight"] = (h,)
        if ckpt.arch.attn_sub_norm:
            assert ckpt.arch.ffn_sub_norm is not None  # every family has both sub-norms or neither
            expected[prefix + ckpt.arch.attn_sub_norm + ".weight"] = (h,)  # sub-norm over the concatenated heads
            expected[prefix + ckpt.arch.ffn_sub_norm + ".weight"] = (f,)
        for lin, dims in linear_shapes.items():
            expected[prefix + lin + ".weight"] = dims
    packed = ckpt.tensors.get(f"model.layers.0.{LINEARS[0]}.weight")
    is_packed = packed is not None and packed.dtype == "U8"
    for name, shape in expected.items():
        ref = ckpt.tensors.get(name)
        if ref is None:
            raise CheckpointError(
                f"{ckpt.path}: tensor {name!r} is missing (architecture {ckpt.arch.hf_class}, {ckpt.layers} layers)"
            )
        actual = ref.shape
        if is_packed and any(name.endswith(lin + ".weight") for lin in LINEARS):
            actual = (ref.shape[0] * 4, *ref.shape[1:])  # four ternary values per byte along the output dim
            if f"{name[: -len('.weight')]}.weight_scale" not in ckpt.tensors:
                raise CheckpointError(f"{ckpt.path}: packed tensor {name!r} has no weight_scale beside it")
        if tuple(actual) != shape:
            raise CheckpointError(
                f"{ckpt.path}: tensor {name!r} has shape {list(actual)}, expected {list(shape)} from config.json"
            )
    for lin, (rows, cols) in linear_shapes.items():
        if cols % TERNARY_BLOCK:
            raise CheckpointError(
                f"{ckpt.path}: {lin}.weight rows have length {cols}, not a multiple of {TERNARY_BLOCK}; "
                f"ternary GGUF types (TQ1_0/TQ2_0) pack rows in blocks of {TERNARY_BLOCK}, so this model "
                f"(hidden {h}, FFN {f}) cannot be stored without padding, which Ryzanstein does not implement"
            )
