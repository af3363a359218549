"""Discovery: the `hf` source against a replayed Hub on 127.0.0.1 (tests/hub_server.py), the `local` source on
synthetic checkpoints and a fake HF cache, the filters, novelty against a registry, and the flow under a
temporary Prefect (retries, error rows, the table artifact)."""

from __future__ import annotations

import json
import shutil

import pytest

from engine.artifacts.discovery import Candidate, judge_candidates, list_hub_models, read_hub_model, scan_local_models
from engine.artifacts.registry import Registry
from engine.artifacts.store import open_store
from engine.errors import HubError
from engine.settings import reload_settings
from tests.checkpoints import falcon3_variant, synth
from tests.hub_server import HubReplay


@pytest.fixture(autouse=True)
def _hub_online(monkeypatch):
    """These tests talk to the replay Hub on 127.0.0.1; `datasets` (imported by other tests) turns
    huggingface_hub's offline switch on process-wide when HF_DATASETS_OFFLINE is set."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


BITNET = "microsoft/bitnet-b1.58-2B-4T"
BITNET_SHA = "04c3b9ba8d4d2ba1a8d2c1e7d2a9b0f3c6e1d2a4"
FALCON = "tiiuae/Falcon3-1B-Instruct-1.58bit"
ONEBIT = "1bitLLM/bitnet_b1_58-large"
LISTED = [
    BITNET,
    FALCON,
    ONEBIT,
    "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
    "ryz-fixtures/bitnet-b1.58-nc",
    "ryz-fixtures/bitnet-b1.58-70B",
]


@pytest.fixture
def hub():
    with HubReplay(hang_seconds=1.5) as replay:
        yield replay


@pytest.fixture
def env(tmp_path, hub, monkeypatch):
    """Settings for one test: a private RYZ_HOME (store and registry), the replayed Hub, tiny retry delays."""
    for name, value in {
        "RYZ_HOME": str(tmp_path / "home"),
        "HF_ENDPOINT": hub.url,
        "RYZ_DISCOVERY_TIMEOUT": "0.4",
        "RYZ_DISCOVERY_RETRIES": "2",
        "RYZ_DISCOVERY_RETRY_DELAY": "0.01",
        "RYZ_DISCOVERY_HF_CACHE": str(tmp_path / "hf-cache"),
        "RYZ_DISCOVERY_LOCAL_PATHS": json.dumps([str(tmp_path / "zoo")]),
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("RYZ_STORE", raising=False)
    settings = reload_settings()
    yield settings
    monkeypatch.undo()
    reload_settings()


# --- the hf source, without Prefect -------------------------------------------------------------------


def test_hub_listing_and_model_info(hub):
    assert list_hub_models(endpoint=hub.url, search="bitnet", sort="last_modified", limit=2) == [BITNET, ONEBIT]
    path, query = hub.requests[-1]
    assert path == "/api/models" and query == {"search": ["bitnet"], "limit": ["2"], "sort": ["lastModified"]}
    assert list_hub_models(endpoint=hub.url, limit=50) == LISTED  # the Hub's order is kept

    info = read_hub_model(BITNET, endpoint=hub.url)
    # safetensors.total is 849,787,090 (U8 elements); four ternary weights per U8 byte make 2.41 B
    assert info == Candidate(
        "hf",
        BITNET,
        BITNET_SHA,
        None,
        "BitNetForCausalLM",
        "bitnet",
        "mit",
        328775890 + 4 * 521011200,
        1186 + 180 + 1184197448 + 9085698 + 50556,
    )  # configs, weights, tokenizer; no README
    assert read_hub_model(FALCON, endpoint=hub.url).license == "falcon-llm-license"  # `other` + license_name


def test_hub_filters_and_novelty(hub, env):
    registry = Registry(open_store(settings=env))
    registry.register(
        "demo",
        "sha256:" + "0" * 64,
        {"type": "hf", "repo": ONEBIT, "revision": "c2f13a7e9d6b5a4f3e2d1c0b9a8f7e6d5c4b3a21"},
    )
    seen = [read_hub_model(repo, endpoint=hub.url) for repo in LISTED]
    judged = {c.repo: c for c in judge_candidates(seen, env, registry)}
    assert [c.repo for c in judged.values() if c.status == "kept"] == [BITNET, FALCON]
    assert judged[BITNET].reason == "new: BitNetForCausalLM, mit, 2.41 B parameters, 1.19 GB"
    assert judged[ONEBIT].reason == "already registered as demo:1 (candidate)"
    assert (
        "LlamaForCausalLM without a bitnet quantization_config" in judged["TinyLlama/TinyLlama-1.1B-Chat-v1.0"].reason
    )
    assert judged["ryz-fixtures/bitnet-b1.58-nc"].reason == "license cc-by-nc-4.0 not allowed (RYZ_DISCOVERY_LICENSES)"
    assert (
        judged["ryz-fixtures/bitnet-b1.58-70B"].reason
        == "70.82 B parameters > maximum 10.00 B; 21.39 GB on disk > maximum 16 GB"
    )


@pytest.mark.parametrize(
    "kind, retryable, words",
    [
        ("429", True, "HTTP 429"),
        ("500", True, "HTTP 500"),
        ("garbage", True, "malformed response"),
        ("hang", True, "did not answer within 0.3 s"),
    ],
)
def test_hub_errors_say_whether_to_retry(hub, kind, retryable, words):
    hub.fault(f"/api/models/{BITNET}", kind)
    with pytest.raises(HubError, match=words) as caught:
        read_hub_model(BITNET, endpoint=hub.url, timeout=0.3)
    assert caught.value.retryable is retryable


def test_missing_repo_is_not_retryable(hub):
    with pytest.raises(HubError, match="HTTP 404.*check the repo id") as caught:
        read_hub_model("nobody/nothing", endpoint=hub.url)
    assert not caught.value.retryable


# --- the local source ---------------------------------------------------------------------------------------


def _local_tree(tmp_path):
    """A zoo (zoo.json lists b before a), a folder with a broken dir, a Falcon3-style model dir, and a fake HF cache."""
    zoo = tmp_path / "zoo"
    synth(zoo / "ryz-a", seed=1)
    synth(zoo / "ryz-b", seed=2)
    (zoo / "zoo.json").write_text(
        json.dumps({"schema": 1, "models": [{"name": "ryz-b", "path": "ryz-b"}, {"name": "ryz-a", "path": "ryz-a"}]})
    )
    falcon3_variant(synth(tmp_path / "work" / "src", seed=3), tmp_path / "work" / "falcon-tiny")
    (tmp_path / "extra" / "broken").mkdir(parents=True)
    (tmp_path / "extra" / "broken" / "config.json").write_text("{not json")
    snapshot = tmp_path / "hf-cache" / "models--org--bitnet-tiny" / "snapshots" / ("ab" * 20)
    shutil.copytree(zoo / "ryz-a", snapshot)
    (snapshot / "README.md").write_text("---\nlicense: cc-by-nc-4.0\n---\n# tiny\n")
    return zoo


def test_local_source_scans_zoo_order_dirs_and_hf_cache(tmp_path, env):
    zoo = _local_tree(tmp_path)
    seen = scan_local_models(
        [zoo, tmp_path / "extra", tmp_path / "work" / "falcon-tiny", tmp_path / "missing"], tmp_path / "hf-cache"
    )
    assert [(c.repo, c.status) for c in seen] == [
        ("ryz-b", "seen"),
        ("ryz-a", "seen"),
        ("broken", "error"),
        ("falcon-tiny", "seen"),
        ("org/bitnet-tiny", "seen"),
    ]
    b, a, broken, falcon, cached = seen
    assert a.architecture == "BitNetForCausalLM" and a.path == str(zoo / "ryz-a") and len(a.revision) == 64
    assert a.revision != b.revision and a.parameters > 0 and a.size_bytes > 0 and a.license is None
    assert falcon.architecture == "LlamaForCausalLM" and falcon.quant_method == "bitnet"
    assert falcon.parameters > a.parameters  # packed U8 linears counted four to a byte, plus an untied head
    assert cached.revision == "ab" * 20 and cached.license == "cc-by-nc-4.0"
    assert "cannot read" in broken.reason

    registry = Registry(open_store(settings=env))
    registry.register("ryz-a", "sha256:" + "1" * 64, {"type": "local", "repo": "ryz-a", "revision": a.revision})
    judged = judge_candidates(seen, env, registry)
    assert [c.status for c in judged] == ["kept", "skipped", "error", "kept", "skipped"]
    assert judged[1].reason == "already registered as ryz-a:1 (candidate)"
    assert judged[4].reason == "license cc-by-nc-4.0 not allowed (RYZ_DISCOVERY_LICENSES)"


# --- the flow under a temporary Prefect -------------------------------------------------------------------


def _table(state) -> list[dict]:
    """The discovery table artifact this flow run wrote, read back through the Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=["discovery"]),
                flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id]),
            )
        )
    assert len(artifacts) == 1 and artifacts[0].type == "table"
    data = artifacts[0].data
    return json.loads(data) if isinstance(data, str) else data


def test_flow_hf_retries_then_reports_errors(prefect_harness, hub, env):
    from flows.discovery import discover_models

    hub.fault(f"/api/models/{BITNET}", "429", "ok")  # rate limited once, then fine
    hub.fault(f"/api/models/{FALCON}", "hang", "ok")  # one timeout, then fine
    hub.fault(f"/api/models/{ONEBIT}", "500")  # failing for good
    hub.fault("/api/models/TinyLlama/TinyLlama-1.1B-Chat-v1.0", "garbage")  # malformed JSON for good
    state = discover_models(source="hf", search="", limit=50, return_state=True)
    assert state.is_completed()
    kept = state.result()
    assert [(c["repo"], c["revision"]) for c in kept] == [
        (BITNET, BITNET_SHA),
        (FALCON, "b7e1f0a2c3d4e5f60718293a4b5c6d7e8f901234"),
    ]
    assert hub.hits(f"/api/models/{BITNET}") == 2 and hub.hits(f"/api/models/{FALCON}") == 2
    assert hub.hits(f"/api/models/{ONEBIT}") == 3  # RYZ_DISCOVERY_RETRIES=2: three attempts, then reported
    rows = {row["repo"]: row for row in _table(state)}
    assert list(rows) == LISTED
    assert rows[ONEBIT]["status"] == "error" and "HTTP 500" in rows[ONEBIT]["reason"]
    assert rows["TinyLlama/TinyLlama-1.1B-Chat-v1.0"]["status"] == "error"
    assert "malformed response" in rows["TinyLlama/TinyLlama-1.1B-Chat-v1.0"]["reason"]
    assert rows["ryz-fixtures/bitnet-b1.58-nc"]["status"] == "skipped"


def test_flow_hf_listing_failure_is_a_row_not_a_crash(prefect_harness, hub, env):
    from flows.discovery import discover_models

    hub.fault("/api/models", "503")
    state = discover_models(source="hf", return_state=True)
    assert state.is_completed() and state.result() == []
    assert hub.hits("/api/models") == 3
    [row] = _table(state)
    assert row["status"] == "error" and "HTTP 503" in row["reason"] and row["repo"] == "(listing 'bitnet')"


def test_flow_local_returns_new_candidates_in_source_order(prefect_harness, tmp_path, env):
    from flows.discovery import discover_models

    _local_tree(tmp_path)
    state = discover_models(source="local", return_state=True)  # RYZ_DISCOVERY_LOCAL_PATHS: the zoo; plus the cache
    assert state.is_completed()
    assert [c["repo"] for c in state.result()] == ["ryz-b", "ryz-a"]
    assert [(row["repo"], row["status"]) for row in _table(state)] == [
        ("ryz-b", "kept"),
        ("ryz-a", "kept"),
        ("org/bitnet-tiny", "skipped"),
    ]

    first = state.result()[1]  # once registered, the same revision is no longer new
    Registry(open_store(settings=env)).register(
        first["repo"], "sha256:" + "2" * 64, {"repo": first["repo"], "revision": first["revision"]}
    )
    assert [c["repo"] for c in discover_models(source="local")] == ["ryz-b"]
