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

import json
import mmap
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

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
GGUF_MAGIC = b"GGUF"


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


class _Cursor:
    def __init__(self, buf: memoryview, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def unpack(self, fmt: str):
        try:
            (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        except struct.error:
            raise GGUFFormatError(f"{self.path}: truncated GGUF header") from None
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.unpack("<Q")
        if self.pos + n > len(self.buf):
            raise GGUFFormatError(f"{self.path}: truncated GGUF header")
        value = bytes(self.buf[self.pos : self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return value

    def skip_value(self, vtype: int) -> None:
        if vtype in _SCALARS:
            self.pos += struct.calcsize(_SCALARS[vtype])
        elif vtype == _STRING:
            length = self.unpack("<Q")  # (not `pos += unpack()`: unpack moves pos first)
            self.pos += length
        else:
            raise GGUFFormatError(f"{self.path}: unknown GGUF value type {vtype}")

    def value(self, vtype: int, lazy_arrays: bool):
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            elem, count = self.unpack("<I"), self.unpack("<Q")
            start = self.pos
            if elem in _SCALARS:  # fixed size: skip in one step
                self.pos += count * struct.calcsize(_SCALARS[elem])
            else:
                for _ in range(count):
                    self.skip_value(elem)
            if lazy_arrays and count > 64:
                return LazyArray(elem, count, start)
            sub = _Cursor(self.buf, self.path)
            sub.pos = start
            return [sub.value(elem, False) for _ in range(count)]
        raise GGUFFormatError(f"{self.path}: unknown GGUF value type {vtype}")


def read_gguf_index(path: Path) -> tuple[dict, dict[str, TensorInfo]]:
    """Metadata (large arrays left lazy) and tensor infos of a GGUF file, without reading tensor data.
    gguf's GGUFReader parses every vocabulary entry eagerly, seconds on a 128k vocabulary."""
    with path.open("rb") as handle:
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
        metadata = {}
        for _ in range(n_kv):
            key = cur.string()
            metadata[key] = cur.value(cur.unpack("<I"), lazy_arrays=True)
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            dims = tuple(cur.unpack("<Q") for _ in range(cur.unpack("<I")))
            infos.append((name, dims, cur.unpack("<I"), cur.unpack("<Q")))
        alignment = int(metadata.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT))
        data_start = (cur.pos + alignment - 1) // alignment * alignment
        tensors = {}
        for name, dims, type_id, offset in infos:
            qtype = gguf.GGMLQuantizationType(type_id)
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            n_bytes = int(np.prod(dims, dtype=np.int64)) // block * type_size
            if data_start + offset + n_bytes > len(buf):
                raise GGUFFormatError(f"{path}: tensor {name!r} extends past the end of the file (truncated?)")
            tensors[name] = TensorInfo(name, dims, qtype, data_start + offset, n_bytes)
        return metadata, tensors
    finally:
        buf.release()
        mapped.close()


class ModelFile:
    """A model artifact opened for reading: header parsed lazily, tensors memory-mapped on demand."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.metadata, self.tensors = read_gguf_index(self.path)
        except (ValueError, OSError) as exc:
            if isinstance(exc, GGUFFormatError):
                raise
            raise GGUFFormatError(f"{self.path}: not a readable GGUF file ({exc})") from None
        self._map: np.memmap | None = None
        self.arch = self.get_str("general.architecture")
        if self.arch not in ARCHES:
            raise GGUFFormatError(
                f"{self.path}: architecture {self.arch!r} is not a BitNet model artifact (expected one of {ARCHES})"
            )
        schema = self.get("ryz.schema", 1)
        if schema != FORMAT_SCHEMA:
            raise GGUFFormatError(
                f"{self.path}: ryz.schema {schema} is not supported by this build (supports {FORMAT_SCHEMA}); upgrade "
                f"Ryzanstein"
            )
        a = self.arch
        heads = int(self.get(f"{a}.attention.head_count"))
        hidden = int(self.get(f"{a}.embedding_length"))
        self.hparams = Hyperparams(
            hidden=hidden,
            layers=int(self.get(f"{a}.block_count")),
            heads=heads,
            kv_heads=int(self.get(f"{a}.attention.head_count_kv", heads)),
            head_dim=int(self.get(f"{a}.attention.key_length", hidden // heads)),
            ffn=int(self.get(f"{a}.feed_forward_length")),
            vocab=int(self.get(f"{a}.vocab_size", 0)) or self.shape("token_embd.weight")[0],
            context=int(self.get(f"{a}.context_length", 4096)),
            rope_theta=float(self.get(f"{a}.rope.freq_base", 10000.0)),
            rms_eps=float(self.get(f"{a}.attention.layer_norm_rms_epsilon", 1e-5)),
            ffn_act=self.get_str(f"{a}.ffn_activation", "silu"),
            sub_norms="blk.0.attn_sub_norm.weight" in self.tensors,
            tied="output.weight" not in self.tensors,
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
        data = self._map[info.offset : info.offset + info.n_bytes]
        rows_shape = tuple(int(d) for d in reversed(info.shape))
        if info.tensor_type == gguf.GGMLQuantizationType.F32:
            return data.view(np.float32).reshape(rows_shape)
        if info.tensor_type == gguf.GGMLQuantizationType.F16:
            return data.view(np.float16).reshape(rows_shape)
        return data.reshape(*rows_shape[:-1], -1)

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
        value = self.metadata.get(key)
        return None if value is None else int(value)
