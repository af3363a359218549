"""Checkpoint variants for tests, derived from the synthetic tiny BitNet checkpoint: the other supported
families (1bitLLM, Falcon3-style Llama), transformers' packed format, and broken directories."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np

from engine.model.checkpoint import load_tensor, read_safetensors_header, write_safetensors
from engine.model.shapes import SHAPES, Shape
from engine.model.synth import write_synthetic_checkpoint
from engine.model.ternary import pack_hf_ternary, quantize_absmean

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def synth(path: Path, shape: Shape | str = "tiny", seed: int = 0) -> Path:
    return write_synthetic_checkpoint(SHAPES[shape] if isinstance(shape, str) else shape, path, seed=seed)


def tensors_of(path: Path) -> dict[str, np.ndarray]:
    """All tensors of a single-file checkpoint as float32 (bf16 widened) or their stored dtype."""
    return {
        name: np.array(load_tensor(ref)) for name, ref in read_safetensors_header(path / "model.safetensors").items()
    }


def rewrite(
    src: Path,
    dst: Path,
    tensors: dict[str, np.ndarray],
    config_update: dict | None = None,
    drop_config: tuple[str, ...] = (),
) -> Path:
    """Copy `src` to `dst` with new weights (float32 stored as F32) and an edited config."""
    shutil.copytree(src, dst)
    write_safetensors(dst / "model.safetensors", tensors)
    config = json.loads((dst / "config.json").read_text())
    config.update(config_update or {})
    for key in drop_config:
        config.pop(key, None)
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst


def silu_variant(src: Path, dst: Path) -> Path:
    """What llama.cpp's bitnet graph computes: SiLU FFN, sub-norms, tied head."""
    return rewrite(src, dst, tensors_of(src), {"hidden_act": "silu"})


def onebit_variant(src: Path, dst: Path, seed: int = 1) -> Path:
    """1bitLLM/bitnet_b1_58 layout: BitnetForCausalLM, SiLU, sub-norms named inner_attn_ln / ffn_layernorm,
    a separate lm_head."""
    tensors = {}
    for name, value in tensors_of(src).items():
        name = name.replace("self_attn.attn_sub_norm", "self_attn.inner_attn_ln").replace(
            "mlp.ffn_sub_norm", "mlp.ffn_layernorm"
        )
        tensors[name] = value
    embed = tensors["model.embed_tokens.weight"]
    tensors["lm_head.weight"] = np.random.default_rng(seed).normal(0, 0.02, embed.shape).astype(np.float32)
    return rewrite(
        src,
        dst,
        tensors,
        {
            "architectures": ["BitnetForCausalLM"],
            "model_type": "llama",
            "hidden_act": "silu",
            "tie_word_embeddings": False,
        },
    )


def packed_variant(src: Path, dst: Path) -> Path:
    """transformers' offline BitNet format (microsoft/bitnet-b1.58-2B-4T): uint8 weights, weight_scale."""
    tensors = {}
    for name, value in tensors_of(src).items():
        if any(name.endswith(f"{lin}.weight") for lin in LINEARS):
            tern = quantize_absmean(value)
            tensors[name] = pack_hf_ternary(tern.codes)
            tensors[name[: -len("weight")] + "weight_scale"] = np.array([1.0 / tern.scale], dtype=np.float32)
        else:
            tensors[name] = value
    qconfig = {"quant_method": "bitnet", "linear_class": "bitlinear", "quantization_mode": "offline"}
    return rewrite(src, dst, tensors, {"quantization_config": qconfig})


def falcon3_variant(src: Path, dst: Path, seed: int = 2) -> Path:
    """Falcon3-*-1.58bit style: LlamaForCausalLM + bitnet quantization_config, packed, SiLU, no sub-norms, untied."""
    packed = tensors_of(packed_variant(src, dst.with_name(dst.name + "-packed")))
    tensors = {n: v for n, v in packed.items() if "sub_norm" not in n}
    embed = tensors["model.embed_tokens.weight"]
    tensors["lm_head.weight"] = np.random.default_rng(seed).normal(0, 0.02, embed.shape).astype(np.float32)
    qconfig = {"quant_method": "bitnet", "linear_class": "bitlinear", "quantization_mode": "offline"}
    return rewrite(
        src,
        dst,
        tensors,
        {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_act": "silu",
            "tie_word_embeddings": False,
            "quantization_config": qconfig,
        },
    )


def odd_width_shape() -> Shape:
    """A shape whose FFN (320) is not a multiple of 256, like 1bitLLM-3B's hidden 3200."""
    return replace(SHAPES["tiny"], ffn=320)


def slower_twin(src: Path, dst: Path, factor: int = 3) -> Path:
    """`src` with `factor` x its decoder layers and the same outputs: the added layers are copies of its layers
    whose o_proj and down_proj are zero, so each adds exactly 0 to the residual stream (an all-zero matrix
    quantizes to zero codes with a finite scale: quantize_absmean clamps mean|W| at SCALE_EPS). The layers' work
    grows `factor` x; the head, the embedding and the engine's per-token overhead do not, so a tiny model slows
    by less than `factor` per token (measure it; test_canary_analysis.py does)."""
    if factor < 1:
        raise ValueError(f"factor must be at least 1, got {factor}")
    tensors = tensors_of(src)
    layers = json.loads((src / "config.json").read_text())["num_hidden_layers"]
    for extra in range(layers, layers * factor):
        source = f"model.layers.{extra % layers}."
        for name, value in list(tensors.items()):
            if name.startswith(source):
                inert = name.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight"))
                tensors[f"model.layers.{extra}.{name[len(source) :]}"] = np.zeros_like(value) if inert else value
    return rewrite(src, dst, tensors, {"num_hidden_layers": layers * factor})
