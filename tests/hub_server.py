"""A Hugging Face Hub stand-in for tests: replays tests/fixtures/hub recordings on 127.0.0.1 and injects faults.

    with HubReplay() as hub:                      # hub.url -> "http://127.0.0.1:<port>"; set HF_ENDPOINT to it
        hub.fault("/api/models/org/name", "429", "ok")   # first request 429, then the recording (last kind repeats)
        ...
        hub.hits("/api/models/org/name")          # how many requests that route got

Routes: GET /api/models (the list; `search` and `limit` applied like the Hub) and GET /api/models/{org}/{name}
(one model's info; 404 with the Hub's X-Error-Code when there is no recording). Fault kinds: "ok", "429",
"500", "503", "garbage" (200 with a truncated JSON body), "hang" (answers only after `hang_seconds`).
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

RECORDINGS = Path(__file__).parent / "fixtures" / "hub"


class HubReplay:
    def __init__(self, root: Path = RECORDINGS, hang_seconds: float = 2.0):
        self.root, self.hang_seconds = root, hang_seconds
        self.requests: list[tuple[str, dict[str, list[str]]]] = []
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

    def fault(self, path: str, *kinds: str) -> None:
        """Answer the next requests to `path` with these kinds in turn; the last one repeats."""
        with self._lock:
            self._faults[path] = list(kinds)

    def hits(self, path: str) -> int:
        with self._lock:
            return sum(p == path for p, _ in self.requests)

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

    def _next_kind(self, path: str, query: dict) -> str:
        with self._lock:
            self.requests.append((path, query))
            kinds = self._faults.get(path) or ["ok"]
            return kinds.pop(0) if len(kinds) > 1 else kinds[0]

    def _recording(self, path: str, query: dict) -> tuple[int, object, dict[str, str]]:
        if path == "/api/models":
            models = json.loads((self.root / "api" / "models.json").read_text())
            search = query.get("search", [""])[0].lower()
            limit = int(query.get("limit", ["1000"])[0])
            return 200, [m for m in models if search in m["id"].lower()][:limit], {}
        recording = self.root / (path.strip("/") + ".json")
        if path.startswith("/api/models/") and path.count("/") == 4 and recording.is_file():
            return 200, json.loads(recording.read_text()), {}
        return 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}


def _handler(hub: HubReplay) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            parts = urlsplit(self.path)
            query = parse_qs(parts.query)
            kind = hub._next_kind(parts.path, query)
            if kind == "hang":
                time.sleep(hub.hang_seconds)
            if kind in ("429", "500", "503"):
                self._send(int(kind), json.dumps({"error": f"fault {kind} injected by the test"}).encode(), {})
                return
            status, body, headers = hub._recording(parts.path, query)
            blob = json.dumps(body).encode()
            self._send(status, blob[: len(blob) // 2] if kind == "garbage" else blob, headers)

        def _send(self, status: int, blob: bytes, headers: dict[str, str]) -> None:
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json; charset=utf-8")
                self.send_header("Content-Length", str(len(blob)))
                self.send_header("X-Request-Id", f"Root=replay-{len(hub.requests)}")
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(blob)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
                pass

        def log_message(self, *args) -> None:
            pass

    return Handler
