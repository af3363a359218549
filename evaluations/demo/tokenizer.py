"""The demo models' tokenizer: a byte-level BPE trained on the demo corpus with `tokenizers`.

Same conventions as engine/model/vocab.py's synthetic tokenizer, so both look alike to the engine and to
llama.cpp: ids 0-255 are the 256 bytes (GPT-2 byte-to-unicode order), 256-260 the Llama-3 style specials
(BOS 256, EOS 257, header and end-of-turn markers; the same chat template), then one token per learned
merge in merge order. Deterministic: the trainer sees the same text in the same order, one thread.
"""

from __future__ import annotations

import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from engine.model.vocab import BOS, EOS, SPECIALS, _gpt2_byte_to_unicode, save_tokenizer_files  # noqa: F401 - re-exported

VOCAB_SIZE = 512


def train_tokenizer(texts: list[str], vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    """Learn vocab_size - 256 - len(SPECIALS) merges from `texts`; return the renumbered tokenizer."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    n_merges = vocab_size - 256 - len(SPECIALS)
    if n_merges < 0:
        raise ValueError(f"vocab_size {vocab_size} is below the {256 + len(SPECIALS)} bytes and specials")
    scratch = Tokenizer(models.BPE())
    scratch.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = trainers.BpeTrainer(
        vocab_size=256 + n_merges,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    scratch.train_from_iterator(texts, trainer=trainer)
    pairs = (m.split(" ") if isinstance(m, str) else m for m in _merges(scratch))  # "a b" or ["a", "b"]
    merges = [(left, right) for left, right in pairs]
    return build_tokenizer(merges)


def _merges(tokenizer: Tokenizer) -> list:
    import json

    return json.loads(tokenizer.to_str())["model"]["merges"]


def build_tokenizer(merges: list[tuple[str, str]]) -> Tokenizer:
    """Bytes, then SPECIALS, then one token per merge: the engine/model/vocab.py layout with learned merges."""
    byte_to_char = _gpt2_byte_to_unicode()
    vocab = {byte_to_char[b]: b for b in range(256)}
    vocab.update({text: 256 + i for i, text in enumerate(SPECIALS)})
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=list(merges)))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(SPECIALS))  # already in the vocabulary: keeps ids 256..
    return tokenizer
