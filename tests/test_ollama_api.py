"""Ollama's REST API, llama-server's routes and `ryz ps` against a real `ryz serve` app on 127.0.0.1: the unmodified
`ollama` client package and the `openai` client on the same server, production and a canary at weight 100 (which
the /api routes must never reach), and the API-key rule on every route but the probes and /metrics.
"""

from __future__ import annotations

import functools
import json

import httpx
import ollama
import pytest
from fastapi.testclient import TestClient

from engine.artifacts.registry import Registry
from engine.artifacts.store import open_store
from engine.model.quantize import quantize_to_store
from engine.settings import Settings
from tests import checkpoints
from tests.test_server import ADMIN, RunningServer, _free_port

PROD_NAME = "tiny-prod"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("ollama")
    store_url = f"file://{root / 'store'}"
    store = open_store(store_url)
    prod = quantize_to_store(checkpoints.synth(root / "prod", seed=5), store, root / "work")["artifact_id"]
    canary = quantize_to_store(checkpoints.synth(root / "canary", seed=9), store, root / "work")["artifact_id"]
    Registry(store, actor="test").register(PROD_NAME, prod, {"repo": PROD_NAME, "revision": "r1"})
    settings = dict(
        home=root / "home", store=store_url, admin_token=ADMIN, max_seqs=2, max_context=256, threads=2, prefill_chunk=32
    )
    return {"root": root, "prod": prod, "canary": canary, "settings": settings}


@pytest.fixture(scope="module")
def server(world, native_library):
    from engine.serving.app import create_app
    from engine.serving.client import load_model

    app = create_app(
        Settings(**world["settings"]), world["prod"], loader=functools.partial(load_model, library=native_library)
    )
    with RunningServer(app, _free_port()) as running:
        r = running.admin("POST", "/admin/variants", json={"name": "canary", "model": world["canary"]})
        assert r.status_code == 200, r.text
        assert running.admin("POST", "/admin/weights", json={"canary": 100}).status_code == 200
        yield running


@pytest.fixture(scope="module")
def client(server):
    return ollama.Client(host=server.url, timeout=60)


CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
GREEDY = {"temperature": 0, "num_predict": 12}


def test_list_show_ps_and_probes(server, client, world):
    listed = client.list().models
    assert [m.model for m in listed] == ["ryzanstein:latest"]  # the canary is never listed
    model = listed[0]
    assert model.digest == world["prod"][7:] and model.size > 0 and model.details.quantization_level == "TQ2_0"
    shown = client.show("ryzanstein")  # the bare name is accepted too
    assert model.details.format == "gguf" and model.details.family == shown.modelinfo["general.architecture"]
    assert shown.modelinfo["general.parameter_count"] > 0
    assert "completion" in shown.capabilities and shown.template
    running = client.ps().models
    assert [m.model for m in running] == ["ryzanstein:latest"] and running[0].context_length == 256
    assert httpx.get(f"{server.url}/").text == "Ollama is running"
    assert httpx.head(f"{server.url}/").status_code == 200
    assert httpx.get(f"{server.url}/api/version").json()["version"].count(".") == 2


def test_chat_streamed_and_whole_agree_and_match_openai(server, client):
    whole = client.chat("ryzanstein:latest", messages=CHAT, options=GREEDY)
    assert whole.done and whole.done_reason in ("stop", "length") and whole.message.role == "assistant"
    assert whole.eval_count and whole.prompt_eval_count and whole.total_duration >= whole.eval_duration > 0
    parts = list(client.chat("ryzanstein:latest", messages=CHAT, options=GREEDY, stream=True))
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    assert "".join(p.message.content for p in parts) == whole.message.content
    assert parts[-1].eval_count == whole.eval_count and parts[-1].created_at
    # the same request through OpenAI's route to production: the same text (the /api routes never reach the
    # canary, though it takes all of the served name's traffic on /v1)
    openai = server.client()
    same = openai.chat.completions.create(model="production", messages=CHAT, max_tokens=12, temperature=0)
    assert same.choices[0].message.content == whole.message.content
    raw = openai.chat.completions.with_raw_response.create(
        model="ryzanstein", messages=CHAT, max_tokens=12, temperature=0
    )
    assert raw.headers["x-ryz-variant"] == "canary"


def test_generate_streamed_and_whole_with_context(client):
    whole = client.generate("ryzanstein", "the quick brown fox", options=GREEDY)
    assert whole.done and 0 < whole.eval_count <= 12
    assert len(whole.context) == whole.prompt_eval_count + whole.eval_count  # prompt and reply ids, for the next turn
    parts = list(client.generate("ryzanstein", "the quick brown fox", options=GREEDY, stream=True))
    assert "".join(p.response for p in parts) == whole.response and parts[-1].done
    raw = client.generate("ryzanstein", "the quick brown fox", raw=True, options={**GREEDY, "num_predict": 3})
    assert raw.eval_count <= 3 and raw.done_reason in ("stop", "length")
    loaded = client.generate("ryzanstein")  # Ollama's "load the model" request
    assert loaded.done and loaded.done_reason == "load"
    structured = client.generate("ryzanstein", "a JSON object:", format="json", options={**GREEDY, "num_predict": 40})
    if structured.done_reason == "stop":
        json.loads(structured.response)


def test_errors_in_ollamas_shape(server, client):
    with pytest.raises(ollama.ResponseError) as caught:
        client.chat("canary", messages=CHAT)
    assert caught.value.status_code == 404 and caught.value.error == "model 'canary' not found"
    with pytest.raises(ollama.ResponseError) as caught:  # the canary's own model id: not addressable either
        client.generate(server.state.variants["canary"].model_id, "hi")
    assert caught.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as caught:
        client.pull("ryzanstein")
    assert caught.value.status_code == 400 and "ryz pull" in caught.value.error
    for path, body in (("/api/chat", b"{not json"), ("/api/generate", b'{"model": "ryzanstein", "options": 3}')):
        r = httpx.post(f"{server.url}{path}", content=body)
        assert r.status_code == 400 and set(r.json()) == {"error"}, r.text
    r = httpx.post(f"{server.url}/api/chat", json={"model": "ryzanstein", "messages": CHAT, "format": "yaml"})
    assert r.status_code == 400 and "format" in r.json()["error"]


def test_tokenize_detokenize_props(server):
    text = "naïve café, the quick brown fox"
    ids = httpx.post(f"{server.url}/tokenize", json={"content": text}).json()["tokens"]
    with_bos = httpx.post(f"{server.url}/tokenize", json={"content": text, "add_special": True}).json()["tokens"]
    assert with_bos[-len(ids) :] == ids and len(with_bos) >= len(ids)
    assert httpx.post(f"{server.url}/detokenize", json={"tokens": ids}).json() == {"content": text}
    pieces = httpx.post(f"{server.url}/tokenize", json={"content": text, "with_pieces": True}).json()["tokens"]
    assert [p["id"] for p in pieces] == ids
    joined = b"".join(p["piece"].encode() if isinstance(p["piece"], str) else bytes(p["piece"]) for p in pieces)
    assert joined.decode() == text
    r = httpx.post(f"{server.url}/detokenize", json={"tokens": [10**9]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens"
    props = httpx.get(f"{server.url}/props").json()
    assert props["total_slots"] == 2 and props["default_generation_settings"]["n_ctx"] == 256
    assert props["model_alias"] == "ryzanstein" and props["model_path"] and "build_info" in props


def test_ryz_ps_lists_both_variants(server, world, capsys):
    from flows.cli import main

    assert main(["ps", "--url", server.url, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    rows = {v["variant"]: v for v in doc["variants"]}
    assert rows["production"]["version"] == f"{PROD_NAME}:1" and rows["production"]["artifact_id"] == world["prod"]
    assert (rows["production"]["weight"], rows["canary"]["weight"]) == (0, 100)
    assert rows["canary"]["artifact_id"] == world["canary"] and rows["canary"]["version"] is None
    for row in rows.values():
        assert row["slots"] == 2 and row["kv_capacity"] == 2 * 256 and 0 <= row["kv_positions"] <= 512
        assert row["weights_bytes"] > 0
    assert rows["production"]["kv_positions"] > 0  # its idle slots keep the prefixes of the requests above
    assert main(["ps", "--url", server.url]) == 0
    table = capsys.readouterr().out
    assert f"{PROD_NAME}:1" in table and "canary" in table and "100%" in table
    assert main(["ps", "--url", "http://127.0.0.1:9"]) == 1 and "ryz serve" in capsys.readouterr().err


def test_api_keys_guard_every_route_but_probes_and_metrics(world):
    from engine.serving.app import create_app

    settings = Settings(**{**world["settings"], "api_keys": "k1,k2"})
    with TestClient(create_app(settings)) as app:
        for method, path in (
            ("GET", "/"),
            ("GET", "/api/tags"),
            ("POST", "/api/chat"),
            ("GET", "/api/version"),
            ("POST", "/tokenize"),
            ("GET", "/props"),
            ("GET", "/ps"),
            ("GET", "/openapi.json"),
            ("GET", "/v1/models"),
        ):
            r = app.request(method, path, json={})
            assert r.status_code == 401, (path, r.text)
            if path.startswith("/api/"):
                assert set(r.json()) == {"error"} and "RYZ_API_KEYS" in r.json()["error"]
            else:
                assert r.json()["error"]["code"] == "invalid_api_key"
        assert app.get("/health").status_code == 200 and app.get("/metrics").status_code == 200
        assert app.get("/ready").status_code == 503  # no model: not a 401
        assert app.get("/api/tags", headers={"Authorization": "Bearer k2"}).json() == {"models": []}
        # admin routes keep their own token, no API key needed
        assert app.get("/admin/state", headers={"Authorization": f"Bearer {ADMIN}"}).status_code == 200
        assert app.get("/admin/state", headers={"Authorization": "Bearer k1"}).status_code == 401
