"""Constrained decoding for `response_format` (json_object, json_schema) and tool calls, on llguidance.

One GrammarCompiler per loaded model turns an OpenAI `response_format` or `tools`/`tool_choice` into
a Grammar (compiled once, cached, shared by requests); each sequence gets a Matcher from it, asks
`allowed()` for the bool mask over the model's vocabulary before sampling, and `accept()`s the token.

Library choice, measured by scripts/bench_structured.py (2 cores; each schema's instance is serialised
by json.dumps and tokenized as a model would emit it; the mask before every token is timed, first one
apart; llguidance over the same tokenizer preparation as this module). xgrammar 0.2.8 is out before
measuring: it requires torch, transformers and triton. llguidance 1.9.1 and outlines-core 0.2.14 have
no runtime dependencies.

| library | vocab | schema | tokens | tokenizer setup ms | compile ms | first mask us | mask median us | mask p95 us |
| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |
| llguidance | byte-512 | nested | 232 | 2.2 | 1.3 | 1015 | 7 | 21 |
| llguidance | byte-512 | tool_call | 92 | 2.0 | 0.7 | 147 | 9 | 25 |
| llguidance | byte-512 | json_object | 94 | 1.8 | 0.5 | 55 | 4 | 13 |
| llguidance | bpe-32k | nested | 103 | 238.4 | 1.3 | 159 | 14 | 286 |
| llguidance | bpe-32k | tool_call | 38 | 204.3 | 1.0 | 233 | 13 | 63 |
| llguidance | bpe-32k | json_object | 36 | 216.6 | 0.8 | 164 | 13 | 89 |
| llguidance | byte-128k | nested | 232 | 278.7 | 1.3 | 150 | 9 | 23 |
| llguidance | byte-128k | tool_call | 92 | 229.2 | 0.9 | 207 | 11 | 24 |
| llguidance | byte-128k | json_object | 94 | 262.4 | 0.7 | 140 | 6 | 17 |
| outlines-core | byte-512 | nested | 232 | 0.7 | 28.6 | 69 | 2 | 3 |
| outlines-core | byte-512 | tool_call | 92 | 4.7 | 1.0 | 23 | 2 | 2 |
| outlines-core | byte-512 | json_object | 94 | 0.5 | 5151.5 | 84 | 2 | 3 |
| outlines-core | bpe-32k | nested | 103 | 43.4 | 443.1 | 91 | 4 | 39 |
| outlines-core | bpe-32k | tool_call | 38 | 34.7 | 21.0 | 69 | 3 | 36 |
| outlines-core | bpe-32k | json_object | 36 | 33.4 | 4421.5 | 92 | 7 | 41 |
| outlines-core | byte-128k | nested | 232 | 196.2 | 17.9 | 89 | 7 | 8 |
| outlines-core | byte-128k | tool_call | 92 | 197.7 | 1.1 | 84 | 8 | 9 |
| outlines-core | byte-128k | json_object | 94 | 203.3 | 4632.6 | 91 | 7 | 9 |

byte-512/byte-128k: engine.model.vocab.build_byte_tokenizer at the tiny and 2B4T shapes (the latter is
128k ids of which 127,987 are `<|pad_N|>` specials); bpe-32k: a byte-level BPE trained on the stdlib's
sources (nothing offline has a 32k+ BPE). Mask times include unpacking the bitmask into the bool
(vocab,) array the Sampler takes.

Winner: llguidance. Both are far below a CPU forward pass (milliseconds per token), so compile time
and coverage decide: outlines-core precompiles a token-level DFA per schema, 0.44 s for the nested
schema over 32k tokens and 4.4-5.2 s for `json_object` (which it can only approximate by unrolling nesting
to a fixed depth), on every new schema a request sends; llguidance compiles lazily in about a
millisecond, supports recursion (`$ref: "#"`), `anyOf`, formats and bounds, and names what it does not
support (`Unimplemented keys: ["uniqueItems"]`), which becomes our 400. Its one trap, fixed here:
handing it all 128k ids of byte-128k (127,987 padding specials) costs 54-80 s of tokenizer setup and
2.1-11.6 ms per mask (median; measured before the fix), so `_llg_tokenizer` gives it only the ids up
to the last real token or eos; the ids above are never allowed (the model's vocabulary may be wider
than the tokenizer's anyway).

JSON is emitted on one line with ", " and ": " separators (no free whitespace): a small model given
free whitespace can loop on newlines until max_tokens, and the output matches json.dumps.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Any

import llguidance as llg
import numpy as np
from tokenizers import Tokenizer

from engine.errors import InvalidRequestError, SamplingError, TokenNotAllowedError, UnsupportedTokenizerError
from engine.serving.schema import JSON_OPTIONS, canonical_json, check_json_schema, first_line, parser_limits
from engine.serving.tools import normalize_tool_choice, tool_grammar_schema, validate_tools

CACHE_SIZE = 64  # compiled grammars kept per model


class GrammarCompiler:
    """Compiles response formats and tool choices into Grammars for one model; thread-safe, caching."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_ids: set[int]):
        self.vocab_size = int(vocab_size)
        self.eos_ids = {int(i) for i in eos_ids}
        self._llg, self.grammar_vocab = _llg_tokenizer(tokenizer, self.vocab_size, self.eos_ids)
        self._cache: OrderedDict[str, Grammar] = OrderedDict()
        self._lock = threading.Lock()

    def compile_response_format(self, response_format: dict | None) -> Grammar | None:
        """OpenAI `response_format`: None or {"type": "text"} -> None (unconstrained); {"type": "json_object"}
        -> any JSON object; {"type": "json_schema", "json_schema": {"name", "schema", "strict"}} -> that schema.
        `strict` changes nothing: the output always follows the schema exactly."""
        if response_format is None:
            return None
        if not isinstance(response_format, dict):
            raise InvalidRequestError(
                f'response_format must be an object like {{"type": "json_object"}}, '
                f"got {type(response_format).__name__}",
                param="response_format",
            )
        kind = response_format.get("type", "text")
        if kind == "text":
            return None
        if kind == "json_object":
            return self.compile_json_schema({"type": "object"})
        if kind != "json_schema":
            raise InvalidRequestError(
                f"response_format.type must be one of text, json_object, json_schema; got {kind!r}",
                param="response_format",
            )
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict):
            raise InvalidRequestError(
                'response_format.json_schema must be an object {"name": ..., "schema": {...}} when type is json_schema',
                param="response_format",
            )
        if "schema" not in spec:
            raise InvalidRequestError(
                "response_format.json_schema.schema is missing: give the JSON schema the "
                'output must follow, or use {"type": "json_object"} for any object',
                param="response_format",
            )
        return self.compile_json_schema(spec["schema"], where="response_format.json_schema.schema")

    def compile_json_schema(self, schema: Any, where: str = "schema", param: str = "response_format") -> Grammar:
        """A Grammar whose complete outputs are exactly the JSON documents valid under `schema`."""
        key = "schema:" + canonical_json(schema) if isinstance(schema, dict) else None
        if key is not None and (hit := self._cached(key)) is not None:
            return hit
        return self._store(key, self._build(check_json_schema(schema, where, param), where, param))

    def compile_tools(
        self, tools: list[dict] | None, tool_choice: Any, parallel_tool_calls: bool = True
    ) -> Grammar | None:
        """Grammar for OpenAI function calling (design in engine/serving/tools.py): None for "none" (or no tools);
        "required"/a named function -> the output is a call `{"name": ..., "arguments": {...}}` ("required":
        or a non-empty array of calls, unless parallel_tool_calls is false); "auto" -> free text or one call,
        decided by the first non-whitespace character (`{` starts a call)."""
        if not tools or normalize_tool_choice(tool_choice, tools) == "none":
            validate_tools(tools, tool_choice)
            return None
        key = "tools:" + canonical_json([tools, tool_choice, bool(parallel_tool_calls)])
        if (hit := self._cached(key)) is not None:
            return hit
        validate_tools(tools, tool_choice)
        schema = tool_grammar_schema(tools, tool_choice, parallel_tool_calls=parallel_tool_calls)
        assert schema is not None  # there are tools and tool_choice is not "none": a call to constrain
        check_json_schema(schema, "the tool-call schema built from tools", "tools")
        if normalize_tool_choice(tool_choice, tools) == "auto":
            schema = {**schema, "x-guidance": JSON_OPTIONS}
            # Leading whitespace, then either nothing, free text not starting with "{", or one call.
            lark = (
                "start: WS? (TEXT | call)?\n"
                "WS: /[ \\t\\r\\n]+/\n"
                "TEXT: /[^{ \\t\\r\\n][\\s\\S]*/\n"
                f"call: %json {canonical_json(schema)}\n"
            )
            grammar = llg.LLMatcher.grammar_from_lark(lark)
        else:
            grammar = llg.LLMatcher.grammar_from_json_schema(canonical_json(schema), overrides=JSON_OPTIONS)
        return self._store(key, self._build(grammar, "the tool-call grammar", "tools"))

    # --- internals ---------------------------------------------------------------------------------

    def _build(self, grammar: str, where: str, param: str) -> Grammar:
        matcher = llg.LLMatcher(self._llg, grammar, log_level=0, limits=parser_limits())
        if matcher.is_error():
            raise InvalidRequestError(
                f"{where} cannot be compiled for this model: {first_line([matcher.get_error()])}; simplify the schema",
                param=param,
            )
        return Grammar(matcher, self.vocab_size, self.grammar_vocab, self._llg)

    def _cached(self, key: str) -> Grammar | None:
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
            return hit

    def _store(self, key: str | None, grammar: Grammar) -> Grammar:
        if key is not None:
            with self._lock:
                self._cache[key] = grammar
                self._cache.move_to_end(key)
                while len(self._cache) > CACHE_SIZE:
                    self._cache.popitem(last=False)
        return grammar


class Grammar:
    """A compiled grammar: immutable, cacheable, shared between requests; matcher() per sequence."""

    def __init__(self, pristine: llg.LLMatcher, vocab_size: int, grammar_vocab: int, tokenizer: llg.LLTokenizer):
        self._pristine = pristine
        self._lock = threading.Lock()
        self.vocab_size = vocab_size
        self.grammar_vocab = grammar_vocab
        self._tokenizer = tokenizer

    def matcher(self) -> Matcher:
        with self._lock:  # deep_copy shares the compiled lexer and parser tables: cheaper than recompiling
            return Matcher(self._pristine.deep_copy(), self.vocab_size, self.grammar_vocab, self._tokenizer)


class Matcher:
    """Follows one sequence through a Grammar. Not thread-safe: one per sequence."""

    def __init__(self, matcher: llg.LLMatcher, vocab_size: int, grammar_vocab: int, tokenizer: llg.LLTokenizer):
        self._m = matcher
        self._vocab_size = vocab_size
        self._n = grammar_vocab
        self._tokenizer = tokenizer
        self._bits = np.zeros((grammar_vocab + 31) // 32, dtype=np.int32)
        self._mask: np.ndarray | None = None  # the last allowed(), valid until the next accept()
        self._count = 0

    def allowed(self) -> np.ndarray:
        """Bool mask of shape (vocab_size,): True where the token may come next. eos is allowed exactly
        when the text so far is complete under the grammar; ids the tokenizer does not have never are."""
        self._m.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        if self._m.is_error():
            raise SamplingError(
                f"the constrained-decoding matcher failed after {self._count} tokens: "
                f"{first_line([self._m.get_error()])}; the schema is too complex to follow token by "
                "token: simplify it (fewer alternatives, shorter patterns)"
            )
        mask = np.zeros(self._vocab_size, dtype=bool)
        mask[: self._n] = np.unpackbits(self._bits.view(np.uint8), count=self._n, bitorder="little").view(bool)
        self._mask = mask
        return mask.copy()

    def accept(self, token_id: int) -> None:
        """Advance past `token_id`; TokenNotAllowedError (matcher unchanged) if the grammar forbids it here."""
        token_id = int(token_id)
        if self._mask is not None:
            ok = 0 <= token_id < self._vocab_size and bool(self._mask[token_id])
        else:
            ok = 0 <= token_id < self._n and self._m.validate_tokens([token_id]) == 1
        if not ok or not self._m.consume_token(token_id):
            shown = self._tokenizer.dbg_tokens([token_id]) if 0 <= token_id < self._n else "outside the tokenizer"
            raise TokenNotAllowedError(
                f"token {token_id} ({shown}) is not allowed by the grammar after {self._count} "
                "tokens; sample with the mask from Matcher.allowed()"
            )
        self._mask = None
        self._count += 1

    def is_finished(self) -> bool:
        """The grammar is complete and nothing but eos can follow: stop generating."""
        return self._m.is_stopped() and not self._m.is_error()

    def is_accepting(self) -> bool:
        """The text so far is complete under the grammar (it may still go on, like digits of a number)."""
        return self._m.is_accepting()


def _llg_tokenizer(tokenizer: Tokenizer, vocab_size: int, eos_ids: set[int]) -> tuple[llg.LLTokenizer, int]:
    """llguidance's view of the tokenizer, covering ids [0, n) where n is one past the last regular token,
    non-special added token or eos id. Special tokens above that (our `<|pad_N|>` fillers, Llama-3's
    reserved tokens) are left out: a grammar never emits them, and 128k of them cost a minute of setup."""
    if not eos_ids:
        raise UnsupportedTokenizerError(
            "structured output needs an end-of-sequence token id to end a finished "
            "grammar, and this model has none; set eos_token_id in its tokenizer config"
        )
    spec = json.loads(tokenizer.to_str())
    regular = tokenizer.get_vocab(with_added_tokens=False).values()
    added = spec.get("added_tokens") or []
    top = max([*regular, *(a["id"] for a in added if not a.get("special")), *eos_ids]) + 1
    if top > vocab_size:
        raise UnsupportedTokenizerError(
            f"the tokenizer uses ids up to {top - 1} but the model's vocabulary has "
            f"{vocab_size} entries; the tokenizer does not belong to this model"
        )
    spec["added_tokens"] = [a for a in added if a["id"] < top]
    try:
        return llg.LLTokenizer(json.dumps(spec), n_vocab=top, eos_token=sorted(eos_ids)), top
    except Exception as exc:  # llguidance raises plain exceptions for tokenizer kinds it cannot walk
        kind = spec.get("model", {}).get("type", "unknown")
        raise UnsupportedTokenizerError(
            f"this model's tokenizer ({kind}) is not supported for structured output: "
            f"{exc}; serve a model with a BPE tokenizer or drop response_format/tools "
            "from the request"
        ) from None
