"""The registry: versions, aliases, events, compare-and-swap on both backends, refs, CLI and gc."""

from __future__ import annotations

import json
import multiprocessing

import pytest

from engine.artifacts.registry import STATE_KEY, Registry
from engine.artifacts.store import FileStore, open_store
from engine.errors import ConflictError, ModelReferenceError, SchemaVersionError


def _model(store, data: bytes) -> str:
    return store.put_bytes(data, "model", {"source": {"repo": "org/demo", "revision": data.hex()}})


def test_versions_aliases_and_history(store):
    reg = Registry(store, actor="test")
    a = reg.register(
        "org/demo", _model(store, b"a"), {"repo": "org/demo", "revision": "r1"}, reason="found by discovery"
    )
    b = reg.register("org/demo", _model(store, b"b"), {"repo": "org/demo", "revision": "r2"})
    assert (a.ref, b.ref) == ("org/demo:1", "org/demo:2") and a.status == "candidate"
    reg.promote("org/demo:1", "first model: floors passed")
    reg.set_alias("canary", "org/demo:2", "canary at 5%")
    reg.promote("org/demo:2", "canary passed every step")
    aliases = reg.aliases()
    assert aliases == {"production": {"name": "org/demo", "version": 2}, "previous": {"name": "org/demo", "version": 1}}
    assert [v.status for v in reg.versions()] == ["retired", "production"]
    assert reg.get("production").ref == "org/demo:2" and reg.get("org/demo").version == 2
    back = reg.rollback("p95 TTFT regressed after promotion")
    assert back.ref == "org/demo:1" and reg.get("production").ref == "org/demo:1"
    assert [v.status for v in reg.versions()] == ["production", "rolled_back"]
    history = reg.history()
    assert [e["action"] for e in history] == ["register", "register", "promote", "alias:canary", "promote", "rollback"]
    assert all(e["actor"] == "test" for e in history) and history[-1]["reason"] == "p95 TTFT regressed after promotion"
    assert reg.find_source("org/demo", "r2").version == 2 and reg.find_source("org/demo", "r3") is None
    with pytest.raises(ModelReferenceError, match="not set"):
        reg.get("canary")
    assert reg.find("canary") is None and reg.find("no/such-model") is None and reg.find("org/demo:7") is None
    assert reg.find("production").ref == "org/demo:1"
    with pytest.raises(ModelReferenceError, match="has no version 7"):
        reg.get("org/demo:7")


def test_conditional_alias_move(store):
    reg = Registry(store)
    aid = _model(store, b"x")
    reg.register("m", aid, {})
    reg.register("m", aid, {})
    reg.set_alias("canary", "m:1", "start", expected=None)
    with pytest.raises(ConflictError, match="names m:1, not None"):
        reg.set_alias("canary", "m:2", "stale reader", expected=None)
    reg.set_alias("canary", "m:2", "step", expected="m:1")


def test_stale_etag_is_a_clear_conflict(store):
    """Deterministic conflict path on both backends (on S3 a conditional PUT with a stale If-Match gets 412)."""
    reg = Registry(store)
    reg.register("m", _model(store, b"y"), {})
    _, etag = store.read_document(STATE_KEY)
    reg.register("m", _model(store, b"z"), {})  # moves the etag on
    with pytest.raises(ConflictError, match="another writer changed it first"):
        store.write_document(STATE_KEY, {"schema": 1, "models": {}, "aliases": {}, "events": []}, etag)
    assert len(reg.versions("m")) == 2  # the stale write changed nothing


def test_losing_writer_retries_on_the_new_state(store, monkeypatch):
    """A write that loses one race re-reads and re-applies: both changes land."""
    reg = Registry(store)
    reg.register("m", _model(store, b"q"), {})
    real_write = store.write_document
    raced = []

    def racing_write(key, doc, etag):
        if not raced:
            raced.append(1)
            Registry(store).register("m", doc["models"]["m"][0]["artifact_id"], {}, reason="the other writer")
        return real_write(key, doc, etag)

    monkeypatch.setattr(store, "write_document", racing_write)
    mine = reg.register("m", _model(store, b"r"), {}, reason="mine")
    assert mine.version == 3 and [v.version for v in reg.versions("m")] == [1, 2, 3]


def _register_many(url: str, worker: int, n: int, barrier) -> None:
    reg = Registry(FileStore(url), actor=f"worker-{worker}")
    barrier.wait()
    for i in range(n):
        reg.register("raced", f"sha256:{worker:032x}{i:032x}", {"worker": worker, "i": i})


def test_two_processes_race_and_nothing_is_lost(tmp_path):
    url = f"file://{tmp_path / 'store'}"
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_register_many, args=(url, w, 15, barrier)) for w in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    versions = Registry(FileStore(url)).versions("raced")
    assert sorted(v.version for v in versions) == list(range(1, 31))
    assert sorted((v.source["worker"], v.source["i"]) for v in versions) == [
        (w, i) for w in range(2) for i in range(15)
    ]
    assert len(Registry(FileStore(url)).history()) == 30


def test_unknown_schema_is_refused(tmp_path):
    store = FileStore(f"file://{tmp_path}")
    store.write_document(STATE_KEY, {"schema": 9, "models": {}}, None)
    with pytest.raises(SchemaVersionError, match="schema 9"):
        Registry(store).versions()


def test_model_refs_resolve_through_the_registry(tmp_path):
    from engine.artifacts.refs import resolve_model

    store = FileStore(f"file://{tmp_path}")
    aid = _model(store, b"gguf bytes")
    reg = Registry(store)
    reg.register("demo", aid, {})
    reg.promote("demo:1", "first")
    for ref in ("demo:1", "production", aid[:19]):
        assert resolve_model(ref, store).read_bytes() == b"gguf bytes"
    with pytest.raises(ModelReferenceError, match="alias 'canary' is not set"):
        resolve_model("canary", store)


def test_cli_json_shapes(tmp_path, monkeypatch, capsys):
    from engine.settings import reload_settings
    from flows.cli import main

    monkeypatch.setenv("RYZ_HOME", str(tmp_path / "home"))
    reload_settings()
    store = open_store()
    reg = Registry(store, actor="cli-test")
    aid = _model(store, b"cli")
    reg.register("demo", aid, {"repo": "demo"})
    reg.promote("demo:1", "first model")

    def run(*argv):
        assert main(list(argv)) == 0
        return json.loads(capsys.readouterr().out)

    assert run("registry", "list", "--json") == [{**reg.get("demo:1").to_json()}]
    assert set(run("registry", "list", "--json")[0]) >= {"name", "version", "status", "artifact_id"}
    assert run("registry", "aliases", "--json") == {"production": {"name": "demo", "version": 1}}
    history = run("registry", "history", "--json")
    assert [e["action"] for e in history] == ["register", "promote"]
    assert set(history[0]) >= {"time", "actor", "action", "reason"}
    assert run("registry", "show", "production", "--json")["aliases"] == ["production"]
    reload_settings()


def test_gc_keeps_what_is_referenced(tmp_path):
    from engine.artifacts.gc import collect_garbage

    store = FileStore(f"file://{tmp_path}")
    reg = Registry(store)
    ids = [store.put_bytes(f"m{i}".encode(), "model", {"source": {"repo": "org/m"}}) for i in range(5)]
    reg.register("org/m", ids[0], {})
    reg.promote("org/m:1", "first")
    bundle = store.put_bytes(b"bundle", "bundle", {"refers_to": [ids[1]], "source": {"repo": "org/m"}})
    reg.register("org/m", ids[2], {}, extra={"bundle": bundle})
    dry = collect_garbage(store, keep=1, dry_run=True)
    assert len(store.list_artifacts()) == 6 and dry["dry_run"]
    result = collect_garbage(store, keep=1)
    gone = {r["artifact_id"] for r in result["removed"]}
    assert gone == {r["artifact_id"] for r in dry["removed"]}
    assert ids[0] not in gone and ids[1] not in gone and ids[2] not in gone and bundle not in gone
    assert len(gone) == 1 and gone < {ids[3], ids[4]}  # newest unreferenced model of org/m kept


def _race(n: int, attempt) -> list:
    """Run `attempt()` on n threads released at once; each one's result or the exception it raised."""
    import threading

    barrier, out = threading.Barrier(n), [None] * n

    def run(i: int) -> None:
        barrier.wait()
        try:
            out[i] = attempt()
        except Exception as exc:  # noqa: BLE001 - the race's losers are the point
            out[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return out


def test_concurrent_release_starts_one_wins(store):
    from engine.artifacts.releases import ReleaseStore, new_release

    releases = ReleaseStore(store)
    out = _race(6, lambda: releases.create(new_release("demo", 1, "sha256:" + "0" * 64, [50, 100])))
    won = [r for r in out if isinstance(r, dict)]
    assert len(won) == 1 and all(isinstance(r, ConflictError) for r in out if r not in won), out
    assert releases.active()["id"] == won[0]["id"] and len(releases.all()) == 1
    releases.set_status(won[0]["id"], "promoted", "done")
    assert releases.create(new_release("demo", 2, "sha256:" + "1" * 64, [100]))["version"] == 2  # the way is free


def test_one_source_registers_once_under_a_race(store):
    reg = Registry(store, actor="test")
    artifact = _model(store, b"once")
    out = _race(6, lambda: reg.register_once("demo", artifact, {"repo": "org/demo", "revision": "abc"}))
    assert sum(added for _version, added in out) == 1 and {v.ref for v, _ in out} == {"demo:1"}
    assert len(reg.versions("demo")) == 1


def test_undoing_a_promotion_leaves_later_changes_alone(store):
    reg = Registry(store, actor="test")
    for i in range(3):
        reg.register("demo", _model(store, bytes([i])), {"repo": "org/demo", "revision": str(i)})
    reg.promote("demo:1", "first")
    changed = reg.promote("demo:2", "second")
    assert changed["aliases"]["production"][1] == {"name": "demo", "version": 2}
    reg.set_alias("canary", "demo:3", "someone else's release started meanwhile")
    reg.set_status("demo:1", "rolled_back", "someone else decided about demo:1")
    kept = reg.undo(changed, "rollback")
    aliases = {a: f"{t['name']}:{t['version']}" for a, t in reg.aliases().items()}
    assert aliases == {"production": "demo:1", "canary": "demo:3"}  # previous cleared, canary kept
    assert kept == ["status of demo:1 (now rolled_back)"] and reg.get("demo:2").status == "candidate"
