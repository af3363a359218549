"""Checkpoint -> ternary GGUF model artifact, streamed tensor by tensor, with its manifest."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from engine.model import quants
from engine.model.checkpoint import Checkpoint, read_checkpoint
from engine.model.ggufio import (
    HEAD_TYPES,
    LINEAR_NAMES,
    TERNARY_TYPES,
    Hyperparams,
    add_hyperparams,
    add_tokenizer,
    tensor_name,
)
from engine.model.ternary import TernaryTensor, quantize_absmean, unpack_hf_ternary

MANIFEST_SCHEMA = 1
HEAD_CHUNK_ROWS = 16384  # rows of the embedding quantized at a time (bounds memory on 128k vocabularies)
_FILE_TYPES = {"tq2_0": gguf.LlamaFileType.MOSTLY_TQ2_0, "tq1_0": gguf.LlamaFileType.MOSTLY_TQ1_0}


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    qtype: str
    source: str | None  # HF tensor name, None for derived tensors (scales)

    @property
    def nbytes(self) -> int:
        if self.qtype in ("f32", "f16"):
            return int(np.prod(self.shape)) * (4 if self.qtype == "f32" else 2)
        return int(np.prod(self.shape[:-1])) * quants.bytes_per_row(self.qtype, self.shape[-1])


def hyperparams(ckpt: Checkpoint) -> Hyperparams:
    return Hyperparams(
        hidden=ckpt.hidden,
        layers=ckpt.layers,
        heads=ckpt.heads,
        kv_heads=ckpt.kv_heads,
        head_dim=ckpt.head_dim,
        ffn=ckpt.ffn,
        vocab=ckpt.vocab,
        context=ckpt.context,
        rope_theta=ckpt.rope_theta,
        rms_eps=ckpt.rms_eps,
        ffn_act=ckpt.ffn_act,
        sub_norms=ckpt.arch.attn_sub_norm is not None,
        tied=ckpt.tied,
    )


def plan_tensors(ckpt: Checkpoint, weights: str, head: str) -> list[PlannedTensor]:
    """Every GGUF tensor in file order; the per-tensor scales go last (known only after quantizing)."""
    hp = hyperparams(ckpt)
    plan = [
        PlannedTensor("token_embd.weight", (hp.vocab, hp.hidden), head, "model.embed_tokens.weight"),
        PlannedTensor("output_norm.weight", (hp.hidden,), "f32", "model.norm.weight"),
    ]
    if not hp.tied:
        plan.append(PlannedTensor("output.weight", (hp.vocab, hp.hidden), head, "lm_head.weight"))
    scales = []
    for i in range(hp.layers):
        prefix = f"model.layers.{i}."
        norms = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
        if hp.sub_norms:
            attn_sub, ffn_sub = ckpt.arch.attn_sub_norm, ckpt.arch.ffn_sub_norm
            assert attn_sub is not None and ffn_sub is not None  # hp.sub_norms: the family has both sub-norms
            norms.update(attn_sub_norm=attn_sub, ffn_sub_norm=ffn_sub)
        for stem, hf in norms.items():
            plan.append(
                PlannedTensor(
                    tensor_name(i, stem), ckpt.tensors[prefix + hf + ".weight"].shape, "f32", prefix + hf + ".weight"
                )
            )
        for hf, stem in LINEAR_NAMES.items():
            ref = ckpt.tensors[prefix + hf + ".weight"]
            shape = (ref.shape[0] * 4, ref.shape[1]) if ckpt.packed else ref.shape
            plan.append(PlannedTensor(tensor_name(i, stem), shape, weights, prefix + hf))
            scales.append(PlannedTensor(tensor_name(i, stem, "scale"), (1,), "f32", None))
    return plan + scales


def load_ternary(ckpt: Checkpoint, hf_linear: str) -> TernaryTensor:
    if ckpt.packed:
        return unpack_hf_ternary(ckpt.load(hf_linear + ".weight"), ckpt.load(hf_linear + ".weight_scale"))
    return quantize_absmean(ckpt.load(hf_linear + ".weight"))


def quantize_checkpoint(
    model_dir: str | Path,
    out_path: str | Path,
    weights: str = "tq2_0",
    head: str = "q8_0",
    progress: Callable[[int], None] | None = None,
    source: dict | None = None,
) -> dict:
    """Write the GGUF to `out_path` (atomically) and return its manifest (without artifact_id/sha256,
    which the store adds)."""
    if weights not in TERNARY_TYPES:
        raise ValueError(f"--weights {weights!r} is not a ternary type; choose one of {', '.join(TERNARY_TYPES)}")
    if head not in HEAD_TYPES:
        raise ValueError(f"--head {head!r} is not supported; choose one of {', '.join(HEAD_TYPES)}")
    ckpt = read_checkpoint(model_dir)
    hp = hyperparams(ckpt)
    plan = plan_tensors(ckpt, weights, head)
    out_path = Path(out_path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".tmp", dir=out_path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    stats: list[dict] = []
    try:
        writer = gguf.GGUFWriter(tmp, hp.arch)
        writer.add_name(ckpt.path.name)
        writer.add_file_type(int(_FILE_TYPES[weights]))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_hyperparams(writer, hp)
        add_tokenizer(writer, ckpt.tokenizer_json, ckpt.tokenizer_config, hp.vocab)
        for t in plan:
            np_type = np.float32 if t.qtype == "f32" else np.float16 if t.qtype == "f16" else np.uint8
            byte_shape = (
                t.shape if t.qtype in ("f32", "f16") else (*t.shape[:-1], quants.bytes_per_row(t.qtype, t.shape[-1]))
            )
            writer.add_tensor_info(
                t.name,
                byte_shape,
                np.dtype(np_type),
                t.nbytes,
                raw_dtype=None if np_type is not np.uint8 else quants.ggml_type(t.qtype),
            )
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        scales: list[np.float32] = []
        for t in plan:
            data = _tensor_bytes(ckpt, t, scales, stats)
            assert data.nbytes == t.nbytes, (t.name, data.nbytes, t.nbytes)
            writer.write_tensor_data(data)
            if progress:
                progress(t.nbytes)
        writer.close()
        os.replace(tmp, out_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return build_manifest(ckpt, hp, plan, stats, weights, head, source)


def _tensor_bytes(ckpt: Checkpoint, t: PlannedTensor, scales: list, stats: list[dict]) -> np.ndarray:
    if t.source is None:  # scales come after all linears, in the same order
        return np.array([scales.pop(0)], dtype=np.float32)
    if t.qtype in TERNARY_TYPES:
        tern = load_ternary(ckpt, t.source)
        scales.append(tern.scale)
        stats.append(
            {
                "name": t.name,
                "type": t.qtype,
                "shape": list(t.shape),
                "scale": float(tern.scale),
                "zero_fraction": round(tern.zero_fraction, 6),
                "rel_error": None if tern.rel_error is None else round(tern.rel_error, 6),
            }
        )
        return quants.pack_ternary(tern.codes, t.qtype)
    values = ckpt.load(t.source)
    if t.qtype == "f32":
        return np.ascontiguousarray(values, dtype=np.float32)
    out = np.empty((t.shape[0], quants.bytes_per_row(t.qtype, t.shape[1])), dtype=np.uint8)  # f16 too, as raw bytes
    sq_err = sq_norm = 0.0
    for start in range(0, t.shape[0], HEAD_CHUNK_ROWS):
        chunk = np.asarray(values[start : start + HEAD_CHUNK_ROWS], dtype=np.float32)
        out[start : start + len(chunk)] = quants.quantize(chunk, t.qtype).view(np.uint8).reshape(len(chunk), -1)
        back = quants.dequantize(out[start : start + len(chunk)], t.qtype, chunk.shape)
        sq_err += float(np.square(back - chunk, dtype=np.float64).sum())
        sq_norm += float(np.square(chunk, dtype=np.float64).sum())
    stats.append(
        {
            "name": t.name,
            "type": t.qtype,
            "shape": list(t.shape),
            "rel_error": round((sq_err / max(sq_norm, 1e-30)) ** 0.5, 6),
        }
    )
    return out


def build_manifest(
    ckpt: Checkpoint,
    hp: Hyperparams,
    plan: list[PlannedTensor],
    stats: list[dict],
    weights: str,
    head: str,
    source: dict | None,
) -> dict:
    ternary = [t for t in plan if t.qtype in TERNARY_TYPES]
    n_ternary = sum(int(np.prod(t.shape)) for t in ternary)
    n_embed = hp.vocab * hp.hidden
    n_params = (
        n_ternary
        + n_embed * (1 if hp.tied else 2)
        + sum(int(np.prod(t.shape)) for t in plan if t.qtype == "f32" and t.source)
    )
    head_tensor = next(t for t in plan if t.name == ("token_embd.weight" if hp.tied else "output.weight"))
    # Decode reads every ternary linear, every norm and scale, the whole head, and one embedding row.
    embd_row = quants.bytes_per_row(head, hp.hidden)
    embeddings = {"token_embd.weight", "output.weight"}
    decode_bytes = (
        sum(t.nbytes for t in plan if t.name not in embeddings) + head_tensor.nbytes + (0 if hp.tied else embd_row)
    )
    kv_bytes_f16 = 2 * hp.layers * hp.kv_heads * hp.head_dim * 2
    return {
        "schema": MANIFEST_SCHEMA,
        "kind": "model",
        "format": "gguf",
        "source": source or {"type": "local", "path": str(ckpt.path), "revision": directory_revision(ckpt.path)},
        "architecture": {
            "gguf": hp.arch,
            "hf_class": ckpt.arch.hf_class,
            "ffn_activation": hp.ffn_act,
            "sub_norms": hp.sub_norms,
            "tied_embeddings": hp.tied,
            "packed_source": ckpt.packed,
        },
        "hyperparameters": {
            "hidden": hp.hidden,
            "layers": hp.layers,
            "heads": hp.heads,
            "kv_heads": hp.kv_heads,
            "head_dim": hp.head_dim,
            "ffn": hp.ffn,
            "vocab": hp.vocab,
            "context": hp.context,
            "rope_theta": hp.rope_theta,
            "rms_eps": hp.rms_eps,
        },
        "quantization": {"weights": weights, "head": head, "norms": "f32", "scale": "per-tensor f32, block scale 1"},
        "parameters": {"total": n_params, "ternary": n_ternary, "embedding": n_embed},
        "bytes_per_token": decode_bytes,
        "kv_bytes_per_position_f16": kv_bytes_f16,
        "tensors": stats,
    }


def directory_revision(path: str | Path) -> str:
    """sha256 over the directory's files' sorted relative names and content hashes (DESIGN.md)."""
    root = Path(path)
    outer = hashlib.sha256()
    for file in sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    ):
        inner = hashlib.sha256()
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                inner.update(block)
        outer.update(f"{file.relative_to(root).as_posix()}\0{inner.hexdigest()}\n".encode())
    return outer.hexdigest()


def quantize_to_store(
    model_dir: str | Path,
    store,
    work_dir: str | Path,
    weights: str = "tq2_0",
    head: str = "q8_0",
    progress: Callable[[int], None] | None = None,
    source: dict | None = None,
) -> dict:
    """Quantize into a temporary GGUF under `work_dir`, store it, and return the stored manifest."""
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix="quantize-", suffix=".gguf", dir=work_dir)
    os.close(fd)
    out = Path(name)
    try:
        manifest = quantize_checkpoint(model_dir, out, weights, head, progress, source)
        artifact_id = store.put_file(out, kind="model", manifest=manifest)
        return store.get_manifest(artifact_id)
    finally:
        out.unlink(missing_ok=True)


def find_quantized(store, revision: str, weights: str, head: str) -> str | None:
    """The stored model artifact already made from this source revision with these types, if any."""
    for manifest in store.list_artifacts(kind="model"):
        q = manifest.get("quantization", {})
        if (manifest.get("source") or {}).get("revision") == revision and (q.get("weights"), q.get("head")) == (
            weights,
            head,
        ):
            return manifest["artifact_id"]
    return None


def planned_bytes(model_dir: str | Path, weights: str, head: str) -> int:
    """Total tensor bytes `quantize_checkpoint` will write (for progress bars)."""
    return sum(t.nbytes for t in plan_tensors(read_checkpoint(model_dir), weights, head))
