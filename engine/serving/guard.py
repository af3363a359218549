"""The guard every request passes before a route runs (engine/serving/app.py installs it): API keys and the admin
token compared in constant time, the body's size counted on the bytes actually read (chunked or not) and the time it
may take to arrive, headers' size; and how a failure is counted for its variant (`unrouted` before routing).
"""

from __future__ import annotations

import asyncio
import hmac
import logging

from starlette.requests import ClientDisconnect, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engine.serving.protocol import APIError, bearer, error_response
from engine.serving.variants import ServingState
from engine.settings import Settings

logger = logging.getLogger("ryz.serve")
UNROUTED = "unrouted"  # the variant label of failures before a request was routed (bad JSON, 413, 401, ...)
_ENDPOINTS = {
    "/v1/completions": "completions",
    "/v1/chat/completions": "chat",
    "/v1/embeddings": "embeddings",
    "/v1/retrieve": "retrieve",
    "/v1/models": "models",
    "/api/generate": "ollama_generate",
    "/api/chat": "ollama_chat",
}
# What answers without an API key when RYZ_API_KEYS is set: the probes and the scrape (load balancers and Prometheus
# carry no key). Admin routes take the admin token instead (below); everything else needs a key.
OPEN_PATHS = frozenset({"/health", "/ready", "/metrics"})


def api_key_set(settings: Settings) -> frozenset[str]:
    """The keys RYZ_API_KEYS lists (empty: no key needed). A value that is not empty yet lists no key (",") is
    refused: it would turn key checking off without a word."""
    value = settings.api_keys or ""
    keys = frozenset(k.strip() for k in value.split(",") if k.strip())
    if value.strip() and not keys:
        raise ValueError(
            f"RYZ_API_KEYS={value!r} lists no key: give comma-separated keys, or leave it unset (or empty) to serve "
            "without keys"
        )
    return keys


def _matches(token: str | None, secrets: frozenset[str] | tuple[str, ...]) -> bool:
    """Whether a bearer token is one of the secrets, in time independent of where they differ (hmac.compare_digest
    on the UTF-8 bytes: a str with non-ASCII characters would make compare_digest raise). Every secret is
    compared, so the time does not tell which one matched either."""
    if token is None:
        return False
    given = token.encode("utf-8", "surrogateescape")
    found = False
    for secret in secrets:
        found |= hmac.compare_digest(given, secret.encode("utf-8", "surrogateescape"))
    return found


def _refusal(request: Request, settings: Settings, api_keys: frozenset[str]) -> APIError | None:
    """Why the guard turns a request away before any route runs, if it does."""
    header_bytes = sum(len(k) + len(v) for k, v in request.scope["headers"])
    if header_bytes > settings.max_header_bytes:
        return APIError(
            431,
            f"the request's headers take {header_bytes} bytes, over the limit of {settings.max_header_bytes} "
            "(RYZ_MAX_HEADER_BYTES)",
            code="headers_too_large",
            headers={"Connection": "close"},
        )
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > settings.max_request_bytes:
        return _too_large(settings)
    path = request.url.path
    keyed = path not in OPEN_PATHS and not path.startswith("/admin")
    if keyed and api_keys and not _matches(bearer(request), api_keys):
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
    if path.startswith("/admin") and not _matches(bearer(request), (settings.admin_token or "",)):
        return APIError(
            401,
            "admin routes need `Authorization: Bearer <RYZ_ADMIN_TOKEN>`",
            "authentication_error",
            code="invalid_admin_token",
        )
    return None


def _too_large(settings: Settings) -> APIError:
    return APIError(
        413,
        f"the request body exceeds the limit of {settings.max_request_bytes} bytes (RYZ_MAX_REQUEST_BYTES)",
        code="too_large",
    )


def internal_error(exc: BaseException) -> APIError:
    return APIError(500, f"internal error: {type(exc).__name__}", "server_error", code="internal_error")


def count_error(state: ServingState, scope: Scope, exc: APIError) -> None:
    """Count a failed request in /metrics: under its variant once it was routed (the canary analysis judges 5xx),
    else under `unrouted`; the endpoint from a fixed set (never the raw path: its labels must stay few)."""
    variant = scope.get("state", {}).get("variant") or UNROUTED
    path = scope.get("path", "")
    endpoint = _ENDPOINTS.get(path, "admin" if path.startswith("/admin") else "other")
    state.metrics.requests.labels(variant, endpoint, str(exc.status)).inc()
    state.metrics.errors.labels(variant, exc.code or exc.type).inc()


class Guard:
    """What every HTTP request passes first, as plain ASGI (nothing buffered, no task per request):

    - refusals before any route runs: headers over RYZ_MAX_HEADER_BYTES (431), a Content-Length over
      RYZ_MAX_REQUEST_BYTES (413), a missing or wrong API key on every route but /health, /ready, /metrics and
      the admin routes (401), the admin token on those (403/401);
    - the body as the app reads it: bytes counted as they arrive, chunked or not (413 past the limit), and all
      of it within RYZ_BODY_TIMEOUT_S of the headers (408);
    - any exception the routes and their handlers leave: a 500 in OpenAI's shape (Ollama's on /api/), logged with
      its traceback, counted for the request's variant; nothing is re-raised, so the kept-alive connection stays
      usable (a response already started is cut off instead)."""

    def __init__(self, app: ASGIApp, settings: Settings, state: ServingState, api_keys: frozenset[str]):
        self.app, self.settings, self.state, self.api_keys = app, settings, state, api_keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = _refusal(Request(scope), self.settings, self.api_keys)
        if refusal is not None:
            count_error(self.state, scope, refusal)
            await error_response(refusal, scope.get("path", ""))(scope, receive, send)
            return
        started = False

        async def send_watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, self._capped(receive), send_watched)
        except ClientDisconnect:  # gone while sending its body: a client error, and nobody to answer
            count_error(self.state, scope, APIError(499, "the client disconnected", code="client_disconnected"))
        except Exception as exc:  # noqa: BLE001 - every failure gets an answer; BaseException (cancel) passes
            logger.exception("ryz serve: unhandled error in %s %s", scope.get("method"), scope.get("path"))
            error = internal_error(exc)
            count_error(self.state, scope, error)
            if not started:
                await error_response(error, scope.get("path", ""))(scope, receive, send)

    def _capped(self, receive: Receive) -> Receive:
        """`receive` with the body's byte and time limits; once the body is complete it passes messages through
        (a route waiting for the client's disconnect waits as long as it likes)."""
        limit, timeout = self.settings.max_request_bytes, self.settings.body_timeout_s
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        read, complete = 0, False

        async def capped() -> Message:
            nonlocal read, complete
            if complete:
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise APIError(
                    408,
                    f"the request body did not arrive within {timeout:g} s (RYZ_BODY_TIMEOUT_S)",
                    code="request_timeout",
                    headers={"Connection": "close"},
                ) from None
            if message["type"] != "http.request":
                complete = True
                return message
            read += len(message.get("body", b""))
            if read > limit:
                raise _too_large(self.settings)
            complete = not message.get("more_body", False)
            return message

        return capped
