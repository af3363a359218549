"""The model artifact: a GGUF file laid out as llama.cpp's BitNet architecture expects.

Tensors (numpy shape, GGUF type):
  token_embd.weight            (vocab, hidden)  Q8_0 | Q6_K | F16   also the head when tied
  output.weight                (vocab, hidden)  same type           only when untied
  output_norm.weight           (hidden,)        F32
  blk.N.attn_norm.weight       (hidden,)        F32
  blk.N.attn_{q,k,v}.weight    (out, hidden)    TQ2_0 | TQ1_0      block scale exactly 1.0: codes only
  blk.N.attn_{q,k,v}.scale     (1,)             F32                exact per-tensor scale (llama.cpp multiplies)
  blk.N.attn_sub_norm.weight   (hidden,)        F32                if the family has sub-norms
  blk.N.attn_output.{weight,scale}, blk.N.ffn_norm.weight, blk.N.ffn_{gate,up,down}.{weight,scale},
  blk.N.ffn_sub_norm.weight    (ffn,)           F32                if the family has sub-norms

Architecture key: `bitnet` only for what llama.cpp's bitnet graph computes (SiLU FFN, sub-norms, tied
head); otherwise `ryz-bitnet` with the same tensor names and keys, so no tool silently computes a
different model. `{arch}.ffn_activation` records `relu2` or `silu`.
"""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from engine.errors import GGUFFormatError

LLAMA_CPP_ARCH = "bitnet"
OWN_ARCH = "ryz-bitnet"
ARCHES = (LLAMA_CPP_ARCH, OWN_ARCH)
FORMAT_SCHEMA = 1  # ryz.schema in the GGUF metadata

# HF linear suffix -> GGUF tensor stem, in forward order.
LINEAR_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
TERNARY_TYPES = ("tq2_0", "tq1_0")
HEAD_TYPES = ("q8_0", "q6_k", "f16")

# tokenizer.json Split regexes llama.cpp knows by a pre-tokenizer name.
_LLAMA3_SPLIT = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}"


@dataclass(frozen=True)
class Hyperparams:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    context: int
    rope_theta: float
    rms_eps: float
    ffn_act: str
    sub_norms: bool
    tied: bool

    @property
    def arch(self) -> str:
        llama_cpp_computes = self.ffn_act == "silu" and self.sub_norms and self.tied
        return LLAMA_CPP_ARCH if llama_cpp_computes else OWN_ARCH


def tensor_name(layer: int | None, stem: str, kind: str = "weight") -> str:
    return f"{stem}.{kind}" if layer is None else f"blk.{layer}.{stem}.{kind}"


def add_hyperparams(writer: gguf.GGUFWriter, hp: Hyperparams) -> None:
    arch = hp.arch
    writer.add_uint32(f"{arch}.context_length", hp.context)
    writer.add_uint32(f"{arch}.embedding_length", hp.hidden)
    writer.add_uint32(f"{arch}.block_count", hp.layers)
    writer.add_uint32(f"{arch}.feed_forward_length", hp.ffn)
    writer.add_uint32(f"{arch}.attention.head_count", hp.heads)
    writer.add_uint32(f"{arch}.attention.head_count_kv", hp.kv_heads)
    writer.add_uint32(f"{arch}.attention.key_length", hp.head_dim)
    writer.add_uint32(f"{arch}.attention.value_length", hp.head_dim)
    writer.add_uint32(f"{arch}.rope.dimension_count", hp.head_dim)
    writer.add_float32(f"{arch}.rope.freq_base", hp.rope_theta)
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", hp.rms_eps)
    writer.add_uint32(f"{arch}.vocab_size", hp.vocab)
    writer.add_string(f"{arch}.ffn_activation", hp.ffn_act)
    writer.add_uint32("ryz.schema", FORMAT_SCHEMA)


def add_tokenizer(writer: gguf.GGUFWriter, tokenizer_json: str, tokenizer_config: dict, vocab: int) -> None:
    """The HF tokenizer verbatim (our engine reads it) plus llama.cpp's own vocabulary keys."""
    writer.add_string(gguf.Keys.Tokenizer.HF_JSON, tokenizer_json)
    spec = json.loads(tokenizer_json)
    model = spec.get("model") or {}
    token_ids: dict[str, int] = dict(model.get("vocab") or {})
    special = {t["content"]: t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    added = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
    token_ids.update(added)
    tokens = [f"[PAD{i}]" for i in range(vocab)]
    types = [gguf.TokenType.UNUSED] * vocab
    for text, idx in token_ids.items():
        if idx < vocab:
            tokens[idx] = text
            types[idx] = (
                gguf.TokenType.CONTROL
                if text in special
                else gguf.TokenType.USER_DEFINED
                if text in added
                else gguf.TokenType.NORMAL
            )
    byte_fallback = bool(model.get("byte_fallback"))
    if model.get("type") == "BPE" and not byte_fallback:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(_pre_tokenizer_name(spec))
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        writer.add_token_merges(merges)
    elif model.get("type") == "BPE":  # SentencePiece-style BPE with byte fallback (Llama 2, 1bitLLM)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        for text, idx in token_ids.items():
            if idx < vocab and text.startswith("<0x") and len(text) == 6:
                types[idx] = gguf.TokenType.BYTE
        writer.add_token_scores([-float(i) for i in range(vocab)])
    else:
        writer.add_tokenizer_model("none")
    writer.add_token_list(tokens)
    writer.add_token_types([int(t) for t in types])
    for key, setter in (
        ("bos_token", writer.add_bos_token_id),
        ("eos_token", writer.add_eos_token_id),
        ("pad_token", writer.add_pad_token_id),
        ("unk_token", writer.add_unk_token_id),
    ):
        content = _token_text(tokenizer_config.get(key))
        if content is not None and content in token_ids:
            setter(token_ids[content])
    writer.add_add_bos_token(bool(tokenizer_config.get("add_bos_token", "bos_token" in tokenizer_config)))
    writer.add_add_eos_token(bool(tokenizer_config.get("add_eos_token", False)))
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # named templates: keep the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if template:
        writer.add_chat_template(template)


def _token_text(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


def _pre_tokenizer_name(spec: dict) -> str:
    text = json.dumps(spec.get("pre_tokenizer") or {})
    if json.dumps(_LLAMA3_SPLIT)[1:-1] in text:
        return "llama-bpe"
    return "gpt-2"  # ByteLevel's own regex is GPT-2's


# --- reading ------------------------------------------------------------------------------------------
#
# A GGUF file is untrusted input: everything the engine uses from it is checked here, before a tensor is mapped or
# handed to the native engine, and every violation is a GGUFFormatError naming the field (docs/artifact-format.md
# "Validation"). Counts are checked against the bytes left before anything is allocated for them, sizes are computed
# with Python's integers (no overflow), and a file is a model only when every tensor the forward reads has the type
# and shape the hyperparameters imply.

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_VALUE_BYTES = {**{t: struct.calcsize(f) for t, f in _SCALARS.items()}, _STRING: 8}  # an array element's least size
_KV_BYTES = 8 + 4 + 1  # the least a metadata pair takes: key length, value type, a one-byte value
_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8  # the least a tensor info takes: name length, n_dims, one dim, type, offset
GGUF_MAGIC = b"GGUF"
MAX_DIMS = 4  # GGML_MAX_DIMS
INT32_MAX, INT64_MAX = 2**31 - 1, 2**63 - 1
DENSE_TYPES = ("q8_0", "q6_k", "f16", "f32")  # embedding and head: what the native engine's dense GEMM reads
NORM_TYPES = ("f32",)
TILE_ROWS = 4  # the native engine repacks ternary rows in tiles of 4 (native/src/blocks.h)


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # GGUF order (innermost first), as gguf's reader reports it
    tensor_type: gguf.GGMLQuantizationType
    offset: int  # absolute byte offset of the data in the file
    n_bytes: int


@dataclass(frozen=True)
class LazyArray:
    """A metadata array left unparsed (the 128k-entry vocabulary and merges): its place in the file."""

    elem_type: int
    count: int
    offset: int


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _show(value) -> str:
    text = "an array" if isinstance(value, (list, LazyArray)) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _Cursor:
    """Reads a GGUF header; `field` names what is being read, for the error messages."""

    def __init__(self, buf: memoryview, path: Path):
        self.buf, self.pos, self.path, self.field = buf, 0, path, "header"

    def error(self, problem: str) -> GGUFFormatError:
        return GGUFFormatError(f"{self.path}: {self.field}: {problem}")

    @property
    def left(self) -> int:
        return len(self.buf) - self.pos

    def need(self, n: int) -> None:
        if n > self.left:
            raise self.error(
                f"needs {n} bytes at offset {self.pos} but the file ends {self.left} bytes later (truncated GGUF?)"
            )

    def unpack(self, fmt: str):
        size = struct.calcsize(fmt)
        self.need(size)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        n = self.unpack("<Q")
        self.need(n)
        value = bytes(self.buf[self.pos : self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return value

    def skip_value(self, vtype: int) -> None:
        if vtype in _SCALARS:
            self.need(_VALUE_BYTES[vtype])
            self.pos += _VALUE_BYTES[vtype]
        else:  # a string: the only other element type value() lets through
            length = self.unpack("<Q")  # (not `pos += unpack()`: unpack moves pos first)
            self.need(length)
            self.pos += length

    def value(self, vtype: int, lazy_arrays: bool):
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype != _ARRAY:
            raise self.error(f"unknown GGUF value type {vtype}")
        elem, count = self.unpack("<I"), self.unpack("<Q")
        if elem not in _VALUE_BYTES:
            raise self.error(
                f"arrays of GGUF value type {elem} are not read (only arrays of numbers, booleans or strings)"
            )
        if count * _VALUE_BYTES[elem] > self.left:
            raise self.error(f"array count {count} cannot fit in the {self.left} bytes left in the file")
        start = self.pos
        if elem in _SCALARS:  # fixed size: skip in one step
            self.pos += count * _VALUE_BYTES[elem]
        else:
            for _ in range(count):
                self.skip_value(elem)
        if lazy_arrays and count > 64:
            return LazyArray(elem, count, start)
        sub = _Cursor(self.buf, self.path)
        sub.pos, sub.field = start, self.field
        return [sub.value(elem, False) for _ in range(count)]


def read_gguf_index(path: Path) -> tuple[dict, dict[str, TensorInfo]]:
    """Metadata (large arrays left lazy) and tensor infos of a GGUF file, without reading tensor data; every
    structural field checked (counts, lengths, value types, alignment, tensor dims, types, offsets and extents).
    gguf's GGUFReader parses every vocabulary entry eagerly, seconds on a 128k vocabulary."""
    with path.open("rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size < 24:
            raise GGUFFormatError(f"{path}: {size} bytes is too short for a GGUF header (truncated?)")
        mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    buf = memoryview(mapped)
    try:
        cur = _Cursor(buf, path)
        if bytes(buf[:4]) != GGUF_MAGIC:
            raise GGUFFormatError(f"{path}: not a GGUF file (bad magic)")
        cur.pos = 4
        version, n_tensors, n_kv = cur.unpack("<I"), cur.unpack("<Q"), cur.unpack("<Q")
        if version not in (2, 3):
            raise GGUFFormatError(f"{path}: GGUF version {version} is not supported (2 or 3)")
        if n_kv * _KV_BYTES + n_tensors * _TENSOR_INFO_BYTES > cur.left:
            raise GGUFFormatError(
                f"{path}: header kv_count {n_kv} and tensor_count {n_tensors} cannot fit in a {size}-byte file"
            )
        metadata: dict = {}
        for i in range(n_kv):
            cur.field = f"metadata key #{i}"
            key = cur.string()
            cur.field = f"metadata key {key!r}"
            if key in metadata:
                raise cur.error("appears twice")
            metadata[key] = cur.value(cur.unpack("<I"), lazy_arrays=True)
        infos = []
        for i in range(n_tensors):
            cur.field = f"tensor info #{i}"
            name = cur.string()
            cur.field = f"tensor {name!r}"
            n_dims = cur.unpack("<I")
            if not 1 <= n_dims <= MAX_DIMS:
                raise cur.error(f"has {n_dims} dimensions (GGUF tensors have 1 to {MAX_DIMS})")
            dims = tuple(cur.unpack("<Q") for _ in range(n_dims))
            infos.append((name, dims, cur.unpack("<I"), cur.unpack("<Q")))
        alignment = metadata.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT)
        if not _is_int(alignment) or alignment < 1 or alignment & (alignment - 1):
            raise GGUFFormatError(
                f"{path}: metadata key 'general.alignment' is {_show(alignment)}; it must be a power of two "
                f"(GGUF's default is {gguf.GGUF_DEFAULT_ALIGNMENT})"
            )
        data_start = (cur.pos + alignment - 1) // alignment * alignment
        tensors: dict[str, TensorInfo] = {}
        for name, dims, type_id, offset in infos:
            if name in tensors:
                raise GGUFFormatError(f"{path}: tensor {name!r} appears twice")
            tensors[name] = _tensor_info(path, name, dims, type_id, offset, data_start, alignment, size)
        # No byte belongs to two tensors (llama.cpp's reader goes further: data in tensor-info order, no gaps).
        by_offset = sorted(tensors.values(), key=lambda t: t.offset)
        for before, after in zip(by_offset, by_offset[1:]):
            if after.offset < before.offset + before.n_bytes:
                raise GGUFFormatError(f"{path}: tensor {after.name!r}: its data overlaps tensor {before.name!r}'s")
        return metadata, tensors
    finally:
        buf.release()
        mapped.close()


def _tensor_info(
    path: Path, name: str, dims: tuple[int, ...], type_id: int, offset: int, data_start: int, alignment: int, size: int
) -> TensorInfo:
    """One tensor info checked: a known type, whole blocks, an element count within 64 bits, an aligned offset and
    data inside the file."""
    where = f"{path}: tensor {name!r}"
    try:
        qtype = gguf.GGMLQuantizationType(type_id)
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
        raise GGUFFormatError(f"{where} has GGML type {type_id}, which is not a known tensor type") from None
    if min(dims) < 1:
        raise GGUFFormatError(f"{where} has shape {list(dims)}: every dimension must be at least 1")
    if dims[0] % block:
        raise GGUFFormatError(f"{where}: rows of {dims[0]} values are not whole {qtype.name} blocks of {block}")
    n_elements = math.prod(dims)
    if n_elements > INT64_MAX:
        raise GGUFFormatError(f"{where} has shape {list(dims)}: {n_elements} elements overflow a 64-bit count")
    n_bytes = n_elements // block * type_size
    if offset % alignment:
        raise GGUFFormatError(f"{where}: data offset {offset} is not a multiple of general.alignment ({alignment})")
    if data_start + offset + n_bytes > size:
        raise GGUFFormatError(
            f"{where}: its {n_bytes} bytes at offset {data_start + offset} extend past the end of the {size}-byte "
            "file (truncated?)"
        )
    return TensorInfo(name, dims, qtype, data_start + offset, n_bytes)


HUGE_PAGE = 2 << 20


def _tensor_view(info: TensorInfo, data: np.ndarray) -> np.ndarray:
    """A tensor's bytes as ModelFile.raw returns them: values for F32/F16, rows of block bytes otherwise."""
    rows_shape = tuple(int(d) for d in reversed(info.shape))
    if info.tensor_type == gguf.GGMLQuantizationType.F32:
        return data.view(np.float32).reshape(rows_shape)
    if info.tensor_type == gguf.GGMLQuantizationType.F16:
        return data.view(np.float16).reshape(rows_shape)
    return data.reshape(*rows_shape[:-1], -1)


class ModelFile:
    """A model artifact opened for reading: header parsed and checked, tensors memory-mapped on demand."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.metadata, self.tensors = read_gguf_index(self.path)
        except OSError as exc:
            raise GGUFFormatError(f"{self.path}: not a readable GGUF file ({exc})") from None
        self._map: np.memmap | None = None
        self.arch = self._str("general.architecture")
        if self.arch not in ARCHES:
            raise GGUFFormatError(
                f"{self.path}: architecture {self.arch!r} is not a BitNet model artifact (expected one of {ARCHES})"
            )
        schema = self._int("ryz.schema", 1, low=0)
        if schema != FORMAT_SCHEMA:
            raise GGUFFormatError(
                f"{self.path}: ryz.schema {schema} is not supported by this build (supports {FORMAT_SCHEMA}); upgrade "
                f"Ryzanstein"
            )
        self.hparams = self._read_hparams()
        self._check_tensors()

    # Typed, range-checked metadata fields: a violation names the key, its value and the rule.

    def _field_error(self, key: str, rule: str) -> GGUFFormatError:
        return GGUFFormatError(f"{self.path}: metadata key {key!r} is {_show(self.metadata.get(key))}; {rule}")

    def _present(self, key: str, default):
        if key not in self.metadata and default is None:
            raise GGUFFormatError(f"{self.path}: metadata key {key!r} is missing")
        return self.metadata.get(key, default)

    def _int(self, key: str, default: int | None = None, low: int = 1, high: int = INT32_MAX) -> int:
        value = self._present(key, default)
        if not _is_int(value) or not low <= value <= high:
            raise self._field_error(key, f"it must be an integer from {low} to {high}")
        return value

    def _float(self, key: str, default: float) -> float:
        value = self._present(key, default)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not (math.isfinite(value) and value > 0):
            raise self._field_error(key, "it must be a finite number above 0")
        return float(value)

    def _str(self, key: str, default: str | None = None, choices: tuple[str, ...] = ()) -> str:
        value = self._present(key, default)
        if not isinstance(value, str) or (choices and value not in choices):
            raise self._field_error(key, f"it must be {' or '.join(choices) if choices else 'a string'}")
        return value

    def _read_hparams(self) -> Hyperparams:
        a = self.arch
        hidden = self._int(f"{a}.embedding_length")
        heads = self._int(f"{a}.attention.head_count")
        kv_heads = self._int(f"{a}.attention.head_count_kv", heads)
        if hidden % heads:
            raise self._field_error(f"{a}.attention.head_count", f"it must divide {a}.embedding_length ({hidden})")
        if heads % kv_heads:
            raise self._field_error(
                f"{a}.attention.head_count_kv", f"it must divide {a}.attention.head_count ({heads})"
            )
        head_dim = self._int(f"{a}.attention.key_length", hidden // heads)
        if head_dim % 2:
            raise self._field_error(f"{a}.attention.key_length", "the head size must be even (RoPE rotates halves)")
        for key in (f"{a}.attention.value_length", f"{a}.rope.dimension_count"):
            if key in self.metadata and self._int(key) != head_dim:
                raise self._field_error(key, f"the engine computes whole heads: it must equal the head size {head_dim}")
        layers = self._int(f"{a}.block_count")
        if layers * (2 + len(LINEAR_NAMES)) > len(self.tensors):
            raise self._field_error(
                f"{a}.block_count", f"the file holds {len(self.tensors)} tensors, too few for that many layers"
            )
        vocab_key = f"{a}.vocab_size"
        return Hyperparams(
            hidden=hidden,
            layers=layers,
            heads=heads,
            kv_heads=kv_heads,
            head_dim=head_dim,
            ffn=self._int(f"{a}.feed_forward_length"),
            vocab=self._int(vocab_key) if vocab_key in self.metadata else self.shape("token_embd.weight")[0],
            context=self._int(f"{a}.context_length", 4096),
            rope_theta=self._float(f"{a}.rope.freq_base", 10000.0),
            rms_eps=self._float(f"{a}.attention.layer_norm_rms_epsilon", 1e-5),
            ffn_act=self._str(f"{a}.ffn_activation", "silu", choices=("silu", "relu2")),
            sub_norms="blk.0.attn_sub_norm.weight" in self.tensors,
            tied="output.weight" not in self.tensors,
        )

    def _check_tensors(self) -> None:
        """Every tensor the forward reads is present, of a type the engine reads, and of the shape the hyperparameters
        imply; a `.scale` beside a ternary weight is exactly one F32 value."""
        hp = self.hparams
        q_dim, kv_dim = hp.heads * hp.head_dim, hp.kv_heads * hp.head_dim
        self._expect("token_embd.weight", (hp.vocab, hp.hidden), DENSE_TYPES)
        if not hp.tied:
            self._expect("output.weight", (hp.vocab, hp.hidden), DENSE_TYPES)
        self._expect("output_norm.weight", (hp.hidden,), NORM_TYPES)
        linears = {
            "attn_q": (q_dim, hp.hidden),
            "attn_k": (kv_dim, hp.hidden),
            "attn_v": (kv_dim, hp.hidden),
            "attn_output": (hp.hidden, q_dim),
            "ffn_gate": (hp.ffn, hp.hidden),
            "ffn_up": (hp.ffn, hp.hidden),
            "ffn_down": (hp.hidden, hp.ffn),
        }
        for i in range(hp.layers):
            norms = {"attn_norm": hp.hidden, "ffn_norm": hp.hidden}
            if hp.sub_norms:
                norms.update(attn_sub_norm=q_dim, ffn_sub_norm=hp.ffn)
            for stem, n in norms.items():
                self._expect(tensor_name(i, stem), (n,), NORM_TYPES)
            for stem, shape in linears.items():
                name = tensor_name(i, stem)
                self._expect(name, shape, TERNARY_TYPES)
                if shape[0] % TILE_ROWS:
                    raise GGUFFormatError(
                        f"{self.path}: tensor {name!r} has {shape[0]} rows; ternary rows must come in multiples of "
                        f"{TILE_ROWS}"
                    )
                if tensor_name(i, stem, "scale") in self.tensors:
                    self._expect(tensor_name(i, stem, "scale"), (1,), ("f32",))

    def _expect(self, name: str, shape: tuple[int, ...], types: tuple[str, ...]) -> None:
        kind = self.tensor_type(name)
        if kind not in types:
            raise GGUFFormatError(
                f"{self.path}: tensor {name!r} is {kind}; the engine reads it only as {', '.join(types)}"
            )
        if self.shape(name) != shape:
            raise GGUFFormatError(
                f"{self.path}: tensor {name!r} has shape {list(self.shape(name))}, expected {list(shape)} from the "
                "hyperparameters"
            )

    def get(self, key: str, default=None):
        value = self.metadata.get(key)
        if value is None:
            if default is None:
                raise GGUFFormatError(f"{self.path}: metadata key {key!r} is missing")
            return default
        if isinstance(value, LazyArray):
            return self._array(value)
        return value

    def _array(self, lazy: LazyArray) -> list:
        with self.path.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            buf = memoryview(mapped)
            try:
                cur = _Cursor(buf, self.path)
                cur.pos = lazy.offset
                return [cur.value(lazy.elem_type, False) for _ in range(lazy.count)]
            finally:
                buf.release()

    def get_str(self, key: str, default: str | None = None) -> str:
        return str(self.get(key, default))

    def tensor_type(self, name: str) -> str:
        return self._tensor(name).tensor_type.name.lower()

    def raw(self, name: str) -> np.ndarray:
        """The stored bytes (uint8, rows x bytes per row) or values (F32/F16) of one tensor, memory-mapped."""
        info = self._tensor(name)
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        return _tensor_view(info, self._map[info.offset : info.offset + info.n_bytes])

    def allocate_resident(self, name: str) -> np.ndarray:
        """An array shaped as raw(name) returns it, in anonymous memory advised as transparent huge pages and
        not yet filled (read_into fills it). For what every decoded token streams, the head: from the file's
        mapping it came in whatever pages the page cache held, and 4 KB ones cost the 2B4T head 1.1-1.2x
        (docs/kernels.md "Huge pages"). Untouched pages are not resident, so a caller can register the
        array first and fill it once it has released what it no longer needs."""
        info = self._tensor(name)
        anon = mmap.mmap(-1, info.n_bytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        start = -np.frombuffer(anon, dtype=np.uint8, count=1).ctypes.data % HUGE_PAGE  # the first 2 MB boundary
        if hasattr(mmap, "MADV_HUGEPAGE"):  # Linux; elsewhere, or with THP off: 4 KB pages, the same bytes
            with contextlib.suppress(OSError):  # advice only: a kernel built without THP refuses it (EINVAL)
                anon.madvise(mmap.MADV_HUGEPAGE, start, info.n_bytes)
        return _tensor_view(info, np.frombuffer(anon, dtype=np.uint8, count=info.n_bytes, offset=start))

    def read_into(self, name: str, out: np.ndarray) -> None:
        """Read one tensor's stored bytes into `out` (from allocate_resident): read, not copied from the
        mapping, so the file's pages never join this process's resident set."""
        info = self._tensor(name)
        view, done = out.reshape(-1).view(np.uint8).data, 0
        if view.nbytes != info.n_bytes:
            raise ValueError(f"{name}: {view.nbytes} bytes to read into, the tensor has {info.n_bytes}")
        with self.path.open("rb", buffering=0) as handle:
            handle.seek(info.offset)
            while done < info.n_bytes:
                got = handle.readinto(view[done:])
                if not got:
                    raise GGUFFormatError(f"{self.path}: tensor {name!r} ends past the end of the file (truncated?)")
                done += got

    def release(self, names) -> None:
        """Drop the named tensors' pages from this process's resident set (they stay in the page cache
        and fault back in if read again): the native engine repacks ternary weights and never reads
        the file's copies after that."""
        if self._map is None:
            return
        page = mmap.PAGESIZE
        for name in names:
            info = self._tensor(name)
            start = (info.offset + page - 1) // page * page
            end = (info.offset + info.n_bytes) // page * page
            if end > start:
                # numpy's stubs omit memmap's private _mmap (the mmap.mmap it maps the file with)
                self._map._mmap.madvise(mmap.MADV_DONTNEED, start, end - start)  # type: ignore[attr-defined]

    def _tensor(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise GGUFFormatError(f"{self.path}: tensor {name!r} is missing") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in reversed(self._tensor(name).shape))

    @property
    def tokenizer_json(self) -> str:
        return self.get_str(gguf.Keys.Tokenizer.HF_JSON)

    @property
    def chat_template(self) -> str | None:
        value = self.metadata.get(gguf.Keys.Tokenizer.CHAT_TEMPLATE)
        return None if value is None else str(value)

    def special_token(self, key: str) -> int | None:
        """A token id from the metadata (bos, eos, ...), None when absent; GGUFFormatError when it is not an integer
        (the tokenizer checks it against its vocabulary, engine/model/tokenizer.py)."""
        if key not in self.metadata:
            return None
        return self._int(key, low=0, high=INT64_MAX)
