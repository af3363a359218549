"""The release flow end to end: a fleet of two real `ryz serve` replicas that follow the registry, the registry in
a file store, Prefect's engine, and a background probe asking every replica's production throughout (a failed
probe, a non-2xx answer or none within 10 s, fails the test that saw it).

Models are tiny synthetic ones; evaluation records are hand-made (their numbers decide the offline
gates, which tests/test_gates.py covers in detail). Faults are injected through the servers'
/admin/faults. Thresholds are loosened for TTFT and speed (four engines share two cores, so their
latencies are noisy) except where a test injects latency on purpose. The promotion policy is `not-worse` here
(most candidates are copies of production's record); the `improve` policy has its own test.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

pytest.importorskip("prefect")

from prefect.client.orchestration import get_client  # noqa: E402
from pydantic import SecretStr  # noqa: E402

from engine.artifacts.registry import Registry  # noqa: E402
from engine.artifacts.store import open_store  # noqa: E402
from engine.serving.admin import AdminClient, Replicas  # noqa: E402
from engine.settings import reload_settings  # noqa: E402
from tests import checkpoints  # noqa: E402
from tests.fleet import Probe, Replica, free_port, ready  # noqa: E402

TOKEN = "release-test-token"


def _record(model_id: str, acc: float, decode: float = 100.0) -> dict:
    return {
        "schema": 1,
        "model": {"artifact_id": model_id},
        "suite": "gate",
        "valid": True,
        "failures": [],
        "tasks": {"demo_mc": {"metrics": {"acc": {"value": acc, "stderr": 0.02}}, "n": 200}},
        "bench": {
            "decode_tok_s": decode,
            "prefill_tok_s": 500.0,
            "ttft_ms": 5.0,
            "peak_rss_mb": 100.0,
            "threads": 1,
            "roofline_fraction": 0.5,
        },
    }


@pytest.fixture(scope="module")
def env(tmp_path_factory, kernel_build):
    """RYZ_HOME with the session's kernel build, four registered versions with records, two replicas (the fleet
    in RYZ_RELEASE_SERVERS) and the probe."""
    from engine.model.quantize import quantize_to_store
    from evaluations.evaluate import store_record

    root = tmp_path_factory.mktemp("release")
    home = root / "home"
    shutil.copytree(kernel_build.directory, home / "cache" / "kernels" / kernel_build.key)
    replicas = [Replica(free_port(), root / f"replica-{i}.log") for i in range(2)]
    variables = {
        "RYZ_HOME": str(home),
        "RYZ_ADMIN_TOKEN": TOKEN,
        "RYZ_RELEASE_SERVERS": json.dumps([r.base for r in replicas]),
        "RYZ_THREADS": "1",
        "RYZ_MAX_SEQS": "4",
        "RYZ_MAX_CONTEXT": "256",
        "RYZ_RELEASE_STEPS": "[50, 100]",
        "RYZ_RELEASE_MIN_REQUESTS": "8",
        "RYZ_RELEASE_STEP_TIMEOUT": "30",
        "RYZ_RELEASE_TTFT_RATIO": "50",
        "RYZ_RELEASE_SPEED_RATIO": "0.02",
        "RYZ_RELEASE_SYNTHETIC_LOAD": "true",
        "RYZ_RELEASE_POLICY": "not-worse",
        "RYZ_GATE_FLOORS": '{"demo_mc": 0.3}',
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    mp = pytest.MonkeyPatch()
    for k, v in variables.items():
        mp.setenv(k, v)
    reload_settings()
    store = open_store()
    registry = Registry(store, actor="test")
    versions, checkpoint_dirs = {}, {}
    for name, seed, acc in (("good", 5, 0.6), ("better", 9, 0.62), ("worse", 11, 0.2), ("fourth", 13, 0.61)):
        checkpoint_dirs[name] = checkpoints.synth(root / name, seed=seed)
        manifest = quantize_to_store(checkpoint_dirs[name], store, root / "work")
        record_id = store_record(_record(manifest["artifact_id"], acc), store)
        versions[name] = registry.register(
            "demo", manifest["artifact_id"], {"repo": "demo", "revision": name}, evaluation=record_id
        ).ref
    for replica in replicas:
        replica.start()
    probe = Probe([r.base for r in replicas])
    try:
        yield {
            "base": replicas[0].base,
            "replicas": replicas,
            "versions": versions,
            "checkpoints": checkpoint_dirs,
            "root": root,
            "registry": registry,
            "admin": AdminClient(replicas[0].base, TOKEN),
            "fleet": Replicas([r.base for r in replicas], TOKEN),
            "probe": probe,
        }
    finally:
        probe.close()
        for replica in replicas:
            replica.stop()
        mp.undo()
        reload_settings()


@pytest.fixture(autouse=True)
def no_failed_probe(request):
    """Production answers the probe throughout every test of this module."""
    if "env" not in request.fixturenames:
        yield
        return
    probe = request.getfixturevalue("env")["probe"]
    before = len(probe.failures)
    yield
    assert probe.alive and probe.failures[before:] == [], probe.failures[before:]


def _aliases(env) -> dict:
    return {a: f"{t['name']}:{t['version']}" for a, t in env["registry"].aliases().items()}


def _server_models(env) -> dict:
    """What the fleet serves; the replicas must agree (never a split fleet)."""
    held = [{n: v["ref"] for n, v in state["variants"].items()} for state in env["fleet"].state()]
    assert all(h == held[0] for h in held), held
    return held[0]


def _weights(env) -> int:
    weights = [state["weights"]["canary"] for state in env["fleet"].state()]
    assert len(set(weights)) == 1, weights
    return weights[0]


def test_release_story(env, prefect_harness):
    """Bootstrap, a passing canary, an offline reject, faults rolled back, a pause and resume, rollback."""
    from flows.release import release
    from tasks.release import resolve_fleet, rollback_production

    v = env["versions"]
    reg = env["registry"]
    # 1. The first model goes straight to production (floors).
    first = release(ref=v["good"])
    assert first["status"] == "promoted" and any("first model" in e["reason"] for e in first["log"])
    assert any(e["event"] == "bundle" or "serving bundle" in e["reason"] for e in first["log"])
    assert _aliases(env) == {"production": v["good"]}
    assert _server_models(env) == {"production": reg.get(v["good"]).artifact_id}

    # 2. A better model passes both canary steps and is promoted; previous <- old production. Its fleet comes as
    #    parameters (the settings name a dead server and a wrong token here); Prefect stores the token masked.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RYZ_ADMIN_TOKEN", "not-the-token")
        mp.setenv("RYZ_RELEASE_SERVERS", '["http://127.0.0.1:9"]')
        reload_settings()
        fleet = [r.base for r in env["replicas"]]
        second = release(ref=v["better"], servers=fleet, admin_token=SecretStr(TOKEN))
    reload_settings()
    with get_client(sync_client=True) as client:
        stored = [r.parameters for r in client.read_flow_runs() if r.parameters.get("servers") == fleet]
    assert stored and all(TOKEN not in json.dumps(p) for p in stored), stored
    assert second["status"] == "promoted", second["log"]
    assert _aliases(env) == {"production": v["better"], "previous": v["good"]}
    assert _server_models(env) == {"production": reg.get(v["better"]).artifact_id}
    steps = [e for e in reg.history() if e["action"].startswith("canary-")]
    assert [e["action"] for e in steps] == ["canary-50%:pass", "canary-100%:pass"]
    assert "canary error rate" in steps[0]["reason"] and "over" in steps[0]["reason"]

    # 3. A much worse model is rejected at the offline gate; servers untouched.
    third = release(ref=v["worse"])
    assert third["status"] == "rejected" and "demo_mc acc 0.2000 vs production 0.6200" in third["log"][-1]["reason"]
    assert reg.get(v["worse"]).status == "rejected"
    assert _server_models(env) == {"production": reg.get(v["better"]).artifact_id}

    # 4. A failing canary (injected 5xx) is aborted at the first step; production untouched.
    env["fleet"].set_faults(canary_error_rate=0.6)
    try:
        fourth = release(ref=v["fourth"])
    finally:
        env["fleet"].set_faults(canary_error_rate=0)
    assert fourth["status"] == "aborted" and "canary error rate" in fourth["log"][-1]["reason"]
    assert reg.get(v["fourth"]).status == "rolled_back"
    assert _aliases(env) == {"production": v["better"], "previous": v["good"]}
    assert _server_models(env) == {"production": reg.get(v["better"]).artifact_id}
    assert _weights(env) == 0

    # 5. Rollback: previous serves again, in the registry and on the server.
    result = rollback_production("test", "drill", resolve_fleet())
    assert {k: result[k] for k in ("production", "rolled_back")} == {
        "production": v["good"],
        "rolled_back": v["better"],
    }
    assert result["bundle"] == reg.get(v["good"]).extra["bundle"]  # built when it was promoted
    assert _server_models(env) == {"production": reg.get(v["good"]).artifact_id}
    history = [e["action"] for e in reg.history()]
    assert history[-1] == "rollback" and "promote" in history


def test_latency_fault_and_inconclusive_pause(env, prefect_harness, monkeypatch):
    from flows.release import release

    reg = env["registry"]
    aid = reg.get(env["versions"]["fourth"]).artifact_id
    slow = reg.register(
        "demo", aid, {"repo": "demo", "revision": "slow"}, evaluation=reg.get(env["versions"]["fourth"]).evaluation
    ).ref
    before = (_aliases(env), _server_models(env))
    monkeypatch.setenv("RYZ_RELEASE_TTFT_RATIO", "1.5")
    reload_settings()
    env["fleet"].set_faults(canary_latency_ms=1500)  # far beyond any load noise on production
    try:
        rel = release(ref=slow)
    finally:
        env["fleet"].set_faults(canary_latency_ms=0)
        monkeypatch.delenv("RYZ_RELEASE_TTFT_RATIO")
        reload_settings()
    assert rel["status"] == "aborted" and "p95 TTFT" in rel["log"][-1]["reason"], rel["log"]
    assert "latency failed in each of 2 windows" in rel["log"][-1]["reason"]  # a fault that stays fails twice
    assert [e["event"] for e in rel["log"]].count("step-retry") == 1, rel["log"]
    assert (_aliases(env), _server_models(env)) == before

    # Too little traffic: no synthetic load and a short deadline -> paused at the first step, canary loaded.
    quiet = reg.register("demo", aid, {"repo": "demo", "revision": "quiet"}, evaluation=reg.get(slow).evaluation).ref
    monkeypatch.setenv("RYZ_RELEASE_STEP_TIMEOUT", "2")
    reload_settings()
    try:
        paused = release(ref=quiet, synthetic_load=False)
    finally:
        monkeypatch.delenv("RYZ_RELEASE_STEP_TIMEOUT")
        reload_settings()
    assert paused["status"] == "paused" and "only 0 successful canary requests" in paused["log"][-1]["reason"]
    assert _server_models(env).get("canary") == aid
    resumed = release(release_id=paused["id"], synthetic_load=True)
    assert resumed["status"] == "promoted", resumed["log"]
    assert _aliases(env)["production"] == quiet


def test_an_exception_mid_step_restores_servers_and_registry(env, prefect_harness, monkeypatch):
    from prefect import task

    import flows.release as flow_module

    reg = env["registry"]
    aid = reg.get(env["versions"]["better"]).artifact_id
    crash = reg.register(
        "demo", aid, {"repo": "demo", "revision": "crash"}, evaluation=reg.get(env["versions"]["better"]).evaluation
    ).ref
    before = (_aliases(env), _server_models(env), _weights(env))

    @task(name="observe-canary-step")
    def exploding_observe(*args, **kwargs):
        raise RuntimeError("metrics backend exploded")

    monkeypatch.setattr(flow_module, "observe_canary_step", exploding_observe)
    with pytest.raises(RuntimeError, match="exploded"):
        flow_module.release(ref=crash)
    assert (_aliases(env), _server_models(env), _weights(env)) == before
    assert reg.get(crash).status == "candidate"
    rel = flow_module.ReleaseStore(open_store()).latest()
    assert rel["status"] == "failed"
    assert any(e["event"] == "rollback-hook" for e in rel["log"])
    assert any(e["action"] == "rollback-hook" or "transaction rollback" in e["reason"] for e in reg.history())


class _Webhook:
    """A JSON sink on 127.0.0.1 collecting what the release POSTs."""

    def __init__(self):
        import http.server

        received = self.received = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                received.append(json.loads(self.rfile.read(int(self.headers["content-length"]))))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, event: str, timeout: float = 10) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for payload in self.received:
                if payload["event"] == event:
                    return payload
            time.sleep(0.05)
        raise AssertionError(f"no {event} among {self.received}")


def test_manual_control_from_the_cli_and_notifications(env, prefect_harness, monkeypatch, capsys):
    from flows.cli import main
    from flows.release import release

    hook = _Webhook()
    reg = env["registry"]
    if "production" not in reg.aliases():  # run alone: bootstrap a production first
        release(ref=env["versions"]["good"])
    donor = reg.get(env["versions"]["better"])
    fresh = reg.register(
        "demo", donor.artifact_id, {"repo": "demo", "revision": "manual"}, evaluation=donor.evaluation
    ).ref
    monkeypatch.setenv("RYZ_NOTIFY_WEBHOOK", hook.url)
    monkeypatch.setenv("RYZ_RELEASE_STEP_TIMEOUT", "1")
    monkeypatch.setenv("RYZ_RELEASE_SYNTHETIC_LOAD", "false")
    reload_settings()

    def cli(*argv) -> tuple[int, dict | None]:
        capsys.readouterr()
        code = main(list(argv))
        out = capsys.readouterr().out
        return code, json.loads(out) if out.strip().startswith("{") else None

    try:
        code, rel = cli("release", "start", fresh, "--json")  # no traffic: pauses at the first step
        assert rel["status"] == "paused" and code == 0
        assert hook.wait_for("ryzanstein.release.paused")["model"] == fresh
        assert cli("release", "status", "--json")[1]["id"] == rel["id"]
        assert cli("release", "promote")[0] == 1  # steps remain: needs --force
        code, aborted = cli("release", "abort", "--reason", "operator says no", "--json")
        assert aborted["status"] == "aborted" and reg.get(fresh).status == "rolled_back"
        assert "canary" not in _server_models(env)
        assert any(e["reason"] == "operator says no" for e in reg.history())
        # A retry after an abort starts clean: a new release id, from the first step.
        code, again = cli("release", "start", fresh, "--json")
        assert again["id"] != rel["id"] and again["status"] == "paused"
        code, promoted = cli("release", "promote", "--force", "--json")
        assert promoted["status"] == "promoted" and _aliases(env)["production"] == fresh
        assert hook.wait_for("ryzanstein.release.promoted")["reason"].startswith("forced promotion")
    finally:
        hook.server.shutdown()


def _start_release_and_kill_it(env, ref: str, tmp_path, until: str = "canary", **overrides: str) -> str:
    """`ryz release start REF` in its own process; kill -9 (its whole process group) once its canary serves at the
    first step (`until="canary"`) or once it is watching production after its promotion (`"baking"`). Returns the
    release id."""
    from prefect.settings import PREFECT_API_URL

    from engine.artifacts.releases import ReleaseStore

    variables = {
        **os.environ,
        "PREFECT_API_URL": str(PREFECT_API_URL.value() or ""),
        "RYZ_RELEASE_STEPS": "[5, 100]",
        "RYZ_RELEASE_MIN_REQUESTS": "100000",  # never judged: it sits at the first step until killed
        "RYZ_RELEASE_STEP_TIMEOUT": "600",
        "RYZ_RELEASE_LEASE_S": "3",
        **overrides,
    }
    with open(tmp_path / f"release-{ref}.log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "release", "start", ref, "--synthetic-load"],
            env=variables,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
    releases = ReleaseStore(open_store())
    deadline = time.monotonic() + 180
    try:
        while time.monotonic() < deadline:
            rel = releases.latest()
            weights = [state["weights"]["canary"] for state in env["fleet"].state()]
            if rel and rel["ref"] == ref and rel["status"] == until and (until != "canary" or weights == [5, 5]):
                return rel["id"]
            assert proc.poll() is None, (tmp_path / f"release-{ref}.log").read_text()
            time.sleep(0.5)
        raise TimeoutError((tmp_path / f"release-{ref}.log").read_text())
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def test_a_killed_release_is_aborted_or_resumed_from_the_cli(env, prefect_harness, monkeypatch, capsys, tmp_path):
    """kill -9 of a release's flow at a canary step: a replica restarted then rejoins with the canary at its
    weight; `abort` restores both replicas and frees the way; a second killed release is continued by `resume` to
    the end."""
    from flows.cli import main
    from flows.release import release

    reg = env["registry"]
    if "production" not in reg.aliases():  # run alone: bootstrap a production first
        release(ref=env["versions"]["good"])
    donor = reg.get(env["versions"]["better"])
    killed, resumed = (
        reg.register("demo", donor.artifact_id, {"repo": "demo", "revision": name}, evaluation=donor.evaluation).ref
        for name in ("killed", "resumed")
    )
    production = _server_models(env)["production"]
    monkeypatch.setenv("RYZ_RELEASE_LEASE_S", "3")
    reload_settings()

    first = _start_release_and_kill_it(env, killed, tmp_path)
    assert _weights(env) == 5  # the dead flow left its canary serving
    canary = reg.get(killed).artifact_id
    restarted = env["replicas"][1]
    AdminClient(restarted.base, TOKEN).drain()  # out of the probe's rotation first, as an operator's restart does
    time.sleep(0.5)
    restarted.stop()
    restarted.start()
    deadline = time.monotonic() + 60
    while not ready(restarted.base) or "canary" not in AdminClient(restarted.base, TOKEN).state()["variants"]:
        assert time.monotonic() < deadline, restarted.log_path.read_text()[-2000:]
        time.sleep(0.2)
    assert _server_models(env) == {"production": production, "canary": canary} and _weights(env) == 5
    time.sleep(3.5)
    capsys.readouterr()
    assert main(["release", "status"]) == 0 and "STALE" in capsys.readouterr().out
    assert main(["release", "start", resumed]) != 0  # refused while the dead release holds the fleet
    assert "not been seen for" in capsys.readouterr().err
    assert main(["release", "abort", "--json"]) == 2  # exit 2: the release ended aborted
    aborted = json.loads(capsys.readouterr().out)
    assert (
        aborted["id"] == first
        and aborted["status"] == "aborted"
        and "had not been seen" in aborted["log"][-1]["reason"]
    )
    assert _server_models(env) == {"production": production} and _weights(env) == 0
    assert reg.get(killed).status == "rolled_back"

    second = _start_release_and_kill_it(env, resumed, tmp_path)
    time.sleep(3.5)
    monkeypatch.setenv("RYZ_RELEASE_MIN_REQUESTS", "8")
    reload_settings()
    assert main(["release", "resume", "--synthetic-load", "--json"]) == 0
    done = json.loads(capsys.readouterr().out)
    assert done["id"] == second and done["status"] == "promoted", done["log"]
    assert _aliases(env)["production"] == resumed and "canary" not in _server_models(env)


def _copy_of(env, name: str, revision: str) -> str:
    """A new registry version of `name`'s model and record (a fresh candidate with known numbers)."""
    donor = env["registry"].get(env["versions"][name])
    source = {"repo": "demo", "revision": revision}
    return env["registry"].register("demo", donor.artifact_id, source, evaluation=donor.evaluation).ref


def _ensure_production(env) -> None:
    from flows.release import release

    if "production" not in env["registry"].aliases():  # run alone: bootstrap a production first
        release(ref=env["versions"]["good"])


def _production_twin(env, revision: str) -> str:
    """Production's artifact and evaluation registered again as a new version (the same model, the same speed)."""
    _ensure_production(env)
    production = env["registry"].get("production")
    source = {"repo": "demo", "revision": revision}
    return env["registry"].register("demo", production.artifact_id, source, evaluation=production.evaluation).ref


def test_a_replica_refusing_promotion_is_undone_on_every_replica(env, prefect_harness, monkeypatch):
    """Replica 2 refuses the promotion after replica 1 made it: both end on the old production with no canary,
    the release says which replica refused, and the abort is notified."""
    from flows.release import release

    _ensure_production(env)
    ref = _copy_of(env, "fourth", "refused")
    before = (_aliases(env), _server_models(env))
    refusing = AdminClient(env["replicas"][1].base, TOKEN)
    hook = _Webhook()
    monkeypatch.setenv("RYZ_NOTIFY_WEBHOOK", hook.url)
    reload_settings()
    refusing.set_faults(refuse_promote=1)
    try:
        rel = release(ref=ref)
        notified = hook.wait_for("ryzanstein.release.aborted")
    finally:
        refusing.set_faults(refuse_promote=0)
        hook.server.shutdown()
    reason = rel["log"][-1]["reason"]
    assert rel["status"] == "aborted" and "refused" in reason and env["replicas"][1].base in reason, rel["log"]
    assert (_aliases(env), _server_models(env)) == before and _weights(env) == 0
    assert env["registry"].get(ref).status == "rolled_back" and notified["model"] == ref


def test_a_regression_after_promotion_is_rolled_back_by_the_watch(env, prefect_harness, monkeypatch, tmp_path):
    """The release's watcher is killed in its bake period; the `watch` flow takes over from the release document,
    and when the promoted model slows down (a fault) rolls back to `previous` on both replicas, with the numbers,
    before the bake period ends."""
    from flows.watch import watch

    _ensure_production(env)
    ref = _copy_of(env, "fourth", "watched")
    previous = (_aliases(env)["production"], _server_models(env)["production"])
    bake = {"RYZ_RELEASE_BAKE_S": "90", "RYZ_RELEASE_BAKE_MIN_REQUESTS": "100000"}  # only a regression ends it early
    rid = _start_release_and_kill_it(
        env, ref, tmp_path, until="baking", RYZ_RELEASE_STEPS="[50, 100]", RYZ_RELEASE_MIN_REQUESTS="8", **bake
    )
    baking_since = time.time()
    assert _aliases(env)["production"] == ref and watch()["status"] == "baking"  # its lease is still live
    time.sleep(3.5)
    for k, v in {**bake, "RYZ_RELEASE_LEASE_S": "3"}.items():
        monkeypatch.setenv(k, v)
    reload_settings()
    env["fleet"].set_faults(production_latency_ms=800)  # the new production regresses
    taken_over = watch()
    assert taken_over["release"] == rid and taken_over["status"] == "rolled_back", taken_over
    reason = taken_over["reason"]
    assert "p95 TTFT" in reason and "x previous" in reason and time.time() - baking_since < 90, reason
    assert (_aliases(env)["production"], _server_models(env)["production"]) == previous
    assert env["registry"].get(ref).status == "rolled_back"
    assert all(s["faults"]["production_latency_ms"] == 0 for s in env["fleet"].state())  # the faulty model is gone


def test_an_equal_candidate_is_held(env, prefect_harness, monkeypatch):
    """Under the improve policy, a candidate with production's own numbers is held and never reaches a replica."""
    from flows.release import release

    ref = _production_twin(env, "equal")
    before = (_aliases(env), _server_models(env))
    monkeypatch.setenv("RYZ_RELEASE_POLICY", "improve")
    reload_settings()
    rel = release(ref=ref)
    assert rel["status"] == "held" and "no metric better beyond noise" in rel["log"][-1]["reason"], rel["log"]
    assert env["registry"].get(ref).status == "held" and (_aliases(env), _server_models(env)) == before


def test_two_concurrent_release_starts_one_wins(env, prefect_harness, monkeypatch, capsys, tmp_path):
    """Two `ryz release start` processes at once: exactly one release starts, the other is refused by name."""
    from prefect.settings import PREFECT_API_URL

    from flows.cli import main

    _ensure_production(env)
    refs = [_copy_of(env, "fourth", f"race-{i}") for i in range(2)]
    variables = {
        **os.environ,
        "PREFECT_API_URL": str(PREFECT_API_URL.value() or ""),
        "RYZ_RELEASE_STEP_TIMEOUT": "2",  # no traffic: the winner pauses at its first step
        "RYZ_RELEASE_SYNTHETIC_LOAD": "false",
    }
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "release", "start", ref, "--json"],
            env=variables,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for ref in refs
    ]
    outcomes = [p.communicate(timeout=180) for p in procs]
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [0, 1], (codes, outcomes)
    loser = outcomes[codes.index(1)][1]
    assert "release" in loser and ("won" in loser or "finish it first" in loser or "is starting" in loser), loser
    winner = json.loads(outcomes[codes.index(0)][0])
    assert winner["status"] == "paused" and winner["ref"] in refs
    capsys.readouterr()
    assert main(["release", "abort", "--json"]) == 2
    assert json.loads(capsys.readouterr().out)["status"] == "aborted" and "canary" not in _server_models(env)


def test_a_latency_burst_in_one_window_is_looked_at_again(env, prefect_harness, monkeypatch):
    """A canary step failing on latency alone is observed again in a fresh window before it aborts: a burst of
    load on the host (here the replicas' latency drill, cleared after the first window) does not roll back a model
    that is not slower, and the step's reason keeps what the first window saw."""
    import tasks.release
    from flows.release import release

    ref = _production_twin(env, "burst")
    windows = []
    observe = tasks.release._observe_window

    def burst_in_the_first_window(*args, **kwargs):
        outcome, verdict = observe(*args, **kwargs)
        windows.append(verdict.outcome)
        env["fleet"].set_faults(canary_latency_ms=0)  # the burst is over
        return outcome, verdict

    monkeypatch.setattr(tasks.release, "_observe_window", burst_in_the_first_window)
    monkeypatch.setenv("RYZ_RELEASE_TTFT_RATIO", "1.5")
    reload_settings()
    env["fleet"].set_faults(canary_latency_ms=600)
    try:
        rel = release(ref=ref)
    finally:
        env["fleet"].set_faults(canary_latency_ms=0)
        monkeypatch.delenv("RYZ_RELEASE_TTFT_RATIO")
        reload_settings()
    assert windows[:2] == ["fail", "pass"], (windows, rel["log"])
    assert rel["status"] == "promoted", rel["log"]
    retry = next(e for e in rel["log"] if e["event"] == "step-retry")
    assert "window 1 of 2 failed on latency alone" in retry["reason"] and "p95 TTFT" in retry["reason"]
    passed = next(e for e in rel["log"] if e["event"] == "step-pass")
    assert "1 earlier window(s) failed on latency alone" in passed["reason"], passed


def test_a_candidate_three_times_slower_per_token_is_stopped_every_time(env, prefect_harness, monkeypatch):
    """Same outputs, >= 3x the time per token (zeroed extra layers): the canary analysis stops it at its first step
    on the decode speed, twice in a row, with the speed limit at its default."""
    from engine.model.quantize import quantize_to_store
    from flows.release import release

    _ensure_production(env)
    production = env["registry"].get("production")
    twin = checkpoints.slower_twin(env["checkpoints"]["good"], env["root"] / "slow-twin", factor=12)
    artifact = quantize_to_store(twin, open_store(), env["root"] / "work")["artifact_id"]
    monkeypatch.setenv("RYZ_RELEASE_SPEED_RATIO", "0.9")
    reload_settings()
    before = (_aliases(env), _server_models(env))
    for attempt in range(2):
        source = {"repo": "demo", "revision": f"slow-{attempt}"}
        ref = env["registry"].register("demo", artifact, source, evaluation=production.evaluation).ref
        rel = release(ref=ref)
        reason = rel["log"][-1]["reason"]
        assert rel["status"] == "aborted" and "canary step 50% failed" in reason, rel["log"]
        assert "canary decode" in reason and "beyond noise" in reason, reason
        assert (_aliases(env), _server_models(env)) == before


def test_canary_traffic_of_client_errors_only_never_passes_a_step(env, prefect_harness, monkeypatch, capsys):
    """Clients whose every request is refused after routing (400: max_tokens over the limit) are the only traffic:
    the canary gets nothing but 4xx, which is no evidence; the step is inconclusive, the release pauses with the
    4xx counted apart, and an abort restores both replicas."""
    from flows.cli import main
    from flows.release import release

    _ensure_production(env)
    ref = _copy_of(env, "fourth", "only-400s")
    monkeypatch.setenv("RYZ_RELEASE_STEP_TIMEOUT", "4")
    reload_settings()
    stop = threading.Event()

    def refused_clients() -> None:
        bad = {"model": "ryzanstein", "prompt": "x", "max_tokens": 10**7}
        with httpx.Client(timeout=10) as client:
            while not stop.is_set():
                for replica in env["replicas"]:
                    client.post(f"{replica.base}/v1/completions", json=bad)

    clients = threading.Thread(target=refused_clients, daemon=True)
    clients.start()
    try:
        rel = release(ref=ref, synthetic_load=False)
    finally:
        stop.set()
        clients.join(timeout=20)
    reason = rel["log"][-1]["reason"]
    assert rel["status"] == "paused" and "only 0 successful canary requests" in reason, rel["log"]
    assert "client errors (4xx) not counted" in reason, reason
    capsys.readouterr()
    assert main(["release", "abort", "--json"]) == 2
    assert "canary" not in _server_models(env) and _weights(env) == 0


def test_a_speed_rejection_is_measured_again_before_it_stands(env, prefect_harness):
    """A record that says the candidate is 3x slower (benchmarked in another session) while its model is
    production's own: before speed alone rejects it, both models run again, interleaved, and the gate passes."""
    from evaluations.evaluate import store_record
    from flows.release import release

    _ensure_production(env)
    production = env["registry"].get("production")
    slow_record = _record(production.artifact_id, 0.6, decode=100.0 / 3)
    slow_record["tasks"] = {}  # accuracy is not the question here
    record_id = store_record(slow_record, open_store())
    ref = (
        env["registry"]
        .register("demo", production.artifact_id, {"repo": "demo", "revision": "stale-bench"}, evaluation=record_id)
        .ref
    )
    rel = release(ref=ref)
    gated = next(e["reason"] for e in rel["log"] if e["event"] == "canary")
    assert gated.startswith("decode speed re-measured now, interleaved with production (3 runs each)"), rel["log"]
    assert rel["status"] == "promoted", rel["log"]
