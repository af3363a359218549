"""The OpenAI-compatible HTTP server: completions, chat, models, health, metrics, canary admin.

The app sees engines only through `EngineClient` (engine/serving/core.py). It holds up to two variants,
`production` and `canary`, and the `CanaryRouter` splits the served model name's traffic between
them; every response names its variant in the `X-Ryz-Variant` header and every metric is labelled by
it. Admin routes (load, unload, weights, promote, drain) need `RYZ_ADMIN_TOKEN` as a bearer token and
change variants without dropping requests in flight: a replaced engine finishes what it started, then
closes. Errors use OpenAI's JSON shape: {"error": {"message", "type", "param", "code"}}.

Retrieval (engine/retrieval/search.py, loaded on first use): `/v1/embeddings`, `/v1/retrieve` and chat's `retrieval`
extension search the registry's production index; chat then answers with the chunks in its system message and
returns them as `citations`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from engine.artifacts.refs import resolve_model
from engine.artifacts.store import open_store
from engine.errors import InvalidRequestError, ModelReferenceError, RyzError
from engine.model.loader import open_model
from engine.model.tokenizer import ModelTokenizer
from engine.retrieval.search import MAX_TOP_K, Retriever, format_context
from engine.serving.core import AsyncEngine, Delta, EngineCore, GenerationRequest
from engine.serving.metrics import CONTENT_TYPE_LATEST, ServerMetrics
from engine.serving.router import CANARY, PRODUCTION, CanaryRouter
from engine.serving.sampling import SamplingParams
from engine.serving.scheduler import QueueFullError, SchedulerConfig
from engine.settings import Settings, get_settings

VARIANT_HEADER = "X-Ryz-Variant"


# -- errors ---------------------------------------------------------------------------------------------
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


def _error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(
        error_body(exc.message, exc.type, exc.param, exc.code), status_code=exc.status, headers=exc.headers
    )


# -- request bodies ---------------------------------------------------------------------------------------
class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=0)
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stream: bool = False
    stream_options: dict | None = None
    stop: str | list[str] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    user: str | None = None
    logit_bias: dict | None = None
    response_format: dict | None = None
    # extensions (vLLM / llama.cpp names)
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None


class CompletionBody(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None


class ChatBody(_Common):
    messages: list[dict]
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None
    retrieval: bool | dict | None = (
        None  # extension: {"top_k": 4, "index": REF} adds retrieved chunks (docs/serving.md)
    )


class EmbeddingsBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

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


# -- variants -------------------------------------------------------------------------------------------
@dataclass
class LoadedModel:
    """What a loader returns: a model with the native forward_batch interface and its tokenizer."""

    model: Any
    tokenizer: Any
    model_id: str


@dataclass
class Variant:
    name: str
    ref: str
    loaded: LoadedModel
    core: EngineCore
    engine: AsyncEngine
    loaded_at: float = field(default_factory=time.time)
    _grammars: Any = None

    @property
    def model_id(self) -> str:
        return self.loaded.model_id

    def grammar_compiler(self):
        if self._grammars is None:
            from engine.serving.structured import GrammarCompiler

            tok = self.loaded.tokenizer
            self._grammars = GrammarCompiler(tok.tokenizer, self.loaded.model.hp.vocab, set(tok.stop_ids))
        return self._grammars


def load_model(ref: str, settings: Settings, library=None) -> LoadedModel:
    """Resolve a model reference once and open it for serving (engine.model.loader.open_model: threads, tuned
    tile, KV slots within RYZ_KV_BUDGET_MB)."""
    path = resolve_model(ref, open_store(settings.store_url, settings=settings))
    model = open_model(path, "serve", settings=settings, library=library)
    return LoadedModel(model, ModelTokenizer(model.file), _model_id(ref, model))


def _model_id(ref: str, model) -> str:
    from pathlib import Path

    name = model.file.metadata.get("general.name")
    if ref.endswith(".gguf"):
        return Path(ref).stem
    return f"{name}@{ref[:19]}" if name else ref[:19]


class ServingState:
    """Variants, router and lifecycle; every change happens under one lock."""

    def __init__(self, settings: Settings, loader: Callable[[str, Settings], LoadedModel] | None = None):
        self.settings = settings
        self.loader = loader or load_model
        self.metrics = ServerMetrics()
        self.router = CanaryRouter()
        self.variants: dict[str, Variant] = {}
        self.retiring: list[Variant] = []
        self.draining = False
        self.loading: set[str] = set()
        self.load_errors: dict[str, str] = {}
        self.faults = {
            "canary_error_rate": settings.fault_canary_error_rate,
            "canary_latency_ms": settings.fault_canary_latency_ms,
        }
        self.retrieval = Retriever(settings)  # embedder and indexes load on first use
        self.compute_lock = threading.Lock()  # one variant's forward at a time (engine.serving.core.EngineCore)
        self._lock = threading.Lock()

    def load(self, name: str, ref: str) -> Variant:
        """Load `ref` as variant `name`, replacing what was there once the new one is ready."""
        with self._lock:
            self.loading.add(name)
        try:
            loaded = self.loader(ref, self.settings)
        except Exception as exc:
            with self._lock:
                self.loading.discard(name)
                self.load_errors[name] = str(exc)
            raise
        config = SchedulerConfig(
            slots=loaded.model.max_seqs,
            max_context=self.settings.max_context,
            prefill_chunk=self.settings.prefill_chunk,
            prefix_cache_slots=self.settings.prefix_cache_slots,
            max_queue=self.settings.max_queue,
        )
        core = EngineCore(
            loaded.model,
            loaded.tokenizer,
            config,
            loaded.model_id,
            self.metrics.for_variant(name),
            compute_lock=self.compute_lock,
        )
        variant = Variant(name, ref, loaded, core, AsyncEngine(core))
        with self._lock:
            old = self.variants.get(name)
            self.variants[name] = variant
            self.loading.discard(name)
            self.load_errors.pop(name, None)
            if old is not None:
                self._retire(old)
            self._publish_info()
        return variant

    def unload(self, name: str) -> None:
        with self._lock:
            variant = self.variants.pop(name, None)
            if variant is None:
                raise APIError(404, f"no variant {name!r} is loaded", code="variant_not_found")
            if name == CANARY:
                self.router.set_weight(0)
                self.metrics.canary_weight.set(0)
            self._retire(variant)
            self._publish_info()

    def promote(self) -> None:
        """The canary becomes production; the old production finishes its requests and closes."""
        with self._lock:
            canary = self.variants.pop(CANARY, None)
            if canary is None:
                raise APIError(409, "no canary is loaded to promote", code="no_canary")
            old = self.variants.get(PRODUCTION)
            canary.name = PRODUCTION
            canary.core.metrics = self.metrics.for_variant(PRODUCTION)
            self.variants[PRODUCTION] = canary
            self.router.set_weight(0)
            self.metrics.canary_weight.set(0)
            if old is not None:
                self._retire(old)
            self._publish_info()

    def _retire(self, variant: Variant) -> None:
        self.retiring.append(variant)
        threading.Thread(target=self._close_when_idle, args=(variant,), daemon=True).start()

    def _close_when_idle(self, variant: Variant) -> None:
        while variant.core.in_flight:
            time.sleep(0.05)
        variant.core.close()
        with self._lock:
            if variant in self.retiring:
                self.retiring.remove(variant)

    def _publish_info(self) -> None:
        self.metrics.variant_info.clear()
        for name, v in self.variants.items():
            self.metrics.variant_info.labels(name, v.model_id).set(1)

    def in_flight(self) -> int:
        return sum(v.core.in_flight for v in [*self.variants.values(), *self.retiring])

    def describe(self) -> dict:
        with self._lock:
            return {
                "variants": {
                    name: {"model": v.model_id, "ref": v.ref, "loaded_at": v.loaded_at, **v.engine.stats()}
                    for name, v in self.variants.items()
                },
                "weights": {CANARY: self.router.weight if CANARY in self.variants else 0},
                "draining": self.draining,
                "loading": sorted(self.loading),
                "load_errors": dict(self.load_errors),
                "in_flight": self.in_flight(),
                "served_model_name": self.settings.served_model_name,
                "faults": dict(self.faults),
            }

    def close(self) -> None:
        with self._lock:
            variants = [*self.variants.values(), *self.retiring]
            self.variants.clear()
        for v in variants:
            v.core.close()
        self.retrieval.close()

    def route(self, model: str, session_key: str | None) -> Variant:
        """The variant serving a request for `model` (the served name, or a variant's own model id)."""
        with self._lock:
            if self.draining:
                raise APIError(
                    503,
                    "the server is draining and accepts no new requests",
                    "server_error",
                    code="draining",
                    headers={"Retry-After": "5"},
                )
            for v in self.variants.values():
                if model == v.model_id:
                    return v
            if model not in (self.settings.served_model_name, PRODUCTION, CANARY):
                known = [self.settings.served_model_name, *(v.model_id for v in self.variants.values())]
                raise APIError(
                    404,
                    f"the model {model!r} does not exist; served models: {', '.join(known)}",
                    param="model",
                    code="model_not_found",
                )
            if PRODUCTION not in self.variants:
                raise APIError(
                    503,
                    "no model is loaded yet" if self.loading else "no production model is loaded",
                    "server_error",
                    code="not_ready",
                    headers={"Retry-After": "2"},
                )
            if model == CANARY and CANARY in self.variants:
                return self.variants[CANARY]
            return self.variants[self.router.choose(session_key, CANARY in self.variants)]


# -- the app --------------------------------------------------------------------------------------------
def create_app(
    settings: Settings | None = None,
    model_ref: str | None = None,
    loader: Callable[[str, Settings], LoadedModel] | None = None,
) -> FastAPI:
    """The server app; `model_ref` (if given) is loaded as production in the background at startup."""
    settings = settings or get_settings()
    state = ServingState(settings, loader)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        if model_ref:
            state.loading.add(PRODUCTION)
            asyncio.get_running_loop().run_in_executor(None, _load_logged, state, PRODUCTION, model_ref)
        yield
        state.close()

    app = FastAPI(title="Ryzanstein", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.serving = state
    api_keys = {k.strip() for k in (settings.api_keys or "").split(",") if k.strip()}

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        variant = getattr(request.state, "variant", None)
        if variant is not None:
            endpoint = "chat" if request.url.path.endswith("/chat/completions") else "completions"
            state.metrics.requests.labels(variant, endpoint, str(exc.status)).inc()
            state.metrics.errors.labels(variant, exc.code or exc.type).inc()
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return _error_response(
            APIError(
                400, f"{where or 'body'}: {first.get('msg', 'invalid request')}", param=where, code="invalid_value"
            )
        )

    @app.middleware("http")
    async def _guard(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > settings.max_request_bytes:
            return _error_response(
                APIError(
                    413,
                    f"request body of {length} bytes exceeds the limit of "
                    f"{settings.max_request_bytes} (RYZ_MAX_REQUEST_BYTES)",
                    code="too_large",
                )
            )
        path = request.url.path
        if path.startswith("/v1/") and api_keys and _bearer(request) not in api_keys:
            return _error_response(
                APIError(
                    401,
                    "missing or invalid API key: send `Authorization: Bearer <key>` "
                    "with one of the keys in RYZ_API_KEYS",
                    "authentication_error",
                    code="invalid_api_key",
                )
            )
        if path.startswith("/admin"):
            if not settings.admin_token:
                return _error_response(
                    APIError(
                        403,
                        "admin routes are disabled: start the server with RYZ_ADMIN_TOKEN set",
                        "permission_error",
                        code="admin_disabled",
                    )
                )
            if _bearer(request) != settings.admin_token:
                return _error_response(
                    APIError(
                        401,
                        "admin routes need `Authorization: Bearer <RYZ_ADMIN_TOKEN>`",
                        "authentication_error",
                        code="invalid_admin_token",
                    )
                )
        return await call_next(request)

    # -- probes and metrics ---------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        if state.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if PRODUCTION not in state.variants:
            status = "loading" if state.loading else "no model"
            return JSONResponse({"status": status, "errors": state.load_errors}, status_code=503)
        return {"status": "ready", "variants": {n: v.model_id for n, v in state.variants.items()}}

    @app.get("/metrics")
    async def metrics():
        state.metrics.refresh({n: v.engine for n, v in state.variants.items()})
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        created = int(min((v.loaded_at for v in state.variants.values()), default=time.time()))
        ids = [settings.served_model_name, *(v.model_id for v in state.variants.values())]
        return {
            "object": "list",
            "data": [
                {"id": i, "object": "model", "created": created, "owned_by": "ryzanstein"} for i in dict.fromkeys(ids)
            ],
        }

    # -- inference ------------------------------------------------------------------------------------
    async def routed(request: Request, body_type: type[_Common]) -> tuple[Any, Variant]:
        request.state.arrival = time.perf_counter()
        body = _parse(body_type, await _json(request))
        variant = state.route(body.model, request.headers.get("x-session-id") or body.user)
        request.state.variant = variant.name
        if variant.name == CANARY:
            await _inject_faults(state.faults)
        return body, variant

    @app.post("/v1/completions")
    async def completions(request: Request):
        body, variant = await routed(request, CompletionBody)
        return await _run_completion(state, variant, body, request.state.arrival)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body, variant = await routed(request, ChatBody)
        citations = await _add_retrieved_context(state, body) if body.retrieval else None
        return await _run_chat(state, variant, body, request.state.arrival, citations)

    # -- retrieval (the production index, engine/retrieval/search.py) ----------------------------------------
    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        _refuse_when_draining(state)
        body = _parse(EmbeddingsBody, await _json(request))
        texts = [body.input] if isinstance(body.input, str) else body.input
        if not texts or any(not isinstance(t, str) for t in texts):
            raise APIError(
                400,
                "input must be a non-empty string or list of strings; token arrays are not supported "
                "(this embedder tokenizes itself)",
                param="input",
                code="unsupported_input",
            )
        if len(texts) > EMBED_MAX_INPUTS or any(not t for t in texts):
            raise APIError(400, f"input takes 1-{EMBED_MAX_INPUTS} non-empty strings", param="input")
        if body.encoding_format not in ("float", "base64"):
            raise APIError(
                400, f"encoding_format must be float or base64, got {body.encoding_format!r}", param="encoding_format"
            )
        if body.model not in _embedder_names(state):
            raise APIError(
                404,
                f"the embedding model {body.model!r} does not exist; this server embeds with "
                f"{state.retrieval.model_id!r}",
                param="model",
                code="model_not_found",
            )
        if body.dimensions is not None and not 1 <= body.dimensions <= 384:
            raise APIError(
                400,
                f"dimensions must be 1-384 (the first k of MiniLM's 384, renormalised), got {body.dimensions}",
                param="dimensions",
            )
        vectors, tokens = await _retrieval_call(state.retrieval.embed, texts, body.dimensions)
        data = [
            {
                "object": "embedding",
                "index": i,
                "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode()
                if body.encoding_format == "base64"
                else v.tolist(),
            }
            for i, v in enumerate(vectors)
        ]
        return {
            "object": "list",
            "data": data,
            "model": state.retrieval.model_id,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    @app.post("/v1/retrieve")
    async def retrieve(request: Request):
        _refuse_when_draining(state)
        body = _parse(RetrieveBody, await _json(request))
        if body.index.startswith(("/", ".", "~")):
            raise APIError(
                400,
                "`index` takes a registry reference (production, index:N) or an artifact id; "
                "directories are not accepted over HTTP",
                param="index",
            )
        hits, opened = await _retrieval_call(state.retrieval.search, body.query, body.top_k, body.index)
        return {
            "object": "list",
            "data": hits,
            "index": opened.ref,
            "artifact_id": opened.artifact_id,
            "model": state.retrieval.model_id,
        }

    # -- admin ----------------------------------------------------------------------------------------
    @app.get("/admin/state")
    async def admin_state():
        return state.describe()

    @app.post("/admin/variants")
    async def admin_load(request: Request):
        body = await _json(request)
        name, ref = body.get("name"), body.get("model")
        if name not in (PRODUCTION, CANARY):
            raise APIError(400, f"variant name must be 'production' or 'canary', got {name!r}", param="name")
        if not isinstance(ref, str) or not ref:
            raise APIError(400, "`model` must be a model reference (artifact id)", param="model")
        if ref.endswith(".gguf") or ref.startswith(("/", ".", "~")):
            raise APIError(
                400,
                "admin loads models from the artifact store by reference; file paths are not "
                "accepted over HTTP (start the server with --model PATH instead)",
                param="model",
            )
        try:
            await asyncio.get_running_loop().run_in_executor(None, state.load, name, ref)
        except ModelReferenceError as exc:
            raise APIError(404, str(exc), param="model", code="model_not_found") from None
        except RyzError as exc:
            raise APIError(500, f"loading {ref!r} failed: {exc}", "server_error", code="load_failed") from None
        return state.describe()

    @app.delete("/admin/variants/{name}")
    async def admin_unload(name: str):
        state.unload(name)
        return state.describe()

    @app.post("/admin/weights")
    async def admin_weights(request: Request):
        body = await _json(request)
        weight = body.get(CANARY)
        try:
            state.router.set_weight(weight)
        except ValueError as exc:
            raise APIError(400, str(exc), param=CANARY) from None
        if weight and CANARY not in state.variants:
            state.router.set_weight(0)
            raise APIError(409, "no canary is loaded: POST /admin/variants with name 'canary' first", code="no_canary")
        state.metrics.canary_weight.set(weight)
        return state.describe()

    @app.post("/admin/faults")
    async def admin_faults(request: Request):
        body = await _json(request)
        for key, value in body.items():
            if (
                key not in state.faults
                or not isinstance(value, (int, float))
                or value < 0
                or (key == "canary_error_rate" and value > 1)
            ):
                raise APIError(
                    400,
                    f"faults take canary_error_rate (0-1) and canary_latency_ms (>= 0), got {key}={value!r}",
                    param=key,
                )
            state.faults[key] = float(value)
        return state.describe()

    @app.post("/admin/promote")
    async def admin_promote():
        state.promote()
        return state.describe()

    @app.post("/admin/drain")
    async def admin_drain(request: Request):
        body = await _json(request, allow_empty=True)
        state.draining = bool(body.get("drain", True))
        return state.describe()

    return app


async def _inject_faults(faults: dict) -> None:
    """Release drills: make the canary slow or failing on purpose (RYZ_FAULT_CANARY_*, POST /admin/faults; off by
    default)."""
    import random

    if faults["canary_latency_ms"]:
        await asyncio.sleep(faults["canary_latency_ms"] / 1000)
    if faults["canary_error_rate"] and random.random() < faults["canary_error_rate"]:
        raise APIError(
            500, "injected canary fault (RYZ_FAULT_CANARY_ERROR_RATE)", "server_error", code="injected_fault"
        )


def _load_logged(state: ServingState, name: str, ref: str) -> None:
    import sys

    try:
        state.load(name, ref)
        print(f"ryz serve: {name} = {state.variants[name].model_id} ready", file=sys.stderr, flush=True)
    except Exception as exc:  # noqa: BLE001 - reported through /ready and the log
        print(f"ryz serve: loading {ref!r} failed: {exc}", file=sys.stderr, flush=True)


def _bearer(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    return auth[7:].strip() if auth.lower().startswith("bearer ") else None


async def _json(request: Request, allow_empty: bool = False) -> dict:
    raw = await request.body()
    if not raw and allow_empty:
        return {}
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    return body


def _parse(model: type[BaseModel], body: dict):
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or None
        raise APIError(400, f"{where}: {first['msg']}", param=where, code="invalid_value") from None


# -- request handling -----------------------------------------------------------------------------------
EMBED_MAX_INPUTS = 256
CHAT_RETRIEVAL_TOP_K = 4


def _embedder_names(state: ServingState) -> set[str]:
    full = state.retrieval.model_id
    return {full, full.rsplit("/", 1)[-1]}


def _refuse_when_draining(state: ServingState) -> None:
    if state.draining:
        raise APIError(
            503,
            "the server is draining and accepts no new requests",
            "server_error",
            code="draining",
            headers={"Retry-After": "5"},
        )


async def _retrieval_call(fn, *args):
    """Run a blocking Retriever call off the event loop; its errors as OpenAI-shaped API errors."""
    from engine.errors import EmbedderError, RetrievalIndexError

    try:
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)
    except ModelReferenceError as exc:  # no production index, unknown index:N
        raise APIError(404, f"{exc}", param="index", code="index_not_found") from None
    except (EmbedderError, RetrievalIndexError) as exc:
        raise APIError(503, str(exc), "server_error", code="retrieval_unavailable") from None
    except RyzError as exc:  # e.g. an artifact id that is not in the store
        raise APIError(404, str(exc), param="index", code="index_not_found") from None


async def _add_retrieved_context(state: ServingState, body: ChatBody) -> list[dict]:
    """Chat's `retrieval` setting: search with the last user message, add the numbered chunks to the system
    message (asking for [n] citations) and return them as the response's `citations`."""
    options = body.retrieval if isinstance(body.retrieval, dict) else {}
    unknown = set(options) - {"top_k", "index"}
    top_k, ref = options.get("top_k", CHAT_RETRIEVAL_TOP_K), options.get("index", "production")
    if (
        unknown
        or type(top_k) is not int
        or not 1 <= top_k <= MAX_TOP_K
        or not isinstance(ref, str)
        or ref.startswith(("/", ".", "~"))
    ):
        raise APIError(400, f'retrieval takes true or {{"top_k": 1-{MAX_TOP_K}, "index": REF}}', param="retrieval")
    users = [m for m in body.messages if isinstance(m, dict) and m.get("role") == "user"]
    content = users[-1].get("content") if users else None
    if isinstance(content, list):
        content = " ".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    if not isinstance(content, str) or not content.strip():
        raise APIError(
            400, "retrieval searches with the last user message, and there is none with text", param="retrieval"
        )
    hits, opened = await _retrieval_call(state.retrieval.search, content[:4000], top_k, ref)
    context = format_context(hits)
    first = body.messages[0] if body.messages else None
    if isinstance(first, dict) and first.get("role") == "system" and isinstance(first.get("content"), str):
        body.messages = [{**first, "content": f"{first['content']}\n\n{context}"}, *body.messages[1:]]
    else:
        body.messages = [{"role": "system", "content": context}, *body.messages]
    return [
        {"index": n, "id": h["id"], "score": h["score"], "source": h["source"], "index_ref": opened.ref}
        for n, h in enumerate(hits, 1)
    ]


def _sampling(body: _Common, logprobs: int | None) -> SamplingParams:
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


def _stops(stop) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > 4 or any(not s for s in stops):
        raise APIError(400, "stop takes up to 4 non-empty strings", param="stop")
    return stops


def _check_lengths(state: ServingState, prompt_ids: list[int], max_tokens: int | None, vocab: int) -> int:
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


def _submit_all(variant: Variant, requests: list[GenerationRequest]) -> list[AsyncIterator[Delta]]:
    try:
        return [variant.engine.generate(r) for r in requests]
    except QueueFullError:
        raise APIError(
            429,
            "the server is at capacity: all sequence slots are busy and the queue is full; retry later",
            "rate_limit_error",
            code="queue_full",
            headers={"Retry-After": "1"},
        ) from None


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


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


async def _run_completion(state: ServingState, variant: Variant, body: CompletionBody, arrival: float):
    tok = variant.loaded.tokenizer
    vocab = variant.loaded.model.hp.vocab
    if body.suffix:
        raise APIError(400, "suffix is not supported", param="suffix")
    if body.best_of not in (None, 1):
        raise APIError(400, "best_of > 1 is not supported", param="best_of")
    if body.logprobs is not None and not 0 <= body.logprobs <= 20:
        raise APIError(400, f"logprobs must be 0-20, got {body.logprobs}", param="logprobs")
    prompts = body.prompt
    if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
        prompts = [prompts]
    if not prompts:
        raise APIError(400, "the prompt is empty", param="prompt")
    if body.stream and len(prompts) > 1:
        raise APIError(400, "streaming takes one prompt per request", param="prompt")
    params = _sampling(body, body.logprobs)
    grammar = _response_grammar(variant, body.response_format)
    requests, prompt_ids_all = [], []
    for p in prompts:
        if not p:
            raise APIError(400, "the prompt is empty", param="prompt")
        ids = tok.encode(p) if isinstance(p, str) else list(p)
        max_tokens = _check_lengths(state, ids, body.max_tokens, vocab)
        prompt_ids_all.append(ids)
        requests.append(
            GenerationRequest(
                ids,
                params,
                max_tokens,
                _stops(body.stop),
                set(body.stop_token_ids or []),
                body.ignore_eos,
                grammar,
                body.logprobs if body.echo and body.logprobs is not None else (0 if body.echo else None),
                arrival=arrival,
            )
        )
    streams = _submit_all(variant, requests)
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    headers = {VARIANT_HEADER: variant.name}
    endpoint = "completions"

    if body.stream:
        include_usage = bool((body.stream_options or {}).get("include_usage"))

        async def events():
            status = "200"
            try:
                prompt_text = (
                    (prompts[0] if isinstance(prompts[0], str) else tok.decode(prompt_ids_all[0])) if body.echo else ""
                )
                first = True
                async for delta in streams[0]:
                    if delta.error:
                        status = "500"
                        yield _sse(error_body(delta.error, "server_error", code="engine_error"))
                        break
                    text = (prompt_text if first else "") + delta.text
                    first = False
                    choice = {
                        "index": 0,
                        "text": text,
                        "finish_reason": delta.finish_reason,
                        "logprobs": _completion_logprobs(tok, delta, [], False, 0)
                        if body.logprobs is not None
                        else None,
                    }
                    if text or delta.finish_reason or delta.token_ids:
                        yield _sse(
                            {
                                "id": rid,
                                "object": "text_completion",
                                "created": created,
                                "model": body.model,
                                "choices": [choice],
                            }
                        )
                    if delta.done and include_usage:
                        yield _sse(
                            {
                                "id": rid,
                                "object": "text_completion",
                                "created": created,
                                "model": body.model,
                                "choices": [],
                                "usage": _usage(delta.prompt_tokens, delta.completion_tokens),
                            }
                        )
                yield _sse("[DONE]")
            finally:
                state.metrics.requests.labels(variant.name, endpoint, status).inc()

        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    results = await asyncio.gather(*(_collect(s) for s in streams))
    choices, prompt_total, completion_total = [], 0, 0
    for i, (text, samples, last, _ids) in enumerate(results):
        prompt_text = ""
        if body.echo:
            prompt_text = prompts[i] if isinstance(prompts[i], str) else tok.decode(prompt_ids_all[i])
        logprobs = None
        if body.logprobs is not None:
            logprobs = _completion_logprobs(tok, last, samples, body.echo, 0, prompt_ids_all[i])
        choices.append(
            {"index": i, "text": prompt_text + text, "logprobs": logprobs, "finish_reason": last.finish_reason}
        )
        prompt_total += last.prompt_tokens
        completion_total += last.completion_tokens
    state.metrics.requests.labels(variant.name, endpoint, "200").inc()
    return JSONResponse(
        {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": body.model,
            "choices": choices,
            "usage": _usage(prompt_total, completion_total),
        },
        headers=headers,
    )


def _token_text(tok, token_id: int) -> str:
    return tok.tokenizer.decode([token_id], skip_special_tokens=False)


def _completion_logprobs(
    tok, last: Delta, samples: list, echo: bool, offset: int, prompt_ids: list[int] | None = None
) -> dict:
    """OpenAI legacy completions logprobs: tokens, token_logprobs, top_logprobs, text_offset."""
    tokens, token_lps, tops, offsets = [], [], [], []
    pos = offset

    def add(token_id: int, lp, top):
        nonlocal pos
        text = _token_text(tok, token_id)
        tokens.append(text)
        token_lps.append(lp)
        # distinct ids can share a text (partial UTF-8): keep the best, as the list is sorted best first
        tops.append(None if top is None else {t: v for i, v in reversed(top) for t in [_token_text(tok, i)]})
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


def _chat_logprobs(tok, samples: list) -> dict:
    def entry(token_id: int, lp: float) -> dict:
        text = _token_text(tok, token_id)
        return {"token": text, "logprob": lp, "bytes": list(text.encode())}

    return {
        "content": [{**entry(s.token, s.logprob), "top_logprobs": [entry(i, v) for i, v in s.top]} for s in samples]
    }


def _response_grammar(variant: Variant, response_format: dict | None):
    if not response_format or response_format.get("type", "text") == "text":
        return None
    try:
        return variant.grammar_compiler().compile_response_format(response_format)
    except (InvalidRequestError, ValueError) as exc:
        raise APIError(400, str(exc), param="response_format") from None


async def _run_chat(
    state: ServingState, variant: Variant, body: ChatBody, arrival: float, citations: list | None = None
):
    from engine.serving.chat import render_chat, validate_messages
    from engine.serving.tools import parse_tool_calls, validate_tools

    tok = variant.loaded.tokenizer
    if body.top_logprobs is not None and not (body.logprobs and 0 <= body.top_logprobs <= 20):
        raise APIError(400, "top_logprobs needs logprobs=true and a value 0-20", param="top_logprobs")
    params = _sampling(body, (body.top_logprobs or 0) if body.logprobs else None)
    tools = body.tools or None
    tool_choice = body.tool_choice if body.tool_choice is not None else ("auto" if tools else "none")
    try:
        messages = validate_messages(body.messages)
        if tools:
            validate_tools(tools, tool_choice)
        if not tok.chat_template:
            raise InvalidRequestError("this model has no chat template; use /v1/completions")
        bos = tok.tokenizer.id_to_token(tok.bos_id) if tok.bos_id is not None else ""
        eos = tok.tokenizer.id_to_token(tok.eos_id) if tok.eos_id is not None else ""
        text = render_chat(
            tok.chat_template,
            messages,
            add_generation_prompt=True,
            bos_token=bos or "",
            eos_token=eos or "",
            tools=tools,
        )
    except (InvalidRequestError, ValueError) as exc:
        raise APIError(400, str(exc), param=getattr(exc, "param", None) or "messages") from None
    grammar = _response_grammar(variant, body.response_format)
    if tools and tool_choice != "none":
        if grammar is not None:
            raise APIError(400, "response_format and forced tool calls cannot be combined", param="tool_choice")
        try:
            grammar = variant.grammar_compiler().compile_tools(tools, tool_choice)
        except (InvalidRequestError, ValueError) as exc:
            raise APIError(400, str(exc), param="tools") from None
    prompt_ids = tok.encode_chat(text)
    max_tokens = _check_lengths(
        state, prompt_ids, body.max_completion_tokens or body.max_tokens, variant.loaded.model.hp.vocab
    )
    request = GenerationRequest(
        prompt_ids,
        params,
        max_tokens,
        _stops(body.stop),
        set(body.stop_token_ids or []),
        body.ignore_eos,
        grammar,
        arrival=arrival,
    )
    stream = _submit_all(variant, [request])[0]
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    headers = {VARIANT_HEADER: variant.name}
    endpoint = "chat"
    buffer_for_tools = bool(tools) and tool_choice != "none"

    def chunk(delta: dict, finish: str | None = None, logprobs: dict | None = None, extra: dict | None = None) -> str:
        return _sse(
            {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": body.model,
                "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}],
                **(extra or {}),
            }
        )

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
                        yield _sse(error_body(delta.error, "server_error", code="engine_error"))
                        break
                    lp = _chat_logprobs(tok, delta.logprobs) if body.logprobs and delta.logprobs else None
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
                        yield chunk({}, finish)
                        if include_usage:
                            yield _sse(
                                {
                                    "id": rid,
                                    "object": "chat.completion.chunk",
                                    "created": created,
                                    "model": body.model,
                                    "choices": [],
                                    "usage": _usage(delta.prompt_tokens, delta.completion_tokens),
                                }
                            )
                yield _sse("[DONE]")
            finally:
                state.metrics.requests.labels(variant.name, endpoint, status).inc()

        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    text, samples, last, _ids = await _collect(stream)
    message: dict[str, Any] = {"role": "assistant", "content": text}
    finish = last.finish_reason
    if buffer_for_tools and (calls := parse_tool_calls(text, tools)):
        message = {"role": "assistant", "content": None, "tool_calls": calls}
        finish = "tool_calls"
    state.metrics.requests.labels(variant.name, endpoint, "200").inc()
    return JSONResponse(
        {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": body.model,
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "finish_reason": finish,
                    "logprobs": _chat_logprobs(tok, samples) if body.logprobs else None,
                }
            ],
            "usage": _usage(last.prompt_tokens, last.completion_tokens),
            **({"citations": citations} if citations is not None else {}),
        },
        headers=headers,
    )


def serve(
    model_ref: str | None, host: str | None = None, port: int | None = None, settings: Settings | None = None
) -> None:
    """Run the server until interrupted (what `ryz serve` calls)."""
    import uvicorn

    settings = settings or get_settings()
    app = create_app(settings, model_ref)
    uvicorn.run(
        app, host=host or settings.host, port=port or settings.port, log_level="info", timeout_graceful_shutdown=10
    )
