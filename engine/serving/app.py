"""The OpenAI-compatible HTTP server: wiring only.

    routes     engine/serving/openai_routes.py (completions, chat, models), retrieval_routes.py (embeddings,
               retrieve), admin_routes.py (variants, weights, faults, promote, drain); probes and metrics here
    state      engine/serving/variants.py: the production and canary variants, each an EngineClient
    engines    engine/serving/client.py: what the routes may ask of an engine (and the local implementation)
    shapes     engine/serving/protocol.py: request bodies, OpenAI's error shape, SSE

This module builds the app: the state, the guard every request passes (body size, API keys, the admin token),
OpenAI-shaped errors for every failure, and the background load of the startup model.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from engine.serving import admin_routes, openai_routes, retrieval_routes
from engine.serving.client import ClientFactory, LoadedModel, load_model, local_clients
from engine.serving.metrics import CONTENT_TYPE_LATEST
from engine.serving.protocol import APIError, bearer, error_response
from engine.serving.router import PRODUCTION
from engine.serving.variants import ServingState, load_logged
from engine.settings import Settings, get_settings


def create_app(
    settings: Settings | None = None,
    model_ref: str | None = None,
    loader: Callable[[str, Settings], LoadedModel] | None = None,
    connect: ClientFactory | None = None,
    follow_registry: bool = False,
) -> FastAPI:
    """The server app; `model_ref` (if given) is loaded as production in the background at startup, else with
    `follow_registry` what the registry and the release in progress say (engine/serving/follow.py). Variants are
    opened by `connect` (an EngineClient factory), by default local engines over `loader` (the artifact store)."""
    settings = settings or get_settings()
    state = ServingState(settings, connect or local_clients(loader or load_model))

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        if model_ref:
            state.loading.add(PRODUCTION)
            asyncio.get_running_loop().run_in_executor(None, load_logged, state, PRODUCTION, model_ref)
        elif follow_registry:
            from engine.artifacts.store import open_store
            from engine.serving.follow import join_logged

            state.loading.add("registry")
            asyncio.get_running_loop().run_in_executor(None, join_logged, state, open_store)
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
        return error_response(exc)

    @app.exception_handler(Exception)
    async def _unhandled(request: Request, exc: Exception):
        """A bug or an engine failure outside the routes' own checks: still a 500 in OpenAI's shape, and counted
        for its variant, so the canary analysis sees the failures that matter most."""
        return await _api_error(request, APIError(500, f"internal error: {type(exc).__name__}", "server_error"))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        message = f"{where or 'body'}: {first.get('msg', 'invalid request')}"
        return error_response(APIError(400, message, param=where, code="invalid_value"))

    @app.middleware("http")
    async def _guard(request: Request, call_next):
        refusal = _refusal(request, settings, api_keys)
        return error_response(refusal) if refusal else await call_next(request)

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
        state.metrics.refresh({n: v.client for n, v in state.variants.items()})
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    for routes in (openai_routes, retrieval_routes, admin_routes):
        app.include_router(routes.router)
    return app


def _refusal(request: Request, settings: Settings, api_keys: set[str]) -> APIError | None:
    """Why the guard turns a request away before any route runs, if it does."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > settings.max_request_bytes:
        return APIError(
            413,
            f"request body of {length} bytes exceeds the limit of {settings.max_request_bytes} (RYZ_MAX_REQUEST_BYTES)",
            code="too_large",
        )
    path = request.url.path
    if path.startswith("/v1/") and api_keys and bearer(request) not in api_keys:
        return APIError(
            401,
            "missing or invalid API key: send `Authorization: Bearer <key>` with one of the keys in RYZ_API_KEYS",
            "authentication_error",
            code="invalid_api_key",
        )
    if path.startswith("/admin") and not settings.admin_token:
        return APIError(
            403,
            "admin routes are disabled: start the server with RYZ_ADMIN_TOKEN set",
            "permission_error",
            code="admin_disabled",
        )
    if path.startswith("/admin") and bearer(request) != settings.admin_token:
        return APIError(
            401,
            "admin routes need `Authorization: Bearer <RYZ_ADMIN_TOKEN>`",
            "authentication_error",
            code="invalid_admin_token",
        )
    return None


def serve(
    model_ref: str | None, host: str | None = None, port: int | None = None, settings: Settings | None = None
) -> None:
    """Run the server until interrupted (what `ryz serve` calls). Without a model it follows the registry."""
    import uvicorn  # only when serving for real

    settings = settings or get_settings()
    app = create_app(settings, model_ref, follow_registry=model_ref is None)
    uvicorn.run(
        app, host=host or settings.host, port=port or settings.port, log_level="info", timeout_graceful_shutdown=10
    )
