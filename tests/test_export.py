"""`ryz export`: files other engines compute correctly, or a refusal with the reason.

ik_llama.cpp: the written IQ2_BN weights decode back to our ternary codes and scales exactly, through a decoder of
the documented layout written here (not the encoder's), and the file carries the architecture, keys, tensor names,
shapes and types its loader requires (listed below from ik_llama.cpp's source, ik-llama-cpp-python 0.1.5). Where
`make check-ik-llama` has built ik_llama.cpp, the file also runs through it and agrees with our reference.
llama.cpp: a SiLU model's export loads in llama-cpp-python and agrees with the reference; relu² is refused.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine.errors import ExportError
from engine.model import quants
from engine.model.export import export_model, plan_export
from engine.model.ggufio import Hyperparams, ModelFile
from engine.model.quantize import quantize_checkpoint
from engine.model.shapes import Shape
from tests import checkpoints
from tests.interop import TOKENS, agreement, llama_cpp_logits, reference_logits

# The smallest shape ik_llama.cpp runs: its IQ2_BN kernels need activation rows of 512 values or more.
SHAPE = Shape(hidden=512, layers=2, heads=8, kv_heads=2, ffn=1024, vocab=512)
ROOT = Path(__file__).resolve().parents[1]
IK_BUILD = ROOT / "build" / "ik-llama"
IK_LIBRARY = IK_BUILD / "cmake" / "src" / "libllama.so"

# From ik_llama.cpp: GGML_TYPE_IQ2_BN (ggml.h), F32 / F16 (ggml.h), and what create_bitnet2_tensors
# (llama-load-tensors.cpp) creates for LLM_ARCH_BITNET_25 "bitnet-25" (llama-arch.cpp), in ggml order (ne0, ne1).
# Its loader fails on a missing tensor and on any extra one ("wrong number of tensors").
IQ2_BN, F32, F16 = 135, 0, 1
IK_GLOBAL = {"token_embd.weight": ("hidden", "vocab"), "output_norm.weight": ("hidden",)}
IK_LAYER = {
    "attn_norm": ("hidden",),
    "attn_sub_norm": ("hidden",),
    "ffn_sub_norm": ("ffn",),
    "attn_q": ("hidden", "q_dim"),
    "attn_k": ("hidden", "kv_dim"),
    "attn_v": ("hidden", "kv_dim"),
    "attn_output": ("q_dim", "hidden"),
    "ffn_norm": ("hidden",),
    "ffn_gate": ("hidden", "ffn"),
    "ffn_down": ("ffn", "hidden"),
    "ffn_up": ("hidden", "ffn"),
}
IK_LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_down", "ffn_up")
# Keys llama-hparams.cpp reads for it (required ones, and n_rot = rope.dimension_count which must equal the head size).
IK_KEYS = (
    "context_length",
    "embedding_length",
    "block_count",
    "feed_forward_length",
    "attention.head_count",
    "attention.head_count_kv",
    "attention.layer_norm_rms_epsilon",
    "rope.dimension_count",
    "rope.freq_base",
)


# --- a GGUF reader and IQ2_BN decoder written from the formats' documentation, independent of the exporter --------

_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def read_gguf(path: Path) -> tuple[dict, dict[str, tuple[tuple[int, ...], int, int]], bytes]:
    """(metadata, {name: (ggml dims, type id, absolute offset)}, file bytes); any type id, known to gguf-py or not."""
    buf = path.read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        (value,) = struct.unpack_from(fmt, buf, pos)
        pos += struct.calcsize(fmt)
        return value

    def value(vtype: int):
        nonlocal pos
        if vtype in _SCALAR:
            return take(_SCALAR[vtype])
        if vtype == 8:
            n = take("<Q")
            pos += n
            return buf[pos - n : pos].decode()
        elem, count = take("<I"), take("<Q")
        return [value(elem) for _ in range(count)]

    assert buf[:4] == b"GGUF"
    pos = 4
    version, n_tensors, n_kv = take("<I"), take("<Q"), take("<Q")
    assert version == 3
    metadata = {}
    for _ in range(n_kv):
        key = value(8)
        metadata[key] = value(take("<I"))
    infos = []
    for _ in range(n_tensors):
        name = value(8)
        dims = tuple(take("<Q") for _ in range(take("<I")))
        infos.append((name, dims, take("<I"), take("<Q")))
    align = metadata.get("general.alignment", 32)
    start = (pos + align - 1) // align * align
    return metadata, {name: (dims, kind, start + off) for name, dims, kind, off in infos}, buf


def decode_iq2_bn(buf: bytes, offset: int, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """IQ2_BN as docs/export.md lays it out: per row a float32 scale, then 64-value blocks of 16 bytes where byte j
    holds value j in bits 0-1, j+16 in bits 2-3, j+32 in bits 4-5, j+48 in bits 6-7, each stored as value + 1."""
    row_bytes = 4 + cols // 4
    data = np.frombuffer(buf, dtype=np.uint8, count=rows * row_bytes, offset=offset).reshape(rows, row_bytes)
    scales = data[:, :4].copy().view("<f4").ravel()
    codes = np.empty((rows, cols), dtype=np.int8)
    for b in range(cols // 64):
        block = data[:, 4 + 16 * b : 4 + 16 * (b + 1)]
        for k in range(4):
            codes[:, 64 * b + 16 * k : 64 * b + 16 * (k + 1)] = ((block >> (2 * k)) & 3).astype(np.int8) - 1
    return codes, scales


# --- fixtures -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A small random model as relu² GGUFs (TQ2_0 and TQ1_0 weights) and its SiLU variant, F16 head."""
    root = tmp_path_factory.mktemp("export")
    relu2 = checkpoints.synth(root / "relu2-ckpt", SHAPE)
    silu = checkpoints.silu_variant(relu2, root / "silu-ckpt")
    out = {}
    for name, ckpt, weights in (("relu2", relu2, "tq2_0"), ("relu2-tq1", relu2, "tq1_0"), ("silu", silu, "tq2_0")):
        out[name] = root / f"{name}.gguf"
        quantize_checkpoint(ckpt, out[name], weights=weights, head="f16")
    return out


# --- ik_llama.cpp ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["relu2", "relu2-tq1"])
def test_ik_llama_export_decodes_to_our_codes(models, tmp_path, source):
    out = tmp_path / "ik.gguf"
    result = export_model(models[source], "ik_llama", out)
    assert result["architecture"] == "bitnet-25" and result["ternary_type"] == "iq2_bn"
    metadata, tensors, buf = read_gguf(out)
    src = ModelFile(models[source])
    hp = src.hparams

    assert metadata["general.architecture"] == "bitnet-25"
    for key in IK_KEYS:
        assert f"bitnet-25.{key}" in metadata, key
        assert metadata[f"bitnet-25.{key}"] == src.metadata[f"ryz-bitnet.{key}"], key
    assert metadata["bitnet-25.rope.dimension_count"] == hp.head_dim  # ik checks n_rot == head size
    assert not [k for k in metadata if k.startswith("ryz-bitnet.")]
    assert metadata["tokenizer.ggml.tokens"] == src.get("tokenizer.ggml.tokens")

    dims = {"hidden": hp.hidden, "vocab": hp.vocab, "ffn": hp.ffn}
    dims.update(q_dim=hp.heads * hp.head_dim, kv_dim=hp.kv_heads * hp.head_dim)
    expected = {name: tuple(dims[d] for d in shape) for name, shape in IK_GLOBAL.items()}
    for i in range(hp.layers):
        expected.update({f"blk.{i}.{stem}.weight": tuple(dims[d] for d in s) for stem, s in IK_LAYER.items()})
    assert {name: info[0] for name, info in tensors.items()} == expected

    for name, (shape, kind, offset) in tensors.items():
        stem = name.split(".")[-2]
        if stem in IK_LINEARS:
            assert kind == IQ2_BN, name
            cols, rows = shape
            codes, scales = decode_iq2_bn(buf, offset, rows, cols)
            ours = quants.unpack_ternary(np.asarray(src.raw(name)), src.tensor_type(name), src.shape(name))
            np.testing.assert_array_equal(codes, ours, err_msg=name)
            scale = np.asarray(src.raw(name.replace(".weight", ".scale")), dtype="<f4").ravel()
            assert scales.tobytes() == np.repeat(scale, rows).tobytes(), name  # the exact f32 scale, every row
        else:
            assert kind == (F16 if name == "token_embd.weight" else F32), name
            raw = np.ascontiguousarray(src.raw(name)).view(np.uint8).tobytes()
            assert buf[offset : offset + len(raw)] == raw, name


@pytest.mark.skipif(not IK_LIBRARY.is_file(), reason=f"{IK_LIBRARY} is not built: run `make check-ik-llama`")
@pytest.mark.parametrize("source, arch", [("relu2", "bitnet-25"), ("silu", "bitnet")])
def test_ik_llama_runs_the_export(models, tmp_path, source, arch):
    """The exported file through ik_llama.cpp itself (in a subprocess: its libraries' sonames clash with
    llama-cpp-python's), against our reference on the source artifact."""
    out = tmp_path / "ik.gguf"
    assert export_model(models[source], "ik_llama", out)["architecture"] == arch
    logits = tmp_path / "logits.npy"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "ik_llama_logits.py"),
            str(out),
            str(logits),
            ",".join(map(str, TOKENS)),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = agreement(reference_logits(models[source]), np.load(logits))
    print(f"ik_llama.cpp {arch}: {found}")  # `make check-ik-llama` shows it (pytest -s)
    found.check()


# --- llama.cpp ------------------------------------------------------------------------------------------------------


def test_llama_cpp_export_round_trip(models, tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install '.[interop]')")
    out = tmp_path / "llama.gguf"
    result = export_model(models["silu"], "llama.cpp", out)
    assert result["architecture"] == "bitnet" and result["transcoded_tensors"] == 0
    assert out.read_bytes() == models["silu"].read_bytes()  # our bitnet artifact already is llama.cpp's file
    agreement(reference_logits(models["silu"]), llama_cpp_logits(out)).check()


def test_llama_cpp_refuses_relu2_with_the_reason(models, tmp_path):
    out = tmp_path / "relu2.gguf"
    with pytest.raises(ExportError, match=r"SiLU.*relu².*--to ik_llama"):
        export_model(models["relu2"], "llama.cpp", out)
    assert list(tmp_path.iterdir()) == []  # nothing written, no temporary left


def _hp(ffn_act: str, sub_norms: bool, tied: bool, hidden: int = 512) -> Hyperparams:
    return Hyperparams(hidden, 2, hidden // 64, 2, 64, 1024, 300, 4096, 5e5, 1e-5, ffn_act, sub_norms, tied)


@pytest.mark.parametrize(
    "ffn_act, sub_norms, tied, llama_cpp, ik_llama",
    [
        ("silu", True, True, "bitnet", "bitnet"),  # what both bitnet graphs compute
        ("relu2", True, True, "--to ik_llama", "bitnet-25"),  # bitnet-b1.58-2B-4T
        ("relu2", True, False, "no separate output head", "bitnet-25"),
        ("silu", True, False, "no separate output head", "no separate output head"),  # 1bitLLM
        ("silu", False, False, "sub_norm", "sub_norm"),  # Falcon3
    ],
)
def test_which_engine_computes_which_model(ffn_act, sub_norms, tied, llama_cpp, ik_llama):
    hp = _hp(ffn_act, sub_norms, tied)
    for target, want in (("llama.cpp", llama_cpp), ("ik_llama", ik_llama)):
        if want in ("bitnet", "bitnet-25"):
            assert plan_export(hp, target).arch == want
        else:
            with pytest.raises(ExportError, match=want):
                plan_export(hp, target)


def test_ik_llama_refuses_rows_its_kernels_abort_on():
    with pytest.raises(ExportError, match="at least 512 values"):
        plan_export(_hp("relu2", True, True, hidden=256), "ik_llama")
    assert plan_export(_hp("silu", True, True, hidden=256), "llama.cpp").arch == "bitnet"


# --- the command ----------------------------------------------------------------------------------------------------


def test_export_command(models, tmp_path, monkeypatch, capsys):
    from engine.artifacts.store import open_store
    from engine.settings import Settings, reload_settings
    from flows.cli import main

    home = tmp_path / "home"
    artifact_id = open_store(settings=Settings(home=home)).put_file(models["relu2"], kind="model")
    monkeypatch.setenv("RYZ_HOME", str(home))
    reload_settings()
    try:
        out = tmp_path / "out.gguf"
        assert main(["export", artifact_id.split(":")[1][:12], "--to", "ik_llama", "-o", str(out), "--json"]) == 0
        stdout = capsys.readouterr().out
        assert json.loads(stdout)["architecture"] == "bitnet-25" and out.is_file()
        for argv, message in (
            (["nosuch:1", "--to", "ik_llama", "-o", str(tmp_path / "a.gguf")], "no model named 'nosuch'"),
            ([str(tmp_path / "missing.gguf"), "--to", "ik_llama", "-o", str(tmp_path / "a.gguf")], "does not exist"),
            ([str(models["relu2"]), "--to", "ik_llama", "-o", str(tmp_path / "none" / "a.gguf")], "does not exist"),
            ([str(models["relu2"]), "--to", "ik_llama", "-o", str(tmp_path / "a.bin")], "must be a .gguf"),
            ([str(models["relu2"]), "--to", "llama.cpp", "-o", str(tmp_path / "a.gguf")], "--to ik_llama"),
        ):
            assert main(["export", *argv]) != 0
            captured = capsys.readouterr()
            assert message in captured.err and captured.out == "", (argv, captured.err)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["home", "out.gguf"]
    finally:
        monkeypatch.undo()
        reload_settings()
