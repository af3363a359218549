"""Parity check of a model artifact: the native engine against the numpy reference on a short prompt.

The pipeline runs it before evaluating a candidate: a build or a file that makes the fast path disagree
with the slow one must never reach evaluation. Logits are compared by relative L2 (fp32 KV cache, so
both compute the same float operations: docs/kernels.md measures 2e-7), and greedy continuations
token by token.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

PARITY_TOLERANCE = 1e-4


def check_parity(path: str | Path, library, prompt: str = "The quick brown fox jumps over the lazy dog.",
                 new_tokens: int = 16, tolerance: float = PARITY_TOLERANCE) -> dict:
    """{"passed", "rel_l2", "tolerance", "prompt_tokens", "reference_ids", "native_ids", "isa", "reason"}."""
    from engine.native import NativeModel
    from engine.reference import ReferenceModel
    from engine.tokenizer import ModelTokenizer

    reference = ReferenceModel(path)
    tokenizer = ModelTokenizer(reference.file)
    ids = tokenizer.encode(prompt)
    native = NativeModel(path, library, threads=1, max_positions=len(ids) + new_tokens + 1, kv_type="f32")
    try:
        ref_logits = reference.forward(ids)
        nat_logits = native.forward(ids)
        rel = float(np.linalg.norm(nat_logits - ref_logits) / max(np.linalg.norm(ref_logits), 1e-30))
        ref_ids = reference.generate(ids, new_tokens)
        nat_ids = native.generate(ids, new_tokens)
    finally:
        native.close()
    reasons = []
    if not rel <= tolerance:
        reasons.append(f"logits differ by {rel:.2e} relative L2 > {tolerance:.0e}")
    if ref_ids != nat_ids:
        first = next((i for i, (a, b) in enumerate(zip(ref_ids, nat_ids)) if a != b), min(len(ref_ids), len(nat_ids)))
        reasons.append(f"greedy continuation differs at token {first}")
    return {"passed": not reasons, "rel_l2": rel, "tolerance": tolerance, "prompt_tokens": len(ids),
            "reference_ids": ref_ids, "native_ids": nat_ids, "isa": library.isa,
            "reason": "; ".join(reasons) or f"native = reference (rel L2 {rel:.1e}, {new_tokens} greedy tokens equal)"}
