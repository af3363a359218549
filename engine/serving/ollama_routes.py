"""Ollama's REST API beside OpenAI's (docs/serving.md "Ollama API"), close enough that an unmodified Ollama
client (the `ollama` Python package, Open WebUI, ...) lists, shows and chats with the served model.

    GET /, HEAD /        "Ollama is running" (what clients probe)
    GET /api/version     the Ollama release whose API these routes follow
    GET /api/tags        the served model as NAME:latest (production only)
    POST /api/show       its details, model_info, chat template, capabilities
    POST /api/generate   a prompt (the chat template applied unless raw), streamed as NDJSON by default
    POST /api/chat       messages (tools too), streamed as NDJSON by default
    GET /api/ps          what is loaded, in Ollama's shape (GET /ps has the whole picture)

Names: the served model name (RYZ_SERVED_MODEL_NAME) with or without `:latest`; those requests go to production
only, never through the canary router (a release judges the canary on the share the router gives it over /v1), and
the canary is neither listed nor addressable here. Model management (pull, push, create, copy, delete) belongs to
`ryz pull` and the registry: those routes answer with an Ollama-shaped error saying so. Errors on /api/ have
Ollama's shape, `{"error": "..."}` (engine/serving/protocol.py error_response).

Generation reuses the OpenAI routes' machinery (engine/serving/openai_routes.py): the same limits, stop strings,
grammars, submission all-or-none, abort on disconnect.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from engine.errors import InvalidRequestError
from engine.serving.client import EngineClient
from engine.serving.core import Delta, GenerationRequest
from engine.serving.openai_routes import (
    EngineStream,
    chat_prompt,
    check_lengths,
    client_gone,
    collect_or_abort,
    request_grammar,
    stop_strings,
    submit_all,
)
from engine.serving.protocol import VARIANT_HEADER, APIError, openapi_body, parse_body, read_json
from engine.serving.router import PRODUCTION
from engine.serving.sampling import OLLAMA_TEMPERATURE, OLLAMA_TOP_K, OLLAMA_TOP_P, Sample, SamplingParams
from engine.serving.tools import parse_tool_calls, validate_tools
from engine.serving.variants import ServingState, Variant

router = APIRouter()
logger = logging.getLogger("ryz.serve")

OLLAMA_API_VERSION = "0.12.0"  # the Ollama release whose API these routes follow (clients gate features on it)
NDJSON = "application/x-ndjson"
FOREVER = "9999-12-31T23:59:59Z"  # /api/ps expires_at: a served model stays until an admin replaces it
_ERROR_SCHEMA = {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}


class OllamaOptions(BaseModel):
    """The `options` of a request that mean something here; Ollama ignores (and logs) the others, so do we
    (num_ctx, num_thread, ...: the server's settings decide those)."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    num_predict: int | None = None
    stop: str | list[str] | None = None
    repeat_penalty: float | None = Field(None, ge=0.01, le=100)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None


class _GenerationBody(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str
    stream: bool = True
    format: str | dict | None = None
    options: dict | None = None
    keep_alive: float | str | None = None  # accepted and ignored: a served model stays loaded
    think: bool | str | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)


class GenerateBody(_GenerationBody):
    prompt: str | None = None
    suffix: str | None = None
    system: str | None = None
    template: str | None = None
    context: list[int] | None = None
    raw: bool | None = None
    images: list | None = None


class ChatBody(_GenerationBody):
    messages: list[dict] = Field(default_factory=list)
    tools: list[dict] | None = None


def _openapi(model: type[BaseModel]) -> dict:
    """The body model as the request body, errors in Ollama's shape."""
    extra = openapi_body(model)
    error = {"description": "Ollama's error shape", "content": {"application/json": {"schema": _ERROR_SCHEMA}}}
    extra["responses"] = {"4XX": error, "5XX": error}
    return extra


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _iso(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat().replace("+00:00", "Z")


def _tag(state: ServingState) -> str:
    return f"{state.settings.served_model_name}:latest"


def _not_found(model: object) -> APIError:
    return APIError(404, f"model '{model}' not found", code="model_not_found")


def _check_name(state: ServingState, model: object) -> None:
    """The served name, bare or with `:latest`; anything else (the canary, production's own id) is not found."""
    if not isinstance(model, str) or not model:
        raise APIError(400, "model is required", param="model")
    if model not in (state.settings.served_model_name, _tag(state)):
        raise _not_found(model)


def _production(state: ServingState, model: object) -> Variant:
    _check_name(state, model)
    production = state.variants.get(PRODUCTION)
    if production is None:
        raise _not_found(model)
    return production


def _parameter_size(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def _details(info: dict) -> dict:
    return {
        "parent_model": "",
        "format": "gguf",
        "family": info["architecture"],
        "families": [info["architecture"]],
        "parameter_size": _parameter_size(info["parameters"]),
        "quantization_level": info["weights_type"] or "",
    }


async def _info(client: EngineClient) -> dict:
    return await asyncio.to_thread(client.model_info)


def _modified_at(info: dict) -> str:
    try:
        return _iso(os.stat(info["path"]).st_mtime)
    except OSError:
        return _now()


# --- probes and listings ------------------------------------------------------------------------------------


@router.get("/", response_class=PlainTextResponse)
async def root():
    return PlainTextResponse("Ollama is running")


# Ollama clients probe with HEAD; one operation per method keeps the OpenAPI ids unique.
router.head("/", response_class=PlainTextResponse, include_in_schema=False)(root)


@router.get("/api/version")
async def version():
    return {"version": OLLAMA_API_VERSION}


@router.get("/api/tags")
async def tags(request: Request):
    state: ServingState = request.app.state.serving
    production = state.variants.get(PRODUCTION)
    if production is None:
        return {"models": []}
    info = await _info(production.client)
    name = _tag(state)
    return {
        "models": [
            {
                "name": name,
                "model": name,
                "modified_at": _modified_at(info),
                "size": info["size_bytes"],
                "digest": info["digest"],
                "details": _details(info),
            }
        ]
    }


class ShowBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    name: str | None = None  # older clients' field
    verbose: bool | None = None


@router.post("/api/show", openapi_extra=_openapi(ShowBody))
async def show(request: Request):
    state: ServingState = request.app.state.serving
    body = parse_body(ShowBody, await read_json(request))
    production = _production(state, body.model or body.name)
    info = await _info(production.client)
    arch = info["architecture"]
    model_info = {
        "general.architecture": arch,
        "general.name": info["name"] or "",
        "general.parameter_count": info["parameters"],
        f"{arch}.context_length": info["context_length"],
        f"{arch}.embedding_length": info["embedding_length"],
        f"{arch}.block_count": info["block_count"],
        f"{arch}.attention.head_count": info["head_count"],
        f"{arch}.attention.head_count_kv": info["head_count_kv"],
        f"{arch}.feed_forward_length": info["feed_forward_length"],
        f"{arch}.vocab_size": info["vocab_size"],
    }
    parameters = (
        f"temperature {OLLAMA_TEMPERATURE}\ntop_k {OLLAMA_TOP_K}\ntop_p {OLLAMA_TOP_P}\n"
        f"num_ctx {info['served_context']}"
    )
    return {
        "modelfile": f"# served by Ryzanstein ({production.ref})\nFROM {info['path']}\n{parameters}\n",
        "parameters": parameters,
        # a Jinja template (Hugging Face's), not a Go one: shown for reference, applied by the server
        "template": info["chat_template"] or "{{ .Prompt }}",
        "details": _details(info),
        "model_info": model_info,
        "capabilities": ["completion", "tools"] if info["chat_template"] else ["completion"],
        "modified_at": _modified_at(info),
    }


@router.get("/api/ps")
async def ps(request: Request):
    state: ServingState = request.app.state.serving
    production = state.variants.get(PRODUCTION)
    if production is None:
        return {"models": []}
    info = await _info(production.client)
    stats = production.client.stats()
    name = _tag(state)
    return {
        "models": [
            {
                "name": name,
                "model": name,
                "size": info["size_bytes"] + int(stats.get("kv_bytes", 0)),
                "digest": info["digest"],
                "details": _details(info),
                "expires_at": FOREVER,
                "size_vram": 0,
                "context_length": info["served_context"],
            }
        ]
    }


# --- model management: the registry's job --------------------------------------------------------------------


def _managed_elsewhere(what: str, instead: str) -> Callable:
    async def refuse():
        raise APIError(400, f"{what} is not available through this server's Ollama API: {instead}")

    return refuse


_REGISTRY = (
    "use `ryz pull REPO` on the server's host to fetch and register a model, and the registry (`ryz registry`, "
    "`ryz release`) to choose what is served"
)
for _path, _method, _what in (
    ("/api/pull", "POST", "pulling a model"),
    ("/api/push", "POST", "pushing a model"),
    ("/api/create", "POST", "creating a model"),
    ("/api/copy", "POST", "copying a model"),
    ("/api/delete", "DELETE", "deleting a model"),
    ("/api/blobs/{digest}", "POST", "uploading a blob"),
):
    router.add_api_route(_path, _managed_elsewhere(_what, _REGISTRY), methods=[_method], include_in_schema=True)
router.add_api_route(
    "/api/blobs/{digest}",
    _managed_elsewhere("uploading a blob", _REGISTRY),
    methods=["HEAD"],
    include_in_schema=False,
)
for _path in ("/api/embed", "/api/embeddings"):
    router.add_api_route(
        _path,
        _managed_elsewhere(
            "embedding with the chat model",
            "use POST /v1/embeddings with model all-MiniLM-L6-v2 (the server's embedder)",
        ),
        methods=["POST"],
    )


# --- generation -----------------------------------------------------------------------------------------------


def _sampling(options: OllamaOptions, body: _GenerationBody) -> SamplingParams:
    seed = options.seed if options.seed is not None and options.seed >= 0 else None  # Ollama: -1 = random
    params = SamplingParams(
        temperature=OLLAMA_TEMPERATURE if options.temperature is None else options.temperature,
        top_k=OLLAMA_TOP_K if options.top_k is None else max(0, options.top_k),  # <= 0 turns it off
        top_p=OLLAMA_TOP_P if options.top_p is None else options.top_p,
        min_p=options.min_p or 0.0,
        repetition_penalty=options.repeat_penalty or 1.0,
        frequency_penalty=options.frequency_penalty or 0.0,
        presence_penalty=options.presence_penalty or 0.0,
        seed=seed,
        logprobs=(body.top_logprobs or 0) if body.logprobs else None,
    )
    try:
        params.validate()
    except (InvalidRequestError, ValueError) as exc:
        raise APIError(400, f"options: {exc}", param="options") from None
    return params


def _response_format(fmt: str | dict | None) -> dict | None:
    """Ollama's `format`: "json" or a JSON schema, as the structured-output module's response_format."""
    if fmt is None or fmt == "":
        return None
    if fmt == "json":
        return {"type": "json_object"}
    if isinstance(fmt, dict):
        return {"type": "json_schema", "json_schema": {"name": "format", "schema": fmt}}
    raise APIError(400, f'invalid format {fmt!r}: give "json" or a JSON schema object', param="format")


def _refuse_unsupported(body: _GenerationBody) -> None:
    if body.think not in (None, False):
        raise APIError(400, f"{body.model!r} does not support thinking", param="think")


async def _parse(request: Request, body_type: type[_GenerationBody]) -> tuple[ServingState, Any, OllamaOptions]:
    state: ServingState = request.app.state.serving
    request.state.arrival = time.perf_counter()
    body = parse_body(body_type, await read_json(request))
    _check_name(state, body.model)
    options = parse_body(OllamaOptions, body.options or {})
    _refuse_unsupported(body)
    return state, body, options


def _route(state: ServingState, request: Request) -> Variant:
    """Production, claimed until submitted (a replacement cannot close it first); 503 while loading or draining."""
    variant = state.route(PRODUCTION, None)
    request.state.variant = variant.name
    return variant


def _logprobs(client: EngineClient, samples: list[Sample]) -> list[dict]:
    def entry(token_id: int, logprob: float) -> dict:
        return {"token": client.token_text(token_id), "logprob": logprob}

    return [{**entry(s.token, s.logprob), "top_logprobs": [entry(i, v) for i, v in s.top]} for s in samples]


class _Timings:
    """Ollama's durations (nanoseconds) of one request: total from arrival, `load` the preparation before the
    engine got it (rendering, tokenizing: the model is already loaded), prompt eval until the first token, eval
    from there."""

    def __init__(self, arrival: float):
        self.arrival = arrival
        self.submitted = self.first = self.end = arrival

    def final(self, last: Delta) -> dict:
        self.end = time.perf_counter()
        first = self.first if self.first > self.submitted else self.end

        def ns(seconds: float) -> int:
            return max(0, int(seconds * 1e9))

        return {
            "total_duration": ns(self.end - self.arrival),
            "load_duration": ns(self.submitted - self.arrival),
            "prompt_eval_count": last.prompt_tokens,
            "prompt_eval_duration": ns(first - self.submitted),
            "eval_count": last.completion_tokens,
            "eval_duration": ns(self.end - first),
        }


async def _answer(
    state: ServingState,
    variant: Variant,
    request: Request,
    engine_request: GenerationRequest,
    stream: bool,
    endpoint: str,
    timings: _Timings,
    chunk: Callable[[Delta], dict | None],
    final: Callable[[str, Delta, list[int], list[Sample]], dict],
) -> Response:
    """Submit and answer: NDJSON lines (`chunk` per delta, `final` last) or one JSON object (`final`)."""
    client = variant.client
    try:
        stream_of = submit_all(state, variant, [engine_request])[0]
    finally:
        state.unclaim(variant)
    timings.submitted = time.perf_counter()
    headers = {VARIANT_HEADER: variant.name}

    if stream:

        async def lines() -> AsyncIterator[str]:
            status = "200"
            text, ids, samples = [], [], []
            try:
                async for delta in stream_of:
                    if delta.token_ids and timings.first <= timings.submitted:
                        timings.first = time.perf_counter()
                    if delta.error:
                        status = "500"
                        yield json.dumps({"error": delta.error}) + "\n"
                        break
                    text.append(delta.text)
                    ids += delta.token_ids
                    samples += delta.logprobs
                    if not delta.done and (line := chunk(delta)) is not None:
                        yield json.dumps(line, ensure_ascii=False) + "\n"
                    if delta.done:
                        if (line := chunk(delta)) is not None:
                            yield json.dumps(line, ensure_ascii=False) + "\n"
                        yield json.dumps(final("".join(text), delta, ids, samples), ensure_ascii=False) + "\n"
            except (asyncio.CancelledError, GeneratorExit):  # the client disconnected
                status = "499"
                raise
            except Exception as exc:  # noqa: BLE001 - a bug mid-stream: an error line, logged and counted
                status = "500"
                logger.error("ryz serve: an Ollama stream failed", exc_info=exc)
                yield json.dumps({"error": f"internal error: {type(exc).__name__}"}) + "\n"
            finally:
                state.metrics.requests.labels(variant.name, endpoint, status).inc()

        return EngineStream(lines(), client, [engine_request], headers, media_type=NDJSON)

    async def first_token_watch() -> AsyncIterator[Delta]:
        async for delta in stream_of:
            if delta.token_ids and timings.first <= timings.submitted:
                timings.first = time.perf_counter()
            yield delta

    collected = await collect_or_abort(request, client, [engine_request], [first_token_watch()])
    if collected is None:
        return client_gone(state, variant, endpoint)
    text, samples, last, ids = collected[0]
    state.metrics.requests.labels(variant.name, endpoint, "200").inc()
    return JSONResponse(final(text, last, ids, samples), headers=headers)


def _engine_request(
    state: ServingState,
    client: EngineClient,
    prompt_ids: list[int],
    options: OllamaOptions,
    body: _GenerationBody,
    grammar,
    arrival: float,
) -> GenerationRequest:
    params = _sampling(options, body)
    stops = stop_strings(state, options.stop)
    num_predict = options.num_predict
    max_tokens = check_lengths(
        state, prompt_ids, None if num_predict is None or num_predict < 0 else num_predict, client.vocab
    )
    return GenerationRequest(prompt_ids, params, max_tokens, stops, grammar=grammar, arrival=arrival)


@router.post("/api/generate", openapi_extra=_openapi(GenerateBody))
async def generate(request: Request):
    state, body, options = await _parse(request, GenerateBody)
    if body.suffix:
        raise APIError(400, "suffix (fill in the middle) is not supported: send the whole prompt", param="suffix")
    if body.images:
        raise APIError(400, "images are not supported: the served model reads text only", param="images")
    if body.template:
        raise APIError(
            400,
            "template is not supported: the model's own chat template applies (or raw: true for none)",
            param="template",
        )
    variant = _route(state, request)
    claimed = True
    try:
        client = variant.client
        if not body.prompt and not body.context:  # Ollama's "load the model" request: it is loaded
            return JSONResponse(
                {"model": body.model, "created_at": _now(), "response": "", "done": True, "done_reason": "load"},
                headers={VARIANT_HEADER: variant.name},
            )
        info = await _info(client)
        prompt = body.prompt or ""
        try:
            if body.raw or not info["chat_template"]:
                ids = await asyncio.to_thread(client.tokenize, prompt, bool(not body.context))
            else:
                messages = ([{"role": "system", "content": body.system}] if body.system else []) + [
                    {"role": "user", "content": prompt}
                ]
                ids = await asyncio.to_thread(chat_prompt, client, messages, None, "none")
        except (InvalidRequestError, ValueError) as exc:
            raise APIError(400, str(exc), param="prompt") from None
        prompt_ids = [*(body.context or []), *ids]
        grammar = await request_grammar(client, _response_format(body.format))
        engine_request = _engine_request(state, client, prompt_ids, options, body, grammar, request.state.arrival)
        timings = _Timings(request.state.arrival)
        want_logprobs = bool(body.logprobs)

        def chunk(delta: Delta) -> dict | None:
            if not delta.text and not delta.logprobs:
                return None
            line = {"model": body.model, "created_at": _now(), "response": delta.text, "done": False}
            if want_logprobs:
                line["logprobs"] = _logprobs(client, delta.logprobs)
            return line

        def final(text: str, last: Delta, ids: list[int], samples: list[Sample]) -> dict:
            out = {
                "model": body.model,
                "created_at": _now(),
                "response": "" if body.stream else text,
                "done": True,
                "done_reason": last.finish_reason,
                "context": [*prompt_ids, *ids],
                **timings.final(last),
            }
            if want_logprobs and not body.stream:
                out["logprobs"] = _logprobs(client, samples)
            return out

        claimed = False  # _answer unclaims once submitted
        return await _answer(
            state, variant, request, engine_request, body.stream, "ollama_generate", timings, chunk, final
        )
    finally:
        if claimed:
            state.unclaim(variant)


def _openai_messages(messages: list[dict]) -> list[dict]:
    """Ollama's chat messages as OpenAI's (what the template renderer validates): tool calls with their arguments
    as JSON text and an id; a tool result naming its tool."""
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise APIError(400, f"messages[{i}] must be an object with role and content", param="messages")
        if message.get("images"):
            raise APIError(400, "images are not supported: the served model reads text only", param="messages")
        converted = {k: v for k, v in message.items() if k in ("role", "content")}
        if calls := message.get("tool_calls"):
            if not isinstance(calls, list):
                raise APIError(400, f"messages[{i}].tool_calls must be a list", param="messages")
            converted["tool_calls"] = [
                {
                    "id": f"call_{i}_{j}",
                    "type": "function",
                    "function": {
                        "name": (call.get("function") or {}).get("name"),
                        "arguments": json.dumps((call.get("function") or {}).get("arguments") or {}),
                    },
                }
                for j, call in enumerate(calls)
                if isinstance(call, dict)
            ]
        if message.get("role") == "tool":
            name = message.get("tool_name") or message.get("name") or "tool"
            converted.update(tool_call_id=str(name), name=str(name))
        out.append(converted)
    return out


def _ollama_calls(calls: list[dict]) -> list[dict]:
    return [
        {"function": {"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"] or "{}")}}
        for c in calls
    ]


@router.post("/api/chat", openapi_extra=_openapi(ChatBody))
async def chat(request: Request):
    state, body, options = await _parse(request, ChatBody)
    if not body.messages:  # Ollama's "load the model" request
        variant = _route(state, request)
        state.unclaim(variant)
        return JSONResponse(
            {
                "model": body.model,
                "created_at": _now(),
                "message": {"role": "assistant", "content": ""},
                "done": True,
                "done_reason": "load",
            },
            headers={VARIANT_HEADER: variant.name},
        )
    messages = _openai_messages(body.messages)
    tools = body.tools or None
    if tools:
        try:
            validate_tools(tools, "auto")
        except (InvalidRequestError, ValueError) as exc:
            raise APIError(400, str(exc), param="tools") from None
    variant = _route(state, request)
    claimed = True
    try:
        client = variant.client
        try:
            prompt_ids = await asyncio.to_thread(chat_prompt, client, messages, tools, "auto" if tools else "none")
        except (InvalidRequestError, ValueError) as exc:
            raise APIError(400, str(exc), param=getattr(exc, "param", None) or "messages") from None
        grammar = await request_grammar(client, _response_format(body.format))
        if tools:
            if grammar is not None:
                raise APIError(400, "format and tools cannot be combined", param="format")
            grammar = await request_grammar(client, None, tools, "auto")
        engine_request = _engine_request(state, client, prompt_ids, options, body, grammar, request.state.arrival)
        timings = _Timings(request.state.arrival)
        want_logprobs = bool(body.logprobs)

        def chunk(delta: Delta) -> dict | None:
            if tools or (not delta.text and not delta.logprobs):  # tool calls are parsed from the whole text
                return None
            line = {
                "model": body.model,
                "created_at": _now(),
                "message": {"role": "assistant", "content": delta.text},
                "done": False,
            }
            if want_logprobs:
                line["logprobs"] = _logprobs(client, delta.logprobs)
            return line

        def final(text: str, last: Delta, ids: list[int], samples: list[Sample]) -> dict:
            message: dict[str, Any] = {"role": "assistant", "content": "" if body.stream and not tools else text}
            if tools and (calls := parse_tool_calls(text, tools)):
                message = {"role": "assistant", "content": "", "tool_calls": _ollama_calls(calls)}
            out = {
                "model": body.model,
                "created_at": _now(),
                "message": message,
                "done": True,
                "done_reason": last.finish_reason,
                **timings.final(last),
            }
            if want_logprobs and not body.stream:
                out["logprobs"] = _logprobs(client, samples)
            return out

        claimed = False  # _answer unclaims once submitted
        return await _answer(state, variant, request, engine_request, body.stream, "ollama_chat", timings, chunk, final)
    finally:
        if claimed:
            state.unclaim(variant)
