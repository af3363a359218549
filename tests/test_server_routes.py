"""The HTTP routes against a fake EngineClient: what the server makes of whatever an engine says, with no model.

The client protocol (engine/serving/client.py) is the only thing the routes see, so a scripted client pins the
route-side behaviour: OpenAI shapes, streaming, an engine error in the middle of a stream, a full queue, and
variants being replaced and promoted while a client holds them.
"""

from __future__ import annotations

import json
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

    def __init__(self, ref: str, script: list[Delta], queue_full: bool = False, crash: bool = False):
        self.model_id, self.script, self.queue_full, self.crash = f"fake-{ref}", script, queue_full, crash
        self.submitted, self.metrics, self.closed = [], None, False

    def tokenize(self, text: str) -> list[int]:
        return list(text.encode())

    def detokenize(self, ids) -> str:
        return bytes(ids).decode(errors="replace")

    def token_text(self, token_id: int) -> str:
        return chr(token_id)

    def render_chat(self, messages, tools=None) -> list[int]:
        return self.tokenize("".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>")

    def grammar(self, response_format=None, tools=None, tool_choice=None):
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
        self.submitted.append(request)
        return self._stream()

    async def _stream(self):
        for delta in self.script:
            yield delta

    def abort(self, request_id: str) -> None:
        pass

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
