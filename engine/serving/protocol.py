"""The HTTP protocol's shapes: request bodies, OpenAI's error shape, and the small helpers every route uses
(reading a JSON body, validating it, SSE framing, usage). Errors use OpenAI's JSON shape:
{"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, ValidationError

VARIANT_HEADER = "X-Ryz-Variant"


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code, self.headers = (
            status,
            message,
            type_,
            param,
            code,
            headers,
        )


def error_body(
    message: str, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(exc: APIError, path: str = "") -> JSONResponse:
    """The error in OpenAI's shape, or in Ollama's (`{"error": message}`) for a request to Ollama's `/api/` routes,
    so an Ollama client reads the message."""
    if is_ollama_path(path):
        return JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers)
    return JSONResponse(
        error_body(exc.message, exc.type, exc.param, exc.code), status_code=exc.status, headers=exc.headers
    )


def is_ollama_path(path: str) -> bool:
    return path.startswith("/api/") or path == "/api"


SEED_MAX = 2**63 - 1  # OpenAI's seed is an int64; the sampler's generator takes non-negative seeds
_JSON_SCHEMA = {"type": "object", "description": "a JSON Schema (engine/serving/structured.py compiles it)"}
_TEXT_PART = {
    "type": "object",
    "required": ["type", "text"],
    "properties": {"type": {"enum": ["text"]}, "text": {"type": "string"}},
    "additionalProperties": False,
}
_TOOL_CALL = {
    "type": "object",
    "required": ["type", "function"],
    "properties": {
        "id": {"type": "string"},
        "type": {"enum": ["function"]},
        "function": {
            "type": "object",
            "required": ["name", "arguments"],
            "properties": {"name": {"type": "string"}, "arguments": {"type": "string"}},
            "additionalProperties": False,
        },
    },
    "additionalProperties": False,
}
# OpenAI's shapes of the objects inside a body, closed where OpenAI's are (the fields beyond them mean nothing
# here); engine/serving/chat.py, tools.py and structured.py validate them, with their own messages.
_MESSAGE = {
    "type": "object",
    "required": ["role"],
    "properties": {
        "role": {"enum": ["system", "developer", "user", "assistant", "tool"]},
        "content": {"anyOf": [{"type": "string"}, {"type": "array", "items": _TEXT_PART}, {"type": "null"}]},
        "name": {"type": "string"},
        "tool_call_id": {"type": "string"},
        "tool_calls": {"type": "array", "items": _TOOL_CALL},
    },
    "additionalProperties": False,
}
_TOOL = {
    "type": "object",
    "required": ["type", "function"],
    "properties": {
        "type": {"enum": ["function"]},
        "function": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string"},
                "description": {"type": "string"},
                "parameters": _JSON_SCHEMA,
                "strict": {"type": "boolean"},
            },
            "additionalProperties": False,
        },
    },
    "additionalProperties": False,
}
_TOOL_CHOICE = {
    "anyOf": [
        {"enum": ["none", "auto", "required"]},
        {
            "type": "object",
            "required": ["type", "function"],
            "properties": {
                "type": {"enum": ["function"]},
                "function": {
                    "type": "object",
                    "required": ["name"],
                    "properties": {"name": {"type": "string"}},
                    "additionalProperties": False,
                },
            },
            "additionalProperties": False,
        },
        {"type": "null"},
    ]
}
_RESPONSE_FORMAT = {
    "anyOf": [
        {
            "type": "object",
            "required": ["type"],
            "properties": {
                "type": {"enum": ["text", "json_object", "json_schema"]},
                "json_schema": {
                    "type": "object",
                    "required": ["name", "schema"],
                    "properties": {
                        "name": {"type": "string"},
                        "description": {"type": "string"},
                        "schema": _JSON_SCHEMA,
                        "strict": {"type": "boolean"},
                    },
                    "additionalProperties": False,
                },
            },
            "additionalProperties": False,
        },
        {"type": "null"},
    ]
}

_SPEC_COUNT = {"type": "integer", "minimum": 1, "maximum": 16}
_SPECULATIVE = {
    "anyOf": [
        {"type": "boolean"},
        {"enum": ["off", "ngram", "draft"]},
        {
            "type": "object",
            "properties": {
                "method": {"enum": ["off", "ngram", "draft"]},
                "num_tokens": _SPEC_COUNT,
                "ngram_min": _SPEC_COUNT,
                "ngram_max": _SPEC_COUNT,
            },
            "additionalProperties": False,
        },
        {"type": "null"},
    ]
}


def _documented(default: Any, replace: dict | None = None, **schema: Any) -> Any:
    """A field whose range or shape the OpenAPI schema states while the routes check it (SamplingParams.validate,
    chat.py, tools.py, structured.py word the errors); pydantic validation stays as the type says. `replace`: the
    field's whole schema instead of pydantic's (which says only "object")."""
    if replace is None:
        return Field(default, json_schema_extra=schema)

    def whole(field_schema: dict[str, Any]) -> None:
        field_schema.clear()
        field_schema.update(replace)

    return Field(default, json_schema_extra=whole)


class SamplingBody(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str
    max_tokens: int | None = Field(None, ge=0)
    temperature: float = _documented(1.0, minimum=0, maximum=2)
    top_p: float = _documented(1.0, exclusiveMinimum=0, maximum=1)
    n: int = _documented(1, minimum=1, maximum=1)  # n > 1 is refused, not ignored
    stream: bool = False
    stream_options: dict | None = _documented(
        None,
        replace={
            "anyOf": [
                {"type": "object", "properties": {"include_usage": {"type": "boolean"}}, "additionalProperties": False},
                {"type": "null"},
            ]
        },
    )
    stop: str | list[str] | None = None
    presence_penalty: float = _documented(0.0, minimum=-2, maximum=2)
    frequency_penalty: float = _documented(0.0, minimum=-2, maximum=2)
    seed: int | None = Field(None, ge=0, le=SEED_MAX)
    user: str | None = None
    logit_bias: dict | None = _documented(None, maxProperties=0)  # not supported: refused, not ignored
    response_format: dict | None = _documented(None, replace=_RESPONSE_FORMAT)
    # extensions (vLLM / llama.cpp names)
    top_k: int = _documented(0, minimum=0)
    min_p: float = _documented(0.0, minimum=0, maximum=1)
    # beyond [0.01, 100] it overflows the logits it divides or multiplies (the sampler drew from NaNs: a 500)
    repetition_penalty: float = Field(1.0, ge=0.01, le=100)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    # extension: speculative decoding (docs/serving.md); null: the server's RYZ_SPECULATIVE
    speculative: StrictBool | StrictStr | dict | None = _documented(None, replace=_SPECULATIVE)


class CompletionBody(SamplingBody):
    prompt: str | list[str] | list[int] | list[list[int]] = _documented(..., minLength=1, minItems=1)
    max_tokens: int | None = Field(16, ge=0)
    echo: bool = False
    logprobs: int | None = _documented(None, minimum=0, maximum=20)
    suffix: str | None = _documented(None, maxLength=0)  # not supported
    best_of: int | None = _documented(None, minimum=1, maximum=1)


class ChatBody(SamplingBody):
    messages: list[dict] = _documented(..., items=_MESSAGE, minItems=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = _documented(None, minimum=0, maximum=20)
    tools: list[dict] | None = _documented(
        None, replace={"anyOf": [{"type": "array", "items": _TOOL}, {"type": "null"}]}
    )
    tool_choice: str | dict | None = _documented(None, replace=_TOOL_CHOICE)
    parallel_tool_calls: bool | None = None
    # extension: {"top_k": 4, "index": REF} adds retrieved chunks (docs/serving.md)
    retrieval: bool | dict | None = _documented(
        None,
        replace={
            "anyOf": [
                {"type": "boolean"},
                {
                    "type": "object",
                    "properties": {
                        "top_k": {"type": "integer", "minimum": 1, "maximum": 50},
                        "index": {"type": "string"},
                    },
                    "additionalProperties": False,
                },
                {"type": "null"},
            ]
        },
    )


class EmbeddingsBody(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: str = "float"
    dimensions: int | None = None
    user: str | None = None


class RetrieveBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    query: str = Field(min_length=1, max_length=4000)
    top_k: int = Field(5, ge=1, le=50)
    index: str = Field("production", min_length=1, max_length=200)


def draining_error() -> APIError:
    return APIError(
        503,
        "the server is draining and accepts no new requests",
        "server_error",
        code="draining",
        headers={"Retry-After": "5"},
    )


def bearer(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    return auth[7:].strip() if auth.lower().startswith("bearer ") else None


async def read_json(request: Request, allow_empty: bool = False) -> dict:
    """The request's body as a JSON object, or a 400 in OpenAI's shape: what `json` refuses (malformed, invalid
    UTF-8, NaN/Infinity, numbers beyond a float or of more than 4,300 digits), nesting deeper than
    RYZ_MAX_JSON_DEPTH, and strings with a lone UTF-16 surrogate ("\\ud800": no UTF-8 text holds one, and every
    later encode of it would fail). The body's size is capped where it is read (engine/serving/app.py: 413)."""
    raw = await request.body()
    if not raw and allow_empty:
        return {}
    settings = getattr(request.app.state.serving, "settings", None)
    return parse_json(raw, settings.max_json_depth if settings is not None else 64)


def parse_json(raw: bytes, max_depth: int = 64) -> dict:
    """read_json's checks on a body already read."""
    try:
        body = json.loads(raw, parse_constant=_no_constant, parse_float=_finite_float)
    except RecursionError:
        body = None  # deeper than the parser goes: beyond any depth limit
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, and an int of more than 4300 digits
        reason = "a number has more than 4300 digits" if "integer string conversion" in str(exc) else str(exc)
        raise APIError(400, f"the request body is not valid JSON: {reason}", code="invalid_json") from None
    if body is not None and not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    if body is None or (raw.count(b"[") + raw.count(b"{") > max_depth and _depth(body, max_depth) > max_depth):
        raise APIError(
            400,
            f"the request body's JSON is nested more than {max_depth} levels deep (RYZ_MAX_JSON_DEPTH)",
            code="invalid_json",
        )
    if _SURROGATE_ESCAPE.search(raw):
        try:
            json.dumps(body, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise APIError(
                400,
                "the request body has a lone UTF-16 surrogate escape (like \\ud800) in a string: that is not valid "
                "Unicode text; send the character as UTF-8 or as a complete surrogate pair",
                code="invalid_json",
            ) from None
    return body


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # where a surrogate can come from: JSON's \uD800-\uDFFF


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is beyond the range of a float")
    return value


def _depth(value: Any, limit: int) -> int:
    """How deep containers nest in a parsed JSON value (1 for a flat object), counting no further than limit + 1."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        if deepest > limit:
            break
        children = node.values() if isinstance(node, dict) else node
        stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))
    return deepest


def parse_body(model: type[BaseModel], body: dict):
    """The body as `model`, or a 400 whose `param` is the top-level field at fault (OpenAI's use of it)."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        errors = exc.errors()
        first = errors[0]
        field = str(first["loc"][0]) if first["loc"] else None
        same_field = [e for e in errors if e["loc"][:1] == first["loc"][:1]]
        if field and len(same_field) > 1 and all(len(e["loc"]) > 1 for e in same_field):  # a union's members
            kinds = list(dict.fromkeys(str(e["loc"][1]) for e in same_field))
            message = f"{field}: got {type(body.get(field)).__name__}; expected {' or '.join(kinds)}"
        else:
            where = ".".join(str(p) for p in first["loc"]) or "body"
            message = f"{where}: {first['msg']}"
        raise APIError(400, message, param=field, code="invalid_value") from None


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}


def openapi_body(model: type[BaseModel]) -> dict:
    """`openapi_extra` for a route that reads its JSON body by hand (read_json + parse_body, so the errors are
    OpenAI's): the body model's JSON schema as the operation's request body, and OpenAI's error shape for 4xx and
    5xx, so /openapi.json describes what the route takes (tests/test_hostile_http.py fuzzes it with schemathesis)."""
    schema = model.model_json_schema()
    if "$defs" in schema:  # would need components; no body model nests another today
        raise TypeError(f"{model.__name__} nests models: register them as OpenAPI components first")
    error = {"description": "OpenAI's error shape", "content": {"application/json": {"schema": ERROR_SCHEMA}}}
    return {
        "requestBody": {"required": True, "content": {"application/json": {"schema": schema}}},
        "responses": {"4XX": error, "5XX": error},
    }
