"""The release flow end to end: a real `ryz serve` process, the registry in a file store, Prefect's engine.

Models are tiny synthetic ones; evaluation records are hand-made (their numbers decide the offline
gates, which tests/test_gates.py covers in detail). Faults are injected through the server's
/admin/faults. Thresholds are loosened for TTFT and speed (two engines share two cores, so their
latencies are noisy) except where a test injects latency on purpose.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

pytest.importorskip("prefect")

from prefect.client.orchestration import get_client  # noqa: E402
from pydantic import SecretStr  # noqa: E402

from engine.artifacts.registry import Registry  # noqa: E402
from engine.artifacts.store import open_store  # noqa: E402
from engine.serving.admin import AdminClient  # noqa: E402
from engine.settings import reload_settings  # noqa: E402
from tests import checkpoints  # noqa: E402

TOKEN = "release-test-token"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    """RYZ_HOME with the session's kernel build, three registered versions with records, a running server."""
    from engine.model.quantize import quantize_to_store
    from evaluations.evaluate import store_record

    root = tmp_path_factory.mktemp("release")
    home = root / "home"
    shutil.copytree(kernel_build.directory, home / "cache" / "kernels" / kernel_build.key)
    port = _free_port()
    variables = {
        "RYZ_HOME": str(home),
        "RYZ_ADMIN_TOKEN": TOKEN,
        "RYZ_PORT": str(port),
        "RYZ_THREADS": "1",
        "RYZ_MAX_SEQS": "4",
        "RYZ_MAX_CONTEXT": "256",
        "RYZ_RELEASE_STEPS": "[50, 100]",
        "RYZ_RELEASE_MIN_REQUESTS": "8",
        "RYZ_RELEASE_STEP_TIMEOUT": "30",
        "RYZ_RELEASE_TTFT_RATIO": "50",
        "RYZ_RELEASE_SPEED_RATIO": "0.02",
        "RYZ_RELEASE_SYNTHETIC_LOAD": "true",
        "RYZ_GATE_FLOORS": '{"demo_mc": 0.3}',
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    mp = pytest.MonkeyPatch()
    for k, v in variables.items():
        mp.setenv(k, v)
    reload_settings()
    store = open_store()
    registry = Registry(store, actor="test")
    versions = {}
    for name, seed, acc in (("good", 5, 0.6), ("better", 9, 0.62), ("worse", 11, 0.2), ("fourth", 13, 0.61)):
        manifest = quantize_to_store(checkpoints.synth(root / name, seed=seed), store, root / "work")
        record_id = store_record(_record(manifest["artifact_id"], acc), store)
        versions[name] = registry.register(
            "demo", manifest["artifact_id"], {"repo": "demo", "revision": name}, evaluation=record_id
        ).ref
    log = open(root / "server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "serve"], env={**os.environ}, stdout=log, stderr=log, start_new_session=True
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    else:
        raise TimeoutError((root / "server.log").read_text())
    try:
        yield {
            "base": base,
            "versions": versions,
            "registry": registry,
            "admin": AdminClient(base, TOKEN),
            "log": root / "server.log",
        }
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        mp.undo()
        reload_settings()


def _aliases(env) -> dict:
    return {a: f"{t['name']}:{t['version']}" for a, t in env["registry"].aliases().items()}


def _server_models(env) -> dict:
    return {n: v["ref"] for n, v in env["admin"].state()["variants"].items()}


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
        second = release(ref=v["better"], servers=[env["base"]], admin_token=SecretStr(TOKEN))
    reload_settings()
    with get_client(sync_client=True) as client:
        stored = [r.parameters for r in client.read_flow_runs() if r.parameters.get("servers") == [env["base"]]]
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
    env["admin"].set_faults(canary_error_rate=0.6)
    try:
        fourth = release(ref=v["fourth"])
    finally:
        env["admin"].set_faults(canary_error_rate=0)
    assert fourth["status"] == "aborted" and "canary error rate" in fourth["log"][-1]["reason"]
    assert reg.get(v["fourth"]).status == "rolled_back"
    assert _aliases(env) == {"production": v["better"], "previous": v["good"]}
    assert _server_models(env) == {"production": reg.get(v["better"]).artifact_id}
    assert env["admin"].state()["weights"]["canary"] == 0

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
    env["admin"].set_faults(canary_latency_ms=1500)  # far beyond any load noise on production
    try:
        rel = release(ref=slow)
    finally:
        env["admin"].set_faults(canary_latency_ms=0)
        monkeypatch.delenv("RYZ_RELEASE_TTFT_RATIO")
        reload_settings()
    assert rel["status"] == "aborted" and "p95 TTFT" in rel["log"][-1]["reason"], rel["log"]
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
    before = (_aliases(env), _server_models(env), env["admin"].state()["weights"])

    @task(name="observe-canary-step")
    def exploding_observe(*args, **kwargs):
        raise RuntimeError("metrics backend exploded")

    monkeypatch.setattr(flow_module, "observe_canary_step", exploding_observe)
    with pytest.raises(RuntimeError, match="exploded"):
        flow_module.release(ref=crash)
    assert (_aliases(env), _server_models(env), env["admin"].state()["weights"]) == before
    assert reg.get(crash).status == "candidate"
    rel = flow_module.ReleaseStore(open_store()).latest()
    assert rel["status"] == "failed"
    assert any(e["event"] == "rollback-hook" for e in rel["log"])
    assert any(e["action"] == "rollback-hook" or "transaction rollback" in e["reason"] for e in reg.history())


class _Webhook:
    """A JSON sink on 127.0.0.1 collecting what the release POSTs."""

    def __init__(self):
        import http.server
        import threading

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


def _start_release_and_kill_it(env, ref: str, tmp_path) -> str:
    """`ryz release start REF` in its own process; kill -9 (its whole process group) once its canary serves at the
    first step. Returns the release id."""
    from prefect.settings import PREFECT_API_URL

    from engine.artifacts.releases import ReleaseStore

    variables = {
        **os.environ,
        "PREFECT_API_URL": str(PREFECT_API_URL.value() or ""),
        "RYZ_RELEASE_STEPS": "[5, 100]",
        "RYZ_RELEASE_MIN_REQUESTS": "100000",  # never judged: it sits at the first step until killed
        "RYZ_RELEASE_STEP_TIMEOUT": "600",
        "RYZ_RELEASE_LEASE_S": "3",
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
            state = env["admin"].state()
            if rel and rel["ref"] == ref and rel["status"] == "canary" and state["weights"]["canary"] == 5:
                return rel["id"]
            assert proc.poll() is None, (tmp_path / f"release-{ref}.log").read_text()
            time.sleep(0.5)
        raise TimeoutError((tmp_path / f"release-{ref}.log").read_text())
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def test_a_killed_release_is_aborted_or_resumed_from_the_cli(env, prefect_harness, monkeypatch, capsys, tmp_path):
    """kill -9 of a release's flow at a canary step: `abort` restores the server and frees the way; a second
    killed release is continued by `resume` to the end."""
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
    assert env["admin"].state()["weights"]["canary"] == 5  # the dead flow left its canary serving
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
    assert _server_models(env) == {"production": production} and env["admin"].state()["weights"]["canary"] == 0
    assert reg.get(killed).status == "rolled_back"

    second = _start_release_and_kill_it(env, resumed, tmp_path)
    time.sleep(3.5)
    monkeypatch.setenv("RYZ_RELEASE_MIN_REQUESTS", "8")
    reload_settings()
    assert main(["release", "resume", "--synthetic-load", "--json"]) == 0
    done = json.loads(capsys.readouterr().out)
    assert done["id"] == second and done["status"] == "promoted", done["log"]
    assert _aliases(env)["production"] == resumed and "canary" not in _server_models(env)
