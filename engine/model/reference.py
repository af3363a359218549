"""The numpy reference forward of BitNet b1.58: slow, exact, the yardstick every fast path is held to.

Per layer (transformers' BitNetForCausalLM; 1bitLLM and Falcon3 differ only where noted):
  h = x + o_proj(attn_sub_norm(attention(rope(q_proj(n)), rope(k_proj(n)), v_proj(n))))   n = attn_norm(x)
  y = h + down_proj(ffn_sub_norm(act(gate_proj(m)) * up_proj(m)))                          m = ffn_norm(h)
with act = relu² (2B4T) or SiLU (1bitLLM, Falcon3), sub-norms skipped where the family has none, and
every projection a BitLinear: int8 per-token absmax activations times ternary codes, then both scales.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engine.model import quants
from engine.model.ggufio import LINEAR_NAMES, ModelFile, tensor_name

ACT_EPS = np.float32(1e-5)  # transformers' clamp on max|x| before 127 / max|x|


def exp32(x: np.ndarray) -> np.ndarray:
    """exp rounded once from float64: the correctly rounded float32 result (to within double rounding),
    which the native engine computes the same way, so the two never differ by an ulp here. One ulp
    is enough to flip an int8 activation step in the next layer."""
    return np.exp(np.asarray(x, dtype=np.float64)).astype(np.float32)


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    variance = np.mean(np.square(x), axis=-1, keepdims=True, dtype=np.float32)
    return (x / np.sqrt(variance + np.float32(eps))) * weight


def quantize_activations(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-token absmax int8 (values in float32, exact integers) and the per-token scale 127/max|x|."""
    scale = np.float32(127.0) / np.maximum(np.max(np.abs(x), axis=-1, keepdims=True), ACT_EPS)
    return np.clip(np.rint(x * scale), -128, 127), scale


@dataclass
class BitLinear:
    codes: np.ndarray  # float32 copy of the ternary codes, (out, in): BLAS sums integers exactly below 2^24
    scale: np.float32

    def __call__(self, x: np.ndarray) -> np.ndarray:
        q, act_scale = quantize_activations(x)
        return (q @ self.codes.T) / act_scale * self.scale


@dataclass
class KVCache:
    keys: list[np.ndarray] = field(default_factory=list)  # per layer: (positions, kv_heads, head_dim)
    values: list[np.ndarray] = field(default_factory=list)

    @property
    def length(self) -> int:
        return self.keys[0].shape[0] if self.keys else 0


@dataclass
class _Layer:
    linears: dict[str, BitLinear]  # by GGUF stem: attn_q, attn_k, ..., ffn_down
    norms: dict[str, np.ndarray]  # attn_norm, ffn_norm and, where the family has them, the sub-norms


class ReferenceModel:
    """Loads a GGUF model artifact fully into float32 numpy arrays."""

    def __init__(self, path: str | Path):
        self.file = ModelFile(path)
        self.hp = hp = self.file.hparams
        self.embedding = self._dense("token_embd.weight")
        self.head = self.embedding if hp.tied else self._dense("output.weight")
        self.output_norm = self._dense("output_norm.weight")
        self.layers: list[_Layer] = []
        for i in range(hp.layers):
            layer = _Layer({stem: self._linear(i, stem) for stem in LINEAR_NAMES.values()}, {})
            for stem in ("attn_norm", "ffn_norm") + (("attn_sub_norm", "ffn_sub_norm") if hp.sub_norms else ()):
                layer.norms[stem] = self._dense(tensor_name(i, stem))
            self.layers.append(layer)
        half = hp.head_dim // 2
        # As transformers computes it: float32 inverse frequencies theta^(-2i/d).
        exponent = np.arange(0, half, dtype=np.float32) * 2 / np.float32(hp.head_dim)
        # transformers: 1 / theta ** (2i / d) in float32; the power is taken in float64 and rounded once.
        self.inv_freq = (
            np.float32(1.0) / (np.float64(np.float32(hp.rope_theta)) ** exponent.astype(np.float64)).astype(np.float32)
        ).astype(np.float32)

    def _dense(self, name: str) -> np.ndarray:
        kind = self.file.tensor_type(name)
        return quants.dequantize(np.asarray(self.file.raw(name)), kind, self.file.shape(name)).astype(np.float32)

    def _linear(self, layer: int, stem: str) -> BitLinear:
        name = tensor_name(layer, stem)
        codes = quants.unpack_ternary(
            np.asarray(self.file.raw(name)), self.file.tensor_type(name), self.file.shape(name)
        )
        scale = np.float32(np.asarray(self.file.raw(tensor_name(layer, stem, "scale"))).ravel()[0])
        return BitLinear(codes.astype(np.float32), scale)

    def _rope(self, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """NEOX-style rotation of the two halves of each head (transformers' rotate_half)."""
        freqs = positions.astype(np.float32)[:, None] * self.inv_freq[None, :]
        emb = np.concatenate([freqs, freqs], axis=-1).astype(np.float64)  # cos/sin rounded once, as exp32
        cos, sin = np.cos(emb).astype(np.float32)[:, None, :], np.sin(emb).astype(np.float32)[:, None, :]
        half = x.shape[-1] // 2
        rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
        return x * cos + rotated * sin

    def _ffn_act(self, x: np.ndarray) -> np.ndarray:
        if self.hp.ffn_act == "relu2":
            return np.square(np.maximum(x, 0))
        return x / (np.float32(1.0) + exp32(-x))

    def _attention(self, q: np.ndarray, keys: np.ndarray, values: np.ndarray, start: int) -> np.ndarray:
        """Causal attention, written so every float sum has a fixed order the native engine repeats:
        dot products and the softmax denominator are numpy's pairwise sums over a contiguous last axis
        (8 interleaved partial sums, then a fixed tree), and the weighted sum of values runs
        sequentially over positions. Each token sees exactly its own prefix, never masked entries."""
        sqrt_d = np.float32(np.sqrt(self.hp.head_dim))
        out = np.empty_like(q)
        for t in range(q.shape[0]):
            visible = start + t + 1
            scores = np.ascontiguousarray(np.sum(q[t][None] * keys[:visible], axis=-1).T) / sqrt_d  # (heads, T)
            scores = exp32(scores - scores.max(axis=-1, keepdims=True))
            probs = scores / np.sum(scores, axis=-1, keepdims=True)
            acc = np.zeros(q.shape[1:], dtype=np.float32)
            for p in range(visible):
                acc = acc + probs[:, p, None] * values[p]
            out[t] = acc
        return out

    def forward(self, tokens: list[int] | np.ndarray, cache: KVCache | None = None) -> np.ndarray:
        """Logits (len(tokens), vocab) for `tokens` appended after what `cache` already holds."""
        hp = self.hp
        tokens = np.asarray(tokens, dtype=np.int64)
        if tokens.size == 0:
            raise ValueError("forward needs at least one token")
        if tokens.min() < 0 or tokens.max() >= hp.vocab:
            raise ValueError(f"token ids must be in [0, {hp.vocab}); got {tokens.min()}..{tokens.max()}")
        cache = cache if cache is not None else KVCache()
        start = cache.length
        n = len(tokens)
        positions = np.arange(start, start + n)
        x = self.embedding[tokens]
        group = hp.heads // hp.kv_heads
        for i, layer in enumerate(self.layers):
            h = rms_norm(x, layer.norms["attn_norm"], hp.rms_eps)
            q = self._rope(layer.linears["attn_q"](h).reshape(n, hp.heads, hp.head_dim), positions)
            k = self._rope(layer.linears["attn_k"](h).reshape(n, hp.kv_heads, hp.head_dim), positions)
            v = layer.linears["attn_v"](h).reshape(n, hp.kv_heads, hp.head_dim)
            if len(cache.keys) <= i:
                cache.keys.append(k)
                cache.values.append(v)
            else:
                cache.keys[i] = np.concatenate([cache.keys[i], k])
                cache.values[i] = np.concatenate([cache.values[i], v])
            keys = np.repeat(cache.keys[i], group, axis=1)  # (T, heads, d): query head j uses kv head j // group
            values = np.repeat(cache.values[i], group, axis=1)
            attn = self._attention(q, keys, values, start).reshape(n, hp.heads * hp.head_dim)
            if hp.sub_norms:
                attn = rms_norm(attn, layer.norms["attn_sub_norm"], hp.rms_eps)
            x = x + layer.linears["attn_output"](attn)
            m = rms_norm(x, layer.norms["ffn_norm"], hp.rms_eps)
            gated = self._ffn_act(layer.linears["ffn_gate"](m)) * layer.linears["ffn_up"](m)
            if hp.sub_norms:
                gated = rms_norm(gated, layer.norms["ffn_sub_norm"], hp.rms_eps)
            x = x + layer.linears["ffn_down"](gated)
        x = rms_norm(x, self.output_norm, hp.rms_eps)
        return (x @ self.head.T).astype(np.float32)

    def generate(self, prompt: list[int], max_tokens: int, stop_ids: set[int] | None = None) -> list[int]:
        """Greedy decoding with a KV cache; stops early at any of `stop_ids`."""
        cache = KVCache()
        return greedy_decode(
            self.forward(prompt, cache)[-1], lambda token: self.forward([token], cache)[-1], max_tokens, stop_ids
        )


def greedy_decode(logits: np.ndarray, step, max_tokens: int, stop_ids: set[int] | None = None) -> list[int]:
    """Argmax decoding from the prompt's last logits; `step(token)` returns the next logits."""
    out: list[int] = []
    for _ in range(max_tokens):
        token = int(np.argmax(logits))
        out.append(token)
        if (stop_ids and token in stop_ids) or len(out) == max_tokens:
            break
        logits = step(token)
    return out


class ReferenceSlots:
    """The reference model behind the native context's interface (numbered sequence slots, `forward_batch`),
    so the engine core's scheduler runs it as it runs `NativeModel`: one numpy forward per sequence's run of
    tokens in a batch, in batch order."""

    def __init__(self, model: ReferenceModel, max_seqs: int = 1, max_positions: int | None = None):
        self.model, self.file, self.hp = model, model.file, model.hp
        self.max_seqs = max_seqs
        self.max_positions = max_positions or model.hp.context
        self._caches: dict[int, KVCache] = {}

    def forward_batch(
        self, tokens: np.ndarray, seq_ids: np.ndarray, want_logits: np.ndarray | None = None
    ) -> np.ndarray:
        tokens, seq_ids = np.asarray(tokens), np.asarray(seq_ids)
        want = np.zeros(len(tokens), bool) if want_logits is None else np.asarray(want_logits).astype(bool)
        if want_logits is None:
            want[-1] = True
        rows, start = [], 0
        while start < len(tokens):
            end = start + 1
            while end < len(tokens) and seq_ids[end] == seq_ids[start]:
                end += 1
            logits = self.model.forward(tokens[start:end], self._caches.setdefault(int(seq_ids[start]), KVCache()))
            rows.append(logits[want[start:end]])
            start = end
        return np.concatenate(rows) if rows else np.zeros((0, self.hp.vocab), np.float32)

    def truncate_seq(self, seq: int, length: int) -> None:
        cache = self._caches.setdefault(seq, KVCache())
        cache.keys[:] = [k[:length] for k in cache.keys]
        cache.values[:] = [v[:length] for v in cache.values]

    def copy_seq(self, src: int, dst: int, length: int) -> None:
        cache = self._caches.setdefault(src, KVCache())  # layer arrays are replaced, never written: share them
        self._caches[dst] = KVCache([k[:length] for k in cache.keys], [v[:length] for v in cache.values])

    def release_seq(self, seq: int) -> None:
        self._caches.pop(seq, None)

    def kv_bytes(self) -> int:
        return sum(a.nbytes for c in self._caches.values() for a in (*c.keys, *c.values))
