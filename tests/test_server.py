"""`ryz serve` end to end: the real `openai` client against the server on 127.0.0.1, on the native engine.

The server runs in this process (uvicorn in a thread) so tests can look at its state; models are the
tiny synthetic shape, two different seeds for production and canary.
"""

from __future__ import annotations

import functools
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
import uvicorn

from engine.artifacts.store import open_store
from engine.model.native import NativeModel
from engine.model.quantize import quantize_checkpoint, quantize_to_store
from engine.settings import Settings
from tests import checkpoints

ADMIN = "test-admin-token"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningServer:
    def __init__(self, app, port: int):
        self.app, self.port = app, port
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"server on {self.url} not ready: {self.app.state.serving.describe()}")

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)

    @property
    def state(self):
        return self.app.state.serving

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"{self.url}/v1", api_key=kw.pop("api_key", "unused"), max_retries=0, timeout=60, **kw
        )

    def admin(self, method: str, path: str, token: str | None = ADMIN, **kw) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.request(method, f"{self.url}{path}", headers=headers, timeout=60, **kw)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    store = open_store(f"file://{root / 'store'}")
    prod_dir = checkpoints.synth(root / "prod", seed=5)
    canary_dir = checkpoints.synth(root / "canary", seed=9)
    gguf = root / "tiny.gguf"
    quantize_checkpoint(prod_dir, gguf)
    canary_id = quantize_to_store(canary_dir, store, root / "work")["artifact_id"]
    prod_id = quantize_to_store(prod_dir, store, root / "work")["artifact_id"]
    return {"root": root, "gguf": gguf, "store": f"file://{root / 'store'}", "canary": canary_id, "prod": prod_id}


def _settings(models, **kw) -> Settings:
    base = dict(
        home=models["root"] / "home",
        store=models["store"],
        admin_token=ADMIN,
        max_seqs=4,
        max_context=256,
        threads=2,
        max_queue=16,
        prefill_chunk=32,
    )
    return Settings(**{**base, **kw})


def _app(models, native_library, model_ref=None, **kw):
    from engine.serving.app import create_app
    from engine.serving.client import load_model

    return create_app(
        _settings(models, **kw),
        model_ref or str(models["gguf"]),
        loader=functools.partial(load_model, library=native_library),
    )


@pytest.fixture(scope="module")
def server(models, native_library):
    with RunningServer(_app(models, native_library), _free_port()) as running:
        yield running


def test_models_health_ready(server):
    ids = [m.id for m in server.client().models.list().data]
    assert ids[0] == "ryzanstein" and "tiny" in ids
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{server.url}/ready").status_code == 200


def test_completion_matches_native_greedy(server, models, native_library):
    from engine.model.tokenizer import ModelTokenizer

    direct = NativeModel(models["gguf"], native_library, threads=1, max_positions=256)
    tok = ModelTokenizer(direct.file)
    prompt = "the quick brown fox"
    expected = direct.generate(tok.encode(prompt), 12, stop_ids=tok.stop_ids)
    out = server.client().completions.create(model="ryzanstein", prompt=prompt, max_tokens=12, temperature=0)
    choice = out.choices[0]
    assert choice.text == tok.decode(expected)
    assert out.usage.prompt_tokens == len(tok.encode(prompt)) and out.usage.completion_tokens == len(expected)
    assert choice.finish_reason == ("length" if len(expected) == 12 else "stop")


def test_chat_and_streaming_agree(server):
    client = server.client()
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    whole = client.chat.completions.create(model="ryzanstein", messages=messages, max_tokens=20, temperature=0)
    parts, finish, usage = [], None, None
    for chunk in client.chat.completions.create(
        model="ryzanstein",
        messages=messages,
        max_tokens=20,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    ):
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage
    assert "".join(parts) == whole.choices[0].message.content
    assert finish == whole.choices[0].finish_reason
    assert usage.completion_tokens == whole.usage.completion_tokens


def test_sse_wire_format_ends_with_done(server):
    body = {"model": "ryzanstein", "prompt": "abc", "max_tokens": 5, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] in ("stop", "length")


def test_stop_strings(server):
    client = server.client()
    kw = dict(
        model="ryzanstein", prompt="the cat sat on", max_tokens=48, temperature=0, extra_body={"ignore_eos": True}
    )
    free = client.completions.create(**kw).choices[0].text
    assert len(free) > 6
    stop = free[len(free) // 2 : len(free) // 2 + 2]
    cut = client.completions.create(**kw, stop=[stop])
    assert cut.choices[0].text == free[: free.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kw, stop=[stop], stream=True))
    assert streamed == cut.choices[0].text


def test_seed_reproducibility(server):
    client = server.client()

    def run(seed):
        return (
            client.completions.create(model="ryzanstein", prompt="once upon", max_tokens=16, temperature=1.0, seed=seed)
            .choices[0]
            .text
        )

    assert run(7) == run(7)
    assert len({run(s) for s in range(1, 5)}) > 1


def test_logprobs_and_echo_match_the_model(server, models, native_library):
    from engine.model.tokenizer import ModelTokenizer
    from engine.serving.sampling import log_softmax

    direct = NativeModel(models["gguf"], native_library, threads=1, max_positions=256)
    tok = ModelTokenizer(direct.file)
    ids = tok.encode("scoring this prompt")
    out = httpx.post(
        f"{server.url}/v1/completions",
        json={"model": "ryzanstein", "prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 2},
        timeout=30,
    ).json()
    lp = out["choices"][0]["logprobs"]
    assert lp["token_logprobs"][0] is None and len(lp["token_logprobs"]) == len(ids)
    expected = log_softmax(direct.forward(ids).astype(np.float64))
    for i in range(1, len(ids)):
        assert lp["token_logprobs"][i] == pytest.approx(expected[i - 1, ids[i]], abs=1e-4)
        assert len(lp["top_logprobs"][i]) <= 2
    gen = server.client().completions.create(model="ryzanstein", prompt="abc", max_tokens=4, temperature=0, logprobs=3)
    lps = gen.choices[0].logprobs
    assert len(lps.token_logprobs) == 4 and all(len(t) <= 3 for t in lps.top_logprobs)
    assert all(
        max(t.values()) == pytest.approx(v, abs=1e-6) for t, v in zip(lps.top_logprobs, lps.token_logprobs)
    )  # greedy
    chat = server.client().chat.completions.create(
        model="ryzanstein",
        messages=[{"role": "user", "content": "x"}],
        max_tokens=3,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(c.top_logprobs) == 2 for c in content)


def test_batched_equals_unbatched_greedy(server):
    client = server.client()
    prompts = [f"prompt number {i} with some text" for i in range(6)]
    alone = [
        client.completions.create(
            model="ryzanstein", prompt=p, max_tokens=16, temperature=0, extra_body={"ignore_eos": True}
        )
        .choices[0]
        .text
        for p in prompts
    ]
    with ThreadPoolExecutor(6) as pool:
        together = list(
            pool.map(
                lambda p: (
                    client.completions.create(
                        model="ryzanstein", prompt=p, max_tokens=16, temperature=0, extra_body={"ignore_eos": True}
                    )
                    .choices[0]
                    .text
                ),
                prompts,
            )
        )
    assert together == alone


def test_admin_needs_the_token(server):
    assert server.admin("GET", "/admin/state", token=None).status_code == 401
    assert server.admin("GET", "/admin/state", token="wrong").status_code == 401
    r = server.admin("POST", "/admin/weights", json={"canary": 10})
    assert r.status_code == 409 and "no canary" in r.json()["error"]["message"]
    assert server.admin("GET", "/admin/state").json()["variants"]["production"]["model"] == "tiny"


def test_admin_disabled_without_a_configured_token(models, native_library):
    from fastapi.testclient import TestClient

    from engine.serving.app import create_app

    app = create_app(_settings(models, admin_token=None), None)
    r = TestClient(app).get("/admin/state", headers={"Authorization": "Bearer x"})
    assert r.status_code == 403 and "RYZ_ADMIN_TOKEN" in r.json()["error"]["message"]


def test_canary_router(server, models):
    r = server.admin("POST", "/admin/variants", json={"name": "canary", "model": models["canary"][7:19]})
    assert r.status_code == 200, r.text
    assert server.admin("POST", "/admin/variants", json={"name": "canary", "model": "/etc/passwd"}).status_code == 400
    body = {"model": "ryzanstein", "prompt": "hi", "max_tokens": 1, "temperature": 0}

    def variants(n: int, session=None) -> list[str]:
        headers = {"X-Session-Id": session} if session else {}
        with httpx.Client(timeout=30) as c:
            return [
                c.post(f"{server.url}/v1/completions", json=body, headers=headers).headers["x-ryz-variant"]
                for _ in range(n)
            ]

    try:
        assert set(variants(20)) == {"production"}  # weight 0
        server.admin("POST", "/admin/weights", json={"canary": 100})
        assert set(variants(20)) == {"canary"}
        server.admin("POST", "/admin/weights", json={"canary": 20})
        n = 300
        hits = variants(n).count("canary")
        sigma = (n * 0.2 * 0.8) ** 0.5
        assert abs(hits - 0.2 * n) < 4 * sigma, hits
        for session in ("alice", "bob", "carol"):
            assert len(set(variants(10, session))) == 1  # sticky
        assert server.admin("POST", "/admin/weights", json={"canary": 101}).status_code == 400
        metrics = httpx.get(f"{server.url}/metrics").text
        assert 'ryz_requests_total{endpoint="completions",status="200",variant="canary"}' in metrics
        assert 'ryz_time_to_first_token_seconds_count{variant="production"}' in metrics
    finally:
        server.admin("POST", "/admin/weights", json={"canary": 0})
        server.admin("DELETE", "/admin/variants/canary")
    assert "canary" not in server.admin("GET", "/admin/state").json()["variants"]


def test_promote_swaps_without_dropping_a_stream(models, native_library):
    with RunningServer(_app(models, native_library), _free_port()) as srv:
        srv.admin("POST", "/admin/variants", json={"name": "canary", "model": models["canary"]})
        canary_model = srv.admin("GET", "/admin/state").json()["variants"]["canary"]["model"]
        body = {
            "model": "ryzanstein",
            "prompt": "long stream",
            "max_tokens": 200,
            "temperature": 0,
            "stream": True,
            "ignore_eos": True,
        }
        with httpx.stream("POST", f"{srv.url}/v1/completions", json=body, timeout=60) as r:
            lines = iter(r.iter_lines())
            next(lines)
            assert srv.admin("POST", "/admin/promote").status_code == 200
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "length"
        state = srv.admin("GET", "/admin/state").json()
        assert state["variants"]["production"]["model"] == canary_model and "canary" not in state["variants"]


BAD_INPUTS = [
    ("malformed json", "/v1/completions", b"{not json", 400, "not valid JSON"),
    ("not an object", "/v1/completions", b"[1, 2]", 400, "JSON object"),
    ("wrong type", "/v1/completions", {"model": "ryzanstein", "prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
    ("unknown model", "/v1/completions", {"model": "gpt-9", "prompt": "x"}, 404, "does not exist"),
    ("missing prompt", "/v1/completions", {"model": "ryzanstein"}, 400, "prompt"),
    ("empty prompt", "/v1/completions", {"model": "ryzanstein", "prompt": ""}, 400, "empty"),
    ("empty messages", "/v1/chat/completions", {"model": "ryzanstein", "messages": []}, 400, "messages"),
    (
        "bad role",
        "/v1/chat/completions",
        {"model": "ryzanstein", "messages": [{"role": "wizard", "content": "x"}]},
        400,
        "role",
    ),
    ("temperature", "/v1/completions", {"model": "ryzanstein", "prompt": "x", "temperature": 7}, 400, "temperature"),
    ("top_p", "/v1/completions", {"model": "ryzanstein", "prompt": "x", "top_p": 0}, 400, "top_p"),
    (
        "negative max_tokens",
        "/v1/completions",
        {"model": "ryzanstein", "prompt": "x", "max_tokens": -1},
        400,
        "max_tokens",
    ),
    (
        "max_tokens over limit",
        "/v1/completions",
        {"model": "ryzanstein", "prompt": "x", "max_tokens": 10**6},
        400,
        "limit",
    ),
    ("n > 1", "/v1/completions", {"model": "ryzanstein", "prompt": "x", "n": 3}, 400, "n=3"),
    ("prompt too long", "/v1/completions", {"model": "ryzanstein", "prompt": [1] * 300}, 400, "context"),
    ("token id out of range", "/v1/completions", {"model": "ryzanstein", "prompt": [1, 10**7]}, 400, "token ids"),
    ("too many stops", "/v1/completions", {"model": "ryzanstein", "prompt": "x", "stop": list("abcde")}, 400, "stop"),
    ("logprobs range", "/v1/completions", {"model": "ryzanstein", "prompt": "x", "logprobs": 50}, 400, "logprobs"),
    (
        "bad response_format",
        "/v1/chat/completions",
        {
            "model": "ryzanstein",
            "messages": [{"role": "user", "content": "x"}],
            "response_format": {"type": "json_schema", "json_schema": {"schema": 5}},
        },
        400,
        "",
    ),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_gets_a_clear_error(server, case):
    _, path, body, status, words = case
    kw = (
        {"content": body, "headers": {"content-type": "application/json"}}
        if isinstance(body, bytes)
        else {"json": body}
    )
    r = httpx.post(f"{server.url}{path}", timeout=30, **kw)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and words.lower() in error["message"].lower()


def test_client_disconnect_mid_stream_frees_the_slot(server):
    body = {
        "model": "ryzanstein",
        "prompt": "disconnect",
        "max_tokens": 200,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30) as r:
        next(r.iter_lines())
    deadline = time.monotonic() + 10
    while server.state.in_flight() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.state.in_flight() == 0
    out = server.client().completions.create(model="ryzanstein", prompt="still here", max_tokens=3)
    assert out.choices[0].finish_reason in ("stop", "length")


def test_api_keys(models, native_library):
    with RunningServer(_app(models, native_library, api_keys="k1,k2"), _free_port()) as srv:
        with pytest.raises(openai.AuthenticationError):
            srv.client(api_key="nope").models.list()
        assert srv.client(api_key="k2").models.list().data
        assert httpx.get(f"{srv.url}/health").status_code == 200  # probes stay open


def test_bounded_load_no_5xx_and_memory_returns(models, native_library):
    """32 clients, 256 requests, 4 slots and a queue of 8: every request completes or gets 429."""
    with RunningServer(_app(models, native_library, max_queue=8, prefix_cache_slots=1), _free_port()) as srv:
        engine_state = srv.state.variants["production"].client.core
        per_seq = engine_state.model.kv_bytes_per_seq
        rejected = []

        def one(i: int) -> int:
            body = {
                "model": "ryzanstein",
                "prompt": f"load {i} " * (1 + i % 5),
                "max_tokens": 8 + i % 9,
                "stream": bool(i % 2),
                "temperature": 0.7,
                "seed": i,
            }
            try:
                with httpx.Client(timeout=60) as c:
                    for attempt in range(
                        12
                    ):  # a client that backs off, shorter than Retry-After to keep the test quick
                        r = c.post(f"{srv.url}/v1/completions", json=body)
                        if r.status_code != 429:
                            break
                        rejected.append(r.headers["retry-after"])
                        time.sleep(min(0.05 * (attempt + 1), 0.3))
                    return r.status_code
            except httpx.HTTPError as exc:
                return repr(exc)

        with ThreadPoolExecutor(32) as pool:
            statuses = list(pool.map(one, range(256)))
        assert set(statuses) <= {200, 429}, [s for s in statuses if s not in (200, 429)][:5]
        assert statuses.count(200) >= 64 and rejected  # the queue bound was hit and answered with 429
        deadline = time.monotonic() + 10
        while srv.state.in_flight() and time.monotonic() < deadline:
            time.sleep(0.05)
        stats = engine_state.stats()
        assert stats["running"] == 0 and stats["waiting"] == 0
        assert stats["kv_bytes"] <= per_seq  # idle slots beyond the one prefix-cache slot were released


def test_continue_config(server, capsys):
    import yaml

    from flows.cli import main

    assert main(["continue-config", "--url", server.url]) == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["schema"] == "v1"
    assert {m["model"] for m in config["models"]} >= {"ryzanstein", "tiny"}
    assert all(m["apiBase"] == f"{server.url}/v1" and m["provider"] == "openai" for m in config["models"])


SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name", "tags", "size"],
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "tags": {"type": "array", "maxItems": 2, "items": {"enum": ["a", "b", "c"]}},
        "size": {"type": "integer", "minimum": 0, "maximum": 99},
        "meta": {
            "type": "object",
            "additionalProperties": False,
            "properties": {"ok": {"type": "boolean"}},
            "required": ["ok"],
        },
    },
}


def test_json_schema_responses_validate(server):
    import jsonschema

    client = server.client()
    fmt = {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA}}
    for seed in range(12):
        out = client.chat.completions.create(
            model="ryzanstein",
            messages=[{"role": "user", "content": f"item {seed}"}],
            max_tokens=120,
            temperature=1.0,
            seed=seed,
            response_format=fmt,
        )
        assert out.choices[0].finish_reason == "stop", out.choices[0].message.content
        jsonschema.validate(json.loads(out.choices[0].message.content), SCHEMA)
    obj = client.chat.completions.create(
        model="ryzanstein",
        messages=[{"role": "user", "content": "x"}],
        max_tokens=120,
        temperature=0.5,
        seed=1,
        response_format={"type": "json_object"},
    )
    if obj.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(obj.choices[0].message.content), dict)


def test_forced_tool_call(server):
    import jsonschema

    params = {
        "type": "object",
        "additionalProperties": False,
        "required": ["city"],
        "properties": {"city": {"type": "string", "maxLength": 8}, "unit": {"enum": ["c", "f"]}},
    }
    tools = [
        {"type": "function", "function": {"name": "get_weather", "parameters": params}},
        {
            "type": "function",
            "function": {
                "name": "get_time",
                "parameters": {"type": "object", "properties": {}, "additionalProperties": False},
            },
        },
    ]
    client = server.client()
    for seed in range(4):
        out = client.chat.completions.create(
            model="ryzanstein",
            messages=[{"role": "user", "content": "weather?"}],
            tools=tools,
            seed=seed,
            max_tokens=80,
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
        )
        choice = out.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        call = choice.message.tool_calls[0]
        assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), params)
    streamed = [
        c
        for c in client.chat.completions.create(
            model="ryzanstein",
            messages=[{"role": "user", "content": "weather?"}],
            tools=tools,
            seed=0,
            max_tokens=80,
            tool_choice="required",
            stream=True,
        )
    ]
    calls = [tc for c in streamed if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert calls and calls[0].function.name in ("get_weather", "get_time"), streamed
    assert streamed[-1].choices[0].finish_reason == "tool_calls"


def test_variants_take_turns_on_the_cores(models, native_library):
    """Two variants never run a forward at the same time (each forward uses every core: together they would
    oversubscribe them and the canary, with less traffic, would be preempted in nearly every step); the time
    one waits for the other is counted apart from its per-token latency."""
    from engine.serving.client import load_model, local_clients
    from engine.serving.core import GenerationRequest
    from engine.serving.sampling import SamplingParams
    from engine.serving.variants import ServingState

    state = ServingState(_settings(models), local_clients(functools.partial(load_model, library=native_library)))
    try:
        variants = [state.load("production", models["prod"]), state.load("canary", models["canary"])]
        spans, spans_lock = [], threading.Lock()
        for v in variants:

            def timed(*args, _forward=v.client.core.model.forward_batch, _name=v.name, **kw):
                start = time.perf_counter()
                out = _forward(*args, **kw)
                with spans_lock:
                    spans.append((start, time.perf_counter(), _name))
                return out

            v.client.core.model.forward_batch = timed
        finished = threading.Semaphore(0)
        for v in variants:
            for _ in range(3):
                v.client.core.submit(
                    GenerationRequest(
                        prompt_ids=[1, 2, 3], params=SamplingParams(temperature=0.0), max_tokens=24, ignore_eos=True
                    ),
                    lambda d: (d.finish_reason or d.error) and finished.release(),
                )
        for _ in range(6):
            assert finished.acquire(timeout=60)
        spans.sort()
        assert {name for *_, name in spans} == {"production", "canary"}
        assert all(end <= next_start for (_, end, _), (next_start, _, _) in zip(spans, spans[1:])), (
            "two forwards overlapped"
        )
        assert sum(v.client.core.compute_wait for v in variants) > 0  # they did contend, and the wait was counted
        assert 'ryz_compute_wait_seconds_total{variant="canary"}' in state.metrics.render().decode()
    finally:
        state.close()
