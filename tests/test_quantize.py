"""Checkpoint -> GGUF: tensor layout, architecture naming, exact ternary codes and scales, manifest."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from engine.model import quants
from engine.model.checkpoint import read_checkpoint
from engine.model.ggufio import ModelFile
from engine.model.quantize import quantize_checkpoint
from engine.model.reference import ReferenceModel
from engine.model.ternary import quantize_absmean
from tests import checkpoints


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return checkpoints.synth(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="module")
def tiny_gguf(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    manifest = quantize_checkpoint(tiny, out)
    return out, manifest


def test_layout_follows_llama_cpp_bitnet(tiny_gguf):
    path, _ = tiny_gguf
    model = ModelFile(path)
    assert model.arch == "ryz-bitnet"  # relu² is not what llama.cpp's bitnet graph computes
    names = set(model.tensors)
    for i in range(2):
        for stem in (
            "attn_norm",
            "attn_q",
            "attn_k",
            "attn_v",
            "attn_sub_norm",
            "attn_output",
            "ffn_norm",
            "ffn_gate",
            "ffn_up",
            "ffn_sub_norm",
            "ffn_down",
        ):
            assert f"blk.{i}.{stem}.weight" in names
    assert {"token_embd.weight", "output_norm.weight"} <= names and "output.weight" not in names
    assert model.tensor_type("blk.0.attn_q.weight") == "tq2_0"
    assert model.tensor_type("token_embd.weight") == "q8_0"
    assert model.tensor_type("blk.0.ffn_sub_norm.weight") == "f32"
    assert model.get("ryz-bitnet.ffn_activation") == "relu2"
    assert model.get("tokenizer.ggml.model") == "gpt2"
    assert "bos_token" in model.chat_template
    assert model.get("general.file_type") == int(gguf.LlamaFileType.MOSTLY_TQ2_0)


@pytest.mark.parametrize("weights", ["tq2_0", "tq1_0"])
def test_codes_and_scales_are_exact(tiny, tmp_path, weights):
    out = tmp_path / "m.gguf"
    quantize_checkpoint(tiny, out, weights=weights)
    model, ckpt = ModelFile(out), read_checkpoint(tiny)
    for hf, stem in (("self_attn.k_proj", "attn_k"), ("mlp.down_proj", "ffn_down")):
        expected = quantize_absmean(ckpt.load(f"model.layers.1.{hf}.weight"))
        codes = quants.unpack_ternary(
            np.asarray(model.raw(f"blk.1.{stem}.weight")), weights, model.shape(f"blk.1.{stem}.weight")
        )
        np.testing.assert_array_equal(codes, expected.codes)
        assert np.asarray(model.raw(f"blk.1.{stem}.scale"))[0] == expected.scale  # bit-exact float32


@pytest.mark.parametrize("head", ["q8_0", "q6_k", "f16"])
def test_head_types(tiny, tmp_path, head):
    out = tmp_path / "m.gguf"
    manifest = quantize_checkpoint(tiny, out, head=head)
    model = ModelFile(out)
    assert model.tensor_type("token_embd.weight") == head
    embd = read_checkpoint(tiny).load("model.embed_tokens.weight")
    back = quants.dequantize(np.asarray(model.raw("token_embd.weight")), head, embd.shape)
    rel = np.linalg.norm(back - embd) / np.linalg.norm(embd)
    assert rel < {"q8_0": 0.01, "q6_k": 0.03, "f16": 1e-3}[head]
    stat = next(t for t in manifest["tensors"] if t["name"] == "token_embd.weight")
    assert stat["rel_error"] == pytest.approx(rel, abs=1e-5)


def test_architecture_names(tiny, tmp_path):
    """`bitnet` only for what llama.cpp computes (SiLU, sub-norms, tied); the rest get our own name."""
    cases = {
        "silu": (checkpoints.silu_variant(tiny, tmp_path / "silu"), "bitnet"),
        "onebit": (checkpoints.onebit_variant(tiny, tmp_path / "onebit"), "ryz-bitnet"),
        "falcon3": (checkpoints.falcon3_variant(tiny, tmp_path / "falcon"), "ryz-bitnet"),
    }
    for name, (path, arch) in cases.items():
        manifest = quantize_checkpoint(path, tmp_path / f"{name}.gguf")
        model = ModelFile(tmp_path / f"{name}.gguf")
        assert (model.arch, manifest["architecture"]["gguf"]) == (arch, arch), name
        assert model.get(f"{arch}.ffn_activation") == "silu"
    assert "output.weight" in ModelFile(tmp_path / "onebit.gguf").tensors
    assert "blk.0.attn_sub_norm.weight" not in ModelFile(tmp_path / "falcon3.gguf").tensors


def test_packed_checkpoint_equals_master_weights(tiny, tmp_path):
    """transformers' offline packed format and the master weights it came from give the same model."""
    master, packed = tmp_path / "master.gguf", tmp_path / "packed.gguf"
    quantize_checkpoint(tiny, master)
    manifest = quantize_checkpoint(checkpoints.packed_variant(tiny, tmp_path / "packed"), packed)
    assert manifest["architecture"]["packed_source"]
    a, b = ModelFile(master), ModelFile(packed)
    np.testing.assert_array_equal(np.asarray(a.raw("blk.0.ffn_up.weight")), np.asarray(b.raw("blk.0.ffn_up.weight")))
    tokens = [256, 72, 105, 33]
    la, lb = ReferenceModel(master).forward(tokens), ReferenceModel(packed).forward(tokens)
    # Scales differ only by 1/(1/s) rounding (1 ulp), far inside one int8 activation step.
    assert np.linalg.norm(la - lb) / np.linalg.norm(la) < 1e-4


def test_manifest(tiny_gguf):
    path, manifest = tiny_gguf
    assert manifest["schema"] == 1 and manifest["kind"] == "model"
    assert manifest["source"]["revision"] and len(manifest["source"]["revision"]) == 64
    assert manifest["parameters"]["ternary"] == 2 * (256 * 256 * 2 + 128 * 256 * 2 + 768 * 256 * 3)
    ternary = [t for t in manifest["tensors"] if t["type"] == "tq2_0"]
    assert len(ternary) == 14
    assert all(0.0 < t["zero_fraction"] < 1.0 and 0.0 < t["rel_error"] < 1.0 and t["scale"] > 0 for t in ternary)
    # bytes per token: every ternary linear, norm and scale, plus the whole tied head; not the file header.
    model = ModelFile(path)
    tensor_bytes = sum(t.n_bytes for t in model.tensors.values())
    assert manifest["bytes_per_token"] == tensor_bytes


def test_failed_quantize_leaves_nothing(tiny, tmp_path, monkeypatch):
    from engine.model import quantize

    calls = {"n": 0}
    real = quants.pack_ternary

    def fail_midway(codes, qtype):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("injected failure")
        return real(codes, qtype)

    monkeypatch.setattr(quantize.quants, "pack_ternary", fail_midway)
    out = tmp_path / "out" / "m.gguf"
    out.parent.mkdir()
    with pytest.raises(RuntimeError, match="injected"):
        quantize_checkpoint(tiny, out)
    assert list(out.parent.iterdir()) == []


def test_bad_type_names(tiny, tmp_path):
    with pytest.raises(ValueError, match="not a ternary type"):
        quantize_checkpoint(tiny, tmp_path / "x.gguf", weights="q4_0")
    with pytest.raises(ValueError, match="choose one of q8_0, q6_k, f16"):
        quantize_checkpoint(tiny, tmp_path / "x.gguf", head="q4_k")
