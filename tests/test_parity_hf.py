"""Parity with Hugging Face transformers: our quantizer -> GGUF -> numpy reference reproduces the
logits and greedy continuations transformers' own BitNet / Llama-bitnet models computed
(tests/fixtures/, made by scripts/make_fixtures.py; see its README for seed selection).

Tolerance: relative L2 of all positions' logits < 1e-5. Measured 3-4e-7 on every fixture and prompt:
float rounding only. The fixtures' seeds were chosen so that no int8 activation sits on a rounding
edge (fp32 vs fp64 transformers runs agree to < 1e-5), so one flipped activation step (>= 3e-4) would
fail this test, as would real bugs (a wrong rope theta or GQA order gives 0.28 or more). The head is
stored as F16, which is lossless here: the fixture's bf16 values are all fp16-representable.
The default Q8_0 head is an approximation of the embedding itself (tied: the input embedding too);
it moves these random models' logits by 1.5-4 % relative L2, so it is checked only for that bound.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from engine.model.quantize import quantize_checkpoint
from engine.model.reference import ReferenceModel

FIXTURES = Path(__file__).parent / "fixtures"
CASES = ["hf-bitnet-tiny", "hf-bitnet-tiny-packed", "hf-llama-bitnet-tiny"]
EXACT_TOL = 1e-5
Q8_HEAD_TOL = 0.06


def _load(name: str):
    directory = FIXTURES / name
    reference = json.loads((directory / "reference.json").read_text())
    logits = np.load(directory / "reference_logits.npz")
    return directory, reference["prompts"], logits


@pytest.fixture(scope="module", params=CASES)
def fixture_model(request, tmp_path_factory):
    directory, prompts, logits = _load(request.param)
    out = tmp_path_factory.mktemp(request.param) / "model.gguf"
    quantize_checkpoint(directory, out, head="f16")
    return request.param, ReferenceModel(out), prompts, logits


def test_logits_match_transformers(fixture_model):
    name, model, prompts, logits = fixture_model
    for i, prompt in enumerate(prompts):
        ours = model.forward(prompt["ids"])
        theirs = logits[f"logits_{i}"]
        rel = np.linalg.norm(ours - theirs) / np.linalg.norm(theirs)
        assert rel < EXACT_TOL, f"{name} prompt {i}: relative L2 {rel:.3g}"


def test_greedy_matches_transformers(fixture_model):
    name, model, prompts, _ = fixture_model
    for prompt in prompts:
        assert model.generate(prompt["ids"], len(prompt["greedy"])) == prompt["greedy"], name


@pytest.mark.parametrize("name", CASES)
def test_q8_0_head_stays_close(name, tmp_path):
    directory, prompts, logits = _load(name)
    out = tmp_path / "q8.gguf"
    quantize_checkpoint(directory, out, head="q8_0")
    model = ReferenceModel(out)
    ours = model.forward(prompts[1]["ids"])
    theirs = logits["logits_1"]
    assert np.linalg.norm(ours - theirs) / np.linalg.norm(theirs) < Q8_HEAD_TOL
