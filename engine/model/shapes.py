"""Named model shapes for synthetic checkpoints and benchmarks."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    tied: bool = True
    rope_theta: float = 500000.0
    rms_eps: float = 1e-5
    context: int = 4096
    hidden_act: str = "relu2"

    def hf_config(self) -> dict:
        """config.json of a transformers `BitNetForCausalLM` with this shape."""
        return {
            "architectures": ["BitNetForCausalLM"],
            "model_type": "bitnet",
            "vocab_size": self.vocab,
            "hidden_size": self.hidden,
            "intermediate_size": self.ffn,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.hidden // self.heads,
            "hidden_act": self.hidden_act,
            "max_position_embeddings": self.context,
            "rms_norm_eps": self.rms_eps,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tied,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "bos_token_id": 256,
            "eos_token_id": 257,
            "torch_dtype": "bfloat16",
        }

    def as_dict(self) -> dict:
        return asdict(self)


SHAPES: dict[str, Shape] = {
    # Smallest shape every kernel path accepts (rows are multiples of 256): tests and make run.
    "tiny": Shape(hidden=256, layers=2, heads=4, kv_heads=2, ffn=768, vocab=512),
    # Mid-size shape for native-vs-reference tests that need realistic ratios.
    "medium": Shape(hidden=1024, layers=4, heads=16, kv_heads=4, ffn=2816, vocab=4096),
    # microsoft/bitnet-b1.58-2B-4T: the reference shape for DESIGN.md's performance targets.
    "bitnet-2b4t": Shape(hidden=2560, layers=30, heads=20, kv_heads=5, ffn=6912, vocab=128256),
}


def get_shape(name: str) -> Shape:
    try:
        return SHAPES[name]
    except KeyError:
        raise ValueError(f"unknown shape {name!r}; choose one of: {', '.join(SHAPES)}") from None
