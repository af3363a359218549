"""Chat prompts: validate OpenAI chat messages and render them with the model's Jinja chat template, the
way Hugging Face's `apply_chat_template` does (same sandbox, globals and filters).

A chat template comes with a checkpoint, written by a stranger, so rendering is bounded: Jinja's immutable sandbox
(no Python internals, no mutation), a rendered prompt of at most MAX_RENDERED_CHARS, at most MAX_RENDER_STEPS loop
iterations, calls and intercepted operators and MAX_RENDER_SECONDS per render, and the string operations that
multiply sizes (`*`, `+`, `~`, `%`, `**`, and the filters and str methods with a width or a count) refused before
they would pass the cap. Any of these is a ChatTemplateError naming the limit.

Special-token text a client writes in a message stays text (docs/serving.md, "Special tokens in client text are
text"): given the model's ChatTemplate (engine.model.tokenizer), the special-token text in every string of the
messages and tools is replaced by an unguessable placeholder before rendering and put back after; the result is a
ChatPrompt that records where it went, for ModelTokenizer.encode_chat.
"""

from __future__ import annotations

import contextvars
import functools
import json
import re
import secrets
import time
from collections.abc import Callable, Mapping
from datetime import datetime

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from engine.errors import ChatTemplateError, InvalidRequestError
from engine.model.tokenizer import MAX_CHAT_TEMPLATE_CHARS, ChatPrompt, GenerationTag

MAX_RENDERED_CHARS = 16 << 20  # 4x the default request body (RYZ_MAX_REQUEST_BYTES)
MAX_RENDER_STEPS = 1_000_000  # loop iterations + calls + intercepted operators; real templates take thousands
MAX_RENDER_SECONDS = 2.0  # real templates render in milliseconds
_MAX_WIDTH = 1 << 16  # a format width, indent or padding a template may ask for
_MAX_INT_BITS = 1 << 16  # integers a template may build with * and **

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
    special_spans: Callable[[str], list[tuple[int, int]]] | None = None,
    **extra,
) -> str:
    """The prompt text for `messages` (already through validate_messages) under a Jinja chat template.

    Renders like transformers' apply_chat_template: variables `messages`, `tools`, `add_generation_prompt`,
    `bos_token`, `eos_token` plus `extra` (e.g. `enable_thinking`, `date_string`). Any failure (invalid
    Jinja, `raise_exception(...)` in the template, a sandbox violation, a missing field, a render past its
    limits) is a ChatTemplateError, an InvalidRequestError the server answers with 400.

    `special_spans` (default: the template's own, when it is the model's engine.model.tokenizer.ChatTemplate) finds
    special-token text in a string; with it the result is a ChatPrompt whose `client_special` spans are the
    special-token text that came from `messages` and `tools`, for ModelTokenizer.encode_chat to keep as text.
    """
    if not template:
        raise ChatTemplateError(
            "this model has no chat template, so /v1/chat/completions cannot build a prompt; "
            "use /v1/completions with your own prompt text, or build the model with a "
            "tokenizer_config.json that has a chat_template"
        )
    if len(template) > MAX_CHAT_TEMPLATE_CHARS:
        raise ChatTemplateError(
            f"the chat template has {len(template)} characters, over the {MAX_CHAT_TEMPLATE_CHARS >> 10} KiB a chat "
            "template may have; fix the chat_template in the model's tokenizer_config.json"
        )
    compiled = _compile(str(template))  # str: the cache holds no model's tokenizer
    finder = special_spans if special_spans is not None else getattr(template, "special_spans", None)
    marks = _ClientSpecials(finder) if finder is not None else None
    if marks is not None:
        try:
            messages, tools = marks.escape(messages), marks.escape(tools)
        except RecursionError:
            raise InvalidRequestError("messages or tools nest too deeply", param="messages") from None
    try:
        text = _render(
            compiled,
            messages=messages,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token,
            eos_token=eos_token,
            **extra,
        )
    except _RenderLimit as exc:
        raise ChatTemplateError(
            f"chat template stopped: {exc.message}; a chat template this costly is broken or hostile — fix the "
            "chat_template in the model's tokenizer_config.json"
        ) from None
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
    except (
        TypeError,
        ValueError,
        KeyError,
        IndexError,
        AttributeError,
        ArithmeticError,
        RecursionError,
        MemoryError,
    ) as exc:
        raise ChatTemplateError(
            f"chat template failed to render the messages: {type(exc).__name__}: {exc}; "
            "check the messages have the fields the template uses"
        ) from None
    return marks.restore(text) if marks is not None else text


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


@functools.lru_cache(maxsize=32)
def _compile(template: str) -> jinja2.Template:
    env = _RenderEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, loopcontrols, _Bounds])
    env.filters["tojson"] = _tojson
    for name, check in _FILTER_CHECKS.items():
        env.filters[name] = _checked_filter(env.filters[name], check)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals.pop("lipsum", None)  # lorem ipsum of any length: no chat template needs it
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise ChatTemplateError(
            f"the chat template is not valid Jinja: {exc.message} (template line {exc.lineno}); "
            "fix the chat_template in the model's tokenizer_config.json"
        ) from None
    except (SyntaxError, RecursionError, MemoryError, OverflowError) as exc:  # nests past what Python compiles
        raise ChatTemplateError(
            f"the chat template cannot be compiled ({type(exc).__name__}: {exc}); "
            "fix the chat_template in the model's tokenizer_config.json"
        ) from None


# --- bounds on a render -----------------------------------------------------------------------------------------


class _RenderLimit(jinja2.exceptions.TemplateError):
    """A render passed one of its limits (steps, time, size)."""


class _Budget:
    __slots__ = ("deadline", "steps")

    def __init__(self) -> None:
        self.steps = 0
        self.deadline = time.monotonic() + MAX_RENDER_SECONDS

    def tick(self) -> None:
        self.steps += 1
        if self.steps > MAX_RENDER_STEPS:
            raise _RenderLimit(f"it took more than {MAX_RENDER_STEPS} steps (loop iterations, calls, operators)")
        if not self.steps & 1023 and time.monotonic() > self.deadline:
            raise _RenderLimit(f"it ran for more than {MAX_RENDER_SECONDS:g} s")


_BUDGET: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("ryz_render_budget", default=None)


def _tick() -> None:
    budget = _BUDGET.get()
    if budget is not None:
        budget.tick()


def _render(compiled: jinja2.Template, **variables) -> str:
    """Render with a fresh budget (a context variable: templates cannot reach it, concurrent renders each have
    theirs), streaming the output to stop at MAX_RENDERED_CHARS."""
    token = _BUDGET.set(_Budget())
    try:
        parts, size = [], 0
        for part in compiled.generate(**variables):
            size += len(part)
            if size > MAX_RENDERED_CHARS:
                raise _RenderLimit(f"the rendered prompt passed {MAX_RENDERED_CHARS} characters")
            parts.append(part)
        return "".join(parts)
    finally:
        _BUDGET.reset(token)


def _check_size(value, what: str) -> None:
    if isinstance(value, (str, list, tuple, dict)) and len(value) > MAX_RENDERED_CHARS:
        raise _RenderLimit(f"{what} made a value of {len(value)} items, over {MAX_RENDERED_CHARS}")


def _check_width(value, what: str) -> None:
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > _MAX_WIDTH:
        raise _RenderLimit(f"{what} asked for a width or count of {value}, over {_MAX_WIDTH}")


_PRINTF = re.compile(r"%[#0\- +]*(\*|\d+)?(?:\.(\*|\d+))?")
_FIELD_SPEC = re.compile(r"\{[^{}]*?:([^{}]*)(\}|\{)")  # a str.format field's spec, or one with a nested field


def _check_format(spec: str, what: str) -> None:
    """printf-style (`%`, the format filter) and str.format widths and precisions."""
    for match in _PRINTF.finditer(spec):
        for number in match.groups():
            if number == "*":
                raise _RenderLimit(f"{what} takes its width from an argument (*), which templates may not")
            if number is not None:
                _check_width(int(number), what)
    for match in _FIELD_SPEC.finditer(spec):
        if match.group(2) == "{":
            raise _RenderLimit(f"{what} takes a width from an argument ({{:{{}}}}), which templates may not")
        for number in re.findall(r"\d+", match.group(1)):
            _check_width(int(number), what)


def _sized(value) -> int:
    return len(value) if isinstance(value, (str, list, tuple)) else 0


class _RenderEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox with a budget: every call, loop iteration and intercepted operator ticks it, and operators that
    multiply sizes are checked before they run."""

    intercepted_binops = frozenset({"+", "*", "**", "%"})

    def _parse(self, source, name, filename):
        """The template's tree, every `for` iterating through _Bounds.each and every `~` concatenating through
        _Bounds.concat (extension attributes: a template cannot rebind them)."""
        tree = super()._parse(source, name, filename)
        ext = _Bounds.identifier
        for loop in list(tree.find_all(nodes.For)):
            loop.iter = nodes.Call(nodes.ExtensionAttribute(ext, "each"), [loop.iter], [], None, None)
        for parent in list(tree.find_all(nodes.Node)):
            for field in parent.fields:
                child = getattr(parent, field, None)
                if isinstance(child, nodes.Concat):
                    setattr(parent, field, _concat_call(child, ext))
                elif isinstance(child, list):  # in place: a Call made above may hold this very list
                    child[:] = [_concat_call(c, ext) if isinstance(c, nodes.Concat) else c for c in child]
        return tree

    def call_binop(self, context, operator, left, right):
        _tick()
        if operator == "*":
            for seq, count in ((left, right), (right, left)):
                if _sized(seq) and isinstance(count, int) and len(seq) * count > MAX_RENDERED_CHARS:
                    raise _RenderLimit(f"'*' would make {len(seq) * count} items, over {MAX_RENDERED_CHARS}")
            if (
                isinstance(left, int)
                and isinstance(right, int)
                and left.bit_length() + right.bit_length() > _MAX_INT_BITS
            ):
                raise _RenderLimit(f"'*' would make an integer of over {_MAX_INT_BITS} bits")
        elif operator == "+":
            if _sized(left) and _sized(right) and len(left) + len(right) > MAX_RENDERED_CHARS:
                raise _RenderLimit(f"'+' would make {len(left) + len(right)} items, over {MAX_RENDERED_CHARS}")
        elif operator == "**":
            if isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 0:
                if left.bit_length() * right > _MAX_INT_BITS:
                    raise _RenderLimit(f"'**' would make an integer of over {_MAX_INT_BITS} bits")
        elif operator == "%" and isinstance(left, str):
            _check_format(left, "'%'")
        return super().call_binop(context, operator, left, right)

    def call(self, context, obj, /, *args, **kwargs):
        _tick()
        target = getattr(obj, "__wrapped__", obj)  # the sandbox wraps str.format
        owner = getattr(target, "__self__", None)
        if isinstance(owner, str):
            name = getattr(target, "__name__", "")
            if name in ("ljust", "rjust", "center", "zfill") and args:
                _check_width(args[0], f"str.{name}")
            elif name == "expandtabs":
                tabsize = args[0] if args else kwargs.get("tabsize", 8)
                _check_width(tabsize, "str.expandtabs")
                _check_size_estimate(owner.count("\t") * tabsize + len(owner), "str.expandtabs")
            elif name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
                _check_replace(owner, args[0], args[1], "str.replace")
            elif name == "join" and args:
                items = list(args[0])
                _check_join(owner, items, "str.join")
                args = (items, *args[1:])
            elif name in ("format", "format_map"):
                _check_format(owner, f"str.{name}")
        result = super().call(context, obj, *args, **kwargs)
        _check_size(result, "a call")
        return result


class _Bounds(Extension):
    """The callables the rewritten tree calls (see _RenderEnvironment._parse)."""

    def each(self, iterable):
        for item in iterable:
            _tick()
            yield item

    def concat(self, *parts):
        texts = [str(p) for p in parts]
        _check_size_estimate(sum(len(t) for t in texts), "'~'")
        return "".join(texts)


def _concat_call(node: nodes.Concat, ext: str) -> nodes.Call:
    return nodes.Call(nodes.ExtensionAttribute(ext, "concat"), node.nodes, [], None, None, lineno=node.lineno)


def _check_size_estimate(size: int, what: str) -> None:
    if size > MAX_RENDERED_CHARS:
        raise _RenderLimit(f"{what} would make {size} characters, over {MAX_RENDERED_CHARS}")


def _check_replace(text: str, old: str, new: str, what: str) -> None:
    count = len(text) + 1 if not old else text.count(old)
    _check_size_estimate(len(text) + count * (len(new) - len(old)), what)


def _check_join(separator: str, items: list, what: str) -> None:
    _check_size(items, what)
    size = sum(len(i) if isinstance(i, str) else 16 for i in items) + len(separator) * max(0, len(items) - 1)
    _check_size_estimate(size, what)


def _filter_width(position: int, name: str):
    def check(args, kwargs):
        value = args[position] if len(args) > position else kwargs.get(name)
        _check_width(value, f"the filter argument {name}")

    return check


def _check_indent(args, kwargs):
    text = args[0] if args else ""
    width = args[1] if len(args) > 1 else kwargs.get("width", 4)
    if isinstance(width, str):
        width = len(width)
    _check_width(width, "the indent filter")
    if isinstance(text, str) and isinstance(width, int):
        _check_size_estimate(len(text) + (text.count("\n") + 1) * width, "the indent filter")


def _check_replace_filter(args, kwargs):
    if len(args) >= 3 and all(isinstance(a, str) for a in args[:3]):
        _check_replace(args[0], args[1], args[2], "the replace filter")


def _check_join_filter(args, kwargs):
    if args and isinstance(args[0], (list, tuple)):
        separator = args[1] if len(args) > 1 else kwargs.get("d", "")
        _check_join(separator if isinstance(separator, str) else "", list(args[0]), "the join filter")


def _check_format_filter(args, kwargs):
    if args and isinstance(args[0], str):
        _check_format(args[0], "the format filter")


_FILTER_CHECKS = {
    "center": _filter_width(1, "width"),
    "indent": _check_indent,
    "wordwrap": _filter_width(1, "width"),
    "batch": _filter_width(1, "linecount"),
    "slice": _filter_width(1, "slices"),
    "truncate": _filter_width(1, "length"),
    "tojson": _filter_width(2, "indent"),
    "replace": _check_replace_filter,
    "join": _check_join_filter,
    "format": _check_format_filter,
}


def _checked_filter(function, check):
    """`function` (a Jinja filter) with its arguments checked first and its result's size after; a filter that
    Jinja passes its context or environment first keeps that (functools.wraps copies jinja_pass_arg)."""
    passes = getattr(function, "jinja_pass_arg", None) is not None

    @functools.wraps(function)
    def checked(*args, **kwargs):
        _tick()
        check(args[1:] if passes else args, kwargs)
        result = function(*args, **kwargs)
        _check_size(result, "a filter")
        return result

    return checked


# --- special-token text in client strings ---------------------------------------------------------------------


class _ClientSpecials:
    """Special-token text in client strings swapped for placeholders before a render and put back after."""

    def __init__(self, finder: Callable[[str], list[tuple[int, int]]]):
        self.finder = finder
        self.nonce = f"{secrets.randbelow(10**12):012d}"  # digits: case filters leave them alone
        self.pattern = re.compile(f"\ue000{self.nonce}:(\\d+)\ue001")
        self.originals: list[str] = []

    def escape(self, value):
        if isinstance(value, str):
            return self._escape_text(value)
        if isinstance(value, Mapping):
            return {self.escape(k): self.escape(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.escape(v) for v in value]
        return value

    def _escape_text(self, text: str) -> str:
        spans = self.finder(text)
        if not spans:
            return text
        out, pos = [], 0
        for start, end in spans:
            out.append(text[pos:start])
            out.append(f"\ue000{self.nonce}:{len(self.originals)}\ue001")
            self.originals.append(text[start:end])
            pos = end
        out.append(text[pos:])
        return "".join(out)

    def restore(self, text: str) -> ChatPrompt:
        """The rendered text with the client's special-token text back, and where it is. A placeholder a template
        cut apart stays as harmless private-use characters: it can never become a special token."""
        if not self.originals:
            return ChatPrompt(text)
        out: list[str] = []
        spans: list[tuple[int, int]] = []
        pos = length = 0
        for match in self.pattern.finditer(text):
            out.append(text[pos : match.start()])
            length += match.start() - pos
            original = self.originals[int(match.group(1))]
            if spans and spans[-1][1] == length:  # adjacent: one span
                spans[-1] = (spans[-1][0], length + len(original))
            else:
                spans.append((length, length + len(original)))
            out.append(original)
            length += len(original)
            pos = match.end()
        out.append(text[pos:])
        return ChatPrompt("".join(out), tuple(spans))


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
            except RecursionError:
                raise InvalidRequestError(
                    f"{at}.function.arguments nests too deeply", param=f"{at}.function.arguments"
                ) from None
            except json.JSONDecodeError as exc:
                raise InvalidRequestError(
                    f"{at}.function.arguments is not valid JSON ({exc.msg} at char {exc.pos}); "
                    "send the arguments as a JSON object string",
                    param=f"{at}.function.arguments",
                ) from None
        out.append({**call, "function": {**function, "arguments": arguments}})
    return out
