"""Does `tokenizers.decoders.DecodeStream` give the same streamed text as engine/serving/textstream.py?

For the zoo's BPE and the synthetic shapes' byte-level tokenizer: texts with multi-byte characters split across
tokens (CJK, emoji, combining marks), streamed after a prompt, and random id sequences (which can hold invalid
UTF-8). For each, the concatenated stream is compared with `tokenizer.decode(prompt + ids)` minus the prompt's text,
and the per-token time is measured. Prints a markdown table; docs/serving.md records it.

    .venv/bin/python scripts/compare_decodestream.py
"""

from __future__ import annotations

import random
import time
from pathlib import Path

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from engine.model.vocab import build_byte_tokenizer
from engine.serving.textstream import IncrementalDetokenizer

ROOT = Path(__file__).resolve().parents[1]
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "naïve café résumé — “quotes” and ellipsis…",
    "日本語のテキストと中文字符混合",
    "emoji: 🦊🐕‍🦺 👩🏽‍💻 and flags 🇩🇪🇯🇵",
    "combining: e\u0301 a\u0308 n\u0303",
    "def f(x):\n    return {'k': [1, 2, 3]}\n",
]
PROMPT = "Answer briefly: "


def stream_ours(tok: Tokenizer, prompt_ids: list[int], ids: list[int]) -> str:
    d = IncrementalDetokenizer(tok, skip_special_tokens=False, prefix_ids=prompt_ids)
    return "".join(d.push(i) for i in ids) + d.flush()


def stream_theirs(tok: Tokenizer, prompt_ids: list[int], ids: list[int]) -> str | None:
    """None: DecodeStream raised (it has no flush for a trailing partial character either)."""
    stream = (
        DecodeStream(prompt_ids, skip_special_tokens=False) if prompt_ids else DecodeStream(skip_special_tokens=False)
    )
    try:
        return "".join(chunk for i in ids if (chunk := stream.step(tok, i)) is not None)
    except Exception:  # noqa: BLE001 - recorded as a failure
        return None


def expected(tok: Tokenizer, prompt_ids: list[int], ids: list[int]) -> str:
    full = tok.decode(prompt_ids + ids, skip_special_tokens=False)
    return full[len(tok.decode(prompt_ids, skip_special_tokens=False)) :]


def timed(fn, *args) -> tuple[object, float]:
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def main() -> None:
    tokenizers = {
        "zoo BPE (ryz-demo-s)": Tokenizer.from_file(str(ROOT / "examples/zoo/ryz-demo-s/tokenizer.json")),
        "byte-level (synthetic shapes)": build_byte_tokenizer(512),
    }
    rng = random.Random(0)
    print(
        "| tokenizer | case | tokens | ours = decode | DecodeStream = decode | ours us/token | DecodeStream us/token |"
    )
    print("|---|---|---:|---|---|---:|---:|")
    for name, tok in tokenizers.items():
        prompt_ids = tok.encode(PROMPT, add_special_tokens=False).ids
        cases = [(text[:24], tok.encode(text, add_special_tokens=False).ids) for text in TEXTS]
        vocab = tok.get_vocab_size()
        cases += [(f"random ids #{k}", [rng.randrange(vocab) for _ in range(64)]) for k in range(3)]
        for label, ids in cases:
            want = expected(tok, prompt_ids, ids)
            ours, t_ours = timed(stream_ours, tok, prompt_ids, ids)
            theirs, t_theirs = timed(stream_theirs, tok, prompt_ids, ids)
            verdict = "raised" if theirs is None else ("yes" if theirs == want else "no")
            print(
                f"| {name} | {label!r} | {len(ids)} | {'yes' if ours == want else 'no'} | {verdict} | "
                f"{t_ours / max(len(ids), 1) * 1e6:.1f} | {t_theirs / max(len(ids), 1) * 1e6:.1f} |"
            )


if __name__ == "__main__":
    main()
