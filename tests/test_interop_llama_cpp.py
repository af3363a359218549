"""llama.cpp loads our `bitnet` GGUF and computes (nearly) what our reference computes.

Not bit-equal by design: llama.cpp quantizes activations to Q8_K per 256-value block, BitNet per token,
so logits differ by a few percent. Measured on this tiny random model (seed 0): relative L2 0.024,
mean per-position correlation 0.9997, teacher-forced top-1 agreement 0.93 (random weights give small
top-1 margins, so a few flips are expected). Computing a different model is far outside these bounds:
the relu² FFN against llama.cpp's SiLU gives correlation 0.72 and top-1 0.13. Subtle errors such as a
wrong rope theta move this random model only to relative L2 0.04, so exact correctness rests on the
transformers parity test; this one proves the file is llama.cpp-compatible.
"""

from __future__ import annotations

import numpy as np
import pytest

from engine.model.quantize import quantize_checkpoint
from engine.model.reference import ReferenceModel
from tests import checkpoints

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install '.[interop]')")

MIN_CORRELATION = 0.995
MIN_TOP1 = 0.85
MAX_REL_L2 = 0.05


@pytest.mark.parametrize("weights", ["tq2_0", "tq1_0"])
def test_llama_cpp_agrees_with_reference(tmp_path, weights):
    silu = checkpoints.silu_variant(checkpoints.synth(tmp_path / "tiny"), tmp_path / "silu")
    gguf_path = tmp_path / f"silu-{weights}.gguf"
    manifest = quantize_checkpoint(silu, gguf_path, weights=weights, head="f16")
    assert manifest["architecture"]["gguf"] == "bitnet"
    tokens = [256, *b"The quick brown fox jumps over the lazy dog. "]
    ours = ReferenceModel(gguf_path).forward(tokens)
    llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=128, logits_all=True, verbose=False, n_threads=2, seed=0)
    try:
        llm.eval(tokens)
        theirs = np.array(llm.scores[: len(tokens)], dtype=np.float32)
    finally:
        llm.close()
    correlation = float(np.mean([np.corrcoef(a, b)[0, 1] for a, b in zip(ours, theirs)]))
    top1 = float(np.mean(ours.argmax(-1) == theirs.argmax(-1)))
    rel = float(np.linalg.norm(ours - theirs) / np.linalg.norm(ours))
    assert correlation >= MIN_CORRELATION, (correlation, top1, rel)
    assert top1 >= MIN_TOP1, (correlation, top1, rel)
    assert rel <= MAX_REL_L2, (correlation, top1, rel)


def test_llama_cpp_refuses_our_own_architecture(tmp_path):
    """A relu² model is written as `ryz-bitnet`, which llama.cpp must refuse rather than mis-compute."""
    gguf_path = tmp_path / "relu2.gguf"
    quantize_checkpoint(checkpoints.synth(tmp_path / "tiny"), gguf_path)
    with pytest.raises(ValueError, match="Failed to load model"):
        llama_cpp.Llama(model_path=str(gguf_path), n_ctx=64, verbose=False)
