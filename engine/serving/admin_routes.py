"""The admin routes (docs/serving.md "Canary variants and admin"): load, unload, weights, faults, promote, drain,
and the per-request samples canary analysis reads.

They need `RYZ_ADMIN_TOKEN` as a bearer token (checked in engine/serving/app.py's guard) and change variants
without dropping requests in flight (engine/serving/variants.py). engine/serving/admin.py is their client.
"""

from __future__ import annotations

import asyncio
import math
import time

from fastapi import APIRouter, Request

from engine.errors import GGUFFormatError, ModelReferenceError, RyzError
from engine.serving.protocol import APIError, read_json
from engine.serving.router import CANARY, PRODUCTION
from engine.serving.variants import ServingState

router = APIRouter()


def _state(request: Request) -> ServingState:
    return request.app.state.serving


@router.get("/admin/state")
async def admin_state(request: Request):
    state = _state(request)
    return state.describe()


@router.post("/admin/variants")
async def admin_load(request: Request):
    state = _state(request)
    body = await read_json(request)
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
    except GGUFFormatError as exc:  # the artifact itself is malformed or not a model this engine runs: not retryable
        raise APIError(422, f"cannot load {ref!r}: {exc}", param="model", code="invalid_model") from None
    except RyzError as exc:
        raise APIError(500, f"loading {ref!r} failed: {exc}", "server_error", code="load_failed") from None
    return state.describe()


@router.delete("/admin/variants/{name}")
async def admin_unload(name: str, request: Request):
    state = _state(request)
    state.unload(name)
    return state.describe()


@router.post("/admin/weights")
async def admin_weights(request: Request):
    state = _state(request)
    body = await read_json(request)
    try:
        state.set_canary_weight(body.get(CANARY))
    except ValueError as exc:
        raise APIError(400, str(exc), param=CANARY) from None
    return state.describe()


@router.post("/admin/faults")
async def admin_faults(request: Request):
    state = _state(request)
    body = await read_json(request)
    for key, value in body.items():
        if (
            key not in state.faults
            or not isinstance(value, (int, float))
            or value < 0
            or (key.endswith("_error_rate") and value > 1)
        ):
            raise APIError(
                400,
                f"faults take {', '.join(state.faults)} (error rates 0-1, latencies in ms >= 0), got {key}={value!r}",
                param=key,
            )
        state.faults[key] = float(value)
    return state.describe()


@router.post("/admin/promote")
async def admin_promote(request: Request):
    state = _state(request)
    state.promote()
    return state.describe()


@router.post("/admin/drain")
async def admin_drain(request: Request):
    state = _state(request)
    body = await read_json(request, allow_empty=True)
    state.draining = bool(body.get("drain", True))
    return state.describe()


@router.get("/admin/samples")
async def admin_samples(request: Request):
    """Per-request figures of each variant finished at or after `since` (unix time, default 0), for canary analysis:
    `{"now", "fields": [...], "variants": {name: [[finished, ttft_s, tpot_s or null], ...]}}`. `now` is this
    server's clock, so the caller can start its next window by it rather than by its own clock."""
    raw = request.query_params.get("since", "0")
    try:
        since = float(raw)
    except ValueError:
        since = math.nan
    if not math.isfinite(since):
        raise APIError(400, f"`since` must be a unix time in seconds, got {raw!r}", param="since")
    now = time.time()
    return {
        "now": now,
        "fields": ["finished", "ttft_s", "tpot_s"],
        "variants": _state(request).metrics.samples.since(since),
    }
