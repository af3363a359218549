"""JSON schemas a request brings (response_format, tool parameters): checked against our caps and compiled to
an llguidance grammar without a tokenizer. Shared by engine/serving/tools.py and engine/serving/structured.py.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, TypedDict

import llguidance as llg

from engine.errors import InvalidRequestError

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions  # declared only in the stub, not at runtime


class _ParserLimits(TypedDict):
    """The llg.LLParserLimits keyword arguments we set."""

    max_grammar_size: int
    max_lexer_states: int
    step_max_items: int


# One-line JSON, json.dumps' separators. Applied over any "x-guidance" options inside a schema.
JSON_OPTIONS: JsonCompileOptions = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
MAX_SCHEMA_BYTES = 64 * 1024  # canonical JSON of one schema (or of a request's whole tools list)
MAX_SCHEMA_DEPTH = 32  # nested JSON objects/arrays inside the schema document
# Bounds llguidance's grammar build and per-token work: a schema over them is a 400, not a slow server.
LIMITS = _ParserLimits(max_grammar_size=200_000, max_lexer_states=100_000, step_max_items=50_000)


def canonical_json(value: Any) -> str:
    """Compact JSON with keys in their given order: property order is the order the model emits them."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def check_json_schema(schema: Any, where: str, param: str) -> str:
    """Check `schema` is a JSON schema llguidance can follow and within our caps; return its grammar.

    `where` names the schema in error messages (`response_format.json_schema.schema`); `param` is the
    OpenAI error param. Needs no tokenizer, so engine/serving/tools.py uses it to validate tool parameters."""
    if not isinstance(schema, dict):
        raise InvalidRequestError(f"{where} must be a JSON schema object, got {type(schema).__name__}", param=param)
    try:
        text = canonical_json(schema)
    except (TypeError, ValueError) as exc:
        raise InvalidRequestError(f"{where} is not serialisable as JSON: {exc}", param=param) from None
    if len(text.encode()) > MAX_SCHEMA_BYTES:
        raise InvalidRequestError(
            f"{where} is {len(text.encode())} bytes of JSON; the limit is {MAX_SCHEMA_BYTES}: "
            "split it or drop descriptions and examples",
            param=param,
        )
    if (depth := _depth(schema)) > MAX_SCHEMA_DEPTH:
        raise InvalidRequestError(
            f"{where} nests {depth} levels of objects/arrays; the limit is {MAX_SCHEMA_DEPTH}: "
            "flatten it or use $defs/$ref for repeated parts",
            param=param,
        )
    try:
        grammar = llg.LLMatcher.grammar_from_json_schema(text, overrides=JSON_OPTIONS)
    except ValueError as exc:
        raise InvalidRequestError(f"{where} is not a valid JSON schema: {exc}", param=param) from None
    is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar, None, limits=parser_limits())
    if is_error:
        raise InvalidRequestError(
            f"{where} is not supported for constrained decoding: {first_line(messages)}; "
            "remove or rewrite that part of the schema",
            param=param,
        )
    return grammar


def parser_limits() -> llg.LLParserLimits:
    return llg.LLParserLimits(**LIMITS)


def _depth(value: Any) -> int:
    depth, stack = 0, [(value, 1)]
    while stack:
        item, d = stack.pop()
        if isinstance(item, dict | list):
            depth = max(depth, d)
            if d <= MAX_SCHEMA_DEPTH:  # deeper than the cap is already an error: stop walking
                stack.extend((v, d + 1) for v in (item.values() if isinstance(item, dict) else item))
    return depth


def first_line(messages: list[str]) -> str:
    text = next((m for m in messages if m), "unknown error")
    return text.strip().splitlines()[0] if text.strip() else "unknown error"
