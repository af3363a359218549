"""`ryz mcp`: a Model Context Protocol server over stdio, so MCP clients (Claude Desktop,
Continue, IDE agents) can search the retrieval index and generate with the production model.

Tools:
* `search_index(query, top_k=5)`: the top_k chunks of the production index (or `--index REF`), each with its
  text, score and source (path, lines): the same `Retriever` as the server's `/v1/retrieve`.
* `generate(prompt, max_tokens=128)`: a greedy completion of `prompt` (plain text, no chat template) by the
  production model (or `--model REF`) on the native engine, in this process.

The model is loaded on the first `generate` call, the embedder and index on the first `search_index` call, so
the server answers `tools/list` at once and `search_index` works on a machine with an index but no model (and
the other way round). It runs in its own process, apart from any `ryz serve`: an MCP client spawns it, and it
holds its own copy of the model. stdout carries the protocol only; logs go to stderr.

Client configuration (Claude Desktop's `mcpServers`, for example):
    {"ryzanstein": {"command": "ryz", "args": ["mcp"], "env": {"RYZ_HOME": "/home/me/.ryzanstein"}}}
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

from engine.errors import InvalidRequestError, RyzError
from engine.retrieval.search import MAX_TOP_K, Retriever
from engine.settings import Settings, get_settings

MAX_GENERATE_TOKENS = 1024


class Generator:
    """Greedy generation with one model on the native engine, loaded on first use; one call at a time."""

    def __init__(self, settings: Settings, model_ref: str = "production", library=None):
        self.settings, self.model_ref, self.library = settings, model_ref, library
        self._loaded: tuple[Any, Any] | None = None
        self._lock = threading.Lock()

    def _load(self):
        from engine.artifacts.refs import resolve_model
        from engine.artifacts.store import open_store
        from engine.model.loader import open_model
        from engine.model.tokenizer import ModelTokenizer

        path = resolve_model(self.model_ref, open_store(self.settings.store_url, settings=self.settings))
        model = open_model(
            path, "generate", settings=self.settings, library=self.library, max_positions=self.settings.max_context
        )
        return model, ModelTokenizer(model.file)

    def generate(self, prompt: str, max_tokens: int) -> dict:
        if not prompt:
            raise InvalidRequestError("the prompt is empty")
        if not 1 <= max_tokens <= MAX_GENERATE_TOKENS:
            raise InvalidRequestError(f"max_tokens must be 1-{MAX_GENERATE_TOKENS}, got {max_tokens}")
        with self._lock:
            if self._loaded is None:
                self._loaded = self._load()
            model, tok = self._loaded
            ids = tok.encode(prompt)
            if len(ids) + max_tokens > self.settings.max_context:
                raise InvalidRequestError(
                    f"the prompt has {len(ids)} tokens; with max_tokens={max_tokens} that exceeds the "
                    f"context of {self.settings.max_context} (RYZ_MAX_CONTEXT)"
                )
            out = model.generate(ids, max_tokens, stop_ids=tok.stop_ids)
        finish = "length" if len(out) >= max_tokens else "stop"
        return {
            "text": tok.decode(out),
            "finish_reason": finish,
            "prompt_tokens": len(ids),
            "completion_tokens": len(out),
            "model": self.model_ref,
        }


def create_mcp_server(
    settings: Settings | None = None,
    model_ref: str = "production",
    index_ref: str = "production",
    library=None,
    retriever: Retriever | None = None,
):
    """The MCP server (`mcp.server.MCPServer`) with the `search_index` and `generate` tools."""
    from mcp.server import MCPServer

    settings = settings or get_settings()
    retriever = retriever or Retriever(settings)
    generator = Generator(settings, model_ref, library)
    server = MCPServer(
        "ryzanstein",
        instructions="Search this Ryzanstein installation's retrieval index with "
        "search_index (chunks of documents and code, with their file paths and lines) and generate text "
        "with its production ternary model with generate.",
    )

    @server.tool()
    def search_index(query: str, top_k: int = 5) -> dict:
        """Search the retrieval index: the top_k (1-50) chunks most similar to `query`, best first, each with its
        text, cosine score and source (path, start_line, end_line)."""
        with _tool_errors():
            if not query.strip():
                raise InvalidRequestError("the query is empty")
            if not 1 <= top_k <= MAX_TOP_K:
                raise InvalidRequestError(f"top_k must be 1-{MAX_TOP_K}, got {top_k}")
            hits, opened = retriever.search(query[:4000], top_k, index_ref)
        return {"index": opened.ref, "results": hits}

    @server.tool()
    def generate(prompt: str, max_tokens: int = 128) -> dict:
        """Continue `prompt` with the production ternary model (greedy, plain text: no chat template); at most
        max_tokens (1-1024) new tokens. Returns the text, why it stopped and token counts."""
        with _tool_errors():
            return generator.generate(prompt, max_tokens)

    return server


@contextlib.contextmanager
def _tool_errors():
    """Our errors say what is wrong and how to fix it: pass them to the client (the SDK hides other exceptions'
    messages), e.g. "no production index yet: build one with `ryz index build DIR`"."""
    from mcp.server.mcpserver.exceptions import ToolError

    try:
        yield
    except RyzError as exc:
        raise ToolError(str(exc)) from exc


def run_mcp(model_ref: str = "production", index_ref: str = "production", settings: Settings | None = None) -> None:
    """Serve MCP over stdin/stdout until the client closes it (what `ryz mcp` calls)."""
    settings = settings or get_settings()
    retriever = Retriever(settings)
    try:
        create_mcp_server(settings, model_ref, index_ref, retriever=retriever).run("stdio")
    finally:
        retriever.close()  # removes this process's unpacked copy of the index
