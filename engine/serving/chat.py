"""Chat prompts: validate OpenAI chat messages and render them with the model's Jinja chat template, the
way Hugging Face's `apply_chat_template` does (same sandbox, globals and filters)."""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from datetime import datetime

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from engine.errors import ChatTemplateError, InvalidRequestError

ROLES = ("system", "user", "assistant", "tool", "developer")
_UNSUPPORTED_PARTS = {
    "image_url": "images",
    "image": "images",
    "input_image": "images",
    "input_audio": "audio",
    "audio_url": "audio",
    "video_url": "video",
    "file": "files",
    "input_file": "files",
}


def render_chat(
    template: str,
    messages: list[dict],
    *,
    add_generation_prompt: bool = True,
    bos_token: str = "",
    eos_token: str = "",
    tools: list[dict] | None = None,
    **extra,
) -> str:
    """The prompt text for `messages` (already through validate_messages) under a Jinja chat template.

    Renders like transformers' apply_chat_template: variables `messages`, `tools`, `add_generation_prompt`,
    `bos_token`, `eos_token` plus `extra` (e.g. `enable_thinking`, `date_string`). Any failure (invalid
    Jinja, `raise_exception(...)` in the template, a sandbox violation, a missing field) is a
    ChatTemplateError, an InvalidRequestError the server answers with 400.
    """
    if not template:
        raise ChatTemplateError(
            "this model has no chat template, so /v1/chat/completions cannot build a prompt; "
            "use /v1/completions with your own prompt text, or build the model with a "
            "tokenizer_config.json that has a chat_template"
        )
    compiled = _compile(template)
    try:
        return compiled.render(
            messages=messages,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token,
            eos_token=eos_token,
            **extra,
        )
    except _TemplateRaised as exc:
        raise ChatTemplateError(f"chat template refused the messages: {exc.message}") from None
    except jinja2.exceptions.SecurityError as exc:
        raise ChatTemplateError(
            f"chat template was stopped by the sandbox: {exc}; templates may not reach Python "
            "internals — fix the template"
        ) from None
    except jinja2.exceptions.TemplateError as exc:
        raise ChatTemplateError(
            f"chat template failed to render the messages: {type(exc).__name__}: {exc}; "
            "check the messages have the fields the template uses"
        ) from None
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, ArithmeticError, RecursionError) as exc:
        raise ChatTemplateError(
            f"chat template failed to render the messages: {type(exc).__name__}: {exc}; "
            "check the messages have the fields the template uses"
        ) from None


def validate_messages(messages) -> list[dict]:
    """OpenAI chat messages, checked and normalised for chat templates: a copy where every `content` is a
    string (text parts joined with newlines, as vLLM does; an assistant message with tool_calls and no
    content gets ""), and tool-call `arguments` JSON strings are parsed into dicts (what HF templates
    expect). Raise InvalidRequestError naming the message index and field."""
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("messages must be a non-empty list of {role, content} objects", param="messages")
    return [_validate_message(i, message) for i, message in enumerate(messages)]


# --- internals -------------------------------------------------------------------------------------


class _TemplateRaised(jinja2.exceptions.TemplateError):
    """raise_exception(...) called by the template itself."""


def _raise_exception(message):
    raise _TemplateRaised(str(message))


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    """transformers' tojson: real JSON, unicode kept, no HTML escaping (Jinja's own filter escapes < > &)."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _GenerationTracker(Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' AssistantTracker marks assistant spans for
    training masks); when rendering a prompt it just renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


@functools.lru_cache(maxsize=32)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTracker, loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise ChatTemplateError(
            f"the chat template is not valid Jinja: {exc.message} (template line {exc.lineno}); "
            "fix the chat_template in the model's tokenizer_config.json"
        ) from None


def _validate_message(i: int, message) -> dict:
    where = f"messages[{i}]"
    if not isinstance(message, Mapping):
        raise InvalidRequestError(
            f"{where} must be an object with role and content, got {type(message).__name__}", param=where
        )
    role = message.get("role")
    if role not in ROLES:
        raise InvalidRequestError(
            f"{where}.role is {role!r}; expected one of {', '.join(ROLES)}", param=f"{where}.role"
        )
    out = dict(message)
    tool_calls = message.get("tool_calls")
    if tool_calls is not None:
        if role != "assistant":
            raise InvalidRequestError(
                f"{where}.tool_calls is only allowed on assistant messages, not {role}", param=f"{where}.tool_calls"
            )
        out["tool_calls"] = _validate_tool_calls(where, tool_calls)
    content = message.get("content")
    if content is None:
        if role == "assistant" and tool_calls:
            out["content"] = ""
        else:
            need = "content (or tool_calls)" if role == "assistant" else "content"
            raise InvalidRequestError(f"{where} ({role}) needs {need}", param=f"{where}.content")
    else:
        out["content"] = _content_text(where, content)
    if role == "tool":
        call_id = message.get("tool_call_id")
        if not isinstance(call_id, str) or not call_id:
            raise InvalidRequestError(
                f"{where}.tool_call_id must be the id of the assistant tool call this message answers, got {call_id!r}",
                param=f"{where}.tool_call_id",
            )
    name = message.get("name")
    if name is not None and not isinstance(name, str):
        raise InvalidRequestError(f"{where}.name must be a string, got {type(name).__name__}", param=f"{where}.name")
    return out


def _content_text(where: str, content) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequestError(
            f"{where}.content must be a string or a list of text parts, got {type(content).__name__}",
            param=f"{where}.content",
        )
    texts = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind in _UNSUPPORTED_PARTS:
            raise InvalidRequestError(
                f"{at} is an {kind} part: {_UNSUPPORTED_PARTS[kind]} are not supported (this server "
                "runs text-only models); send text parts only",
                param=at,
            )
        if kind != "text":
            raise InvalidRequestError(f'{at} must be {{"type": "text", "text": ...}}, got type {kind!r}', param=at)
        if not isinstance(part.get("text"), str):
            raise InvalidRequestError(f"{at}.text must be a string", param=f"{at}.text")
        texts.append(part["text"])
    return "\n".join(texts)


def _validate_tool_calls(where: str, tool_calls) -> list[dict]:
    if not isinstance(tool_calls, list):
        raise InvalidRequestError(f"{where}.tool_calls must be a list", param=f"{where}.tool_calls")
    out = []
    for j, call in enumerate(tool_calls):
        at = f"{where}.tool_calls[{j}]"
        function = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise InvalidRequestError(
                f'{at} must be {{"id": ..., "type": "function", "function": {{"name": ..., "arguments": "<json>"}}}}',
                param=at,
            )
        if call.get("type", "function") != "function":
            raise InvalidRequestError(f'{at}.type must be "function", got {call.get("type")!r}', param=f"{at}.type")
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError as exc:
                raise InvalidRequestError(
                    f"{at}.function.arguments is not valid JSON ({exc.msg} at char {exc.pos}); "
                    "send the arguments as a JSON object string",
                    param=f"{at}.function.arguments",
                ) from None
        out.append({**call, "function": {**function, "arguments": arguments}})
    return out
