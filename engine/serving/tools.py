"""OpenAI function calling for models without a native tool-call format, on constrained decoding.

A call is the JSON object `{"name": <tool name>, "arguments": <that tool's parameters>}`, the shape
vLLM and llama.cpp fall back to for such models. What `tool_choice` does to the output
(GrammarCompiler.compile_tools builds the grammar from tool_grammar_schema's schema):

- "none" (or no tools): no constraint, no parsing; the text is the answer.
- a named function {"type": "function", "function": {"name": N}}: exactly one call to N.
- "required": one call to any tool, or (when parallel_tool_calls, the default) a non-empty JSON array of
  calls.
- "auto" (the default when tools are given): free text or one call, decided by the first non-whitespace
  character: `{` starts a call, which must then be complete and valid; anything else is free text.
  Why a grammar rather than no constraint plus a parser: the models we serve have no tool-call format
  of their own, so a small model that starts a call often gets the JSON or the argument types
  wrong, and a parser can then only give up and return the broken JSON as text; the grammar makes
  every started call valid, for about 10 us of mask work per token, and leaves plain answers
  untouched. The cost: in "auto" an answer cannot start with `{` (it would be a call), and parallel
  calls need "required" (a leading `[` stays free text, since answers start with one more often).

parse_tool_calls turns the finished text into OpenAI `tool_calls`. It accepts only text that is a call
(or an array of calls) and nothing else beyond whitespace or a ```json fence, so a plain answer that
mentions JSON is never taken for a call.
"""

from __future__ import annotations

import json
import re
import secrets
from typing import Any

from engine.errors import InvalidRequestError
from engine.serving.schema import check_json_schema

NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")  # OpenAI: letters, digits, underscores and dashes, 64 at most
NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}
_FENCE = re.compile(r"^```[A-Za-z]*\s*\n?(.*?)\n?```$", re.S)


def validate_tools(tools: list[dict] | None, tool_choice: Any) -> None:
    """InvalidRequestError naming the first problem: malformed tool, missing or duplicate name, a
    parameters schema that is not an object schema or cannot be followed, tool_choice naming no tool."""
    if tools is not None and not isinstance(tools, list):
        raise InvalidRequestError(
            f'tools must be a list of {{"type": "function", "function": {{...}}}}, got {type(tools).__name__}',
            param="tools",
        )
    seen: set[str] = set()
    for i, tool in enumerate(tools or []):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise InvalidRequestError(f"{where} must be an object, got {type(tool).__name__}", param=where)
        if tool.get("type", "function") != "function":
            raise InvalidRequestError(
                f'{where}.type is {tool.get("type")!r}; only "function" tools are supported', param=f"{where}.type"
            )
        function = tool.get("function")
        if not isinstance(function, dict):
            raise InvalidRequestError(
                f'{where}.function is missing: give {{"name": ..., "parameters": {{...}}}}', param=f"{where}.function"
            )
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidRequestError(
                f"{where}.function.name is missing: every tool needs a name", param=f"{where}.function.name"
            )
        if not NAME_RE.match(name):
            raise InvalidRequestError(
                f"{where}.function.name {name!r} must be 1-64 letters, digits, '_', '-' or '.'",
                param=f"{where}.function.name",
            )
        if name in seen:
            raise InvalidRequestError(
                f"{where}.function.name {name!r} is used by an earlier tool; names must be unique",
                param=f"{where}.function.name",
            )
        seen.add(name)
        if "description" in function and not isinstance(function["description"], str | type(None)):
            raise InvalidRequestError(
                f"{where}.function.description must be a string", param=f"{where}.function.description"
            )
        params = function.get("parameters")
        if params is not None:
            param = f"{where}.function.parameters"
            if not isinstance(params, dict):
                raise InvalidRequestError(
                    f"{param} of tool {name!r} must be a JSON schema object, got {type(params).__name__}", param=param
                )
            if params.get("type", "object") != "object":
                raise InvalidRequestError(
                    f"{param} of tool {name!r} must describe a JSON object "
                    f'("type": "object"), got type {params.get("type")!r}',
                    param=param,
                )
            check_json_schema(params, f"{param} of tool {name!r}", param)
    choice = normalize_tool_choice(tool_choice, tools)
    if choice == "required" or isinstance(choice, dict):
        if not tools:
            raise InvalidRequestError(
                f"tool_choice {tool_choice!r} needs tools, but the request has none", param="tool_choice"
            )
    if isinstance(choice, dict) and choice["name"] not in seen:
        raise InvalidRequestError(
            f"tool_choice names function {choice['name']!r}, which is not in tools (tools: {', '.join(sorted(seen))})",
            param="tool_choice",
        )


def normalize_tool_choice(tool_choice: Any, tools: list[dict] | None) -> str | dict:
    """ "none" | "auto" | "required" | {"name": N}; None means OpenAI's default ("auto" with tools, else "none")."""
    if tool_choice is None:
        return "auto" if tools else "none"
    if isinstance(tool_choice, str):
        if tool_choice in ("none", "auto", "required"):
            return tool_choice
        raise InvalidRequestError(
            f'tool_choice must be "none", "auto", "required" or '
            f'{{"type": "function", "function": {{"name": ...}}}}, got {tool_choice!r}',
            param="tool_choice",
        )
    if isinstance(tool_choice, dict):
        function = tool_choice.get("function")
        if (
            tool_choice.get("type", "function") == "function"
            and isinstance(function, dict)
            and isinstance(function.get("name"), str)
        ):
            return {"name": function["name"]}
    raise InvalidRequestError(
        f'tool_choice must be "none", "auto", "required" or {{"type": "function", "function": '
        f'{{"name": ...}}}}, got {tool_choice!r}',
        param="tool_choice",
    )


def tool_grammar_schema(tools: list[dict] | None, tool_choice: Any, parallel_tool_calls: bool = True) -> dict | None:
    """The JSON schema a tool call in the output must follow, or None when no call is wanted ("none",
    no tools). For a named function: that call. For "required": a call to any tool, or a non-empty array
    of calls when parallel_tool_calls. For "auto": a call to any tool (compile_tools lets the output be
    free text instead, see the module docstring). Assumes validate_tools passed."""
    choice = normalize_tool_choice(tool_choice, tools)
    if not tools or choice == "none":
        return None
    functions = [t["function"] for t in tools]
    if isinstance(choice, dict):
        functions = [f for f in functions if f["name"] == choice["name"]]
    defs: dict[str, Any] = {}
    calls = [_call_schema(f, i, defs) for i, f in enumerate(functions)]
    call = calls[0] if len(calls) == 1 else {"anyOf": calls}
    schema = call
    if choice == "required" and parallel_tool_calls:
        schema = {"anyOf": [call, {"type": "array", "items": call, "minItems": 1}]}
    return {**schema, "$defs": defs} if defs else schema


def parse_tool_calls(text: str, tools: list[dict] | None) -> list[dict] | None:
    """OpenAI `tool_calls` from generated text, or None when the text is not a tool call: it must be a
    call `{"name": ..., "arguments": {...}}` (or an array of them) to a tool in `tools`, alone apart
    from whitespace or a ```json fence. "parameters" is accepted for "arguments", and arguments given
    as a JSON string are decoded."""
    names = {t.get("function", {}).get("name") for t in tools or [] if isinstance(t, dict)}
    body = text.strip()
    if fenced := _FENCE.match(body):
        body = fenced.group(1).strip()
    if not body or body[0] not in "{[":
        return None
    try:
        value = json.loads(body)
    except ValueError:
        return None
    items = value if isinstance(value, list) else [value]
    calls = []
    for item in items:
        call = _parse_call(item, names)
        if call is None:
            return None
        calls.append(call)
    return calls or None


def _parse_call(item: Any, names: set) -> dict | None:
    if not isinstance(item, dict) or item.get("name") not in names:
        return None
    args = item.get("arguments", item.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict) or set(item) - {"name", "arguments", "parameters"}:
        return None
    return {
        "id": "call_" + secrets.token_hex(12),
        "type": "function",
        "function": {"name": item["name"], "arguments": json.dumps(args, ensure_ascii=False)},
    }


def _call_schema(function: dict, index: int, defs: dict) -> dict:
    params = function.get("parameters")
    if params is None:
        params = NO_PARAMETERS
    elif _has_local_ref(params):
        # `#/...` pointers are relative to the document root; the parameters move under $defs so they stay valid.
        key = f"tool{index}"
        defs[key] = _rebase_refs(params, f"#/$defs/{key}")
        params = {"$ref": f"#/$defs/{key}"}
    return {
        "type": "object",
        "properties": {"name": {"const": function["name"]}, "arguments": params},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def _has_local_ref(value: Any) -> bool:
    if isinstance(value, dict):
        return any(
            (k == "$ref" and isinstance(v, str) and v.startswith("#")) or _has_local_ref(v) for k, v in value.items()
        )
    return isinstance(value, list) and any(_has_local_ref(v) for v in value)


def _rebase_refs(value: Any, base: str) -> Any:
    if isinstance(value, dict):
        return {
            k: (base + v[1:] if k == "$ref" and isinstance(v, str) and v.startswith("#") else _rebase_refs(v, base))
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_rebase_refs(v, base) for v in value]
    return value
