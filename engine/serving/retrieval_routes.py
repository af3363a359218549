"""The retrieval routes over the registry's production index (engine/retrieval/search.py, loaded on first use):
`/v1/embeddings`, `/v1/retrieve`, and chat's `retrieval` extension, which searches with the last user message,
answers with the chunks in its system message and returns them as `citations`.
"""

from __future__ import annotations

import asyncio
import base64

from fastapi import APIRouter, Request

from engine.errors import EmbedderError, ModelReferenceError, RetrievalIndexError, RyzError
from engine.retrieval.search import MAX_TOP_K, format_context
from engine.serving.protocol import (
    APIError,
    ChatBody,
    EmbeddingsBody,
    RetrieveBody,
    draining_error,
    parse_body,
    read_json,
)
from engine.serving.variants import ServingState

router = APIRouter()


EMBED_MAX_INPUTS = 256
CHAT_RETRIEVAL_TOP_K = 4


def _embedder_names(state: ServingState) -> set[str]:
    full = state.retrieval.model_id
    return {full, full.rsplit("/", 1)[-1]}


def _serving(request: Request) -> ServingState:
    """The server's state, refusing new work while it drains."""
    state: ServingState = request.app.state.serving
    if state.draining:
        raise draining_error()
    return state


async def _retrieval_call(fn, *args):
    """Run a blocking Retriever call off the event loop; its errors as OpenAI-shaped API errors."""
    try:
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)
    except ModelReferenceError as exc:  # no production index, unknown index:N
        raise APIError(404, f"{exc}", param="index", code="index_not_found") from None
    except (EmbedderError, RetrievalIndexError) as exc:
        raise APIError(503, str(exc), "server_error", code="retrieval_unavailable") from None
    except RyzError as exc:  # e.g. an artifact id that is not in the store
        raise APIError(404, str(exc), param="index", code="index_not_found") from None


async def add_retrieved_context(state: ServingState, body: ChatBody) -> list[dict]:
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


@router.post("/v1/embeddings")
async def embeddings(request: Request):
    state = _serving(request)
    body = parse_body(EmbeddingsBody, await read_json(request))
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
            f"the embedding model {body.model!r} does not exist; this server embeds with {state.retrieval.model_id!r}",
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


@router.post("/v1/retrieve")
async def retrieve(request: Request):
    state = _serving(request)
    body = parse_body(RetrieveBody, await read_json(request))
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
