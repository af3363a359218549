"""The OpenAI routes: /v1/completions, /v1/chat/completions, /v1/models.

Each request is routed to a variant (engine/serving/variants.py), validated into `GenerationRequest`s through
the variant's `EngineClient` (tokenize, render, grammar: on a worker thread, so a long prompt or a hard schema
never stalls the event loop), submitted, and answered whole or as server-sent events in OpenAI's shapes. Every
response names its variant in the `X-Ryz-Variant` header and every metric is labelled by it.

Nothing of a request runs on without a client: a client that disconnects aborts its engine requests, streaming or
not (the client protocol's `abort`), and a request refused at submit (429) aborts what it had submitted already.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, cast

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from engine.errors import InvalidRequestError
from engine.serving.chat import validate_messages
from engine.serving.client import EngineClient
from engine.serving.core import Delta, GenerationRequest, QueueFullError
from engine.serving.protocol import (
    VARIANT_HEADER,
    APIError,
    ChatBody,
    CompletionBody,
    SamplingBody,
    error_body,
    error_response,
    openapi_body,
    parse_body,
    read_json,
    sse,
    usage,
)
from engine.serving.retrieval_routes import add_retrieved_context
from engine.serving.sampling import SamplingParams
from engine.serving.speculative import SpecConfig, parse_spec, spec_from_settings
from engine.serving.tools import parse_tool_calls, validate_tools
from engine.serving.variants import ServingState, Variant

router = APIRouter()
logger = logging.getLogger("ryz.serve")


@router.get("/v1/models")
async def models(request: Request):
    state: ServingState = request.app.state.serving
    created = int(min((v.loaded_at for v in state.variants.values()), default=time.time()))
    ids = state.model_names()
    return {
        "object": "list",
        "data": [
            {"id": i, "object": "model", "created": created, "owned_by": "ryzanstein"} for i in dict.fromkeys(ids)
        ],
    }


@router.post("/v1/completions", openapi_extra=openapi_body(CompletionBody))
async def completions(request: Request):
    state, body, variant = await _routed(request, CompletionBody)
    try:
        return await run_completion(state, variant, body, request.state.arrival, request)
    finally:  # submitted (or failed): the variant may close once its engine is idle
        state.unclaim(variant)


@router.post("/v1/chat/completions", openapi_extra=openapi_body(ChatBody))
async def chat(request: Request):
    state, body, variant = await _routed(request, ChatBody)
    try:
        citations = await add_retrieved_context(state, body) if body.retrieval else None
        return await run_chat(state, variant, body, request.state.arrival, citations, request)
    finally:  # submitted (or failed): the variant may close once its engine is idle
        state.unclaim(variant)


async def _routed(request: Request, body_type: type[SamplingBody]) -> tuple[ServingState, Any, Variant]:
    state: ServingState = request.app.state.serving
    request.state.arrival = time.perf_counter()
    body = parse_body(body_type, await read_json(request))
    variant = state.route(body.model, request.headers.get("x-session-id") or body.user)
    request.state.variant = variant.name
    try:
        await _inject_faults(state.faults, variant.name)
    except BaseException:
        state.unclaim(variant)
        raise
    return state, body, variant


async def _inject_faults(faults: dict, variant: str) -> None:
    """Release drills: make a variant slow or failing on purpose (RYZ_FAULT_CANARY_*, POST /admin/faults; off by
    default)."""
    if delay := faults.get(f"{variant}_latency_ms"):
        await asyncio.sleep(delay / 1000)
    if (rate := faults.get(f"{variant}_error_rate")) and random.random() < rate:
        raise APIError(500, f"injected {variant} fault (POST /admin/faults)", "server_error", code="injected_fault")


def _sampling(body: SamplingBody, logprobs: int | None) -> SamplingParams:
    if body.n != 1:
        raise APIError(400, f"n={body.n} is not supported: send n separate requests", param="n")
    if body.logit_bias:
        raise APIError(400, "logit_bias is not supported", param="logit_bias")
    params = SamplingParams(
        temperature=body.temperature,
        top_k=body.top_k,
        top_p=body.top_p,
        min_p=body.min_p,
        repetition_penalty=body.repetition_penalty,
        frequency_penalty=body.frequency_penalty,
        presence_penalty=body.presence_penalty,
        seed=body.seed,
        logprobs=logprobs,
    )
    try:
        params.validate()
    except (InvalidRequestError, ValueError) as exc:
        raise APIError(400, str(exc), param=getattr(exc, "param", None)) from None
    return params


def _generation_request(
    body: SamplingBody,
    prompt_ids: list[int],
    params: SamplingParams,
    max_tokens: int,
    grammar,
    arrival: float,
    stops: list[str],
    prompt_logprobs: int | None = None,
    speculative: SpecConfig | None = None,
) -> GenerationRequest:
    """A request for the engine from a validated body: its stops (checked by `stop_strings`), stop ids, eos."""
    return GenerationRequest(
        prompt_ids,
        params,
        max_tokens,
        stops,
        set(body.stop_token_ids or []),
        body.ignore_eos,
        grammar,
        prompt_logprobs,
        arrival=arrival,
        speculative=speculative,
    )


def _speculative(state: ServingState, body: SamplingBody) -> SpecConfig | None:
    """The body's `speculative` field checked; None: the engine's default (RYZ_SPECULATIVE)."""
    if body.speculative is None:
        return None
    try:
        config = parse_spec(body.speculative, spec_from_settings(state.settings))
    except InvalidRequestError as exc:
        raise APIError(400, str(exc), param="speculative") from None
    if config.method == "draft" and not state.settings.spec_draft_model:
        raise APIError(
            400,
            "speculative method 'draft' needs a draft model, and this server has none (RYZ_SPEC_DRAFT_MODEL)",
            param="speculative",
        )
    return config


def _spec_field(delta: Delta) -> dict:
    """A choice's `speculative` extension: what speculation did for it (only for requests that asked for it)."""
    return {"speculative": delta.speculative} if delta.speculative is not None else {}


def stop_strings(state: ServingState, stop) -> list[str]:
    """The request's stop strings, within RYZ_MAX_STOPS and RYZ_MAX_STOP_CHARS."""
    s = state.settings
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > s.max_stops or any(not x for x in stops):
        raise APIError(400, f"stop takes up to {s.max_stops} non-empty strings (RYZ_MAX_STOPS)", param="stop")
    if (longest := max((len(x) for x in stops), default=0)) > s.max_stop_chars:
        raise APIError(
            400,
            f"a stop string of {longest} characters exceeds this server's limit of {s.max_stop_chars} "
            "(RYZ_MAX_STOP_CHARS)",
            param="stop",
        )
    return stops


def check_lengths(state: ServingState, prompt_ids: list[int], max_tokens: int | None, vocab: int) -> int:
    s = state.settings
    if not prompt_ids:
        raise APIError(400, "the prompt is empty", param="prompt")
    if any(not isinstance(t, int) or t < 0 or t >= vocab for t in prompt_ids):
        raise APIError(400, f"prompt token ids must be integers in [0, {vocab})", param="prompt")
    if len(prompt_ids) >= s.max_context:
        raise APIError(
            400,
            f"the prompt has {len(prompt_ids)} tokens; this server's context is {s.max_context} "
            f"(RYZ_MAX_CONTEXT) including the reply",
            param="messages",
            code="context_length_exceeded",
        )
    if max_tokens is None:
        return min(s.max_tokens_limit, s.max_context - len(prompt_ids))
    if max_tokens > s.max_tokens_limit:
        raise APIError(
            400,
            f"max_tokens={max_tokens} exceeds this server's limit of {s.max_tokens_limit} (RYZ_MAX_TOKENS_LIMIT)",
            param="max_tokens",
        )
    return max_tokens


def submit_all(state: ServingState, variant: Variant, requests: list[GenerationRequest]) -> list[AsyncIterator[Delta]]:
    """Submit a request's engine requests, all or none: a batch that does not fit the queue (RYZ_MAX_QUEUE, with
    the free slots) is refused before anything is submitted, and if the queue fills midway (other requests
    raced it) the ones already submitted are aborted before the 429 goes out, so nothing of it runs on."""
    client = variant.client
    stats = client.stats()
    free = max(0, stats.get("slots", 0) - stats.get("running", 0))
    if len(requests) > 1 and stats.get("waiting", 0) + len(requests) > state.settings.max_queue + free:
        raise _queue_full()
    streams: list[AsyncIterator[Delta]] = []
    try:
        for r in requests:
            streams.append(client.submit(r))
    except BaseException as exc:
        _abort(client, requests[: len(streams)])
        if isinstance(exc, QueueFullError):
            raise _queue_full() from None
        raise
    return streams


def _queue_full() -> APIError:
    return APIError(
        429,
        "the server is at capacity: all sequence slots are busy and the queue is full; retry later",
        "rate_limit_error",
        code="queue_full",
        headers={"Retry-After": "1"},
    )


def _abort(client: EngineClient, requests: list[GenerationRequest]) -> None:
    """Abort engine requests (a no-op for those already finished)."""
    for r in requests:
        client.abort(r.request_id)


async def collect_or_abort(
    request: Request, client: EngineClient, requests: list[GenerationRequest], streams: list[AsyncIterator[Delta]]
) -> list[tuple[str, list, Delta, list[int]]] | None:
    """Every stream collected, or None when the client disconnected first: then its engine requests are aborted
    (they would otherwise run to max_tokens for nobody). Any failure aborts them too."""
    collecting = asyncio.create_task(_collect_all(streams))
    disconnect = asyncio.create_task(_disconnected(request))
    try:
        await asyncio.wait({collecting, disconnect}, return_when=asyncio.FIRST_COMPLETED)
        return collecting.result() if collecting.done() else None
    finally:
        for task in (collecting, disconnect):
            task.cancel()
        _abort(client, requests)


async def _collect_all(streams: list[AsyncIterator[Delta]]) -> list[tuple[str, list, Delta, list[int]]]:
    return await asyncio.gather(*(_collect(s) for s in streams))


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (the body is read by now: the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def client_gone(state: ServingState, variant: Variant, endpoint: str) -> Response:
    """What a non-streaming request that lost its client answers (nobody reads it): counted as 499, a client error
    (nginx's "client closed request"), not as an answer."""
    state.metrics.requests.labels(variant.name, endpoint, "499").inc()
    state.metrics.errors.labels(variant.name, "client_disconnected").inc()
    return error_response(APIError(499, "the client disconnected", code="client_disconnected"))


class EngineStream(StreamingResponse):
    """Server-sent events over engine requests: whatever ends the response (its last event, the client's
    disconnect, even before the first event, an error), the requests still in flight are aborted."""

    def __init__(
        self,
        content,
        client: EngineClient,
        requests: list[GenerationRequest],
        headers: dict,
        media_type: str = "text/event-stream",
    ):
        super().__init__(content, media_type=media_type, headers=headers)
        self._client, self._requests = client, requests

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            _abort(self._client, self._requests)


def _stream_failed(exc: Exception) -> str:
    """The event that ends a stream a bug broke: OpenAI's error shape, as for an engine error (logged here)."""
    logger.error("ryz serve: a stream failed", exc_info=exc)
    return sse(error_body(f"internal error: {type(exc).__name__}", "server_error", code="internal_error"))


async def _collect(stream: AsyncIterator[Delta]) -> tuple[str, list, Delta, list[int]]:
    text, samples, ids, last = [], [], [], Delta()
    async for delta in stream:
        text.append(delta.text)
        samples += delta.logprobs
        ids += delta.token_ids
        last = delta
    if last.error:
        raise APIError(500, last.error, "server_error", code="engine_error")
    return "".join(text), samples, last, ids


async def run_completion(
    state: ServingState, variant: Variant, body: CompletionBody, arrival: float, request: Request | None = None
):
    client = variant.client
    if body.suffix:
        raise APIError(400, "suffix is not supported", param="suffix")
    if body.best_of not in (None, 1):
        raise APIError(400, "best_of > 1 is not supported", param="best_of")
    if body.logprobs is not None and not 0 <= body.logprobs <= 20:
        raise APIError(400, f"logprobs must be 0-20, got {body.logprobs}", param="logprobs")
    # one prompt (text or token ids) or a batch of them; pydantic made a list starting with an int all ints
    prompts: list[str] | list[list[int]]
    if isinstance(body.prompt, str):
        prompts = [body.prompt]
    elif body.prompt and isinstance(body.prompt[0], int):
        prompts = [body.prompt]
    else:
        prompts = cast("list[str] | list[list[int]]", body.prompt)  # a batch of texts or of token-id lists
    if not prompts:
        raise APIError(400, "the prompt is empty", param="prompt")
    if len(prompts) > state.settings.max_prompts:
        raise APIError(
            400,
            f"{len(prompts)} prompts in one request exceed this server's limit of {state.settings.max_prompts} "
            "(RYZ_MAX_PROMPTS): send them in several requests",
            param="prompt",
        )
    if body.stream and len(prompts) > 1:
        raise APIError(400, "streaming takes one prompt per request", param="prompt")
    if any(not p for p in prompts):
        raise APIError(400, "the prompt is empty", param="prompt")
    params = _sampling(body, body.logprobs)
    stops = stop_strings(state, body.stop)
    spec = _speculative(state, body)
    grammar = await request_grammar(client, body.response_format)
    texts = [p for p in prompts if isinstance(p, str)]
    encoded = iter(await asyncio.to_thread(lambda: [client.tokenize(t) for t in texts]) if texts else [])
    requests, prompt_ids_all = [], []
    for p in prompts:
        ids = next(encoded) if isinstance(p, str) else list(p)
        max_tokens = check_lengths(state, ids, body.max_tokens, client.vocab)
        prompt_ids_all.append(ids)
        echo_logprobs = body.logprobs if body.echo and body.logprobs is not None else (0 if body.echo else None)
        requests.append(
            _generation_request(body, ids, params, max_tokens, grammar, arrival, stops, echo_logprobs, spec)
        )
    streams = submit_all(state, variant, requests)
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    headers = {VARIANT_HEADER: variant.name}
    endpoint = "completions"

    if body.stream:
        include_usage = bool((body.stream_options or {}).get("include_usage"))

        async def events():
            status = "200"
            try:
                prompt_text = (
                    (prompts[0] if isinstance(prompts[0], str) else client.detokenize(prompt_ids_all[0]))
                    if body.echo
                    else ""
                )
                first = True
                async for delta in streams[0]:
                    if delta.error:
                        status = "500"
                        yield sse(error_body(delta.error, "server_error", code="engine_error"))
                        break
                    text = (prompt_text if first else "") + delta.text
                    first = False
                    choice = {
                        "index": 0,
                        "text": text,
                        "finish_reason": delta.finish_reason,
                        "logprobs": _completion_logprobs(client, delta, [], False, 0)
                        if body.logprobs is not None
                        else None,
                        **_spec_field(delta),
                    }
                    if text or delta.finish_reason or delta.token_ids:
                        yield sse(_envelope(rid, "text_completion", created, body.model, choices=[choice]))
                    if delta.done and include_usage:
                        yield _usage_event(rid, "text_completion", created, body.model, delta)
                yield sse("[DONE]")
            except (asyncio.CancelledError, GeneratorExit):  # the client disconnected
                status = "499"
                raise
            except Exception as exc:  # noqa: BLE001 - a bug mid-stream: an error event, logged and counted
                status = "500"
                yield _stream_failed(exc)
            finally:
                state.metrics.requests.labels(variant.name, endpoint, status).inc()

        return EngineStream(events(), client, requests, headers)

    results = (
        await collect_or_abort(request, client, requests, streams)
        if request is not None
        else await asyncio.gather(*(_collect(s) for s in streams))
    )
    if results is None:
        return client_gone(state, variant, endpoint)
    choices, prompt_total, completion_total = [], 0, 0
    for i, (text, samples, last, _ids) in enumerate(results):
        prompt_text = ""
        if body.echo:
            prompt = prompts[i]
            prompt_text = prompt if isinstance(prompt, str) else client.detokenize(prompt_ids_all[i])
        logprobs = None
        if body.logprobs is not None:
            logprobs = _completion_logprobs(client, last, samples, body.echo, 0, prompt_ids_all[i])
        choices.append(
            {
                "index": i,
                "text": prompt_text + text,
                "logprobs": logprobs,
                "finish_reason": last.finish_reason,
                **_spec_field(last),
            }
        )
        prompt_total += last.prompt_tokens
        completion_total += last.completion_tokens
    state.metrics.requests.labels(variant.name, endpoint, "200").inc()
    return JSONResponse(
        _envelope(
            rid, "text_completion", created, body.model, choices=choices, usage=usage(prompt_total, completion_total)
        ),
        headers=headers,
    )


def _completion_logprobs(
    client: EngineClient, last: Delta, samples: list, echo: bool, offset: int, prompt_ids: list[int] | None = None
) -> dict:
    """OpenAI legacy completions logprobs: tokens, token_logprobs, top_logprobs, text_offset."""
    tokens, token_lps, tops, offsets = [], [], [], []
    pos = offset

    def add(token_id: int, lp, top):
        nonlocal pos
        text = client.token_text(token_id)
        tokens.append(text)
        token_lps.append(lp)
        # distinct ids can share a text (partial UTF-8): keep the best, as the list is sorted best first
        tops.append(None if top is None else {t: v for i, v in reversed(top) for t in [client.token_text(i)]})
        offsets.append(pos)
        pos += len(text)

    if echo and prompt_ids is not None and last.prompt_logprobs is not None:
        for token_id, entry in zip(prompt_ids, last.prompt_logprobs):
            add(token_id, None if entry is None else entry[0], None if entry is None else entry[1])
    if not samples:
        samples = last.logprobs
    for s in samples:
        add(s.token, s.logprob, s.top)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def _chat_logprobs(client: EngineClient, samples: list) -> dict:
    def entry(token_id: int, lp: float) -> dict:
        text = client.token_text(token_id)
        return {"token": text, "logprob": lp, "bytes": list(text.encode())}

    return {
        "content": [{**entry(s.token, s.logprob), "top_logprobs": [entry(i, v) for i, v in s.top]} for s in samples]
    }


def _envelope(rid: str, object_: str, created: int, model: str, **fields: Any) -> dict:
    """The fields every OpenAI completion object and chunk starts with, then its own."""
    return {"id": rid, "object": object_, "created": created, "model": model, **fields}


def _usage_event(rid: str, object_: str, created: int, model: str, last: Delta) -> str:
    """The stream's closing usage chunk (stream_options.include_usage): no choices, the request's token counts."""
    return sse(
        _envelope(rid, object_, created, model, choices=[], usage=usage(last.prompt_tokens, last.completion_tokens))
    )


async def request_grammar(client: EngineClient, response_format: dict | None = None, tools=None, tool_choice=None):
    """The request's grammar, compiled on a worker thread (a crafted schema must not stall the event loop)."""
    plain = response_format is None or (
        isinstance(response_format, dict) and response_format.get("type") in (None, "text")
    )
    if not tools and plain:
        return None  # nothing to compile: no thread hop for the common request
    try:
        return await asyncio.to_thread(client.grammar, response_format, tools, tool_choice)
    except (InvalidRequestError, ValueError) as exc:
        raise APIError(400, str(exc), param="tools" if tools else "response_format") from None


def chat_prompt(client: EngineClient, messages, tools, tool_choice) -> list[int]:
    """Validate and render a chat (run on a worker thread: templates and tokenizing take time on long chats)."""
    valid = validate_messages(messages)
    if tools:
        validate_tools(tools, tool_choice)
    return client.render_chat(valid, tools)


async def run_chat(
    state: ServingState,
    variant: Variant,
    body: ChatBody,
    arrival: float,
    citations: list | None = None,
    http: Request | None = None,
):
    client = variant.client
    if body.top_logprobs is not None and not (body.logprobs and 0 <= body.top_logprobs <= 20):
        raise APIError(400, "top_logprobs needs logprobs=true and a value 0-20", param="top_logprobs")
    params = _sampling(body, (body.top_logprobs or 0) if body.logprobs else None)
    stops = stop_strings(state, body.stop)
    spec = _speculative(state, body)
    tools = body.tools or None
    tool_choice = body.tool_choice if body.tool_choice is not None else ("auto" if tools else "none")
    try:
        prompt_ids = await asyncio.to_thread(chat_prompt, client, body.messages, tools, tool_choice)
    except (InvalidRequestError, ValueError) as exc:
        raise APIError(400, str(exc), param=getattr(exc, "param", None) or "messages") from None
    grammar = await request_grammar(client, body.response_format)
    if tools and tool_choice != "none":
        if grammar is not None:
            raise APIError(400, "response_format and forced tool calls cannot be combined", param="tool_choice")
        grammar = await request_grammar(client, None, tools, tool_choice)
    max_tokens = check_lengths(state, prompt_ids, body.max_completion_tokens or body.max_tokens, client.vocab)
    request = _generation_request(body, prompt_ids, params, max_tokens, grammar, arrival, stops, None, spec)
    stream = submit_all(state, variant, [request])[0]
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    headers = {VARIANT_HEADER: variant.name}
    endpoint = "chat"
    buffer_for_tools = bool(tools) and tool_choice != "none"

    def chunk(
        delta: dict,
        finish: str | None = None,
        logprobs: dict | None = None,
        extra: dict | None = None,
        choice_extra: dict | None = None,
    ) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish, **(choice_extra or {})}
        return sse(_envelope(rid, "chat.completion.chunk", created, body.model, choices=[choice], **(extra or {})))

    if body.stream:
        include_usage = bool((body.stream_options or {}).get("include_usage"))

        async def events():
            status = "200"
            try:
                yield chunk(
                    {"role": "assistant", "content": ""},
                    extra={"citations": citations} if citations is not None else None,
                )
                held = []
                async for delta in stream:
                    if delta.error:
                        status = "500"
                        yield sse(error_body(delta.error, "server_error", code="engine_error"))
                        break
                    lp = _chat_logprobs(client, delta.logprobs) if body.logprobs and delta.logprobs else None
                    if buffer_for_tools:
                        held.append(delta.text)
                    elif delta.text or lp:
                        yield chunk({"content": delta.text}, None, lp)
                    if delta.done:
                        finish = delta.finish_reason
                        if buffer_for_tools:
                            calls = parse_tool_calls("".join(held), tools)
                            if calls:
                                finish = "tool_calls"
                                yield chunk({"tool_calls": [{"index": i, **c} for i, c in enumerate(calls)]})
                            else:
                                yield chunk({"content": "".join(held)})
                        yield chunk({}, finish, choice_extra=_spec_field(delta))
                        if include_usage:
                            yield _usage_event(rid, "chat.completion.chunk", created, body.model, delta)
                yield sse("[DONE]")
            except (asyncio.CancelledError, GeneratorExit):  # the client disconnected
                status = "499"
                raise
            except Exception as exc:  # noqa: BLE001 - a bug mid-stream: an error event, logged and counted
                status = "500"
                yield _stream_failed(exc)
            finally:
                state.metrics.requests.labels(variant.name, endpoint, status).inc()

        return EngineStream(events(), client, [request], headers)

    collected = (
        await collect_or_abort(http, client, [request], [stream]) if http is not None else [await _collect(stream)]
    )
    if collected is None:
        return client_gone(state, variant, endpoint)
    text, samples, last, _ids = collected[0]
    message: dict[str, Any] = {"role": "assistant", "content": text}
    finish = last.finish_reason
    if buffer_for_tools and (calls := parse_tool_calls(text, tools)):
        message = {"role": "assistant", "content": None, "tool_calls": calls}
        finish = "tool_calls"
    state.metrics.requests.labels(variant.name, endpoint, "200").inc()
    return JSONResponse(
        _envelope(
            rid,
            "chat.completion",
            created,
            body.model,
            choices=[
                {
                    "index": 0,
                    "message": message,
                    "finish_reason": finish,
                    "logprobs": _chat_logprobs(client, samples) if body.logprobs else None,
                    **_spec_field(last),
                }
            ],
            usage=usage(last.prompt_tokens, last.completion_tokens),
            **({"citations": citations} if citations is not None else {}),
        ),
        headers=headers,
    )
