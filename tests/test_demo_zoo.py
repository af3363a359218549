"""The demo model zoo (examples/zoo) and its task data (evaluations/tasks/demo): the generator is
deterministic and wrote the committed jsonl, every checkpoint loads and quantizes with our reader, and
the quantized models score where examples/zoo/README.md says, through the numpy reference."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.model.checkpoint import read_checkpoint
from engine.model.quantize import quantize_checkpoint
from evaluations.demo import corpus, score

REPO = Path(__file__).resolve().parents[1]
ZOO = REPO / "examples" / "zoo"
NAMES = ["ryz-demo-s", "ryz-demo-m", "ryz-demo-ptq"]

# Thresholds (examples/zoo/README.md): demo_mc acc on the first MC_LIMIT items through the numpy
# reference (measured: s 0.625, m 1.000, ptq 0.604; chance 0.25), exact match of m on GEN_LIMIT prompts.
MC_LIMIT = 48
MIN_ACC = {"ryz-demo-s": 0.45, "ryz-demo-m": 0.85}
MIN_GAP_M_OVER_S = 0.2  # m beats s
MIN_GAP_M_OVER_PTQ = 0.2  # the post-training-quantized model is clearly worse than m
GEN_LIMIT = 8  # demo_gen prompts greedily decoded by ryz-demo-m (measured 7 of 8)
MIN_GEN_M = 0.75


def test_generator_is_deterministic_and_wrote_the_task_data(tmp_path):
    assert corpus.documents(corpus.TRAIN_SEED, 20) == corpus.documents(corpus.TRAIN_SEED, 20)
    assert corpus.documents(corpus.TRAIN_SEED, 20) != corpus.documents(corpus.HELDOUT_SEED, 20)
    assert corpus.world() == corpus.WORLD
    for path in corpus.write_task_data(tmp_path):
        committed = REPO / "evaluations" / "tasks" / "demo" / path.name
        assert path.read_bytes() == committed.read_bytes(), (
            f"{committed} is stale: rerun python -m evaluations.demo.corpus"
        )
    mc = corpus.read_jsonl(tmp_path / "demo_mc.jsonl")
    assert all(len(set(item["choices"])) == 4 and 0 <= item["gold"] < 4 for item in mc)
    golds = [item["gold"] for item in mc]
    assert max(golds.count(g) for g in range(4)) < 0.35 * len(golds)  # answers are not always in one slot


def test_task_yamls_point_at_their_jsonl():
    for name in ("demo_mc", "demo_gen", "demo_ppl"):
        text = (REPO / "evaluations" / "tasks" / "demo" / f"{name}.yaml").read_text()
        assert f"task: {name}\n" in text and "dataset_path: json\n" in text
        assert f"test: {name}.jsonl\n" in text  # relative to the YAML's directory


def test_zoo_lists_s_m_ptq():
    doc = json.loads((ZOO / "zoo.json").read_text())
    assert doc["schema"] == 1
    assert [m["name"] for m in doc["models"]] == NAMES
    assert [p.name for p in score.zoo_models(ZOO)] == NAMES


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory):
    out = {}
    for name in NAMES:
        ckpt = read_checkpoint(ZOO / name)
        assert ckpt.arch.hf_class == "BitNetForCausalLM" and ckpt.ffn_act == "relu2" and ckpt.tied and not ckpt.packed
        assert {ref.dtype for ref in ckpt.tensors.values()} == {"BF16"}
        assert (ckpt.hidden, ckpt.layers, ckpt.heads, ckpt.kv_heads, ckpt.ffn, ckpt.vocab) == (256, 2, 4, 2, 768, 512)
        assert (ZOO / name / "model.safetensors").stat().st_size < 8 * 1024 * 1024
        path = tmp_path_factory.mktemp("zoo") / f"{name}.gguf"
        manifest = quantize_checkpoint(ZOO / name, path)
        assert manifest["quantization"]["weights"] == "tq2_0"
        out[name] = path
    return out


def test_mc_accuracy_through_the_reference(ggufs):
    items = score.load_suites(limit=MC_LIMIT)["demo_mc"]
    acc = {}
    for name, path in ggufs.items():
        encode, _, loglikelihood, _, _ = score.engine_backend(path, "reference")
        acc[name] = score.score_mc(items, encode, loglikelihood)["acc"]
    for name, floor in MIN_ACC.items():
        assert acc[name] >= floor, acc
    assert acc["ryz-demo-m"] >= acc["ryz-demo-s"] + MIN_GAP_M_OVER_S, acc
    assert acc["ryz-demo-ptq"] <= acc["ryz-demo-m"] - MIN_GAP_M_OVER_PTQ, acc


def test_m_generates_exact_answers(ggufs):
    items = score.load_suites(limit=GEN_LIMIT)["demo_gen"]
    encode, decode, _, generate, stop = score.engine_backend(ggufs["ryz-demo-m"], "reference")
    result = score.score_gen(items, encode, decode, generate, stop)
    assert result["exact_match"] >= MIN_GEN_M, result
