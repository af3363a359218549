"""A Hugging Face Hub stand-in for tests: replays tests/fixtures/hub recordings on 127.0.0.1, serves the files of
small real checkpoints the way huggingface_hub downloads them, and injects faults.

    with HubReplay() as hub:                      # hub.url -> "http://127.0.0.1:<port>"; set HF_ENDPOINT to it
        hub.fault("/api/models/org/name", "429", "ok")   # first request 429, then the recording (last kind repeats)
        ...
        hub.hits("/api/models/org/name")          # how many requests that route got

Routes: GET /api/models (the list; `search` and `limit` applied like the Hub) and GET /api/models/{org}/{name}
(one model's info; 404 with the Hub's X-Error-Code when there is no recording). Fault kinds: "ok", "429",
"500", "503", "garbage" (200 with a truncated JSON body), "hang" (answers only after `hang_seconds`).

File repos (`FILE_REPOS`, or `hub.add_repo`) are served from a local model directory under a fake repo id, with a
commit sha derived from the files: GET /api/models/{repo}[/revision/{rev}] (model info with `sha`, `siblings`,
`safetensors`, `cardData`), GET /api/models/{repo}/tree/{rev} (the listing snapshot_download reads) and HEAD/GET
/{repo}/resolve/{rev}/{file} with the headers huggingface_hub 2.x reads (X-Repo-Commit, ETag, Content-Length;
Range answered with 206 and Content-Range). A gated repo answers the file routes with 401 X-Error-Code GatedRepo
without an `Authorization: Bearer <hub.token>` header and 403 with another token, as the Hub does. GET faults on a
resolve path also take "cut:N": send the headers of the whole answer, then only N bytes, and close the connection.
`hub.log` records every request's method, path, Range and whether it carried a token.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from engine.model.checkpoint import read_safetensors_header

RECORDINGS = Path(__file__).parent / "fixtures" / "hub"
ZOO = Path(__file__).resolve().parents[1] / "examples" / "zoo"
TOKEN = "hf_replay_token"  # the one token a gated repo accepts


@dataclass
class FileRepo:
    """A Hub model repo whose files come from a local directory (plus a README declaring `license`)."""

    repo: str
    directory: Path
    license: str | None = "mit"
    gated: bool = False
    tags: tuple[str, ...] = ("v1.0",)  # git tags naming the one commit besides `main`
    files: dict[str, bytes] = field(init=False)
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        self.files = {p.name: p.read_bytes() for p in sorted(self.directory.iterdir()) if p.is_file()}
        if self.license:
            self.files["README.md"] = f"---\nlicense: {self.license}\n---\n# {self.repo}\n".encode()
        commit = hashlib.sha1(self.repo.encode())
        for name in sorted(self.files):
            commit.update(f"{name}\0{self.blob_id(name)}\n".encode())
        self.sha = commit.hexdigest()

    def blob_id(self, name: str) -> str:
        """The file's git blob id, as the Hub reports it."""
        data = self.files[name]
        return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()

    def lfs(self, name: str) -> dict | None:
        """LFS pointer info for weights (the Hub's ETag for them is their sha256)."""
        if not name.endswith(".safetensors"):
            return None
        data = self.files[name]
        return {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}

    def resolves(self, revision: str) -> bool:
        return revision in (self.sha, "main", *self.tags)

    def info(self) -> dict:
        config = json.loads(self.files["config.json"])
        parameters: dict[str, int] = {}
        for name in self.files:
            if name.endswith(".safetensors"):
                for ref in read_safetensors_header(self.directory / name).values():
                    count = 1
                    for dim in ref.shape:
                        count *= dim
                    parameters[ref.dtype] = parameters.get(ref.dtype, 0) + count
        siblings = []
        for name in sorted(self.files):
            sibling = {"rfilename": name, "blobId": self.blob_id(name), "size": len(self.files[name])}
            if (lfs := self.lfs(name)) is not None:
                sibling["lfs"] = {"sha256": lfs["oid"], "size": lfs["size"], "pointerSize": lfs["pointerSize"]}
            siblings.append(sibling)
        return {
            "_id": self.sha[:24],
            "id": self.repo,
            "modelId": self.repo,
            "author": self.repo.split("/")[0],
            "sha": self.sha,
            "lastModified": "2026-01-02T03:04:05.000Z",
            "createdAt": "2026-01-01T00:00:00.000Z",
            "private": False,
            "disabled": False,
            "gated": "manual" if self.gated else False,
            "downloads": 1,
            "likes": 0,
            "tags": ["safetensors", "bitnet", "text-generation"]
            + ([f"license:{self.license}"] if self.license else []),
            "pipeline_tag": "text-generation",
            "library_name": "transformers",
            "config": {k: config[k] for k in ("architectures", "model_type", "quantization_config") if k in config},
            "cardData": {"license": self.license} if self.license else {},
            "siblings": siblings,
            "spaces": [],
            "safetensors": {"parameters": parameters, "total": sum(parameters.values())},
            "usedStorage": sum(len(d) for d in self.files.values()),
        }

    def tree(self) -> list[dict]:
        entries = []
        for name in sorted(self.files):
            entry = {"type": "file", "oid": self.blob_id(name), "size": len(self.files[name]), "path": name}
            if (lfs := self.lfs(name)) is not None:
                entry["lfs"] = lfs
            entries.append(entry)
        return entries


def default_file_repos() -> list[FileRepo]:
    """ryz-demo-s under a public repo id, ryz-demo-ptq under a gated one, ryz-demo-m with a non-commercial license
    (what discovery's license filter refuses)."""
    return [
        FileRepo("ryz-fixtures/ryz-demo-s", ZOO / "ryz-demo-s"),
        FileRepo("ryz-fixtures/ryz-demo-gated", ZOO / "ryz-demo-ptq", gated=True),
        FileRepo("ryz-fixtures/ryz-demo-nc", ZOO / "ryz-demo-m", license="cc-by-nc-4.0"),
    ]


class HubReplay:
    def __init__(self, root: Path = RECORDINGS, hang_seconds: float = 2.0, file_repos: list[FileRepo] | None = None):
        self.root, self.hang_seconds = root, hang_seconds
        self.token = TOKEN
        self.requests: list[tuple[str, dict[str, list[str]]]] = []
        self.log: list[dict] = []  # {"method", "path", "range", "token"} per request
        self.repos: dict[str, FileRepo] = {}
        for repo in default_file_repos() if file_repos is None else file_repos:
            self.add_repo(repo)
        self._faults: dict[str, list[str]] = {}
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._server.block_on_close = False  # a hanging handler must not hold up stop()
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="hub-replay", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def add_repo(self, repo: FileRepo) -> FileRepo:
        self.repos[repo.repo] = repo
        return repo

    def fault(self, path: str, *kinds: str) -> None:
        """Answer the next requests to `path` with these kinds in turn; the last one repeats."""
        with self._lock:
            self._faults[path] = list(kinds)

    def hits(self, path: str) -> int:
        with self._lock:
            return sum(p == path for p, _ in self.requests)

    def downloads(self, repo: str, filename: str) -> list[dict]:
        """The GET requests for one file of a file repo (any revision), in order."""
        with self._lock:
            return [
                e
                for e in self.log
                if e["method"] == "GET"
                and e["path"].startswith(f"/{repo}/resolve/")
                and e["path"].endswith("/" + filename)
            ]

    def start(self) -> HubReplay:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> HubReplay:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _next_kind(self, method: str, path: str, query: dict, headers) -> str:
        with self._lock:
            self.requests.append((path, query))
            auth = headers.get("Authorization") or ""
            self.log.append({"method": method, "path": path, "range": headers.get("Range"), "token": auth[7:] or None})
            if method != "GET":  # faults are for GETs: a HEAD before a download does not use one up
                return "ok"
            kinds = self._faults.get(path) or ["ok"]
            return kinds.pop(0) if len(kinds) > 1 else kinds[0]

    def _recording(self, path: str, query: dict) -> tuple[int, object, dict[str, str]]:
        if path == "/api/models":
            models = json.loads((self.root / "api" / "models.json").read_text())
            search = query.get("search", [""])[0].lower()
            limit = int(query.get("limit", ["1000"])[0])
            return 200, [m for m in models if search in m["id"].lower()][:limit], {}
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            repo_id, rest = "/".join(parts[2:4]), parts[4:]
            if (repo := self.repos.get(repo_id)) is not None:
                return self._file_repo_api(repo, rest)
            recording = self.root / "api" / "models" / parts[2] / (parts[3] + ".json")
            if recording.is_file():
                doc = json.loads(recording.read_text())
                if not rest or (rest[0] == "revision" and unquote("/".join(rest[1:])) in (doc["sha"], "main")):
                    return 200, doc, {}
                if rest[0] == "revision":
                    return 404, {"error": "Invalid rev id"}, {"X-Error-Code": "RevisionNotFound"}
        return 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}

    def _file_repo_api(self, repo: FileRepo, rest: list[str]) -> tuple[int, object, dict[str, str]]:
        if rest[:1] in ([], ["revision"], ["tree"]):
            revision = unquote("/".join(rest[1:])) if rest else "main"
            if not repo.resolves(revision):
                return 404, {"error": f"Invalid rev id: {revision}"}, {"X-Error-Code": "RevisionNotFound"}
            return 200, (repo.tree() if rest[:1] == ["tree"] else repo.info()), {}
        return 404, {"error": "Not found"}, {}

    def _file(self, path: str, token: str | None) -> tuple[int, bytes, dict[str, str], FileRepo | None]:
        """A resolve route: (status, body, headers, repo); body is the whole file for a 200."""
        parts = path.strip("/").split("/")
        if len(parts) < 5 or parts[2] != "resolve":
            return 404, b'{"error": "Not found"}', {}, None
        repo = self.repos.get("/".join(parts[:2]))
        if repo is None:
            return 404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"}, None
        revision, filename = unquote(parts[3]), unquote("/".join(parts[4:]))
        commit = {"X-Repo-Commit": repo.sha} if repo.resolves(revision) else {}
        if repo.gated and token != self.token:
            status = 401 if token is None else 403
            message = f"Access to model {repo.repo} is restricted. You must have access to it and be authenticated."
            return status, json.dumps({"error": message}).encode(), {"X-Error-Code": "GatedRepo", **commit}, None
        if not commit:
            return 404, b'{"error": "Invalid rev id"}', {"X-Error-Code": "RevisionNotFound"}, None
        if filename not in repo.files:
            return 404, b'{"error": "Entry not found"}', {"X-Error-Code": "EntryNotFound", **commit}, None
        lfs = repo.lfs(filename)
        etag = lfs["oid"] if lfs else repo.blob_id(filename)
        return 200, repo.files[filename], {**commit, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}, repo


def _handler(hub: HubReplay) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:  # noqa: N802 - http.server's name
            parts = urlsplit(self.path)
            hub._next_kind("HEAD", parts.path, parse_qs(parts.query), self.headers)
            status, blob, headers, _repo = hub._file(parts.path, self._token())
            self._send(status, b"", {**headers, "Content-Length": str(len(blob))}, head=True)

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            parts = urlsplit(self.path)
            query = parse_qs(parts.query)
            kind = hub._next_kind("GET", parts.path, query, self.headers)
            if kind == "hang":
                time.sleep(hub.hang_seconds)
            if kind in ("429", "500", "503"):
                self._send(int(kind), json.dumps({"error": f"fault {kind} injected by the test"}).encode(), {})
                return
            if not parts.path.startswith("/api/"):
                self._send_file(parts.path, kind)
                return
            status, body, headers = hub._recording(parts.path, query)
            blob = json.dumps(body).encode()
            self._send(status, blob[: len(blob) // 2] if kind == "garbage" else blob, headers)

        def _token(self) -> str | None:
            auth = self.headers.get("Authorization") or ""
            return auth[len("Bearer ") :] if auth.startswith("Bearer ") else None

        def _send_file(self, path: str, kind: str) -> None:
            status, blob, headers, repo = hub._file(path, self._token())
            if repo is None:
                self._send(status, blob, headers)
                return
            size, start = len(blob), 0
            if (asked := self.headers.get("Range", "")).startswith("bytes="):
                start = int(asked[len("bytes=") :].split("-")[0] or 0)
                headers["Content-Range"] = f"bytes {start}-{size - 1}/{size}"
                status, blob = 206, blob[start:]
            headers["Content-Length"] = str(len(blob))
            if kind.startswith("cut:"):  # promise the whole answer, send part of it, hang up
                self._send(status, blob[: int(kind[4:])], headers, close=True)
                return
            self._send(status, blob, headers)

        def _send(
            self, status: int, blob: bytes, headers: dict[str, str], head: bool = False, close: bool = False
        ) -> None:
            try:
                self.send_response(status)
                headers = {"Content-Length": str(len(blob)), **headers}
                if not any(name.lower() == "content-type" for name in headers):
                    json_body = blob.startswith((b"{", b"[")) or head or status >= 400
                    headers["Content-Type"] = (
                        "application/json; charset=utf-8" if json_body else "application/octet-stream"
                    )
                self.send_header("X-Request-Id", f"Root=replay-{len(hub.requests)}")
                for name, value in headers.items():
                    self.send_header(name, value)
                if close:
                    self.send_header("Connection", "close")
                self.end_headers()
                if not head:
                    self.wfile.write(blob)
                if close:
                    self.wfile.flush()
                    self.close_connection = True
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
                pass

        def log_message(self, *args) -> None:
            pass

    return Handler
