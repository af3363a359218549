"""Checkpoint reader: every supported family opens; every broken directory gets a clear error."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from engine.errors import CheckpointError, UnsupportedArchitectureError
from engine.model.checkpoint import read_checkpoint
from engine.model.ternary import pack_hf_ternary, quantize_absmean, unpack_hf_ternary
from tests import checkpoints


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return checkpoints.synth(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture
def broken(tiny, tmp_path):
    """A fresh copy of the tiny checkpoint to damage."""
    return shutil.copytree(tiny, tmp_path / "broken")


def test_reads_synthetic_bitnet(tiny):
    ckpt = read_checkpoint(tiny)
    assert ckpt.arch.hf_class == "BitNetForCausalLM" and ckpt.ffn_act == "relu2"
    assert (ckpt.hidden, ckpt.layers, ckpt.heads, ckpt.kv_heads, ckpt.ffn, ckpt.vocab) == (256, 2, 4, 2, 768, 512)
    assert ckpt.tied and not ckpt.packed
    w = ckpt.load("model.layers.0.self_attn.q_proj.weight")
    assert w.dtype == np.float32 and w.shape == (256, 256)


def test_reads_other_families(tiny, tmp_path):
    onebit = read_checkpoint(checkpoints.onebit_variant(tiny, tmp_path / "onebit"))
    assert onebit.arch.hf_class == "BitnetForCausalLM" and onebit.ffn_act == "silu" and not onebit.tied
    falcon = read_checkpoint(checkpoints.falcon3_variant(tiny, tmp_path / "falcon"))
    assert falcon.arch.attn_sub_norm is None and falcon.packed and not falcon.tied


def test_sharded_checkpoint(tiny, tmp_path, monkeypatch):
    from engine.model import synth

    monkeypatch.setattr(synth, "SHARD_BYTES", 300_000)
    sharded = checkpoints.synth(tmp_path / "sharded")
    assert (sharded / "model.safetensors.index.json").is_file()
    ckpt = read_checkpoint(sharded)
    same = read_checkpoint(tiny)
    for name in ("model.embed_tokens.weight", "model.layers.1.mlp.down_proj.weight"):
        np.testing.assert_array_equal(ckpt.load(name), same.load(name))


def test_packed_round_trip():
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.02, (64, 256)).astype(np.float32)
    tern = quantize_absmean(w)
    back = unpack_hf_ternary(pack_hf_ternary(tern.codes), np.array([1 / tern.scale], np.float32))
    np.testing.assert_array_equal(back.codes, tern.codes)
    assert back.scale == pytest.approx(tern.scale, rel=1e-6)


def test_absmean_matches_definition():
    w = np.array([[0.3, -0.05, 0.0, -0.2] * 64], dtype=np.float32)
    tern = quantize_absmean(w)
    assert tern.scale == pytest.approx(np.abs(w).mean(), rel=1e-6)
    np.testing.assert_array_equal(tern.codes[0, :4], [1, 0, 0, -1])  # 0.3/0.1375 -> 2 -> clip 1; 0.05/0.1375 -> 0


# --- errors ---------------------------------------------------------------------------------------


def _edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def _damage_missing_config(p):
    (p / "config.json").unlink()


def _damage_bad_json(p):
    (p / "config.json").write_text("{not json")


def _damage_unsupported(p):
    _edit_config(p, architectures=["GPT2LMHeadModel"])


def _damage_plain_llama(p):
    config = json.loads((p / "config.json").read_text())
    config.pop("quantization_config")
    config["architectures"] = ["LlamaForCausalLM"]
    (p / "config.json").write_text(json.dumps(config))


def _damage_no_weights(p):
    (p / "model.safetensors").unlink()


def _damage_truncated(p):
    data = (p / "model.safetensors").read_bytes()
    (p / "model.safetensors").write_bytes(data[: len(data) // 2])


def _damage_header(p):
    data = bytearray((p / "model.safetensors").read_bytes())
    data[8:20] = b"\x00garbage!!!\xff"
    (p / "model.safetensors").write_bytes(bytes(data))


def _damage_no_tokenizer(p):
    (p / "tokenizer.json").unlink()


def _damage_shape(p):
    _edit_config(p, intermediate_size=1024)


def _damage_missing_tensor(p):
    tensors = checkpoints.tensors_of(p)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    from engine.model.checkpoint import write_safetensors

    write_safetensors(p / "model.safetensors", tensors)


def _damage_missing_shard(p):
    (p / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.embed_tokens.weight": "model-00002-of-00002.safetensors"}})
    )


@pytest.mark.parametrize(
    "damage, error, words",
    [
        (_damage_missing_config, CheckpointError, "config.json is missing"),
        (_damage_bad_json, CheckpointError, "invalid JSON"),
        (_damage_unsupported, UnsupportedArchitectureError, "'GPT2LMHeadModel' is not supported"),
        (_damage_plain_llama, UnsupportedArchitectureError, "without a bitnet quantization_config"),
        (_damage_no_weights, CheckpointError, "no *.safetensors"),
        (_damage_truncated, CheckpointError, "truncated"),
        (_damage_header, CheckpointError, "corrupt"),
        (_damage_no_tokenizer, CheckpointError, "tokenizer.json is missing"),
        (_damage_shape, CheckpointError, "has shape [768], expected [1024] from config.json"),
        (_damage_missing_tensor, CheckpointError, "'model.layers.1.mlp.up_proj.weight' is missing"),
        (_damage_missing_shard, CheckpointError, "shards listed in model.safetensors.index.json are missing"),
    ],
)
def test_reader_errors(broken, damage, error, words):
    damage(broken)
    with pytest.raises(error) as info:
        read_checkpoint(broken)
    assert words in str(info.value)


def test_row_length_not_multiple_of_256(tmp_path):
    odd = checkpoints.synth(tmp_path / "odd", checkpoints.odd_width_shape())
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(odd)
    message = str(info.value)
    assert "mlp.down_proj.weight" in message and "320" in message and "multiple of 256" in message


def test_not_a_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        read_checkpoint(tmp_path / "nowhere")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_weight_is_named_with_its_index(broken, tmp_path, value):
    from engine.model.checkpoint import write_safetensors
    from engine.model.quantize import quantize_checkpoint

    tensors = checkpoints.tensors_of(broken)
    tensors["model.layers.1.mlp.down_proj.weight"][3, 17] = value
    tensors["model.layers.1.mlp.down_proj.weight"][5, 2] = value  # only the first is named
    write_safetensors(broken / "model.safetensors", tensors)
    with pytest.raises(CheckpointError) as info:
        quantize_checkpoint(broken, tmp_path / "out.gguf")
    assert f"'model.layers.1.mlp.down_proj.weight' holds {value} at index (3, 17)" in str(info.value)
    assert not (tmp_path / "out.gguf").exists()
