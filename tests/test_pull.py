"""`ryz pull` against the Hub stand-in (tests/hub_server.py) serving real files: pinned download, a runnable
`pulled` version, idempotence, a cut transfer resumed, a gated repo, offline from the HF cache, a local directory,
discovery's filters refusing, and discovery still treating a pulled source as new."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager

import pytest

from engine.artifacts.discovery import judge_candidates, read_hub_model
from engine.artifacts.pull import pull_model
from engine.artifacts.registry import Registry
from engine.artifacts.store import open_store
from engine.errors import ModelReferenceError
from engine.model.quantize import directory_revision
from engine.settings import reload_settings
from flows.cli import main
from tests.hub_server import ZOO, FileRepo, HubReplay

DEMO = "ryz-fixtures/ryz-demo-s"


@pytest.fixture(autouse=True)
def _hub_online(monkeypatch):
    """`datasets` (imported by other tests) turns huggingface_hub's offline switch on process-wide when
    HF_DATASETS_OFFLINE is set; these tests talk to the stand-in on 127.0.0.1."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


@pytest.fixture(scope="module")
def hub():
    with HubReplay() as replay:
        replay.add_repo(FileRepo("ryz-fixtures/ryz-demo-resume", ZOO / "ryz-demo-s"))
        yield replay


@pytest.fixture(scope="module")
def env(hub, tmp_path_factory):
    """One store and one HF cache for the module, the stand-in as the Hub, no token."""
    root = tmp_path_factory.mktemp("pull")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RYZ_HOME", str(root / "home"))
        mp.setenv("HF_ENDPOINT", hub.url)
        mp.setenv("RYZ_DISCOVERY_HF_CACHE", str(root / "hf-cache"))
        for name in ("RYZ_STORE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
            mp.delenv(name, raising=False)
        yield reload_settings()
    reload_settings()


@contextmanager
def fresh_store(monkeypatch, tmp_path):
    """Another empty store (same HF cache), for pulls that must register anew."""
    home = os.environ["RYZ_HOME"]
    monkeypatch.setenv("RYZ_HOME", str(tmp_path / "other-home"))
    try:
        yield reload_settings()
    finally:
        monkeypatch.setenv("RYZ_HOME", home)
        reload_settings()


@pytest.fixture(scope="module")
def pulled(env):
    """DEMO pulled once at the tag v1.0 (the module's other tests build on it)."""
    from huggingface_hub import constants

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(constants, "HF_HUB_OFFLINE", False)
        return pull_model(f"{DEMO}@v1.0", env, open_store(settings=env))


def _pull(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["pull", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_help_names_the_forms(capsys):
    with pytest.raises(SystemExit) as done:
        main(["pull", "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps to the terminal width
    assert "REPO[@REVISION] | DIR" in text and "branch, tag or commit sha" in text and "status pulled" in text


def test_hub_pull_is_pinned_runnable_and_never_released(hub, env, pulled, capsys):
    from engine.artifacts.refs import resolve_model
    from engine.artifacts.releases import ReleaseStore
    from engine.model.reference import ReferenceModel
    from engine.model.tokenizer import ModelTokenizer

    sha = hub.repos[DEMO].sha
    assert (pulled.ref, pulled.status, pulled.already, pulled.offline) == (f"{DEMO}:1", "pulled", False, False)
    assert pulled.source == {"type": "hf", "repo": DEMO, "revision": sha}
    # Pinned: the tag was resolved once, then every file fetched at the sha.
    assert [e["path"] for e in hub.log if "/revision/" in e["path"]] == [f"/api/models/{DEMO}/revision/v1.0"]
    assert all(f"/resolve/{sha}/" in e["path"] for e in hub.log if "/resolve/" in e["path"] and DEMO + "/" in e["path"])

    store = open_store(settings=env)
    registry = Registry(store)
    assert registry.get(pulled.ref).status == "pulled"
    model = ReferenceModel(resolve_model(pulled.ref, store))
    tokenizer = ModelTokenizer(model.file)
    assert len(model.generate(tokenizer.encode("Hello"), 3)) == 3

    # Never served by the fleet: no alias, no release, no promotion.
    for refuse in (
        lambda: registry.set_alias("canary", pulled.ref, "test"),
        lambda: registry.promote(pulled.ref, "test"),
    ):
        with pytest.raises(ModelReferenceError, match="ryz pull.*status pulled.*ryz pipeline run"):
            refuse()
    assert main(["release", "start", pulled.ref]) == 1
    assert "cannot be released" in capsys.readouterr().err
    assert registry.aliases() == {} and ReleaseStore(store).latest() is None


def test_second_pull_does_nothing(hub, env, pulled, capsys):
    registry = Registry(open_store(settings=env))
    versions = registry.versions(DEMO)
    before = len(hub.log)
    code, out, _ = _pull(capsys, DEMO)  # the default branch: the same sha
    assert code == 0 and out.splitlines()[0] == f"already pulled as {DEMO}:1"
    assert [e["method"] for e in hub.log[before:]] == ["GET"]  # model_info only: nothing downloaded
    code, out, _ = _pull(capsys, f"{DEMO}@{hub.repos[DEMO].sha}", "--json")
    doc = json.loads(out)
    assert code == 0 and (doc["ref"], doc["already"], doc["status"]) == (f"{DEMO}:1", True, "pulled")
    assert doc["artifact_id"] == pulled.artifact_id and registry.versions(DEMO) == versions


def test_cut_transfer_resumes_with_a_range_request(hub, env, capsys, monkeypatch):
    from huggingface_hub import constants

    # huggingface_hub writes (and resumes from) whole 10 MiB reads; the demo weights are 3.4 MB, so read less.
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 64 * 1024)
    repo = hub.repos["ryz-fixtures/ryz-demo-resume"]
    hub.fault(f"/{repo.repo}/resolve/{repo.sha}/model.safetensors", f"cut:{1 << 20}", "ok")
    code, out, err = _pull(capsys, repo.repo, "--json")
    assert code == 0, err
    first, second = hub.downloads(repo.repo, "model.safetensors")
    assert first["range"] is None and second["range"] == f"bytes={1 << 20}-"  # the second asked only for the rest
    snapshot = json.loads(out)["checkpoint"]
    with open(f"{snapshot}/model.safetensors", "rb") as f:
        assert f.read() == (ZOO / "ryz-demo-s" / "model.safetensors").read_bytes()


def test_gated_repo_needs_a_token(hub, env, capsys, monkeypatch):
    gated = "ryz-fixtures/ryz-demo-gated"
    code, _, err = _pull(capsys, gated)
    assert code == 1
    assert "is gated and no Hugging Face token was sent" in err and "set HF_TOKEN" in err
    assert "huggingface-cli login" in err
    monkeypatch.setenv("HF_TOKEN", "hf_not_granted")
    code, _, err = _pull(capsys, gated)
    assert code == 1 and "has not been granted access" in err
    assert Registry(open_store(settings=env)).versions(gated) == []

    monkeypatch.setenv("HF_TOKEN", hub.token)
    code, out, err = _pull(capsys, gated, "--json")
    assert code == 0, err
    assert json.loads(out)["status"] == "pulled"
    assert all(e["token"] == hub.token for e in hub.downloads(gated, "model.safetensors"))


def test_offline_uses_the_hf_cache(hub, env, pulled, capsys, monkeypatch, tmp_path):
    from huggingface_hub import constants

    with fresh_store(monkeypatch, tmp_path):
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
        before = len(hub.log)
        code, out, err = _pull(capsys, f"{DEMO}@v1.0", "--json")  # the tag -> sha recorded in the cache's refs/
        assert code == 0, err
        doc = json.loads(out)
        assert (doc["status"], doc["offline"], doc["source"]) == ("pulled", True, pulled.source)
        assert "from the HF cache (HF_HUB_OFFLINE is set)" in doc["message"]
        assert doc["artifact_id"] == pulled.artifact_id and len(hub.log) == before
        code, _, err = _pull(capsys, "ryz-fixtures/never-pulled")
        assert code == 1 and "HF_HUB_OFFLINE is set, and ryz-fixtures/never-pulled@main is not in the HF cache" in err
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    with fresh_store(monkeypatch, tmp_path / "unreachable"):  # the Hub failing: the cache answers, and says so
        hub.fault(f"/api/models/{DEMO}/revision/v1.0", "503")
        code, out, err = _pull(capsys, f"{DEMO}@v1.0", "--json")
        hub.fault(f"/api/models/{DEMO}/revision/v1.0", "ok")
        assert code == 0, err
        assert json.loads(out)["offline"] and "the Hub did not answer" in json.loads(out)["message"]


def test_local_directory(env, capsys, monkeypatch, tmp_path):
    with fresh_store(monkeypatch, tmp_path):
        code, out, err = _pull(capsys, str(ZOO / "ryz-demo-m"), "--json")
        assert code == 0, err
        doc = json.loads(out)
        assert (doc["ref"], doc["status"], doc["already"]) == ("ryz-demo-m:1", "pulled", False)
        assert doc["source"]["type"] == "local"
        assert doc["source"]["revision"] == directory_revision(ZOO / "ryz-demo-m")
        code, out, _ = _pull(capsys, str(ZOO / "ryz-demo-m"))
        assert code == 0 and out.startswith("already pulled as ryz-demo-m:1")
        code, _, err = _pull(capsys, str(tmp_path / "missing"))
        assert code == 1 and "is not a model directory" in err


def test_discovery_filters_refuse(hub, env, capsys):
    code, _, err = _pull(capsys, "ryz-fixtures/ryz-demo-nc")
    assert code == 1
    assert (
        "refusing ryz-fixtures/ryz-demo-nc@" in err
        and "license cc-by-nc-4.0 not allowed (RYZ_DISCOVERY_LICENSES)" in err
    )
    assert hub.downloads("ryz-fixtures/ryz-demo-nc", "model.safetensors") == []
    assert Registry(open_store(settings=env)).versions("ryz-fixtures/ryz-demo-nc") == []


def test_discovery_still_treats_a_pulled_source_as_new(hub, env, pulled):
    registry = Registry(open_store(settings=env))
    seen = read_hub_model(DEMO, endpoint=hub.url)
    assert seen.revision == pulled.source["revision"]
    (judged,) = judge_candidates([seen], env, registry)
    assert judged.status == "kept", judged.reason
    # The pipeline registers its own candidate for the source rather than adopting the pulled version.
    version, added = registry.register_once(DEMO, pulled.artifact_id, pulled.source, status="candidate")
    assert added and version.ref == f"{DEMO}:2"
    (judged,) = judge_candidates([read_hub_model(DEMO, endpoint=hub.url)], env, registry)
    assert judged.reason == f"already registered as {DEMO}:2 (candidate)"
    again = pull_model(DEMO, env, open_store(settings=env))
    assert again.already and again.message == (
        f"already registered by the pipeline as {DEMO}:2 (candidate); it is runnable as {DEMO}:2"
    )
