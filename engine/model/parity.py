"""Parity check of a model artifact: the native engine against the numpy reference on a short prompt.

The pipeline runs it before evaluating a candidate: a build or a file that makes the fast path disagree
with the slow one must never reach evaluation. Logits are compared by relative L2 (fp32 KV cache, so
both compute the same float operations: docs/kernels.md measures 2e-7), and greedy continuations
token by token, on every kernel family the CPU runs: a family that is wrong must fail here even when
another one is dispatched.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from engine.model.loader import open_model
from engine.model.native import ISAS
from engine.model.reference import ReferenceModel
from engine.model.tokenizer import ModelTokenizer

PARITY_TOLERANCE = 1e-4


def check_parity(
    path: str | Path,
    library,
    prompt: str = "The quick brown fox jumps over the lazy dog.",
    new_tokens: int = 16,
    tolerance: float = PARITY_TOLERANCE,
) -> dict:
    """Every kernel family this CPU runs (not only the dispatched one) against the reference.

    Returns {"passed", "rel_l2" (the largest), "tolerance", "prompt_tokens", "reference_ids", "native_ids" (the
    dispatched family's), "isa" (the dispatched family), "isas": {isa: {"passed", "rel_l2", "native_ids",
    "reason"}}, "reason"}; the library's ISA is restored afterwards."""
    reference = ReferenceModel(path)
    tokenizer = ModelTokenizer(reference.file)
    ids = tokenizer.encode(prompt)
    ref_logits = reference.forward(ids)
    ref_ids = reference.generate(ids, new_tokens)
    dispatched = library.isa
    per_isa = {}
    try:
        for isa in [dispatched] + [name for name in ISAS if name != dispatched and library.isa_supported(name)]:
            library.set_isa(isa)
            native = open_model(path, "parity", library=library, max_positions=len(ids) + new_tokens + 1)
            per_isa[isa] = _compare(native, ids, ref_logits, ref_ids, new_tokens, tolerance)
    finally:
        library.set_isa(dispatched)
    failed = [f"{isa}: {r['reason']}" for isa, r in per_isa.items() if not r["passed"]]
    worst = max(r["rel_l2"] for r in per_isa.values())
    return {
        "passed": not failed,
        "rel_l2": worst,
        "tolerance": tolerance,
        "prompt_tokens": len(ids),
        "reference_ids": ref_ids,
        "native_ids": per_isa[dispatched]["native_ids"],
        "isa": dispatched,
        "isas": per_isa,
        "reason": "; ".join(failed)
        or f"native = reference on {', '.join(per_isa)} (rel L2 <= {worst:.1e}, {new_tokens} greedy tokens equal)",
    }


def _compare(
    native, ids: list[int], ref_logits: np.ndarray, ref_ids: list[int], new_tokens: int, tolerance: float
) -> dict:
    try:
        nat_logits = native.forward(ids)
        rel = float(np.linalg.norm(nat_logits - ref_logits) / max(float(np.linalg.norm(ref_logits)), 1e-30))
        nat_ids = native.generate(ids, new_tokens)
    finally:
        native.close()
    reasons = []
    if not rel <= tolerance:
        reasons.append(f"logits differ by {rel:.2e} relative L2 > {tolerance:.0e}")
    if ref_ids != nat_ids:
        first = next((i for i, (a, b) in enumerate(zip(ref_ids, nat_ids)) if a != b), min(len(ref_ids), len(nat_ids)))
        reasons.append(f"greedy continuation differs at token {first}")
    return {
        "passed": not reasons,
        "rel_l2": rel,
        "native_ids": nat_ids,
        "reason": "; ".join(reasons) or f"rel L2 {rel:.1e}, {new_tokens} greedy tokens equal",
    }
