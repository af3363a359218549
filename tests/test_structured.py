"""engine/serving/structured.py and engine/serving/tools.py with the real llguidance over our byte tokenizer (and a
small
trained BPE): random walks through the matcher must always give JSON that validates against the schema."""

from __future__ import annotations

import json
import re
import sysconfig

import jsonschema
import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from engine.errors import InvalidRequestError, TokenNotAllowedError
from engine.model.vocab import EOS, build_byte_tokenizer
from engine.serving.schema import MAX_SCHEMA_DEPTH
from engine.serving.structured import GrammarCompiler
from engine.serving.tools import parse_tool_calls, tool_grammar_schema, validate_tools

EOS_ID = 257
EOT_ID = 260  # <|eot_id|>: a second stop id
MODEL_VOCAB = 600  # wider than the 512-token tokenizer: ids 512..599 exist only in the model

NESTED = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": -5, "maximum": 250},
        "status": {"enum": ["open", "closed", 3, None]},
        "owner": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 6},
                "admin": {"type": "boolean"},
                "score": {"type": "number"},
            },
            "required": ["name", "admin"],
            "additionalProperties": False,
        },
        "items": {
            "type": "array",
            "maxItems": 3,
            "items": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string", "maxLength": 4},
                    "qty": {"type": "integer", "minimum": 1, "maximum": 9},
                    "tags": {"type": "array", "maxItems": 2, "items": {"enum": ["red", "green"]}},
                    "note": {"anyOf": [{"type": "string", "maxLength": 3}, {"type": "null"}]},
                },
                "required": ["sku", "qty", "tags"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["id", "status", "owner", "items"],
    "additionalProperties": False,
}

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 8},
                "unit": {"enum": ["c", "f"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 14},
            },
            "required": ["city", "unit", "days"],
            "additionalProperties": False,
        },
    },
}
LOCATE = {
    "type": "function",
    "function": {
        "name": "locate",
        "parameters": {
            "type": "object",
            "properties": {"at": {"$ref": "#/$defs/point"}},
            "required": ["at"],
            "additionalProperties": False,
            "$defs": {
                "point": {
                    "type": "object",
                    "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
                    "required": ["x", "y"],
                    "additionalProperties": False,
                }
            },
        },
    },
}
NOOP = {"type": "function", "function": {"name": "noop"}}
TOOLS = [WEATHER, LOCATE, NOOP]


@pytest.fixture(scope="module")
def byte_tok() -> Tokenizer:
    return build_byte_tokenizer(512)


@pytest.fixture(scope="module")
def compiler(byte_tok) -> GrammarCompiler:
    return GrammarCompiler(byte_tok, MODEL_VOCAB, {EOS_ID, EOT_ID})


@pytest.fixture(scope="module")
def bpe_tok() -> Tokenizer:
    """A small real BPE (multi-byte tokens, including ones spanning JSON punctuation)."""
    stdlib = sysconfig.get_paths()["stdlib"]
    files = [f"{stdlib}/json/{name}" for name in ("__init__.py", "decoder.py", "encoder.py", "scanner.py")]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train(
        files,
        trainers.BpeTrainer(
            vocab_size=1500,
            special_tokens=[EOS],
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    return tokenizer


def walk(matcher, tokenizer, seed: int, eos_ids=(EOS_ID, EOT_ID), max_steps: int = 1500, check=None):
    """Sample random allowed tokens until the matcher finishes; returns (text, finished).

    A third of the steps prefer closing punctuation when allowed, so unbounded strings and arrays end."""
    rng = np.random.default_rng(seed)
    closers = {tokenizer.token_to_id(c) for c in ('"', "}", "]")} | set(eos_ids)
    out: list[int] = []
    for _ in range(max_steps):
        allowed = matcher.allowed()
        ids = np.flatnonzero(allowed)
        assert ids.size, "the grammar allows nothing"
        if check is not None:
            check(allowed, out)
        preferred = [i for i in ids if i in closers]
        token = int(rng.choice(preferred if preferred and rng.random() < 0.33 else ids))
        matcher.accept(token)
        if token in eos_ids:
            return tokenizer.decode(out), True
        out.append(token)
        if matcher.is_finished():
            return tokenizer.decode(out), True
    return tokenizer.decode(out), False


def test_random_walks_follow_a_nested_schema(compiler, byte_tok):
    grammar = compiler.compile_response_format(
        {"type": "json_schema", "json_schema": {"name": "order", "schema": NESTED, "strict": True}}
    )
    finished = 0
    for seed in range(25):
        text, done = walk(grammar.matcher(), byte_tok, seed)
        if done:
            finished += 1
            jsonschema.validate(json.loads(text), NESTED)
    assert finished >= 20


def test_random_walks_over_a_bpe_vocabulary(bpe_tok):
    eos = bpe_tok.token_to_id(EOS)
    assert len(bpe_tok.get_vocab()) > 1000 and any(len(t) > 3 for t in bpe_tok.get_vocab())
    compiler = GrammarCompiler(bpe_tok, bpe_tok.get_vocab_size(), {eos})
    grammar = compiler.compile_json_schema(NESTED)
    done_count = 0
    for seed in range(15):
        text, done = walk(grammar.matcher(), bpe_tok, seed, eos_ids=(eos,))
        if done:
            done_count += 1
            jsonschema.validate(json.loads(text), NESTED)
    assert done_count >= 10


def test_json_object_mode_gives_an_object(compiler, byte_tok):
    grammar = compiler.compile_response_format({"type": "json_object"})
    finished = 0
    for seed in range(20):
        text, done = walk(grammar.matcher(), byte_tok, seed)
        if done:
            finished += 1
            assert isinstance(json.loads(text), dict)
    assert finished >= 15


def test_eos_only_when_complete(compiler, byte_tok):
    def check(allowed, out):
        text = byte_tok.decode(out)
        try:
            jsonschema.validate(json.loads(text), NESTED)
            complete = True
        except (ValueError, jsonschema.ValidationError):
            complete = False
        assert allowed[EOS_ID] == allowed[EOT_ID] == complete, text

    grammar = compiler.compile_json_schema(NESTED)
    for seed in range(4):
        walk(grammar.matcher(), byte_tok, seed, check=check)


def test_ids_beyond_the_tokenizer_and_specials_never_allowed(compiler, byte_tok):
    specials = [i for i in range(256, 512) if i not in (EOS_ID, EOT_ID) and i < 261 or i >= 269]

    def check(allowed, out):
        assert allowed.shape == (MODEL_VOCAB,) and allowed.dtype == np.bool_
        assert not allowed[512:].any()
        assert not allowed[specials].any()

    grammar = compiler.compile_response_format({"type": "json_object"})
    for seed in range(3):
        walk(grammar.matcher(), byte_tok, seed, check=check)
    matcher = grammar.matcher()
    matcher.allowed()
    with pytest.raises(TokenNotAllowedError, match="not allowed"):
        matcher.accept(550)


def test_padding_specials_are_left_out_of_the_grammar_vocabulary():
    tokenizer = build_byte_tokenizer(4096)  # the medium shape: 3800+ <|pad_N|> specials
    compiler = GrammarCompiler(tokenizer, 4096, {EOS_ID})
    assert compiler.grammar_vocab == 269
    allowed = compiler.compile_json_schema({"type": "object"}).matcher().allowed()
    assert allowed.shape == (4096,) and list(np.flatnonzero(allowed)) == [ord("{")]


def test_accept_of_a_disallowed_token_raises_and_leaves_the_matcher_usable(compiler, byte_tok):
    matcher = compiler.compile_json_schema(NESTED).matcher()
    with pytest.raises(TokenNotAllowedError) as info:  # no allowed() first: checked by the grammar
        matcher.accept(ord("x"))
    assert isinstance(info.value, ValueError)
    allowed = matcher.allowed()
    with pytest.raises(TokenNotAllowedError):
        matcher.accept(EOS_ID)
    assert not allowed[EOS_ID]
    for token in byte_tok.encode('{"id": 7').ids:
        matcher.accept(token)
    assert not matcher.is_finished()


def test_finished_after_the_closing_brace(compiler, byte_tok):
    matcher = compiler.compile_json_schema(
        {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"], "additionalProperties": False}
    ).matcher()
    for token in byte_tok.encode('{"a": 12').ids:
        matcher.accept(token)
    assert not matcher.is_finished() and not matcher.allowed()[EOS_ID]
    matcher.accept(ord("}"))
    assert matcher.is_finished()
    assert list(np.flatnonzero(matcher.allowed())) == [EOS_ID, EOT_ID]


def test_response_format_shapes_and_errors(compiler):
    assert compiler.compile_response_format(None) is None
    assert compiler.compile_response_format({"type": "text"}) is None
    cases = [
        ({"type": "xml"}, "response_format.type"),
        ({"type": "json_schema"}, "json_schema must be an object"),
        ({"type": "json_schema", "json_schema": {"name": "x"}}, "schema is missing"),
        ({"type": "json_schema", "json_schema": {"schema": ["a"]}}, "must be a JSON schema object"),
        ({"type": "json_schema", "json_schema": {"schema": {"type": "array", "uniqueItems": True}}}, "uniqueItems"),
        (
            {"type": "json_schema", "json_schema": {"schema": {"type": "integer", "minimum": 5, "maximum": 1}}},
            "minimum",
        ),
        ({"type": "json_schema", "json_schema": {"schema": {"type": "strin"}}}, "strin"),
        ({"type": "json_schema", "json_schema": {"schema": {"$ref": "#/$defs/missing"}}}, "missing"),
    ]
    for response_format, message in cases:
        with pytest.raises(InvalidRequestError, match=re.escape(message)) as info:
            compiler.compile_response_format(response_format)
        assert isinstance(info.value, ValueError) and info.value.param == "response_format"


def test_schema_size_and_depth_caps(compiler):
    huge = {"type": "object", "properties": {f"p{i}": {"type": "string", "description": "x" * 200} for i in range(400)}}
    with pytest.raises(InvalidRequestError, match="bytes of JSON; the limit is"):
        compiler.compile_json_schema(huge)
    deep: dict = {"type": "integer"}
    for _ in range(MAX_SCHEMA_DEPTH):
        deep = {"type": "array", "items": deep}
    with pytest.raises(InvalidRequestError, match="nests .* levels"):
        compiler.compile_json_schema(deep)


def test_grammars_are_cached_by_schema(compiler):
    a = compiler.compile_json_schema(
        {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}}}
    )
    again = compiler.compile_json_schema(
        {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}}}
    )
    reordered = compiler.compile_json_schema(
        {"type": "object", "properties": {"b": {"type": "string"}, "a": {"type": "integer"}}}
    )
    assert a is again and a is not reordered  # property order is emission order, so it is part of the key
    assert compiler.compile_response_format({"type": "json_object"}) is compiler.compile_response_format(
        {"type": "json_object"}
    )


def test_forced_named_tool_yields_a_call_to_it(compiler, byte_tok):
    grammar = compiler.compile_tools(TOOLS, {"type": "function", "function": {"name": "get_weather"}})
    finished = 0
    for seed in range(12):
        text, done = walk(grammar.matcher(), byte_tok, seed)
        if done:
            finished += 1
            calls = parse_tool_calls(text, TOOLS)
            assert calls is not None and len(calls) == 1 and calls[0]["function"]["name"] == "get_weather"
            jsonschema.validate(json.loads(calls[0]["function"]["arguments"]), WEATHER["function"]["parameters"])
    assert finished >= 9


def test_required_calls_any_tool_with_valid_arguments(compiler, byte_tok):
    params = {t["function"]["name"]: t["function"].get("parameters") for t in TOOLS}
    grammar = compiler.compile_tools(TOOLS, "required")
    seen: set[str] = set()
    for seed in range(20):
        text, done = walk(grammar.matcher(), byte_tok, seed)
        if done:
            calls = parse_tool_calls(text, TOOLS)
            assert calls, text
            for call in calls:
                name = call["function"]["name"]
                seen.add(name)
                args = json.loads(call["function"]["arguments"])
                jsonschema.validate(args, params[name] or {"type": "object", "maxProperties": 0})
    assert len(seen) >= 2
    single = compiler.compile_tools(TOOLS, "required", parallel_tool_calls=False).matcher()
    assert not single.allowed()[ord("[")]
    assert grammar.matcher().allowed()[ord("[")]


def test_auto_is_free_text_or_a_valid_call(compiler, byte_tok):
    grammar = compiler.compile_tools(TOOLS, "auto")
    first = grammar.matcher().allowed()
    assert first[EOS_ID] and first[ord("{")] and first[ord("a")] and not first[512:].any()
    kinds = set()
    for seed in range(16):
        text, done = walk(grammar.matcher(), byte_tok, seed, max_steps=300)
        calls = parse_tool_calls(text, TOOLS) if done else None
        if text.lstrip().startswith("{") and done:
            assert calls, text
            kinds.add("call")
        elif text.strip():
            assert calls is None
            kinds.add("text")
    matcher = grammar.matcher()
    for token in byte_tok.encode('{"name": "no').ids:
        matcher.accept(token)
    with pytest.raises(TokenNotAllowedError):
        matcher.accept(ord("p"))  # "nop..." is no tool ("noop" is): a started call must name one
    assert "text" in kinds
    matcher = grammar.matcher()
    call = '\n{"name": "locate", "arguments": {"at": {"x": 3, "y": 4}}}'
    for token in byte_tok.encode(call).ids:
        assert matcher.allowed()[token]
        matcher.accept(token)
    assert matcher.is_finished()
    assert parse_tool_calls(call, TOOLS)[0]["function"]["arguments"] == '{"at": {"x": 3, "y": 4}}'


def test_none_and_no_tools_are_unconstrained(compiler):
    assert compiler.compile_tools(TOOLS, "none") is None
    assert compiler.compile_tools([], None) is None
    assert compiler.compile_tools(None, "auto") is None
    assert tool_grammar_schema(TOOLS, "none") is None


def test_tool_grammar_schema_shapes():
    named = tool_grammar_schema(TOOLS, {"type": "function", "function": {"name": "noop"}})
    assert named["properties"]["name"] == {"const": "noop"}
    jsonschema.validate({"name": "noop", "arguments": {}}, named)
    required = tool_grammar_schema(TOOLS, "required")
    call = {"name": "locate", "arguments": {"at": {"x": 1, "y": -2}}}
    jsonschema.validate(call, required)
    jsonschema.validate([call, {"name": "noop", "arguments": {}}], required)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "locate", "arguments": {"at": {"x": 1}}}, required)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([call], tool_grammar_schema(TOOLS, "required", parallel_tool_calls=False))


def test_parse_tool_calls_shape():
    calls = parse_tool_calls('{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c", "days": 2}}', TOOLS)
    assert calls is not None and len(calls) == 1
    call = calls[0]
    assert set(call) == {"id", "type", "function"} and call["type"] == "function"
    assert re.fullmatch(r"call_[0-9a-f]{24}", call["id"])
    assert call["function"]["name"] == "get_weather"
    assert isinstance(call["function"]["arguments"], str)
    assert json.loads(call["function"]["arguments"]) == {"city": "Oslo", "unit": "c", "days": 2}
    two = parse_tool_calls('[{"name": "noop", "arguments": {}}, {"name": "noop", "parameters": "{}"}]', TOOLS)
    assert [c["function"]["name"] for c in two] == ["noop", "noop"] and two[0]["id"] != two[1]["id"]
    fenced = parse_tool_calls('```json\n{"name": "noop", "arguments": {}}\n```', TOOLS)
    assert fenced and fenced[0]["function"]["arguments"] == "{}"
    for text in [
        "Hello there",
        '{"name": "unknown", "arguments": {}}',
        '{"name": "noop", "arguments": {',
        'Sure: {"name": "noop", "arguments": {}}',
        '{"city": "Oslo"}',
        "[]",
        '[{"name": "noop"}, 3]',
        '{"name": "noop", "arguments": {}, "extra": 1}',
        "",
    ]:
        assert parse_tool_calls(text, TOOLS) is None, text
    assert parse_tool_calls('{"name": "noop", "arguments": {}}', None) is None


def test_validate_tools_errors():
    validate_tools(TOOLS, "auto")
    validate_tools(TOOLS, {"type": "function", "function": {"name": "locate"}})
    validate_tools(None, "none")
    cases = [
        (TOOLS, {"type": "function", "function": {"name": "fly"}}, "'fly', which is not in tools"),
        (TOOLS, "sometimes", "tool_choice must be"),
        (None, "required", "needs tools"),
        ([{"type": "function", "function": {"description": "no name"}}], "auto", "name is missing"),
        ([{"type": "function"}], "auto", "function is missing"),
        ([{"type": "retrieval", "function": {"name": "a"}}], "auto", 'only "function" tools'),
        ([{"type": "function", "function": {"name": "has space"}}], "auto", "must be 1-64 letters"),
        ([NOOP, NOOP], "auto", "names must be unique"),
        ([{"type": "function", "function": {"name": "a", "parameters": "x"}}], "auto", "must be a JSON schema object"),
        (
            [{"type": "function", "function": {"name": "a", "parameters": {"type": "string"}}}],
            "auto",
            "describe a JSON object",
        ),
        (
            [{"type": "function", "function": {"name": "a", "parameters": {"type": "object", "not": {}}}}],
            "auto",
            "not supported",
        ),
        ("noop", "auto", "tools must be a list"),
    ]
    for tools, choice, message in cases:
        with pytest.raises(InvalidRequestError, match=re.escape(message)):
            validate_tools(tools, choice)
