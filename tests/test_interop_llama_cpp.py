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

import pytest

from engine.model.quantize import quantize_checkpoint
from tests import checkpoints
from tests.interop import agreement, llama_cpp_logits, reference_logits

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install '.[interop]')")


@pytest.mark.parametrize("weights", ["tq2_0", "tq1_0"])
def test_llama_cpp_agrees_with_reference(tmp_path, weights):
    silu = checkpoints.silu_variant(checkpoints.synth(tmp_path / "tiny"), tmp_path / "silu")
    gguf_path = tmp_path / f"silu-{weights}.gguf"
    manifest = quantize_checkpoint(silu, gguf_path, weights=weights, head="f16")
    assert manifest["architecture"]["gguf"] == "bitnet"
    agreement(reference_logits(gguf_path), llama_cpp_logits(gguf_path)).check()


def test_llama_cpp_refuses_our_own_architecture(tmp_path):
    """A relu² model is written as `ryz-bitnet`, which llama.cpp must refuse rather than mis-compute."""
    gguf_path = tmp_path / "relu2.gguf"
    quantize_checkpoint(checkpoints.synth(tmp_path / "tiny"), gguf_path)
    with pytest.raises(ValueError, match="Failed to load model"):
        llama_cpp.Llama(model_path=str(gguf_path), n_ctx=64, verbose=False)
