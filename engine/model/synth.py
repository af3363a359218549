"""Random-weight Hugging Face BitNet checkpoints of a named shape, for benchmarks before any download.

Weights are bf16 master weights (what `ryz quantize` expects), written tensor by tensor in shards so
the 2B4T shape never sits in memory as fp32. Each tensor has its own seed stream (seed, index), so the
output is deterministic and independent of write order.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from engine.fsutil import atomic_directory
from engine.model.checkpoint import safetensors_header
from engine.model.shapes import Shape
from engine.model.vocab import build_byte_tokenizer, save_tokenizer_files

SHARD_BYTES = 2 * 1024**3
CHUNK_ROWS = 8192  # rows of a large tensor generated at a time
INIT_STD = 0.02


def plan_tensors(shape: Shape) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, init) for every tensor of a transformers BitNetForCausalLM."""
    h, f, hd = shape.hidden, shape.ffn, shape.hidden // shape.heads
    q, kv = shape.heads * hd, shape.kv_heads * hd
    plan: list[tuple[str, tuple[int, ...], str]] = [("model.embed_tokens.weight", (shape.vocab, h), "normal")]
    for i in range(shape.layers):
        p = f"model.layers.{i}."
        plan += [
            (p + "input_layernorm.weight", (h,), "norm"),
            (p + "self_attn.q_proj.weight", (q, h), "normal"),
            (p + "self_attn.k_proj.weight", (kv, h), "normal"),
            (p + "self_attn.v_proj.weight", (kv, h), "normal"),
            (p + "self_attn.attn_sub_norm.weight", (h,), "norm"),
            (p + "self_attn.o_proj.weight", (h, q), "normal"),
            (p + "post_attention_layernorm.weight", (h,), "norm"),
            (p + "mlp.gate_proj.weight", (f, h), "normal"),
            (p + "mlp.up_proj.weight", (f, h), "normal"),
            (p + "mlp.ffn_sub_norm.weight", (f,), "norm"),
            (p + "mlp.down_proj.weight", (h, f), "normal"),
        ]
    plan.append(("model.norm.weight", (h,), "norm"))
    if not shape.tied:
        plan.append(("lm_head.weight", (shape.vocab, h), "normal"))
    return plan


def to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits (uint16), round to nearest even."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)


def _generate(seed: int, index: int, shape: tuple[int, ...], init: str) -> Iterator[np.ndarray]:
    """bf16 chunks of one tensor, row-chunked so a 128k-row embedding never exists as fp32 at once."""
    rng = np.random.Generator(np.random.PCG64([seed, index]))
    rows = shape[0]
    cols = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    for start in range(0, rows, CHUNK_ROWS):
        n = min(CHUNK_ROWS, rows - start)
        values = rng.standard_normal(n * cols, dtype=np.float32)
        if init == "norm":
            values = np.float32(1.0) + np.float32(0.1) * values
        else:
            values *= np.float32(INIT_STD)
        yield to_bf16(values)


def write_synthetic_checkpoint(
    shape: Shape, out_dir: str | Path, seed: int = 0, progress: Callable[[int], None] | None = None
) -> Path:
    """Write config, tokenizer and bf16 safetensors shards to `out_dir` (atomically: temp dir + rename)."""
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        plan = plan_tensors(shape)
        shards = _assign_shards(plan)
        weight_map: dict[str, str] = {}
        for shard_no, names in enumerate(shards, start=1):
            file_name = (
                "model.safetensors" if len(shards) == 1 else f"model-{shard_no:05d}-of-{len(shards):05d}.safetensors"
            )
            entries = [(i, n, s, init) for i, (n, s, init) in enumerate(plan) if n in names]
            _write_shard(tmp / file_name, entries, seed, progress)
            weight_map.update({n: file_name for _, n, _, _ in entries})
        if len(shards) > 1:
            total = sum(int(np.prod(s)) * 2 for _, s, _ in plan)
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
            )
        config = shape.hf_config()
        # Without a quantization_config transformers would build plain nn.Linear and quantize nothing.
        config["quantization_config"] = {
            "quant_method": "bitnet",
            "linear_class": "autobitlinear",
            "quantization_mode": "online",
        }
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        (tmp / "generation_config.json").write_text(
            json.dumps(
                {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"], "do_sample": False},
                indent=2,
            )
        )
        save_tokenizer_files(build_byte_tokenizer(shape.vocab), tmp)
    return out_dir


def _assign_shards(plan) -> list[set[str]]:
    shards: list[set[str]] = [set()]
    size = 0
    for name, shape, _ in plan:
        nbytes = int(np.prod(shape)) * 2
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append(set())
            size = 0
        shards[-1].add(name)
        size += nbytes
    return shards


def _write_shard(path: Path, entries, seed: int, progress) -> None:
    with path.open("wb") as handle:
        handle.write(safetensors_header([(name, "BF16", shape) for _, name, shape, _ in entries]))
        for index, _, shape, init in entries:
            for chunk in _generate(seed, index, shape, init):
                chunk.tofile(handle)
                if progress:
                    progress(chunk.nbytes)
