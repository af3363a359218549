"""The artifact's tokenizer: the Hugging Face tokenizer.json stored in the GGUF metadata."""

from __future__ import annotations

import gguf
from tokenizers import Tokenizer

from engine.model.ggufio import ModelFile


class ModelTokenizer:
    def __init__(self, model_file: ModelFile):
        self.tokenizer = Tokenizer.from_str(model_file.tokenizer_json)
        self.bos_id = model_file.special_token(gguf.Keys.Tokenizer.BOS_ID)
        self.eos_id = model_file.special_token(gguf.Keys.Tokenizer.EOS_ID)
        add_bos = model_file.metadata.get(gguf.Keys.Tokenizer.ADD_BOS)
        self.add_bos = bool(add_bos) if add_bos is not None else self.bos_id is not None
        self.chat_template = model_file.chat_template
        # Stop at eos and at any end-of-turn marker the vocabulary has.
        self.stop_ids = {i for i in (self.eos_id, self.tokenizer.token_to_id("<|eot_id|>")) if i is not None}

    def encode(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=True).ids
        if self.add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id, *ids]  # tokenizer.json files without a post-processor leave bos to us
        return ids

    def encode_chat(self, text: str) -> list[int]:
        """Ids of a rendered chat prompt. The template already wrote the special tokens (usually bos
        first), so the post-processor adds nothing and bos is prepended only when the model wants one
        and the text does not start with it: exactly one bos either way."""
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if self.add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)
