"""The retrieval index: chunk vectors in Qdrant, built and updated from a corpus, packed as an artifact.

Backends share one collection configuration (`IndexConfig`): cosine distance, the original float vectors on
disk (kept for rescoring), the quantized codes pinned in RAM (binary 1 / 1.5 / 2 bits with 8-bit scalar
query encoding, scalar int8, or none), and an HNSW graph (or a plain full scan of the codes). Search
oversamples with the quantized codes and rescores the candidates with the originals by default.

* `EdgeIndex`: Qdrant Edge (`qdrant-edge-py`, the real Qdrant engine in-process) on a shard directory; the
  default.
* `ServerIndex`: a Qdrant server or cluster through `qdrant-client`, when RYZ_QDRANT_URL is set.

An index directory holds `shard/` (Edge) and `ryz-index.json`: the configuration, the embedder (model id,
ONNX hash, dims), corpus stats and, per file, its hash and chunk ids. `update_index` compares the corpus
with that file map, embeds only chunks whose ids it has not seen, deletes chunks of changed or deleted
files, and (Edge) applies everything to a copy of the directory that replaces the old one only when
complete: a failure leaves the previous index as it was. `pack_index` tars the directory for the artifact
store; `unpack_index` restores it.
"""

from __future__ import annotations

import gzip
import json
import os
import secrets
import shutil
import tarfile
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Literal

import numpy as np

from engine.artifacts.registry import Registry, Version
from engine.artifacts.store import open_store
from engine.errors import ModelReferenceError, RetrievalIndexError, SchemaVersionError
from engine.fsutil import atomic_directory
from engine.retrieval.corpus import Chunk, CorpusScan, chunk_text, embedding_text, read_text
from engine.settings import get_settings

SCHEMA = 1
STATE_FILE = "ryz-index.json"
SHARD_DIR = "shard"
UPSERT_BATCH = 512
QUANTIZATIONS = ("none", "int8", "binary1", "binary1.5", "binary2")
Quantization = Literal["none", "int8", "binary1", "binary1.5", "binary2"]
BITS = {"none": 32, "int8": 8, "binary1": 1, "binary1.5": 1.5, "binary2": 2}


@dataclass(frozen=True)
class IndexConfig:
    """One collection configuration, used as-is by Qdrant Edge and by a Qdrant server."""

    dims: int = 384
    quantization: Quantization = "binary1"
    hnsw: bool = True
    hnsw_m: int = 8
    hnsw_ef_construct: int = 100
    hnsw_ef: int = 512
    oversampling: float = 16.0
    rescore: bool = True

    def __post_init__(self):
        if self.quantization not in QUANTIZATIONS:
            raise RetrievalIndexError(f"unknown quantization {self.quantization!r}: one of {', '.join(QUANTIZATIONS)}")

    @classmethod
    def from_settings(cls, settings, **overrides) -> IndexConfig:
        base = cls(
            dims=settings.index_dims,
            quantization=settings.index_quantization,
            hnsw=settings.index_hnsw,
            hnsw_m=settings.index_hnsw_m,
            hnsw_ef=settings.index_hnsw_ef,
            oversampling=settings.index_oversampling,
            rescore=settings.index_rescore,
        )
        return replace(base, **{k: v for k, v in overrides.items() if v is not None})

    def to_json(self) -> dict:
        return asdict(self)

    def structure(self) -> dict:
        """What the stored data depends on (search-time knobs excluded): a change here needs a rebuild."""
        return {
            k: v
            for k, v in asdict(self).items()
            if k in ("dims", "quantization", "hnsw", "hnsw_m", "hnsw_ef_construct")
        }


# --- backends --------------------------------------------------------------------------------------


def edge_config(cfg: IndexConfig):
    import qdrant_edge as qe

    quant: qe.ScalarQuantizationConfig | qe.BinaryQuantizationConfig | None = None
    if cfg.quantization == "int8":
        quant = qe.ScalarQuantizationConfig(type=qe.ScalarType.Int8, quantile=0.99, memory=qe.Memory.Pinned)
    elif cfg.quantization.startswith("binary"):
        encoding = {
            "binary1": qe.BinaryQuantizationEncoding.OneBit,
            "binary1.5": qe.BinaryQuantizationEncoding.OneAndHalfBits,
            "binary2": qe.BinaryQuantizationEncoding.TwoBits,
        }[cfg.quantization]
        quant = qe.BinaryQuantizationConfig(
            encoding=encoding, query_encoding=qe.BinaryQuantizationQueryEncoding.Scalar8Bits, memory=qe.Memory.Pinned
        )
    # with quantization the originals only serve rescoring: on disk (mmap); without, they are what is searched
    vectors = qe.EdgeVectorParams(
        size=cfg.dims, distance=qe.Distance.Cosine, memory=qe.Memory.Cold if quant is not None else qe.Memory.Cached
    )
    # plain: m=0 builds no graph, but segments are still optimized (codes built, originals moved to disk)
    hnsw = qe.HnswIndexConfig(
        m=cfg.hnsw_m if cfg.hnsw else 0, ef_construct=cfg.hnsw_ef_construct, full_scan_threshold=10
    )
    optimizers = qe.EdgeOptimizersConfig(indexing_threshold=1000, default_segment_number=1)
    return qe.EdgeConfig(
        vectors=vectors,
        quantization_config=quant,
        hnsw_config=hnsw,
        optimizers=optimizers,
        wal_enabled=False,
        payload_memory=qe.Memory.Cold,
    )


def _as_id(point_id) -> str:
    return str(point_id)


class EdgeIndex:
    """A Qdrant Edge shard directory."""

    backend = "edge"

    def __init__(self, shard, path: Path, cfg: IndexConfig):
        self.shard, self.path, self.cfg = shard, Path(path), cfg

    @classmethod
    def create(cls, path: Path, cfg: IndexConfig) -> EdgeIndex:
        import qdrant_edge as qe

        return cls(qe.EdgeShard.create(str(path), edge_config(cfg)), path, cfg)

    @classmethod
    def open(cls, path: Path, cfg: IndexConfig) -> EdgeIndex:
        import qdrant_edge as qe

        if not (Path(path) / "edge_config.json").is_file():
            raise RetrievalIndexError(f"{path} is not a Qdrant Edge shard (no edge_config.json); rebuild the index")
        return cls(qe.EdgeShard.load(str(path)), path, cfg)

    def upsert(self, ids: list[str], vectors: np.ndarray, payloads: list[dict]) -> None:
        import qdrant_edge as qe

        for start in range(0, len(ids), UPSERT_BATCH):
            end = start + UPSERT_BATCH
            points = [
                qe.Point(i, v.tolist(), p) for i, v, p in zip(ids[start:end], vectors[start:end], payloads[start:end])
            ]
            self.shard.update(qe.UpdateOperation.upsert_points(points))

    def delete(self, ids: list[str]) -> None:
        import qdrant_edge as qe

        for start in range(0, len(ids), UPSERT_BATCH):
            self.shard.update(qe.UpdateOperation.delete_points(list(ids[start : start + UPSERT_BATCH])))

    def _params(self, exact: bool = False):
        import qdrant_edge as qe

        quant = None
        if self.cfg.quantization != "none":
            quant = qe.QuantizationSearchParams(
                ignore=exact, rescore=self.cfg.rescore, oversampling=self.cfg.oversampling
            )
        return qe.SearchParams(hnsw_ef=self.cfg.hnsw_ef, exact=exact, quantization=quant)

    def search(self, vector: np.ndarray, limit: int = 10, with_payload: bool = True, exact: bool = False) -> list[dict]:
        import qdrant_edge as qe

        hits = self.shard.query(
            qe.QueryRequest(
                limit=limit,
                query=qe.Query.Nearest(np.asarray(vector, np.float32).tolist()),
                params=self._params(exact),
                with_payload=with_payload,
            )
        )
        return [
            {"id": _as_id(h.id), "score": h.score, **({"payload": h.payload} if with_payload else {})} for h in hits
        ]

    def retrieve_vectors(self, ids: list[str]) -> dict[str, np.ndarray]:
        out = {}
        for start in range(0, len(ids), UPSERT_BATCH):
            for rec in self.shard.retrieve(
                list(ids[start : start + UPSERT_BATCH]), with_payload=False, with_vector=True
            ):
                out[_as_id(rec.id)] = np.asarray(_plain_vector(rec.vector), np.float32)
        return out

    def retrieve_points(self, ids: list[str]) -> list[tuple[str, np.ndarray, dict]]:
        return [
            (_as_id(rec.id), np.asarray(_plain_vector(rec.vector), np.float32), rec.payload or {})
            for rec in self.shard.retrieve(list(ids), with_payload=True, with_vector=True)
        ]

    def scroll(
        self, with_vectors: bool = True, with_payload: bool = True
    ) -> Iterable[tuple[str, np.ndarray | None, dict | None]]:
        import qdrant_edge as qe

        offset = None
        while True:
            records, offset = self.shard.scroll(
                qe.ScrollRequest(offset=offset, limit=1024, with_vector=with_vectors, with_payload=with_payload)
            )
            for rec in records:
                yield (
                    _as_id(rec.id),
                    (np.asarray(_plain_vector(rec.vector), np.float32) if with_vectors else None),
                    rec.payload,
                )
            if offset is None:
                return

    def count(self) -> int:
        return self.shard.info().points_count

    def optimize(self) -> None:
        self.shard.optimize()

    def flush(self) -> None:
        self.shard.flush()

    def close(self) -> None:
        self.shard.close()

    def ram_bytes(self) -> dict:
        return shard_bytes(self.path, max(self.count(), 1)) or theoretical_bytes(self.cfg)


def _plain_vector(vector):
    if isinstance(vector, dict):  # named vectors: the default one is ""
        vector = vector.get("", next(iter(vector.values())))
    return vector


class ServerIndex:
    """A collection on a Qdrant server or cluster (qdrant-client), configured like the Edge shard."""

    backend = "server"

    def __init__(self, url: str, collection: str, cfg: IndexConfig, create: bool = False):
        from qdrant_client import QdrantClient

        self.client, self.collection, self.cfg, self.url = QdrantClient(url=url, timeout=60), collection, cfg, url
        if create:
            if self.client.collection_exists(collection):
                self.client.delete_collection(collection)
            self.client.create_collection(collection, **server_collection_params(cfg))
        elif not self.client.collection_exists(collection):
            raise RetrievalIndexError(f"collection {collection!r} does not exist on {url}; build the index first")

    def upsert(self, ids, vectors, payloads) -> None:
        from qdrant_client import models

        for start in range(0, len(ids), UPSERT_BATCH):
            end = start + UPSERT_BATCH
            self.client.upsert(
                self.collection,
                wait=True,
                points=[
                    models.PointStruct(id=i, vector=v.tolist(), payload=p)
                    for i, v, p in zip(ids[start:end], vectors[start:end], payloads[start:end])
                ],
            )

    def delete(self, ids) -> None:
        from qdrant_client import models

        for start in range(0, len(ids), UPSERT_BATCH):
            self.client.delete(
                self.collection, models.PointIdsList(points=list(ids[start : start + UPSERT_BATCH])), wait=True
            )

    def search(self, vector, limit: int = 10, with_payload: bool = True, exact: bool = False) -> list[dict]:
        from qdrant_client import models

        quant = None
        if self.cfg.quantization != "none":
            quant = models.QuantizationSearchParams(
                ignore=exact, rescore=self.cfg.rescore, oversampling=self.cfg.oversampling
            )
        hits = self.client.query_points(
            self.collection,
            query=np.asarray(vector, np.float32).tolist(),
            limit=limit,
            with_payload=with_payload,
            search_params=models.SearchParams(hnsw_ef=self.cfg.hnsw_ef, exact=exact, quantization=quant),
        ).points
        return [
            {"id": _as_id(h.id), "score": h.score, **({"payload": h.payload} if with_payload else {})} for h in hits
        ]

    def retrieve_vectors(self, ids) -> dict[str, np.ndarray]:
        out = {}
        for start in range(0, len(ids), UPSERT_BATCH):
            for rec in self.client.retrieve(
                self.collection, list(ids[start : start + UPSERT_BATCH]), with_vectors=True
            ):
                out[_as_id(rec.id)] = np.asarray(_plain_vector(rec.vector), np.float32)
        return out

    def scroll(self, with_vectors: bool = True, with_payload: bool = True):
        offset = None
        while True:
            records, offset = self.client.scroll(
                self.collection, limit=1024, offset=offset, with_vectors=with_vectors, with_payload=with_payload
            )
            for rec in records:
                yield (
                    _as_id(rec.id),
                    (np.asarray(_plain_vector(rec.vector), np.float32) if with_vectors else None),
                    rec.payload,
                )
            if offset is None:
                return

    def count(self) -> int:
        return self.client.count(self.collection, exact=True).count

    def optimize(self) -> None:
        pass  # the server optimizes in the background

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.client.close()

    def ram_bytes(self) -> dict:
        return theoretical_bytes(self.cfg)

    def snapshot(self, dest: Path) -> Path:
        """Create a collection snapshot on the server and download it to dest."""
        import httpx

        description = self.client.create_snapshot(self.collection, wait=True)
        if description is None:  # only without wait=True does the client return no description
            raise RetrievalIndexError(f"the Qdrant server at {self.url} returned no snapshot of {self.collection}")
        url = f"{self.url.rstrip('/')}/collections/{self.collection}/snapshots/{description.name}"
        with httpx.stream("GET", url, timeout=600) as response, open(dest, "wb") as out:
            response.raise_for_status()
            for chunk in response.iter_bytes(1 << 20):
                out.write(chunk)
        return dest


def server_collection_params(cfg: IndexConfig) -> dict:
    """`create_collection` arguments equal to `edge_config(cfg)`."""
    from qdrant_client import models

    quant: models.ScalarQuantization | models.BinaryQuantization | None = None
    if cfg.quantization == "int8":
        quant = models.ScalarQuantization(
            scalar=models.ScalarQuantizationConfig(type=models.ScalarType.INT8, quantile=0.99, always_ram=True)
        )
    elif cfg.quantization.startswith("binary"):
        encoding = {
            "binary1": models.BinaryQuantizationEncoding.ONE_BIT,
            "binary1.5": models.BinaryQuantizationEncoding.ONE_AND_HALF_BITS,
            "binary2": models.BinaryQuantizationEncoding.TWO_BITS,
        }[cfg.quantization]
        quant = models.BinaryQuantization(
            binary=models.BinaryQuantizationConfig(
                always_ram=True, encoding=encoding, query_encoding=models.BinaryQuantizationQueryEncoding.SCALAR8BITS
            )
        )
    return {
        "vectors_config": models.VectorParams(
            size=cfg.dims, distance=models.Distance.COSINE, on_disk=quant is not None
        ),
        "quantization_config": quant,
        "hnsw_config": models.HnswConfigDiff(
            m=cfg.hnsw_m if cfg.hnsw else 0, ef_construct=cfg.hnsw_ef_construct, full_scan_threshold=10
        ),
        "optimizers_config": models.OptimizersConfigDiff(indexing_threshold=1000, default_segment_number=1),
    }


def theoretical_bytes(cfg: IndexConfig) -> dict:
    """Bytes per vector by the encoding's definition (servers do not expose their files)."""
    code = cfg.dims * BITS[cfg.quantization] / 8
    return {
        "quantized": code if cfg.quantization != "none" else 0.0,
        "hnsw": None,
        "originals": cfg.dims * 4.0,
        "ram": code,
        "measured": False,
    }


def shard_bytes(path: Path, points: int) -> dict | None:
    """Bytes per vector of an optimized Edge shard, measured from its segment files: the quantized codes and
    the HNSW links (held in RAM for search) and the original float vectors (on disk, read to rescore)."""
    quantized: float  # bytes, then bytes per vector
    hnsw: float
    originals: float
    quantized = hnsw = originals = 0
    for segment in (Path(path) / "segments").glob("*"):
        storage, index = segment / "vector_storage", segment / "vector_index"
        if (storage / "quantized.data").is_file():
            quantized += (storage / "quantized.data").stat().st_size
        if (storage / "matrix.dat").is_file():
            originals += (storage / "matrix.dat").stat().st_size
        if index.is_dir():
            hnsw += sum(f.stat().st_size for f in index.glob("*.bin"))
    if not originals:  # not optimized yet (fewer points than the indexing threshold): files are preallocated pages
        return None
    quantized, hnsw, originals = quantized / points, hnsw / points, originals / points
    in_ram = quantized if quantized else originals
    return {"quantized": quantized, "hnsw": hnsw, "originals": originals, "ram": in_ram + hnsw, "measured": True}


# --- state -----------------------------------------------------------------------------------------


def read_state(index_dir: Path) -> dict | None:
    path = Path(index_dir) / STATE_FILE
    if not path.is_file():
        return None
    state = json.loads(path.read_text())
    if state.get("schema") != SCHEMA:
        raise SchemaVersionError(
            f"{path} has schema {state.get('schema')!r}; this Ryzanstein reads schema {SCHEMA}: "
            "rebuild the index (`ryz index build DIR --full`) or upgrade Ryzanstein"
        )
    return state


def open_index(index_dir: Path, qdrant_url: str | None = None, search_overrides: dict | None = None):
    """(backend, state) of a built index directory; search knobs (oversampling, rescore, hnsw_ef) may be overridden."""
    state = read_state(index_dir)
    if state is None:
        raise RetrievalIndexError(
            f"{index_dir} holds no index ({STATE_FILE} missing); build one with `ryz index build DIR`"
        )
    cfg = replace(IndexConfig(**state["config"]), **(search_overrides or {}))
    if state["backend"] == "server":
        return ServerIndex(qdrant_url or state["url"], state["collection"], cfg), state
    return EdgeIndex.open(Path(index_dir) / SHARD_DIR, cfg), state


def _payload(chunk: Chunk, file_sha: str) -> dict:
    return {
        "path": chunk.path,
        "start_line": chunk.start_line,
        "end_line": chunk.end_line,
        "text": chunk.text,
        "file_sha256": file_sha,
    }


def update_index(
    index_dir: Path,
    scan: CorpusScan,
    embedder,
    cfg: IndexConfig,
    *,
    full: bool = False,
    chunk_chars: int = 1000,
    overlap_chars: int = 150,
    qdrant_url: str | None = None,
    collection: str = "ryz-index",
    log: Callable[[str], None] = lambda _m: None,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Bring the index at index_dir up to date with the scanned corpus; returns what changed.

    Only changed files are chunked, only never-seen chunk ids are embedded. Embedding happens before anything
    is written; the Edge shard is then updated in a copy that replaces index_dir only when complete.
    """
    index_dir = Path(index_dir)
    state = None if full else read_state(index_dir)
    backend = "server" if qdrant_url else "edge"
    restructure = False  # only the shard's structure changed: a new shard from the old one's vectors and payloads
    if state is not None:
        why = []
        if state["config"] and IndexConfig(**state["config"]).structure() != cfg.structure():
            why.append(f"configuration {IndexConfig(**state['config']).structure()} -> {cfg.structure()}")
        if state["embedder"]["onnx_sha256"] != embedder.onnx_sha256 or state["embedder"]["dims"] != embedder.dims:
            why.append(
                f"embedder {state['embedder']['onnx_sha256'][:19]}/{state['embedder']['dims']} -> "
                f"{embedder.onnx_sha256[:19]}/{embedder.dims}"
            )
        if state["backend"] != backend:
            why.append(f"backend {state['backend']} -> {backend}")
        if (
            why == [f"configuration {IndexConfig(**state['config']).structure()} -> {cfg.structure()}"]
            and backend == "edge"
            and state["config"]["dims"] == cfg.dims
        ):
            log(f"new shard, vectors reused (same embedder): {why[0]}")
            restructure = True
        elif why:
            log(f"full rebuild: {'; '.join(why)}")
            state = None
    old_files: dict = state["files"] if state else {}
    current = {f.path: f for f in scan.files}
    unreadable = {u["path"] for u in scan.unreadable}
    changed = [f for f in scan.files if old_files.get(f.path, {}).get("sha256") != f.sha256]
    deleted = sorted(p for p in old_files if p not in current and p not in unreadable)
    known_ids = {i for entry in old_files.values() for i in entry["chunks"]}

    # Transform: chunk the changed files; a file that vanished or became unreadable since the scan is reported
    files = {p: e for p, e in old_files.items() if p not in deleted}
    new_chunks: list[tuple[Chunk, str]] = []
    read_errors = []
    for f in changed:
        try:
            text = read_text(scan.root, f.path)
        except (OSError, UnicodeDecodeError) as exc:
            read_errors.append({"path": f.path, "error": getattr(exc, "strerror", None) or str(exc)})
            continue
        chunks = chunk_text(text, f.path, chunk_chars, overlap_chars)
        files[f.path] = {"sha256": f.sha256, "chunks": [c.id for c in chunks]}
        new_chunks.extend((c, f.sha256) for c in chunks)
    new_ids = {c.id for c, _ in new_chunks}
    stale = sorted(
        {i for p in [f.path for f in changed] + deleted for i in old_files.get(p, {}).get("chunks", [])} - new_ids
    )
    to_embed = [(c, sha) for c, sha in new_chunks if c.id not in known_ids]
    reuse = [(c, sha) for c, sha in new_chunks if c.id in known_ids]
    log(
        f"{len(scan.files)} files: {len(changed)} changed or new, {len(deleted)} deleted; {len(new_chunks)} chunks "
        f"to write ({len(to_embed)} to embed, {len(reuse)} reused), {len(stale)} to delete"
    )

    carried = (
        sorted({i for p, e in files.items() if p not in {f.path for f in changed} for i in e["chunks"]})
        if restructure
        else []
    )
    if state is not None and not (changed or deleted or restructure):  # the shard stays byte for byte
        points = sum(len(e["chunks"]) for e in files.values())
        reconfigured = state["config"] != cfg.to_json()
        if reconfigured:  # search knobs only (oversampling, rescore, hnsw_ef): the state file is rewritten
            tmp = index_dir / f".tmp-{secrets.token_hex(6)}-{STATE_FILE}"
            tmp.write_text(json.dumps({**state, "config": cfg.to_json(), "updated": time.time()}) + "\n")
            os.replace(tmp, index_dir / STATE_FILE)
            log(f"search configuration {state['config']} -> {cfg.to_json()}")
        return {
            "files": len(scan.files),
            "changed": 0,
            "deleted": 0,
            "chunks": points,
            "embedded": 0,
            "reused": 0,
            "removed": 0,
            "embed_s": 0.0,
            "read_errors": [],
            "full": False,
            "reconfigured": reconfigured,
        }

    # Embed first: the slow, failure-prone step; nothing has been written yet
    started = time.perf_counter()
    vectors = (
        embedder.encode([embedding_text(c) for c, _ in to_embed], progress=progress)
        if to_embed
        else np.zeros((0, cfg.dims), np.float32)
    )
    embed_s = time.perf_counter() - started

    # Load: into a copy of the index directory (Edge), swapped in only when complete
    with atomic_directory(index_dir, prefix=f".tmp-{index_dir.name}-") as work:
        idx: EdgeIndex | ServerIndex
        if backend == "edge":
            if state is not None and not restructure:
                shutil.copytree(index_dir / SHARD_DIR, work / SHARD_DIR)
                idx = EdgeIndex.open(work / SHARD_DIR, cfg)
            else:
                idx = EdgeIndex.create(work / SHARD_DIR, cfg)
            if restructure:  # copy every chunk that stays, vector and payload, from the old shard
                assert state is not None  # restructure is only set while a previous state is kept
                old_idx = EdgeIndex.open(index_dir / SHARD_DIR, IndexConfig(**state["config"]))
                try:
                    for start in range(0, len(carried), UPSERT_BATCH):
                        batch = old_idx.retrieve_points(carried[start : start + UPSERT_BATCH])
                        idx.upsert([b[0] for b in batch], np.stack([b[1] for b in batch]), [b[2] for b in batch])
                    reused_old = old_idx.retrieve_vectors([c.id for c, _ in reuse]) if reuse else {}
                finally:
                    old_idx.close()
        else:
            assert qdrant_url  # the server backend is chosen by a qdrant_url
            idx = ServerIndex(qdrant_url, collection, cfg, create=state is None)
        try:
            reused = reused_old if restructure else idx.retrieve_vectors([c.id for c, _ in reuse]) if reuse else {}
            if missing := [c.id for c, _ in reuse if c.id not in reused]:
                raise RetrievalIndexError(
                    f"{len(missing)} chunks listed in {STATE_FILE} are missing from the index "
                    f"(first: {missing[0]}); rebuild it with --full"
                )
            items = [(c, sha, v) for (c, sha), v in zip(to_embed, vectors)] + [
                (c, sha, reused[c.id]) for c, sha in reuse
            ]
            if items:
                idx.upsert(
                    [c.id for c, _, _ in items],
                    np.stack([v for _, _, v in items]),
                    [_payload(c, sha) for c, sha, _ in items],
                )
            if stale:
                idx.delete(stale)
            idx.optimize()
            idx.flush()
            points = idx.count()
        finally:
            idx.close()
        expected = sum(len(e["chunks"]) for e in files.values())
        if points != expected:
            raise RetrievalIndexError(
                f"the index holds {points} points but its file map lists {expected} chunks; "
                "nothing was replaced: rebuild with --full"
            )
        new_state = {
            "schema": SCHEMA,
            "backend": backend,
            "config": cfg.to_json(),
            "embedder": embedder.describe(),
            "collection": collection if backend == "server" else None,
            "url": qdrant_url if backend == "server" else None,
            "corpus": {
                "root": str(scan.root),
                **scan.stats(),
                "chunks": points,
                "chunk_chars": chunk_chars,
                "overlap_chars": overlap_chars,
            },
            "updated": time.time(),
            "files": dict(sorted(files.items())),
        }
        (work / STATE_FILE).write_text(json.dumps(new_state) + "\n")
    return {
        "files": len(scan.files),
        "changed": len(changed),
        "deleted": len(deleted),
        "chunks": points,
        "embedded": len(to_embed),
        "reused": len(reuse) + len(carried),
        "removed": len(stale),
        "embed_s": round(embed_s, 3),
        "read_errors": read_errors,
        "full": state is None or restructure,
        "reconfigured": restructure,
    }


# --- packing ---------------------------------------------------------------------------------------


def _reset(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
    return info


def pack_index(index_dir: Path, dest: Path, snapshot: Path | None = None) -> Path:
    """A tarball of the index directory (shard + ryz-index.json; for a server index, ryz-index.json and the
    collection snapshot), entries sorted and timestamps zeroed so equal content gives equal bytes."""
    index_dir, dest = Path(index_dir), Path(dest)
    # gzip with mtime 0 (deterministic); Qdrant preallocates segment pages, and zeros compress away
    with (
        open(dest, "wb") as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6) as gz,
        tarfile.open(fileobj=gz, mode="w") as tar,
    ):
        tar.add(index_dir / STATE_FILE, arcname=STATE_FILE, filter=_reset)
        if snapshot is not None:
            tar.add(snapshot, arcname="collection.snapshot", filter=_reset)
        shard = index_dir / SHARD_DIR
        if shard.is_dir():
            for path in sorted(shard.rglob("*")):
                tar.add(path, arcname=path.relative_to(index_dir).as_posix(), recursive=False, filter=_reset)
    return dest


def unpack_index(tar_path: Path, dest: Path) -> Path:
    """Extract a packed index into dest (refusing paths outside it)."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tar_path, "r:*") as tar:
        tar.extractall(dest, filter="data")
    if not (dest / STATE_FILE).is_file():
        raise RetrievalIndexError(f"{tar_path} is not an index artifact: it has no {STATE_FILE}")
    return dest


def manifest_fields(state: dict, evaluation: dict | None) -> dict:
    """The index artifact's manifest (DESIGN.md "Index artifact")."""
    corpus = {k: v for k, v in state["corpus"].items() if k != "unreadable"}
    corpus["unreadable"] = len(state["corpus"].get("unreadable", []))
    return {
        "format": "qdrant-edge-shard" if state["backend"] == "edge" else "qdrant-collection-snapshot",
        "embedder": state["embedder"],
        "dims": state["config"]["dims"],
        "quantization": state["config"]["quantization"],
        "config": state["config"],
        "corpus": corpus,
        "evaluation": evaluation or {},
    }


def read_payloads_text(idx) -> tuple[list[str], np.ndarray, list[dict]]:
    """All (ids, vectors, payloads) of an index, scrolled."""
    ids, vecs, payloads = [], [], []
    for i, v, p in idx.scroll(with_vectors=True, with_payload=True):
        ids.append(i)
        vecs.append(v)
        payloads.append(p or {})
    return ids, (np.stack(vecs) if vecs else np.zeros((0, idx.cfg.dims), np.float32)), payloads


def describe_bytes(b: dict, dims: int) -> dict:
    return {k: (round(v, 2) if isinstance(v, float) else v) for k, v in b.items()} | {"float32": dims * 4}


# --- references ------------------------------------------------------------------------------------

REGISTRY_NAME = "index"
ARTIFACT_KIND = "index"


def default_index_dir(settings) -> Path:
    return Path(settings.index_dir) if settings.index_dir else settings.home / "indexes" / "default"


def embedder_for(state: dict, settings=None):
    """The embedder an index was built with (same precision and dims; the ONNX hash is checked by callers)."""
    from engine.retrieval.embedder import Embedder

    settings = settings or get_settings()
    emb = state["embedder"]
    return Embedder.load(
        settings.cache_dir,
        precision=emb["precision"],
        dims=emb["dims"],
        batch_size=settings.index_batch_size,
        threads=settings.threads or os.cpu_count() or 1,
    )


def production_index(registry):
    """The index version with status `production`, or None. (Registry aliases are global, one `production` for
    the model being served, so an index is published by status, never through the alias.)"""
    live = [v for v in registry.versions(REGISTRY_NAME) if v.status == "production"]
    return max(live, key=lambda v: v.version) if live else None


def publish_index(registry, ref: str, reason: str):
    """Make index version `ref` the production index; the previous one becomes `retired`. One registry write."""

    def change(state: dict):
        versions = state["models"].get(REGISTRY_NAME, [])
        number = int(ref.split(":", 1)[1]) if ref.startswith(f"{REGISTRY_NAME}:") else None
        target = (
            next((v for v in versions if v["version"] == number), None)
            if number is not None
            else (max(versions, key=lambda v: v["version"]) if versions and ref == REGISTRY_NAME else None)
        )
        if target is None:
            raise ModelReferenceError(f"no index version {ref!r}; `ryz registry list index` shows them")
        if target["status"] == "production":
            raise ModelReferenceError(f"{REGISTRY_NAME}:{target['version']} is already the production index")
        previous = [v for v in versions if v["status"] == "production"]
        for v in previous:
            v["status"] = "retired"
        target["status"] = "production"
        state["events"].append(
            {
                "time": time.time(),
                "actor": registry.actor,
                "action": "publish",
                "name": REGISTRY_NAME,
                "version": target["version"],
                "reason": reason,
                **({"alias_from": f"{REGISTRY_NAME}:{previous[0]['version']}"} if previous else {}),
                "alias_to": f"{REGISTRY_NAME}:{target['version']}",
            }
        )
        return Version.from_json(target)

    return registry.update(change, f"publishing {ref}")


def resolve_artifact(ref: str, store, registry) -> tuple[str, str | None]:
    """(artifact id, registry ref or None) of an index reference: `production` (the published index), `index`
    (the newest version), `index:N`, or an artifact id / prefix."""
    if ref == "production":
        version = production_index(registry)
        if version is None:
            raise ModelReferenceError(
                "no production index yet: build one with `ryz index build DIR` (the first build "
                "is published) or publish a version with `ryz index publish index:N`"
            )
        return version.artifact_id, version.ref
    if ref == REGISTRY_NAME or ref.startswith(f"{REGISTRY_NAME}:"):
        version = registry.get(ref)
        return version.artifact_id, version.ref
    artifact_id = store.resolve(ref)
    kind = store.get_manifest(artifact_id).get("kind")
    if kind != ARTIFACT_KIND:
        raise RetrievalIndexError(f"artifact {artifact_id} is a {kind} artifact, not an index")
    return artifact_id, None


@contextmanager
def resolve_index(ref: str, settings=None):
    """A local index directory for `ref`: an existing index directory as-is, else the artifact (registry
    reference or artifact id) unpacked into a temporary directory removed on exit."""
    settings = settings or get_settings()
    if Path(ref).expanduser().is_dir():
        if not (Path(ref).expanduser() / STATE_FILE).is_file():
            raise RetrievalIndexError(f"{ref} is a directory but holds no index ({STATE_FILE} missing)")
        yield Path(ref).expanduser()
        return
    store = open_store(settings=settings)
    artifact_id, _ = resolve_artifact(ref, store, Registry(store))
    tmp = Path(tempfile.mkdtemp(prefix="ryz-index-", dir=settings.cache_dir if settings.cache_dir.exists() else None))
    try:
        yield unpack_index(store.local_path(artifact_id), tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
