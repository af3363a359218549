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
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
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
            types[idx] = (gguf.TokenType.CONTROL if text in special else
                          gguf.TokenType.USER_DEFINED if text in added else gguf.TokenType.NORMAL)
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
    for key, setter in (("bos_token", writer.add_bos_token_id), ("eos_token", writer.add_eos_token_id),
                        ("pad_token", writer.add_pad_token_id), ("unk_token", writer.add_unk_token_id)):
        text = _token_text(tokenizer_config.get(key))
        if text is not None and text in token_ids:
            setter(token_ids[text])
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

class ModelFile:
    """A model artifact opened for reading (memory-mapped)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.reader = gguf.GGUFReader(self.path, "r")
        except (ValueError, OSError, IndexError) as exc:
            raise GGUFFormatError(f"{self.path}: not a readable GGUF file ({exc})") from None
        self.arch = self.get_str("general.architecture")
        if self.arch not in ARCHES:
            raise GGUFFormatError(f"{self.path}: architecture {self.arch!r} is not a BitNet model artifact (expected one of {ARCHES})")
        schema = self.get("ryz.schema", 1)
        if schema != FORMAT_SCHEMA:
            raise GGUFFormatError(f"{self.path}: ryz.schema {schema} is not supported by this build (supports {FORMAT_SCHEMA}); upgrade Ryzanstein")
        self.tensors = {t.name: t for t in self.reader.tensors}
        a = self.arch
        heads = int(self.get(f"{a}.attention.head_count"))
        hidden = int(self.get(f"{a}.embedding_length"))
        self.hparams = Hyperparams(
            hidden=hidden, layers=int(self.get(f"{a}.block_count")), heads=heads,
            kv_heads=int(self.get(f"{a}.attention.head_count_kv", heads)),
            head_dim=int(self.get(f"{a}.attention.key_length", hidden // heads)),
            ffn=int(self.get(f"{a}.feed_forward_length")), vocab=int(self.get(f"{a}.vocab_size", 0)) or self.tensors["token_embd.weight"].shape[-1],
            context=int(self.get(f"{a}.context_length", 4096)), rope_theta=float(self.get(f"{a}.rope.freq_base", 10000.0)),
            rms_eps=float(self.get(f"{a}.attention.layer_norm_rms_epsilon", 1e-5)),
            ffn_act=self.get_str(f"{a}.ffn_activation", "silu"),
            sub_norms="blk.0.attn_sub_norm.weight" in self.tensors, tied="output.weight" not in self.tensors)

    def get(self, key: str, default=None):
        field = self.reader.get_field(key)
        if field is None:
            if default is None:
                raise GGUFFormatError(f"{self.path}: metadata key {key!r} is missing")
            return default
        return field.contents()

    def get_str(self, key: str, default: str | None = None) -> str:
        return str(self.get(key, default))

    def tensor_type(self, name: str) -> str:
        return self._tensor(name).tensor_type.name.lower()

    def raw(self, name: str) -> np.ndarray:
        """The stored bytes (uint8, rows x bytes per row) or values (F32/F16) of one tensor."""
        return self._tensor(name).data

    def _tensor(self, name: str):
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
        field = self.reader.get_field(gguf.Keys.Tokenizer.CHAT_TEMPLATE)
        return None if field is None else field.contents()

    def special_token(self, key: str) -> int | None:
        field = self.reader.get_field(key)
        return None if field is None else int(field.contents())
