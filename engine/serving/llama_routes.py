"""llama-server's own routes beside the OpenAI ones (docs/serving.md "llama-server routes"), with the field names of
llama.cpp's tools/server README, and `GET /ps`, what the server has loaded (`ryz ps` reads it).

    POST /tokenize     {"content", "add_special" (false), "with_pieces" (false)} -> {"tokens": [...]}
    POST /detokenize   {"tokens": [...]} -> {"content"}
    GET /props         default_generation_settings, total_slots, model_path, model_alias, chat_template, build_info
    GET /ps            per variant: model, name:version, artifact id, weight, weights size, slots, KV use

All of them speak of production (the canary is an experiment, not the model a client tokenizes for), except /ps,
which lists every variant. Unlike llama-server, /props needs an API key when RYZ_API_KEYS is set, as every route
but the probes and /metrics does (engine/serving/guard.py).
"""

from __future__ import annotations

import asyncio
import importlib.metadata

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

from engine.serving.client import EngineClient
from engine.serving.protocol import APIError, openapi_body, parse_body, read_json
from engine.serving.variants import ServingState

router = APIRouter()


class TokenizeBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    content: str
    add_special: StrictBool = False
    with_pieces: StrictBool = False


class DetokenizeBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    tokens: list[StrictInt] = Field(max_length=1_000_000)


def _production(request: Request) -> tuple[ServingState, EngineClient]:
    state: ServingState = request.app.state.serving
    return state, state.production().client


def _piece(client: EngineClient, token_id: int) -> str | list[int]:
    """llama-server's piece: the text when the token's bytes are valid UTF-8, else the bytes."""
    raw = client.token_bytes(token_id)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return list(raw)


@router.post("/tokenize", openapi_extra=openapi_body(TokenizeBody))
async def tokenize(request: Request):
    state, client = _production(request)
    body = parse_body(TokenizeBody, await read_json(request))

    def run() -> list:
        ids = client.tokenize(body.content, body.add_special) if body.content else []
        return [{"id": i, "piece": _piece(client, i)} for i in ids] if body.with_pieces else ids

    return {"tokens": await asyncio.to_thread(run)}


@router.post("/detokenize", openapi_extra=openapi_body(DetokenizeBody))
async def detokenize(request: Request):
    state, client = _production(request)
    body = parse_body(DetokenizeBody, await read_json(request))
    if any(not 0 <= t < client.vocab for t in body.tokens):
        raise APIError(400, f"tokens must be ids in [0, {client.vocab})", param="tokens")
    return {"content": await asyncio.to_thread(client.detokenize, body.tokens)}


def _version() -> str:
    try:
        return importlib.metadata.version("ryzanstein")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@router.get("/props")
async def props(request: Request):
    state, client = _production(request)
    info = await asyncio.to_thread(client.model_info)
    s = state.settings
    stats = client.stats()
    return {
        "default_generation_settings": {
            "n_ctx": info["served_context"],
            # the defaults of a /v1 request that leaves a field out (OpenAI's)
            "params": {
                "n_predict": -1,
                "max_tokens": s.max_tokens_limit,
                "seed": -1,
                "temperature": 1.0,
                "top_k": 0,
                "top_p": 1.0,
                "min_p": 0.0,
                "repeat_penalty": 1.0,
                "presence_penalty": 0.0,
                "frequency_penalty": 0.0,
                "stop": [],
                "ignore_eos": False,
                "speculative": stats.get("speculative", "off"),
            },
        },
        "total_slots": stats.get("slots", 0),
        "model_path": info["path"],
        "model_alias": s.served_model_name,
        "chat_template": info["chat_template"] or "",
        "bos_token": info["bos_token"],
        "eos_token": info["eos_token"],
        "modalities": {"vision": False, "audio": False},
        "build_info": f"ryzanstein {_version()}",
    }


@router.get("/ps")
async def loaded(request: Request):
    """What this server has loaded: every variant with its model, weight, slots and KV use (`ryz ps`)."""
    state: ServingState = request.app.state.serving
    rows = await asyncio.to_thread(state.loaded)
    return {
        "served_model_name": state.settings.served_model_name,
        "draining": state.draining,
        "loading": sorted(state.loading),
        "load_errors": dict(state.load_errors),
        "variants": rows,
    }
