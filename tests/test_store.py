"""The artifact store on both backends: a local directory, and S3 through moto over real HTTP."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
from datetime import datetime, timedelta

import pytest

from engine.artifacts import store as store_mod
from engine.artifacts.store import FileStore, S3Store, open_store
from engine.errors import (
    AmbiguousReferenceError,
    ArtifactNotFoundError,
    ConflictError,
    IntegrityError,
    SchemaVersionError,
    StoreError,
)
from engine.settings import Settings

MiB = 1 << 20


def _blob_rel(artifact_id: str) -> str:
    hex_ = artifact_id.removeprefix("sha256:")
    return f"blobs/sha256/{hex_[:2]}/{hex_}"


def _stored(store) -> list[str]:
    """Every file or object the store holds."""
    if isinstance(store, FileStore):
        return sorted(p.relative_to(store.root).as_posix() for p in store.root.rglob("*") if p.is_file())
    return sorted(o["Key"] for o in store._s3.list_objects_v2(Bucket=store.bucket).get("Contents", []))


def _flip_byte(store, artifact_id: str) -> None:
    if isinstance(store, FileStore):
        path = store.root / _blob_rel(artifact_id)
        os.chmod(path, 0o644)  # blobs are stored read-only
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 1
        path.write_bytes(data)
    else:
        key = store._key(_blob_rel(artifact_id))
        data = bytearray(store._s3.get_object(Bucket=store.bucket, Key=key)["Body"].read())
        data[len(data) // 2] ^= 1
        store._s3.put_object(Bucket=store.bucket, Key=key, Body=bytes(data))


def _write_file(path, size):
    data = os.urandom(size)
    path.write_bytes(data)
    return data


def test_put_fetch_round_trip(store, tmp_path):
    data = _write_file(tmp_path / "model.gguf", 3 * MiB + 123)
    seen = []
    aid = store.put_file(tmp_path / "model.gguf", "model", {"arch": "bitnet"}, progress=seen.append)
    assert aid == "sha256:" + hashlib.sha256(data).hexdigest()
    assert sum(seen) == len(data)

    manifest = store.get_manifest(aid)
    assert {k: manifest[k] for k in ("schema", "artifact_id", "kind", "size", "arch")} == {
        "schema": 1,
        "artifact_id": aid,
        "kind": "model",
        "size": len(data),
        "arch": "bitnet",
    }
    assert datetime.fromisoformat(manifest["created"]).utcoffset() == timedelta(0)
    assert store.exists(aid)

    out = tmp_path / "out"
    assert store.fetch(aid, out / "copy.gguf").read_bytes() == data
    assert [p.name for p in out.iterdir()] == ["copy.gguf"]  # no temp files left
    assert store.local_path(aid).read_bytes() == data
    with store.open_read(aid) as f:
        assert f.read() == data

    # the same bytes again: same id, first manifest kept
    assert store.put_file(tmp_path / "model.gguf", "other", {"arch": "x"}) == aid
    assert store.get_manifest(aid) == manifest


def test_put_bytes_list_update_delete(store):
    a = store.put_bytes(b"alpha", "model")
    b = store.put_bytes(b"beta", "index", {"dims": 384})
    assert [m["artifact_id"] for m in store.list_artifacts()] == [b, a]  # newest first
    assert [m["artifact_id"] for m in store.list_artifacts("model")] == [a]

    merged = store.update_manifest(a, {"recall": 0.9})
    assert merged["recall"] == store.get_manifest(a)["recall"] == 0.9
    assert merged["kind"] == "model"
    assert store.update_manifest(a, {"kind": "model"})["kind"] == "model"  # repeating the store's keys is fine
    with pytest.raises(ValueError, match=r"\['size'\] are set by the store"):
        store.update_manifest(a, {"size": 1})
    # manifest fields may repeat schema/kind but never contradict what the store computes
    c = store.put_bytes(b"gamma", "model", {"schema": 1, "kind": "model", "note": "ok"})
    assert store.get_manifest(c)["note"] == "ok"
    for bad in ({"kind": "index"}, {"schema": 2}, {"size": 5}, {"artifact_id": c}, {"created": "2020"}):
        with pytest.raises(ValueError, match="set by the store"):
            store.put_bytes(b"delta", "model", bad)
    assert not any(hashlib.sha256(b"delta").hexdigest() in key for key in _stored(store))  # not even a blob
    store.delete(c)

    store.delete(a)
    assert not store.exists(a)
    assert [m["artifact_id"] for m in store.list_artifacts()] == [b]
    with pytest.raises(ArtifactNotFoundError):
        store.get_manifest(a)
    with pytest.raises(ArtifactNotFoundError):
        store.open_read(a)
    store.delete(a)  # idempotent


def test_multipart_upload(store, tmp_path, monkeypatch):
    monkeypatch.setattr(store_mod, "MULTIPART_THRESHOLD", 5 * MiB)
    monkeypatch.setattr(store_mod, "MULTIPART_CHUNKSIZE", 5 * MiB)
    data = _write_file(tmp_path / "big.bin", 11 * MiB)
    aid = store.put_file(tmp_path / "big.bin", "model")
    assert store.fetch(aid, tmp_path / "back.bin").read_bytes() == data
    if isinstance(store, S3Store):
        head = store._s3.head_object(Bucket=store.bucket, Key=store._key(_blob_rel(aid)))
        assert head["ETag"].strip('"').endswith("-3")  # really uploaded as 3 parts


def test_resolve(store):
    aid = store.put_bytes(b"resolve me", "model")
    hex_ = aid.removeprefix("sha256:")
    assert store.resolve(aid) == aid
    assert store.resolve(hex_) == aid
    assert store.resolve(hex_[:12]) == aid
    assert store.resolve("sha256:" + hex_[:12].upper()) == aid
    with pytest.raises(ValueError, match="too short.*at least 12 hex digits"):
        store.resolve(hex_[:11])
    with pytest.raises(ValueError, match="not an artifact id or prefix"):
        store.resolve("model:1")
    with pytest.raises(ArtifactNotFoundError, match="no artifact matches"):
        store.resolve("sha256:" + "0" * 64)
    with pytest.raises(ArtifactNotFoundError):
        store.resolve(("0" if hex_[0] != "0" else "1") + hex_[1:12])

    # a second artifact sharing the first 12 hex digits: write its manifest directly
    twin = hex_[:12] + ("0" if hex_[12] != "0" else "1") + hex_[13:]
    doc = {"schema": 1, "artifact_id": f"sha256:{twin}", "kind": "model", "size": 1, "created": "2020-01-01"}
    store._write_cas(f"manifests/sha256/{twin}.json", json.dumps(doc).encode(), None)
    with pytest.raises(AmbiguousReferenceError, match="matches 2 artifacts") as err:
        store.resolve(hex_[:12])
    assert aid in str(err.value) and f"sha256:{twin}" in str(err.value)
    assert store.resolve(hex_[:13]) == aid


def test_corrupt_blob_is_refused(store, tmp_path):
    aid = store.put_bytes(os.urandom(200_000), "model")
    _flip_byte(store, aid)
    dest_dir = tmp_path / "fetched"
    with pytest.raises(IntegrityError, match=f"sha256 mismatch for {aid} in {store.url}: stored bytes hash to"):
        store.fetch(aid, dest_dir / "model.gguf")
    assert list(dest_dir.iterdir()) == []  # neither dest nor a temp file
    with pytest.raises(IntegrityError, match="the blob is corrupt"):
        store.local_path(aid, verify=True)
    if isinstance(store, S3Store):
        assert list((store.settings.cache_dir / "blobs").iterdir()) == []


def test_local_path_is_verified_once(store, monkeypatch):
    aid = store.put_bytes(b"y" * 1000, "model")
    calls = []
    real_hash = store_mod._hash_file
    monkeypatch.setattr(store_mod, "_hash_file", lambda path: calls.append(path) or real_hash(path))
    first, second = store.local_path(aid), store.local_path(aid)
    assert first == second and first.read_bytes() == b"y" * 1000
    # file: hashed on the first call only; S3: verified while downloading, never re-hashed
    assert len(calls) == (1 if isinstance(store, FileStore) else 0)


@pytest.mark.parametrize("multipart", [False, True], ids=["single-put", "multipart"])
@pytest.mark.parametrize("base", [Exception, BaseException], ids=["error", "base-exception"])
def test_interrupted_put_leaves_nothing(store, tmp_path, monkeypatch, multipart, base):
    if multipart:
        monkeypatch.setattr(store_mod, "MULTIPART_THRESHOLD", 5 * MiB)
        monkeypatch.setattr(store_mod, "MULTIPART_CHUNKSIZE", 5 * MiB)
    size = 11 * MiB
    _write_file(tmp_path / "model.gguf", size)

    class Interrupted(base):  # base-exception: like a KeyboardInterrupt
        pass

    written = 0

    def progress(n):  # called while bytes are being stored: fail half-way
        nonlocal written
        written += n
        if written > size // 2:
            raise Interrupted

    # s3transfer runs progress in worker threads and turns a BaseException there into a failed upload
    expected = Interrupted if base is Exception or isinstance(store, FileStore) else (Interrupted, StoreError)
    with pytest.raises(expected):
        store.put_file(tmp_path / "model.gguf", "model", progress=progress)
    assert _stored(store) == []
    assert store.list_artifacts() == []
    if isinstance(store, S3Store):
        assert not store._s3.list_multipart_uploads(Bucket=store.bucket).get("Uploads")


def test_document_compare_and_swap(store):
    key = "registry/aliases"
    assert store.read_document(key) == (None, None)
    first = store.write_document(key, {"production": 1}, None)
    assert store.read_document(key) == ({"production": 1}, first)
    second = store.write_document(key, {"production": 2}, first)
    assert second != first
    with pytest.raises(ConflictError, match="re-read it and retry"):
        store.write_document(key, {"production": 3}, first)  # stale etag
    with pytest.raises(ConflictError, match="already exists"):
        store.write_document(key, {"production": 4}, None)
    with pytest.raises(ConflictError):
        store.write_document("registry/missing", {}, "some-etag")
    assert store.read_document(key) == ({"production": 2}, second)

    store.write_document("registry/models/org/name", {"v": 1}, None)
    store.write_document("other", {}, None)
    assert store.list_documents("registry/") == ["registry/aliases", "registry/models/org/name"]
    assert store.list_documents("reg") == ["registry/aliases", "registry/models/org/name"]
    assert store.list_documents() == ["other", "registry/aliases", "registry/models/org/name"]
    for bad in ("../x", "/abs", "a/../b", "", "a//b", ".hidden", "a/"):
        with pytest.raises(ValueError, match="invalid document key"):
            store.read_document(bad)
    with pytest.raises(ValueError, match="invalid document key"):
        store.list_documents("../")


def _count_up(url: str, key: str, times: int, barrier) -> None:
    """Child process: read-modify-write a counter, retrying lost races."""
    store = FileStore(url)
    barrier.wait()  # start together so the writes really interleave
    for _ in range(times):
        while True:
            doc, etag = store.read_document(key)
            try:
                store.write_document(key, {"n": doc["n"] + 1}, etag)
                break
            except ConflictError:
                continue


def test_file_documents_survive_a_process_race(tmp_path):
    url, key = f"file://{tmp_path / 'store'}", "race/counter"
    FileStore(url).write_document(key, {"n": 0}, None)
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_count_up, args=(url, key, 50, barrier)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert FileStore(url).read_document(key)[0] == {"n": 100}


def test_unknown_manifest_schema_is_refused(store):
    aid = store.put_bytes(b"future", "model")
    rel = f"manifests/sha256/{aid.removeprefix('sha256:')}.json"
    data, etag = store._read(rel)
    store._write_cas(rel, json.dumps({**json.loads(data), "schema": 99}).encode(), etag)
    with pytest.raises(SchemaVersionError, match="has schema 99; this Ryzanstein reads schema 1"):
        store.get_manifest(aid)
    with pytest.raises(SchemaVersionError):
        store.list_artifacts()


def test_open_store_urls(tmp_path):
    for bad in ("/plain/path", "http://host/x", "gs://bucket/x", ""):
        with pytest.raises(ValueError, match=r"file:///absolute/path or s3://bucket/prefix"):
            open_store(bad or "relative/dir", Settings(home=tmp_path))
    with pytest.raises(ValueError, match="file:///absolute/path"):
        open_store("file://relative/dir", Settings(home=tmp_path))
    with pytest.raises(ValueError, match="s3://bucket/prefix"):
        open_store("s3:///no-bucket", Settings(home=tmp_path))
    assert isinstance(open_store(f"file://{tmp_path}"), FileStore)
    assert open_store(settings=Settings(home=tmp_path)).url == f"file://{tmp_path / 'store'}"


def test_missing_bucket_is_named(moto_server, tmp_path):
    settings = Settings(home=tmp_path, store="s3://ryz-no-such-bucket/p", s3_endpoint_url=moto_server)
    store = open_store(settings=settings)
    with pytest.raises(StoreError, match="'ryz-no-such-bucket' does not exist.*RYZ_STORE.*RYZ_S3_ENDPOINT_URL"):
        store.exists("sha256:" + "0" * 64)
