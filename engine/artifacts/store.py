"""Content-addressed artifact store: blobs named by the sha256 of their bytes, a JSON manifest per blob, and
small JSON documents written with compare-and-swap (the registry builds on these).

Both backends use one layout under their root:

    blobs/sha256/<2 hex>/<64 hex>      the bytes
    manifests/sha256/<64 hex>.json     {"schema": 1, "artifact_id", "kind", "size", "created", ...extra}
    documents/<key>.json               compare-and-swap documents

A manifest is written only after its blob is complete, so a listed artifact always has its bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import secrets
from abc import ABC, abstractmethod
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO, Callable, Iterator
from urllib.parse import unquote, urlparse

from botocore.exceptions import BotoCoreError, ClientError

from engine.errors import (
    AmbiguousReferenceError,
    ArtifactNotFoundError,
    ConflictError,
    IntegrityError,
    SchemaVersionError,
    StoreError,
)
from engine.fsutil import file_lock
from engine.settings import Settings, get_settings

ARTIFACT_ID_RE = re.compile(r"sha256:[0-9a-f]{64}")
SCHEMA = 1
MIN_PREFIX = 12  # hex digits a reference prefix must have
CHUNK = 1 << 20  # streaming read size
MULTIPART_THRESHOLD = 64 << 20  # S3: one PUT below this size, a multipart upload at or above it
MULTIPART_CHUNKSIZE = 64 << 20  # S3 part size (S3 requires >= 5 MiB)
CAS_ATTEMPTS = 10  # update_manifest retries when a concurrent update wins

_IDENTITY_KEYS = ("schema", "artifact_id", "kind", "size", "created")  # set by the store, never by callers
_TMP = ".tmp-"  # temp-file prefix; never listed
_VERIFIED: dict[str, tuple[int, int]] = {}  # local blob path -> (size, mtime_ns) that hashed correctly

Progress = Callable[[int], None]


# --- helpers ----------------------------------------------------------------------------------------


def _hex(artifact_id: str) -> str:
    if not isinstance(artifact_id, str) or not ARTIFACT_ID_RE.fullmatch(artifact_id):
        raise ValueError(f"not an artifact id: {artifact_id!r} (expected sha256:<64 hex>; resolve() takes prefixes)")
    return artifact_id[len("sha256:") :]


def _blob_rel(hex_: str) -> str:
    return f"blobs/sha256/{hex_[:2]}/{hex_}"


def _manifest_rel(hex_: str) -> str:
    return f"manifests/sha256/{hex_}.json"


def _doc_rel(key: str, prefix: bool = False) -> str:
    """`documents/<key>`; a prefix may end in '/' or mid-name. Rejects absolute, '..' and hidden parts."""
    parts = key.split("/") if isinstance(key, str) else [""]
    must_be_named = parts[:-1] if prefix else parts
    if (
        any(not p for p in must_be_named)
        or (not prefix and not key)
        or any(p.startswith(".") or "\\" in p or "\0" in p for p in parts)
    ):
        raise ValueError(
            f"invalid document key {key!r}: use relative names like 'registry/aliases' "
            "(no absolute paths, empty parts, '..' or parts starting with '.')"
        )
    return f"documents/{key}"


def _copy_hashing(src: BinaryIO, dst: BinaryIO | None = None, progress: Progress | None = None) -> tuple[str, int]:
    """Stream src (optionally into dst) in CHUNK pieces; returns (sha256 hex, size)."""
    digest, size = hashlib.sha256(), 0
    while chunk := src.read(CHUNK):
        digest.update(chunk)
        size += len(chunk)
        if dst is not None:
            dst.write(chunk)
        if progress:
            progress(len(chunk))
    return digest.hexdigest(), size


def _hash_file(path: Path) -> str:
    with open(path, "rb") as f:
        return _copy_hashing(f)[0]


def _dumps(doc: dict) -> bytes:
    return (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode()


def _extra(extra: dict | None, current: dict) -> dict:
    """A copy of the caller's manifest fields: it may repeat the store's own keys (schema, kind...) with the
    same values, never change them. Checked before anything is written."""
    extra = dict(extra or {})
    if changed := sorted(k for k in _IDENTITY_KEYS if k in extra and extra[k] != current.get(k)):
        raise ValueError(
            f"manifest keys {changed} are set by the store and cannot be given other values "
            f"(store: { {k: current.get(k) for k in changed} }); drop them from the extra fields"
        )
    _dumps(extra)  # fail early if a value is not JSON
    return extra


def _put_extra(kind: str, manifest: dict | None) -> dict:
    if not isinstance(kind, str) or not kind:
        raise ValueError(f"artifact kind must be a non-empty string, got {kind!r}")
    return _extra(manifest, {"schema": SCHEMA, "kind": kind})


def _stat_key(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


# --- the interface ----------------------------------------------------------------------------------


class ArtifactStore(ABC):
    """Artifacts (blob + manifest) and compare-and-swap documents. Backends implement the `_` primitives on
    keys relative to the store root; everything else is shared."""

    url: str

    # backend primitives
    @abstractmethod
    def _put_blob(self, src: Path | bytes, progress: Progress | None) -> tuple[str, int]:
        """Store the bytes under blobs/ atomically (no-op if present); returns (sha256 hex, size)."""

    @abstractmethod
    def _read(self, rel: str) -> tuple[bytes, str] | None:
        """(content, etag) of a small object, or None."""

    @abstractmethod
    def _write_cas(self, rel: str, data: bytes, expected_etag: str | None) -> str:
        """Write if the current etag is expected_etag (None: must not exist); returns the new etag."""

    @abstractmethod
    def _open(self, rel: str) -> BinaryIO | None: ...

    @abstractmethod
    def _exists(self, rel: str) -> bool: ...

    @abstractmethod
    def _list(self, rel_prefix: str) -> list[str]:
        """Relative keys starting with rel_prefix (string prefix, not only whole directories)."""

    @abstractmethod
    def _delete(self, rel: str) -> None:
        """Remove if present."""

    @abstractmethod
    def local_path(self, artifact_id: str, verify: bool = True) -> Path:
        """A local file holding the artifact's bytes (verify: hashed once per (size, mtime))."""

    # artifacts
    def put_file(self, path: Path, kind: str, manifest: dict | None = None, progress: Progress | None = None) -> str:
        """Store a file's bytes (streamed) and its manifest; returns "sha256:<hex>". Re-putting the same bytes
        is a no-op that keeps the first manifest. progress(n) gets byte increments as bytes are stored."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"cannot store {path}: not a file")
        extra = _put_extra(kind, manifest)
        hex_, size = self._put_blob(path, progress)
        return self._add_manifest(hex_, kind, size, extra)

    def put_bytes(self, data: bytes, kind: str, manifest: dict | None = None) -> str:
        extra = _put_extra(kind, manifest)
        hex_, size = self._put_blob(bytes(data), None)
        return self._add_manifest(hex_, kind, size, extra)

    def _add_manifest(self, hex_: str, kind: str, size: int, extra: dict) -> str:
        artifact_id = f"sha256:{hex_}"
        if not self._exists(_manifest_rel(hex_)):
            doc = {
                "schema": SCHEMA,
                "artifact_id": artifact_id,
                "kind": kind,
                "size": size,
                "created": datetime.now(timezone.utc).isoformat(timespec="microseconds"),
                **extra,
            }
            try:
                self._write_cas(_manifest_rel(hex_), _dumps(doc), None)
            except ConflictError:
                pass  # a concurrent put of the same bytes wrote it first: keep theirs
        return artifact_id

    def resolve(self, ref: str) -> str:
        """Full id or a unique prefix of >= 12 hex digits (with or without "sha256:") -> full id."""
        hex_ = str(ref).strip().lower().removeprefix("sha256:")
        if not re.fullmatch(r"[0-9a-f]{1,64}", hex_):
            raise ValueError(
                f"{ref!r} is not an artifact id or prefix: expected sha256:<64 hex> or at least {MIN_PREFIX} hex digits"
            )
        if len(hex_) < MIN_PREFIX:
            raise ValueError(
                f"artifact prefix {ref!r} is too short: give at least {MIN_PREFIX} hex digits "
                f"(it has {len(hex_)}) or the full sha256:<64 hex> id"
            )
        if len(hex_) == 64:
            matches = [hex_] if self._exists(_manifest_rel(hex_)) else []
        else:
            matches = self._ids(hex_)
        if not matches:
            raise ArtifactNotFoundError(f"no artifact matches {ref!r} in {self.url}")
        if len(matches) > 1:
            shown = ", ".join(f"sha256:{h}" for h in matches[:10]) + (" ..." if len(matches) > 10 else "")
            raise AmbiguousReferenceError(
                f"{ref!r} matches {len(matches)} artifacts in {self.url}: {shown}; give more hex digits"
            )
        return f"sha256:{matches[0]}"

    def _ids(self, hex_prefix: str) -> list[str]:
        rels = self._list(f"manifests/sha256/{hex_prefix}")
        return sorted(r.rsplit("/", 1)[1][:-5] for r in rels if r.endswith(".json"))

    def exists(self, artifact_id: str) -> bool:
        hex_ = _hex(artifact_id)
        return self._exists(_manifest_rel(hex_)) and self._exists(_blob_rel(hex_))

    def get_manifest(self, artifact_id: str) -> dict:
        got = self._read(_manifest_rel(_hex(artifact_id)))
        if got is None:
            raise ArtifactNotFoundError(f"no artifact {artifact_id} in {self.url}")
        return self._parse_manifest(artifact_id, got[0])

    def _parse_manifest(self, artifact_id: str, data: bytes) -> dict:
        try:
            doc = json.loads(data)
        except ValueError as e:
            raise StoreError(
                f"manifest of {artifact_id} in {self.url} is not valid JSON ({e}); re-run the step that produced it"
            ) from e
        if doc.get("schema") != SCHEMA:
            raise SchemaVersionError(
                f"manifest of {artifact_id} in {self.url} has schema {doc.get('schema')!r}; "
                f"this Ryzanstein reads schema {SCHEMA} only: upgrade Ryzanstein to read it"
            )
        return doc

    def update_manifest(self, artifact_id: str, extra: dict) -> dict:
        """Merge keys into the manifest (compare-and-swap, retried on concurrent updates); returns it."""
        rel = _manifest_rel(_hex(artifact_id))
        for _ in range(CAS_ATTEMPTS):
            got = self._read(rel)
            if got is None:
                raise ArtifactNotFoundError(f"no artifact {artifact_id} in {self.url}")
            current = self._parse_manifest(artifact_id, got[0])
            doc = {**current, **_extra(extra, current)}
            try:
                self._write_cas(rel, _dumps(doc), got[1])
                return doc
            except ConflictError:
                continue
        raise ConflictError(
            f"manifest of {artifact_id} in {self.url} changed under {CAS_ATTEMPTS} update "
            "attempts in a row; retry later"
        )

    def list_artifacts(self, kind: str | None = None) -> list[dict]:
        """Manifests, newest first."""
        docs = []
        for hex_ in self._ids(""):
            try:
                doc = self.get_manifest(f"sha256:{hex_}")
            except ArtifactNotFoundError:
                continue  # deleted while listing
            if kind is None or doc.get("kind") == kind:
                docs.append(doc)
        return sorted(docs, key=lambda d: (d.get("created", ""), d["artifact_id"]), reverse=True)

    def open_read(self, artifact_id: str) -> BinaryIO:
        """A streaming reader of the blob (not verified: fetch/local_path verify)."""
        stream = self._open(_blob_rel(_hex(artifact_id)))
        if stream is None:
            raise ArtifactNotFoundError(f"no blob for {artifact_id} in {self.url}")
        return stream

    def fetch(self, artifact_id: str, dest: Path) -> Path:
        """Stream the blob to dest via a temp file, verifying sha256; on mismatch nothing is left at dest."""
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f"{_TMP}{secrets.token_hex(8)}-{dest.name}"
        try:
            with self.open_read(artifact_id) as src, open(tmp, "xb") as out:
                actual, _ = _copy_hashing(src, out)
                out.flush()
                os.fsync(out.fileno())
            if actual != _hex(artifact_id):
                raise self._corrupt(artifact_id, actual)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        return dest

    def delete(self, artifact_id: str) -> None:
        """Remove manifest then blob (idempotent). Manifest first: a listed artifact always has its bytes."""
        hex_ = _hex(artifact_id)
        self._delete(_manifest_rel(hex_))
        self._delete(_blob_rel(hex_))

    # documents
    def read_document(self, key: str) -> tuple[dict | None, str | None]:
        got = self._read(_doc_rel(key) + ".json")
        return (None, None) if got is None else (json.loads(got[0]), got[1])

    def write_document(self, key: str, doc: dict, expected_etag: str | None) -> str:
        """Compare-and-swap: expected_etag None means "must not exist yet". Returns the new etag;
        ConflictError if the stored etag differs."""
        return self._write_cas(_doc_rel(key) + ".json", _dumps(doc), expected_etag)

    def list_documents(self, prefix: str = "") -> list[str]:
        rels = self._list(_doc_rel(prefix, prefix=True))
        return sorted(r[len("documents/") : -len(".json")] for r in rels if r.endswith(".json"))

    # messages
    def _corrupt(self, artifact_id: str, actual: str) -> IntegrityError:
        return IntegrityError(
            f"sha256 mismatch for {artifact_id} in {self.url}: stored bytes hash to "
            f"sha256:{actual}; the blob is corrupt — delete it with `ryz gc` or re-run the "
            "step that produced it"
        )

    def _conflict(self, rel: str, expected: str | None) -> ConflictError:
        what = "already exists" if expected is None else f"no longer has etag {expected}"
        return ConflictError(f"{rel} in {self.url} {what}: another writer changed it first; re-read it and retry")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"


# --- local directory --------------------------------------------------------------------------------


class FileStore(ArtifactStore):
    """A local directory. Writes go to a temp file on the same filesystem, then os.replace. Compare-and-swap
    takes an exclusive flock on locks/<key>.lock and re-checks the etag (sha256 of the content) under it, so
    it is safe across processes on one machine (network filesystems need working flock)."""

    def __init__(self, url: str | Path, settings: Settings | None = None):
        if isinstance(url, Path):
            root = url
        else:
            parsed = urlparse(url)
            if parsed.scheme != "file" or parsed.netloc not in ("", "localhost"):
                raise ValueError(f"bad file store URL {url!r}: use file:///absolute/path")
            root = Path(unquote(parsed.path))
        if not root.is_absolute():
            raise ValueError(f"file store path must be absolute, got {str(root)!r}: use file:///absolute/path")
        self.root, self.url = root, f"file://{root}"

    def _path(self, rel: str) -> Path:
        return self.root / rel

    def _write_atomic(self, path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f"{_TMP}{secrets.token_hex(8)}"
        try:
            with open(tmp, "xb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def _put_blob(self, src: Path | bytes, progress: Progress | None) -> tuple[str, int]:
        tmp_dir = self.root / "blobs" / "sha256"  # same filesystem as the final blob, so the rename is atomic
        tmp_dir.mkdir(parents=True, exist_ok=True)
        tmp = tmp_dir / f"{_TMP}{secrets.token_hex(8)}"
        try:
            with open(src, "rb") if isinstance(src, Path) else io.BytesIO(src) as f, open(tmp, "xb") as out:
                hex_, size = _copy_hashing(f, out, progress)  # one pass: hash exactly what is written
                out.flush()
                os.fsync(out.fileno())
            final = self._path(_blob_rel(hex_))
            if not final.exists():
                final.parent.mkdir(parents=True, exist_ok=True)
                os.chmod(tmp, 0o444)  # blobs are immutable: stop tools from editing them in place
                os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        return hex_, size

    def _read(self, rel: str) -> tuple[bytes, str] | None:
        try:
            data = self._path(rel).read_bytes()
        except FileNotFoundError:
            return None
        return data, hashlib.sha256(data).hexdigest()

    def _lock(self, rel: str):
        return file_lock(self.root / "locks" / f"{rel}.lock")

    def _write_cas(self, rel: str, data: bytes, expected_etag: str | None) -> str:
        with self._lock(rel):
            got = self._read(rel)
            if (got[1] if got else None) != expected_etag:
                raise self._conflict(rel, expected_etag)
            self._write_atomic(self._path(rel), data)
        return hashlib.sha256(data).hexdigest()

    def _open(self, rel: str) -> BinaryIO | None:
        try:
            return open(self._path(rel), "rb")
        except FileNotFoundError:
            return None

    def _exists(self, rel: str) -> bool:
        return self._path(rel).exists()

    def _list(self, rel_prefix: str) -> list[str]:
        out = []
        for dirpath, _, files in os.walk(self.root / rel_prefix.rpartition("/")[0]):
            for name in files:
                rel = Path(dirpath, name).relative_to(self.root).as_posix()
                if rel.startswith(rel_prefix) and not name.startswith(_TMP):
                    out.append(rel)
        return out

    def _delete(self, rel: str) -> None:
        self._path(rel).unlink(missing_ok=True)

    def local_path(self, artifact_id: str, verify: bool = True) -> Path:
        """The blob itself (read-only). verify hashes it once per (size, mtime) in this process."""
        hex_ = _hex(artifact_id)
        path = self._path(_blob_rel(hex_))
        try:
            stat = _stat_key(path)
        except FileNotFoundError:
            raise ArtifactNotFoundError(f"no blob for {artifact_id} in {self.url}") from None
        if verify and _VERIFIED.get(str(path)) != stat:
            if (actual := _hash_file(path)) != hex_:
                raise self._corrupt(artifact_id, actual)
            _VERIFIED[str(path)] = stat
        return path


# --- S3 and S3-compatible services ------------------------------------------------------------------

_MISSING = {"NoSuchKey", "404", "NotFound"}
_CONFLICT = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}


def _code(e: ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code", ""))


class S3Store(ArtifactStore):
    """s3://bucket/prefix on AWS or any S3-compatible endpoint (settings.s3_endpoint_url). A blob is hashed in a
    first streaming pass so its key is known, then uploaded with one PUT below MULTIPART_THRESHOLD or a
    multipart upload (completed atomically, or aborted on failure). Documents use conditional PUTs
    (If-Match: etag / If-None-Match: *).

    Atomicity of conditional writes comes from S3 itself; moto honours the conditions but is not atomic under
    concurrency (it checks, then writes), so true races are only tested on the file backend. A service that
    ignores these headers (some older S3-compatible servers) gives no compare-and-swap protection."""

    def __init__(self, url: str, settings: Settings | None = None):
        import boto3  # lazy: ~0.1 s, and file-store users never need it
        from botocore.config import Config

        parsed = urlparse(url)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise ValueError(f"bad S3 store URL {url!r}: use s3://bucket/prefix")
        self.settings = settings or get_settings()
        self.bucket, self.prefix = parsed.netloc, parsed.path.strip("/")
        self.url = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        self.endpoint = self.settings.s3_endpoint_url
        # custom endpoints (MinIO, moto, Ceph...) generally need path-style addressing
        config = Config(s3={"addressing_style": "path"}) if self.endpoint else None
        self._s3 = boto3.client("s3", endpoint_url=self.endpoint, config=config)
        self._bucket_ok = False

    @property
    def _client(self):
        """The client, after checking once that the bucket is reachable (so errors name the bucket)."""
        if not self._bucket_ok:
            where = self.endpoint or "AWS"
            try:
                self._s3.head_bucket(Bucket=self.bucket)
            except ClientError as e:
                if _code(e) in ("404", "NoSuchBucket"):
                    msg = f"S3 bucket {self.bucket!r} does not exist at {where}: create it"
                elif _code(e) in ("403", "AccessDenied"):
                    msg = f"access to S3 bucket {self.bucket!r} at {where} is denied: check the AWS credentials"
                else:
                    msg = f"cannot use S3 bucket {self.bucket!r} at {where}: {e}"
                raise StoreError(f"{msg}, or fix RYZ_STORE (now {self.url}) / RYZ_S3_ENDPOINT_URL") from e
            except BotoCoreError as e:
                raise StoreError(
                    f"cannot reach S3 at {where} for {self.url}: {e}; check RYZ_S3_ENDPOINT_URL and the AWS credentials"
                ) from e
            self._bucket_ok = True
        return self._s3

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """Turn unexpected boto errors into StoreError (expected codes are handled inside the block)."""
        try:
            yield
        except ClientError as e:
            raise StoreError(f"S3 error while {what} in {self.url}: {e}") from e
        except BotoCoreError as e:
            raise StoreError(f"S3 failure while {what} in {self.url} (endpoint {self.endpoint or 'AWS'}): {e}") from e

    def _key(self, rel: str) -> str:
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def _put_blob(self, src: Path | bytes, progress: Progress | None) -> tuple[str, int]:
        from boto3.exceptions import S3UploadFailedError
        from boto3.s3.transfer import TransferConfig

        if isinstance(src, Path):
            before = _stat_key(src)
            with open(src, "rb") as f:
                hex_, size = _copy_hashing(f)
        else:
            hex_, size = hashlib.sha256(src).hexdigest(), len(src)
        rel = _blob_rel(hex_)
        if self._exists(rel):
            if progress:
                progress(size)
            return hex_, size
        config = TransferConfig(multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_CHUNKSIZE)
        with self._errors(f"uploading sha256:{hex_}"):
            try:
                # upload_file streams parts from disk; s3transfer aborts the multipart upload on any failure
                if isinstance(src, Path):
                    self._client.upload_file(str(src), self.bucket, self._key(rel), Config=config, Callback=progress)
                else:
                    self._client.upload_fileobj(
                        io.BytesIO(src), self.bucket, self._key(rel), Config=config, Callback=progress
                    )
            except S3UploadFailedError as e:
                raise StoreError(f"upload of sha256:{hex_} to {self.url} failed: {e}") from e
        # s3transfer returns normally (after aborting) when a BaseException escapes a worker thread, and the
        # file may have changed since it was hashed: check before any manifest points at this blob
        changed = isinstance(src, Path) and _stat_key(src) != before
        stored = self._size(rel)
        if changed or stored != size:
            if stored is not None:
                self._delete(rel)
            problem = (
                f"{src} changed while it was being stored"
                if changed and isinstance(src, Path)  # changed implies a Path; the check narrows src for the message
                else f"upload of sha256:{hex_} to {self.url} did not complete ({stored or 0} of {size} bytes)"
            )
            raise StoreError(f"{problem}; nothing was kept: store it again")
        return hex_, size

    def _get(self, rel: str):
        with self._errors(f"reading {rel}"):
            try:
                return self._client.get_object(Bucket=self.bucket, Key=self._key(rel))
            except ClientError as e:
                if _code(e) in _MISSING:
                    return None
                raise

    def _read(self, rel: str) -> tuple[bytes, str] | None:
        resp = self._get(rel)
        if resp is None:
            return None
        with self._errors(f"reading {rel}"), resp["Body"] as body:
            return body.read(), resp["ETag"]

    def _write_cas(self, rel: str, data: bytes, expected_etag: str | None) -> str:
        condition = {"IfNoneMatch": "*"} if expected_etag is None else {"IfMatch": expected_etag}
        with self._errors(f"writing {rel}"):
            try:
                resp = self._client.put_object(
                    Bucket=self.bucket, Key=self._key(rel), Body=data, ContentType="application/json", **condition
                )
            except ClientError as e:
                if _code(e) in _CONFLICT or (expected_etag is not None and _code(e) in _MISSING):
                    raise self._conflict(rel, expected_etag) from e
                raise
        return resp["ETag"]

    def _open(self, rel: str) -> BinaryIO | None:
        resp = self._get(rel)
        return None if resp is None else resp["Body"]

    def _exists(self, rel: str) -> bool:
        return self._size(rel) is not None

    def _size(self, rel: str) -> int | None:
        with self._errors(f"checking {rel}"):
            try:
                return self._client.head_object(Bucket=self.bucket, Key=self._key(rel))["ContentLength"]
            except ClientError as e:
                if _code(e) in _MISSING:
                    return None
                raise

    def _list(self, rel_prefix: str) -> list[str]:
        strip = len(self._key(""))
        with self._errors(f"listing {rel_prefix}"):
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self._key(rel_prefix)
            )
            return [obj["Key"][strip:] for page in pages for obj in page.get("Contents", [])]

    def _delete(self, rel: str) -> None:
        with self._errors(f"deleting {rel}"):
            self._client.delete_object(Bucket=self.bucket, Key=self._key(rel))

    def local_path(self, artifact_id: str, verify: bool = True) -> Path:
        """Downloaded once into settings.cache_dir/blobs (verified while streaming); a cached copy that no
        longer verifies is downloaded again."""
        hex_ = _hex(artifact_id)
        path = self.settings.cache_dir / "blobs" / hex_
        if path.exists():
            stat = _stat_key(path)
            if not verify or _VERIFIED.get(str(path)) == stat:
                return path
            if _hash_file(path) == hex_:
                _VERIFIED[str(path)] = stat
                return path
            path.unlink()
        self.fetch(artifact_id, path)
        _VERIFIED[str(path)] = _stat_key(path)
        return path


def open_store(url: str | None = None, settings: Settings | None = None) -> ArtifactStore:
    """The store at url (default: settings.store_url, i.e. RYZ_STORE)."""
    settings = settings or get_settings()
    url = url or settings.store_url
    scheme = urlparse(url).scheme
    if scheme == "file":
        return FileStore(url, settings)
    if scheme == "s3":
        return S3Store(url, settings)
    raise ValueError(
        f"unsupported artifact store URL {url!r}: use file:///absolute/path or s3://bucket/prefix (RYZ_STORE)"
    )
