"""Byte-level tokenizer for synthetic checkpoints: speed never depends on the vocabulary, so 256 byte
tokens, a few specials and padding up to the shape's vocabulary size are enough to run anything."""

from __future__ import annotations

import json

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
SPECIALS = (BOS, EOS, "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
# A few merges so the vocabulary is a real BPE (llama.cpp refuses a gpt2 vocabulary without merges).
MERGES = (("Ġ", "t"), ("h", "e"), ("Ġ", "a"), ("i", "n"), ("Ġt", "he"), ("e", "r"), ("o", "n"), ("Ġ", "s"))

# Llama-3 style template: the same markers the 2B4T checkpoint uses, so chat code paths are exercised.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)


def build_byte_tokenizer(vocab_size: int) -> Tokenizer:
    """A byte-level BPE: ids 0-255 are bytes, then SPECIALS, then MERGES' tokens, then `<|pad_N|>` fillers."""
    n_fixed = 256 + len(SPECIALS) + len(MERGES)
    if vocab_size < n_fixed:
        raise ValueError(f"vocab_size {vocab_size} is too small for a byte tokenizer: need at least {n_fixed}")
    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    # ByteLevel.alphabet() is unordered; order it by the byte each character stands for (GPT-2 mapping).
    byte_to_char = _gpt2_byte_to_unicode()
    assert set(byte_to_char.values()) == set(byte_chars)
    vocab = {byte_to_char[b]: b for b in range(256)}
    vocab.update({text: 256 + i for i, text in enumerate(SPECIALS)})
    for i, (left, right) in enumerate(MERGES):
        vocab[left + right] = 256 + len(SPECIALS) + i
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=list(MERGES)))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(SPECIALS))  # already in the vocabulary: keeps ids 256..
    tokenizer.add_special_tokens([f"<|pad_{i}|>" for i in range(vocab_size - n_fixed)])
    assert tokenizer.get_vocab_size() == vocab_size
    return tokenizer


def tokenizer_config(tokenizer: Tokenizer) -> dict:
    """tokenizer_config.json contents for build_byte_tokenizer's output."""
    return {
        "bos_token": BOS,
        "eos_token": EOS,
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": 4096,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": True,
    }


def save_tokenizer_files(tokenizer: Tokenizer, directory) -> None:
    from pathlib import Path

    directory = Path(directory)
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(tokenizer), indent=2))
    (directory / "special_tokens_map.json").write_text(json.dumps({"bos_token": BOS, "eos_token": EOS}, indent=2))


def _gpt2_byte_to_unicode() -> dict[int, str]:
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping
