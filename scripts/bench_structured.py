"""Measure constrained-decoding libraries for engine/serving/structured.py: compile time and per-token mask cost.

    .venv/bin/python scripts/bench_structured.py [--bpe PATH_TO_TOKENIZER_JSON]

Candidates: llguidance and outlines-core (xgrammar is out: it requires torch, transformers and triton).
Each schema's document is a valid instance serialised with json.dumps (", " and ": " separators) and
tokenized by the vocabulary's own tokenizer, as a model would emit it; the mask before every token is
timed. Vocabularies: our byte tokenizer at the tiny shape (512) and at the 2B4T shape (128256, mostly
padding specials), plus a 32k byte-level BPE trained on the stdlib's sources (no 32k+ BPE is offline).
Dev script only: outlines-core is not a dependency (`pip install outlines-core` to include it).
"""

from __future__ import annotations

import argparse
import glob
import json
import statistics
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine.model.vocab import EOS, build_byte_tokenizer  # noqa: E402

NESTED = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 100000},
        "status": {"enum": ["open", "closed", "pending"]},
        "owner": {
            "type": "object",
            "properties": {"name": {"type": "string", "maxLength": 40}, "admin": {"type": "boolean"}},
            "required": ["name", "admin"],
            "additionalProperties": False,
        },
        "items": {
            "type": "array",
            "maxItems": 8,
            "items": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string", "maxLength": 12},
                    "qty": {"type": "integer", "minimum": 1, "maximum": 99},
                    "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}},
                },
                "required": ["sku", "qty", "tags"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["id", "status", "owner", "items"],
    "additionalProperties": False,
}
NESTED_DOC = {
    "id": 4217,
    "status": "pending",
    "owner": {"name": "Ada Lovelace", "admin": True},
    "items": [
        {"sku": "AB-1234", "qty": 3, "tags": ["red", "blue"]},
        {"sku": "ZX-9", "qty": 12, "tags": []},
        {"sku": "QQ-77", "qty": 1, "tags": ["green"]},
    ],
}
TOOL_CALL = {
    "type": "object",
    "properties": {
        "name": {"const": "get_weather"},
        "arguments": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 14},
            },
            "required": ["city", "unit", "days"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "arguments"],
    "additionalProperties": False,
}
TOOL_DOC = {"name": "get_weather", "arguments": {"city": "San Francisco", "unit": "celsius", "days": 3}}
ANY_OBJECT = {"type": "object"}
ANY_DOC = {"query": "ternary models", "k": 5, "filters": {"year": [2023, 2024], "open": True}, "note": None}
CASES = {"nested": (NESTED, NESTED_DOC), "tool_call": (TOOL_CALL, TOOL_DOC), "json_object": (ANY_OBJECT, ANY_DOC)}


def train_bpe(path: Path, vocab_size: int = 32000) -> Tokenizer:
    if path.exists():
        return Tokenizer.from_file(str(path))
    files = [
        f for f in sorted(glob.glob(sysconfig.get_paths()["stdlib"] + "/**/*.py", recursive=True)) if "/test" not in f
    ]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|begin_of_text|>", EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train(files[:1500], trainer)
    tokenizer.save(str(path))
    return tokenizer


def bench_llguidance(tokenizer: Tokenizer, eos: int, schema: dict, doc_ids: list[int]) -> dict:
    """Through engine.serving.structured: its tokenizer preparation, compile, and Matcher.allowed() (bool mask)."""
    from engine.serving.structured import GrammarCompiler

    t0 = time.perf_counter()
    compiler = GrammarCompiler(tokenizer, tokenizer.get_vocab_size(), {eos})
    t_tok = time.perf_counter() - t0
    t0 = time.perf_counter()
    matcher = compiler.compile_json_schema(schema).matcher()
    t_compile = time.perf_counter() - t0
    times = []
    first = None
    for token in [*doc_ids, eos]:
        t0 = time.perf_counter()
        mask = matcher.allowed()
        dt = time.perf_counter() - t0
        first = dt if first is None else first
        times.append(dt)
        assert mask[token], f"llguidance rejects {tokenizer.id_to_token(token)!r}"
        matcher.accept(token)
    return {"tokenizer_s": t_tok, "compile_s": t_compile, "first_mask_s": first, "masks": times}


def bench_outlines(tokenizer: Tokenizer, eos: int, schema: dict, doc_ids: list[int]) -> dict:
    import outlines_core as oc

    t0 = time.perf_counter()
    specials = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
    vocab_map: dict[bytes, list[int]] = {}
    byte_decoder = {c: b for b, c in _bytes_to_unicode().items()}
    for text, idx in tokenizer.get_vocab().items():
        if text in specials:
            continue
        vocab_map.setdefault(bytes(byte_decoder[c] for c in text), []).append(idx)
    vocabulary = oc.Vocabulary(eos, vocab_map)
    t_tok = time.perf_counter() - t0
    t0 = time.perf_counter()
    regex = oc.json_schema.build_regex_from_schema(json.dumps(schema), r"[ ]?")
    index = oc.Index(regex, vocabulary)
    guide = oc.Guide(index)
    t_compile = time.perf_counter() - t0
    n = tokenizer.get_vocab_size()
    buf = np.zeros((n + 31) // 32, dtype=np.int32)
    times = []
    first = None
    for token in [*doc_ids, eos]:
        t0 = time.perf_counter()
        guide.write_mask_into(buf.ctypes.data, buf.size, 4)
        mask = np.unpackbits(buf.view(np.uint8), count=n, bitorder="little").view(bool)
        dt = time.perf_counter() - t0
        first = dt if first is None else first
        times.append(dt)
        assert mask[token], f"outlines-core rejects {tokenizer.id_to_token(token)!r}"
        if token != eos:
            guide.advance(token, return_tokens=False)
    return {"tokenizer_s": t_tok, "compile_s": t_compile, "first_mask_s": first, "masks": times}


def _bytes_to_unicode() -> dict[int, str]:
    from engine.model.vocab import _gpt2_byte_to_unicode

    return _gpt2_byte_to_unicode()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bpe", type=Path, default=Path("/tmp/ryz-bpe32k.json"), help="cached 32k BPE tokenizer.json")
    parser.add_argument("--libs", default="llguidance,outlines-core")
    args = parser.parse_args()
    vocabs = {
        "byte-512": build_byte_tokenizer(512),
        "bpe-32k": train_bpe(args.bpe),
        "byte-128k": build_byte_tokenizer(128256),
    }
    benches = {"llguidance": bench_llguidance, "outlines-core": bench_outlines}
    print(
        "| library | vocab | schema | tokens | tokenizer setup ms | compile ms | first mask us | mask median us | mask "
        "p95 us |"
    )
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for lib in args.libs.split(","):
        for vname, tokenizer in vocabs.items():
            eos = tokenizer.token_to_id(EOS)
            for cname, (schema, doc) in CASES.items():
                ids = tokenizer.encode(json.dumps(doc), add_special_tokens=False).ids
                try:
                    r = benches[lib](tokenizer, eos, schema, ids)
                except Exception as exc:  # report and go on: a failure is a measurement too
                    print(f"| {lib} | {vname} | {cname} | {len(ids)} | failed: {type(exc).__name__}: {str(exc)[:80]} |")
                    continue
                us = sorted(t * 1e6 for t in r["masks"][1:])
                p95 = us[min(len(us) - 1, int(0.95 * len(us)))]
                print(
                    f"| {lib} | {vname} | {cname} | {len(ids)} | {r['tokenizer_s'] * 1e3:.1f} | "
                    f"{r['compile_s'] * 1e3:.1f} "
                    f"| {r['first_mask_s'] * 1e6:.0f} | {statistics.median(us):.0f} | {p95:.0f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
