"""The HTTP routes against a fake EngineClient: what the server makes of whatever an engine says, with no model.

The client protocol (engine/serving/client.py) is the only thing the routes see, so a scripted client pins the
route-side behaviour: OpenAI shapes, streaming, an engine error in the middle of a stream, a full queue, and
variants being replaced and promoted while a client holds them.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest
from fastapi.testclient import TestClient

from engine.errors import InvalidRequestError
from engine.serving.app import create_app
from engine.serving.core import Delta, QueueFullError
from engine.settings import Settings


class FakeClient:
    """Byte-level tokens; each request answers with `script` (one Delta per item), then finishes."""

    vocab = 256

    def __init__(
        self,
        ref: str,
        script: list[Delta],
        queue_full: bool = False,
        crash: bool = False,
        queue_full_after: int | None = None,
        endless: bool = False,
    ):
        self.model_id, self.script, self.queue_full, self.crash = f"fake-{ref}", script, queue_full, crash
        self.queue_full_after, self.endless = queue_full_after, endless  # a queue that fills midway; no end
        self.submitted: list = []
        self.metrics, self.closed = None, False
        self.aborted: list[str] = []
        self.threads: dict[str, int] = {}  # input processing: the thread each step ran on

    def tokenize(self, text: str) -> list[int]:
        self.threads["tokenize"] = threading.get_ident()
        return list(text.encode())

    def detokenize(self, ids) -> str:
        return bytes(ids).decode(errors="replace")

    def token_text(self, token_id: int) -> str:
        return chr(token_id)

    def render_chat(self, messages, tools=None) -> list[int]:
        self.threads["render_chat"] = threading.get_ident()
        return self.tokenize("".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>")

    def grammar(self, response_format=None, tools=None, tool_choice=None):
        self.threads["grammar"] = threading.get_ident()
        if response_format and response_format.get("type") == "json_schema":
            raise InvalidRequestError("json_schema.schema: this fake compiles no grammars")
        return None

    def submit(self, request):
        if self.closed:  # as the real core does once closed
            raise RuntimeError("the engine is shutting down")
        if self.queue_full:
            raise QueueFullError("full")
        if self.crash:
            raise RuntimeError("a bug the routes do not expect")
        if self.queue_full_after is not None and len(self.submitted) >= self.queue_full_after:
            raise QueueFullError("full")
        self.submitted.append(request)
        return self._stream()

    async def _stream(self):
        for delta in self.script:
            yield delta
        while self.endless:  # a generation that would run on until aborted
            await asyncio.sleep(0.01)
            yield Delta(text="x", token_ids=[120])

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def score(self, pairs):
        return [(0.0, True) for _ in pairs]

    def stats(self) -> dict:
        return {"waiting": 0, "running": 0, "kv_bytes": 0, "slots": 1, "prefix_hits": 0, "prefix_tokens_reused": 0}

    @property
    def in_flight(self) -> int:
        return 0

    def use_metrics(self, metrics) -> None:
        self.metrics = metrics

    def close(self) -> None:
        self.closed = True


HELLO = [
    Delta(text="hel", token_ids=[104, 101, 108]),
    Delta(text="lo", token_ids=[108, 111], finish_reason="stop", prompt_tokens=5, completion_tokens=5),
]


@pytest.fixture(params=[False])
def fake(tmp_path, request):
    """An app whose variants are FakeClients; `scripts[ref]` sets what a reference answers. Parametrize with
    True (indirect) for a server that lets clients address the canary by name."""
    clients: dict[str, FakeClient] = {}
    scripts = {"prod": HELLO, "canary": HELLO}
    options: dict[str, dict] = {}

    def connect(ref, settings, metrics, compute_lock):
        clients[ref] = FakeClient(ref, scripts[ref], **options.get(ref, {}))
        clients[ref].metrics = metrics
        return clients[ref]

    settings = Settings(
        store=f"file://{tmp_path}/store", admin_token="t0ken", max_context=64, canary_by_name=request.param
    )
    app = create_app(settings, connect=connect)
    with TestClient(app, raise_server_exceptions=False) as http:
        state = app.state.serving
        yield http, state, clients, scripts, options


def test_completion_and_chat_speak_openai(fake):
    http, state, clients, *_ = fake
    state.load("production", "prod")
    r = http.post("/v1/completions", json={"model": "ryzanstein", "prompt": "hi", "max_tokens": 5})
    assert r.status_code == 200 and r.headers["x-ryz-variant"] == "production"
    body = r.json()
    assert body["choices"][0]["text"] == "hello" and body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}
    assert clients["prod"].submitted[0].prompt_ids == list(b"hi")
    r = http.post("/v1/chat/completions", json={"model": "ryzanstein", "messages": [{"role": "user", "content": "x"}]})
    assert r.json()["choices"][0]["message"] == {"role": "assistant", "content": "hello"}
    assert clients["prod"].submitted[1].prompt_ids == list(b"<user>x<assistant>")
    # the client's input errors are the caller's 400s
    r = http.post(
        "/v1/chat/completions",
        json={"model": "ryzanstein", "messages": [{"role": "user", "content": "x"}], "response_format": {
            "type": "json_schema", "json_schema": {"name": "x", "schema": {}}}},
    )  # fmt: skip
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format"


def test_an_engine_error_mid_stream_ends_the_stream_with_an_error_event(fake):
    http, state, _, scripts, _ = fake
    scripts["prod"] = [Delta(text="par", token_ids=[1]), Delta(error="engine error: forward failed")]
    state.load("production", "prod")
    with http.stream(
        "POST",
        "/v1/chat/completions",
        json={"model": "ryzanstein", "stream": True, "messages": [{"role": "user", "content": "x"}]},
    ) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert r.status_code == 200 and events[-1] == "[DONE]"
    payloads = [json.loads(e) for e in events[:-1]]
    assert payloads[1]["choices"][0]["delta"] == {"content": "par"}
    assert payloads[-1]["error"]["code"] == "engine_error" and "forward failed" in payloads[-1]["error"]["message"]


def test_a_full_queue_is_a_429_with_retry_after(fake):
    http, state, _, _, options = fake
    options["prod"] = {"queue_full": True}
    state.load("production", "prod")
    r = http.post("/v1/completions", json={"model": "ryzanstein", "prompt": "hi"})
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["code"] == "queue_full"


@pytest.mark.parametrize("fake", [True], indirect=True)
def test_promotion_relabels_the_canary_and_closes_the_old_production(fake):
    http, state, clients, *_ = fake
    state.load("production", "prod")
    admin = {"Authorization": "Bearer t0ken"}
    assert http.post("/admin/variants", json={"name": "canary", "model": "canary"}, headers=admin).status_code == 200
    r = http.post("/v1/completions", json={"model": "canary", "prompt": "hi"})
    assert r.headers["x-ryz-variant"] == "canary"
    canary_metrics = clients["canary"].metrics
    assert http.post("/admin/promote", headers=admin).json()["variants"]["production"]["model"] == "fake-canary"
    assert clients["canary"].metrics is not canary_metrics  # now counted as production
    for _ in range(100):  # the old production closes once idle, on a background thread
        if clients["prod"].closed:
            break
        time.sleep(0.02)
    assert clients["prod"].closed
    assert http.post("/v1/completions", json={"model": "ryzanstein", "prompt": "hi"}).headers["x-ryz-variant"] == (
        "production"
    )


def test_production_by_name_is_production_and_the_canary_is_not_addressable(fake):
    http, state, clients, *_ = fake
    state.load("production", "prod")
    state.load("canary", "canary")
    state.router.set_weight(100)  # every routed request goes to the canary
    ask = lambda model: http.post("/v1/completions", json={"model": model, "prompt": "hi"})  # noqa: E731
    assert ask("ryzanstein").headers["x-ryz-variant"] == "canary"
    for name in ("production", "fake-prod"):
        assert all(ask(name).headers["x-ryz-variant"] == "production" for _ in range(5))
    for name in ("canary", "fake-canary"):
        r = ask(name)
        assert r.status_code == 404 and "RYZ_CANARY_BY_NAME" in r.json()["error"]["message"]
    assert [m["id"] for m in http.get("/v1/models").json()["data"]] == ["ryzanstein", "fake-prod"]


def test_an_unhandled_error_is_a_counted_500(fake):
    http, state, _, _, options = fake
    options["prod"] = {"crash": True}
    state.load("production", "prod")
    r = http.post("/v1/completions", json={"model": "ryzanstein", "prompt": "hi"})
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    metrics = http.get("/metrics").text
    assert 'ryz_requests_total{endpoint="completions",status="500",variant="production"} 1.0' in metrics


def test_a_production_replaced_between_routing_and_submit_still_answers(fake):
    """A request routed to production, then held (a latency fault here; retrieval or parsing in real life) while a
    rollback loads another production: the old one closes only after that request reached it."""
    import threading

    http, state, clients, scripts, _ = fake
    scripts["prod2"] = HELLO
    state.load("production", "prod")
    state.faults["production_latency_ms"] = 400
    answers = []
    body = {"model": "production", "prompt": "hi", "max_tokens": 5}
    sender = threading.Thread(target=lambda: answers.append(http.post("/v1/completions", json=body)))
    sender.start()
    time.sleep(0.15)
    state.load("production", "prod2")  # clears production's faults: the faulty model is gone
    sender.join(timeout=10)
    assert answers[0].status_code == 200 and clients["prod"].submitted, answers[0].text
    deadline = time.monotonic() + 5
    while not clients["prod"].closed:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert state.faults["production_latency_ms"] == 0


# --- hostile input (issue 16): the route-side halves; tests/test_hostile_http.py runs a real server ---------------


def _asgi_post(app, path: str, body: dict, disconnect_after: float, timeout: float = 5.0) -> list[dict]:
    """POST `body` to the app as raw ASGI, with a client that disconnects `disconnect_after` s after sending it;
    returns the messages the app sent."""
    raw = json.dumps(body).encode()
    pending = [{"type": "http.request", "body": raw, "more_body": False}]
    sent: list[dict] = []

    async def receive():
        if pending:
            return pending.pop(0)
        await asyncio.sleep(disconnect_after)
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }
    asyncio.run(asyncio.wait_for(app(scope, receive, send), timeout))
    return sent


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_disconnects_aborts_its_requests(fake, path, stream):
    """Issue 16 row 4: a client that goes away, streaming or not (and before the first event), leaves nothing
    running: its engine requests are aborted through the client protocol. A non-streaming one ran to the end."""
    http, state, clients, scripts, options = fake
    scripts["prod"] = [Delta(text="x", token_ids=[120])]
    options["prod"] = {"endless": True}
    state.load("production", "prod")
    body = {"model": "ryzanstein", "max_tokens": 50, "stream": stream}
    body.update({"prompt": "hi"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "x"}]})
    _asgi_post(http.app, path, body, disconnect_after=0.0 if stream else 0.1)
    fake_client = clients["prod"]
    assert [r.request_id for r in fake_client.submitted] == fake_client.aborted != []
    if not stream:
        endpoint = "chat" if "chat" in path else "completions"
        line = f'ryz_requests_total{{endpoint="{endpoint}",status="499",variant="production"}} 1.0'
        assert line in http.get("/metrics").text


def test_a_429_midway_aborts_what_the_request_had_submitted(fake):
    """Issue 16 row 3: the queue fills after two of three prompts; the 429 leaves neither of the two running."""
    http, state, clients, _, options = fake
    options["prod"] = {"queue_full_after": 2}
    state.load("production", "prod")
    r = http.post("/v1/completions", json={"model": "ryzanstein", "prompt": ["a", "b", "c"], "max_tokens": 4})
    assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
    fake_client = clients["prod"]
    assert len(fake_client.submitted) == 2
    assert fake_client.aborted == [req.request_id for req in fake_client.submitted]


def test_a_batch_that_cannot_fit_the_queue_is_refused_before_submitting(tmp_path):
    clients = {}

    def connect(ref, settings, metrics, compute_lock):
        clients[ref] = FakeClient(ref, HELLO)
        return clients[ref]

    app = create_app(Settings(store=f"file://{tmp_path}/store", max_queue=2, max_prompts=8), connect=connect)
    with TestClient(app, raise_server_exceptions=False) as http:
        app.state.serving.load("production", "prod")
        ask = lambda n: http.post("/v1/completions", json={"model": "ryzanstein", "prompt": ["a"] * n})  # noqa: E731
        assert ask(4).status_code == 429 and clients["prod"].submitted == []  # 4 > 2 queued + 1 free slot
        r = ask(9)
        assert r.status_code == 400 and "RYZ_MAX_PROMPTS" in r.json()["error"]["message"]
        assert ask(3).status_code == 200 and len(clients["prod"].submitted) == 3


def test_input_processing_runs_off_the_event_loop(fake):
    """Tokenizing, template rendering and grammar compilation run on worker threads, not the event loop's."""
    http, state, clients, *_ = fake
    state.load("production", "prod")
    loop_threads = []
    fake_client = clients["prod"]
    submit = fake_client.submit
    fake_client.submit = lambda request: (loop_threads.append(threading.get_ident()), submit(request))[1]
    assert http.post("/v1/completions", json={"model": "ryzanstein", "prompt": "hi"}).status_code == 200
    assert fake_client.threads["tokenize"] != loop_threads[-1]
    chat = {"model": "ryzanstein", "messages": [{"role": "user", "content": "x"}], "response_format": {
        "type": "json_object"}}  # fmt: skip
    assert http.post("/v1/chat/completions", json=chat).status_code == 200
    assert loop_threads[-1] not in (fake_client.threads["render_chat"], fake_client.threads["grammar"])


def test_secrets_are_compared_in_constant_time(tmp_path, monkeypatch):
    """Issue 16 row 5: the admin token and the API keys go through hmac.compare_digest (bytes: a non-ASCII
    bearer is a 401, not a TypeError's 500)."""
    import hmac

    compared = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: compared.append((a, b)) or real(a, b))
    app = create_app(
        Settings(store=f"file://{tmp_path}/store", admin_token="t0ken", api_keys="k1, k2"),
        connect=lambda *a: FakeClient("prod", HELLO),
    )
    with TestClient(app, raise_server_exceptions=False) as http:
        assert http.get("/admin/state", headers={"Authorization": "Bearer t0ken"}).status_code == 200
        assert (b"t0ken", b"t0ken") in compared
        compared.clear()
        assert http.get("/v1/models", headers={"Authorization": "Bearer k2"}).status_code == 200
        assert {b for _, b in compared} == {b"k1", b"k2"}  # every key compared, whichever matches
        for token in ("t0ke", "é".encode("latin-1"), ""):
            raw = token if isinstance(token, bytes) else token.encode()
            r = http.get("/admin/state", headers=[(b"authorization", b"Bearer " + raw)])
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_admin_token"
            r = http.get("/v1/models", headers=[(b"authorization", b"Bearer " + raw)])
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize("keys", [",", " , ,", ",,"])
def test_a_key_list_of_only_commas_is_refused_at_start(tmp_path, keys):
    """Issue 16 row 5: RYZ_API_KEYS="," turned key checking off without a word; unset or empty still means open."""
    with pytest.raises(ValueError, match="RYZ_API_KEYS"):
        create_app(Settings(store=f"file://{tmp_path}/store", api_keys=keys))
    create_app(Settings(store=f"file://{tmp_path}/store", api_keys=""))


def test_an_unhandled_error_is_logged_and_answered_in_openai_shape(fake, caplog):
    http, state, _, _, options = fake
    options["prod"] = {"crash": True}
    state.load("production", "prod")
    with caplog.at_level("ERROR", logger="ryz.serve"):
        r = http.post(
            "/v1/chat/completions", json={"model": "ryzanstein", "messages": [{"role": "user", "content": "x"}]}
        )
    error = r.json()["error"]
    assert r.status_code == 500 and error["code"] == "internal_error" and error["type"] == "server_error"
    assert error["message"] == "internal error: RuntimeError"
    assert "a bug the routes do not expect" in caplog.text  # the traceback is in the log
    metrics = http.get("/metrics").text
    assert 'ryz_requests_total{endpoint="chat",status="500",variant="production"} 1.0' in metrics
    assert 'ryz_request_errors_total{kind="internal_error",variant="production"} 1.0' in metrics


def test_every_error_is_openai_shaped_and_counted_even_before_routing(fake):
    """Unknown routes and methods, bad JSON, lone surrogates, JSON nested 50,000 deep, 5,000-digit numbers,
    NaN: a 4xx in OpenAI's shape, counted under variant `unrouted` (they never reached one)."""
    http, state, *_ = fake
    state.load("production", "prod")
    raw = {
        "not json": b'{"model": ',
        "lone surrogate": b'{"model": "ryzanstein", "prompt": "\\ud800"}',
        "5000 digits": b'{"model": "ryzanstein", "prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}",
        "50000 deep": b'{"model": "ryzanstein", "prompt": ' + b"[" * 50000 + b"]" * 50000 + b"}",
        "NaN": b'{"model": "ryzanstein", "prompt": "x", "temperature": NaN}',
        "1e999": b'{"model": "ryzanstein", "prompt": "x", "temperature": 1e999}',
    }
    for name, body in raw.items():
        r = http.post("/v1/completions", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json", (name, r.text)
    assert http.post("/v1/nope", json={}).json()["error"]["code"] == "not_found"
    assert http.get("/v1/completions").json()["error"]["code"] == "method_not_allowed"
    r = http.post("/v1/completions", json={"model": "ryzanstein", "prompt": "x", "seed": -1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "seed"
    metrics = http.get("/metrics").text
    assert 'ryz_requests_total{endpoint="completions",status="400",variant="unrouted"} 7.0' in metrics
    assert 'ryz_requests_total{endpoint="other",status="404",variant="unrouted"} 1.0' in metrics
