"""The OpenAI-compatible HTTP server: wiring only.

    routes     engine/serving/openai_routes.py (completions, chat, models), retrieval_routes.py (embeddings,
               retrieve), admin_routes.py (variants, weights, faults, promote, drain), ollama_routes.py (Ollama's
               /api), llama_routes.py (llama-server's /tokenize, /detokenize, /props; /ps); probes and metrics here
    state      engine/serving/variants.py: the production and canary variants, each an EngineClient
    engines    engine/serving/client.py: what the routes may ask of an engine (and the local implementation)
    shapes     engine/serving/protocol.py: request bodies, OpenAI's error shape, SSE
    guard      engine/serving/guard.py: keys and token in constant time, body and header limits, error counting

This module builds the app: the state, the guard every request passes (API keys and the admin token in constant
time, the body's size on the bytes actually read and the time it may take to arrive), OpenAI-shaped errors for
every failure, Ollama-shaped on /api/ (an unhandled exception too: logged, counted for its variant, the connection
kept), and the background load of the startup model.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.serving import admin_routes, llama_routes, ollama_routes, openai_routes, retrieval_routes
from engine.serving.client import ClientFactory, LoadedModel, load_model, local_clients
from engine.serving.guard import Guard, api_key_set, count_error, internal_error
from engine.serving.metrics import CONTENT_TYPE_LATEST
from engine.serving.protocol import APIError, error_response
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
    api_keys = api_key_set(settings)  # refuses a key list of only commas before anything starts
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

    # /openapi.json describes every route, the bodies the OpenAI routes read by hand included (protocol.openapi_body)
    app = FastAPI(title="Ryzanstein", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.serving = state

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        count_error(state, request.scope, exc)
        return error_response(exc, request.url.path)

    @app.exception_handler(Exception)
    async def _unhandled(request: Request, exc: Exception):
        """The last resort, for an error in the guard itself (the guard answers everything inside it)."""
        return await _api_error(request, internal_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        """No such route (404), a method the route does not take (405): OpenAI's shape too."""
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = f"{request.method} {request.url.path}: {exc.detail}"
        headers = dict(exc.headers) if exc.headers else None
        return await _api_error(request, APIError(exc.status_code, message, code=code, headers=headers))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        message = f"{where or 'body'}: {first.get('msg', 'invalid request')}"
        return await _api_error(request, APIError(400, message, param=where, code="invalid_value"))

    app.add_middleware(Guard, settings=settings, state=state, api_keys=api_keys)

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

    for routes in (openai_routes, retrieval_routes, admin_routes, ollama_routes, llama_routes):
        app.include_router(routes.router)
    return app


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
