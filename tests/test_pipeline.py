"""The main job (`ryz pipeline run`) under a real temporary Prefect: discovery -> candidate pipeline -> release ->
report, twice (the second run finds nothing new), and a crash mid-pipeline that a re-run resumes from the store."""

from __future__ import annotations

import json
import shutil

import pytest

pytest.importorskip("prefect")

from engine.artifacts.registry import Registry  # noqa: E402
from engine.artifacts.store import open_store  # noqa: E402
from engine.settings import reload_settings  # noqa: E402
from tests import checkpoints  # noqa: E402


@pytest.fixture
def home(tmp_path, kernel_build, monkeypatch):
    home = tmp_path / "home"
    shutil.copytree(kernel_build.directory, home / "cache" / "kernels" / kernel_build.key)
    zoo = tmp_path / "zoo"
    for name, seed in (("alpha", 1), ("beta", 2)):
        checkpoints.synth(zoo / name, seed=seed)
    (zoo / "zoo.json").write_text(json.dumps({"models": ["alpha", "beta"]}))
    for k, v in {
        "RYZ_HOME": str(home),
        "RYZ_DISCOVERY_HF_CACHE": "",
        "RYZ_GATE_FLOORS": '{"demo_mc": 0.0}',
        "RYZ_RELEASE_STEPS": "[100]",
        "RYZ_RELEASE_MIN_REQUESTS": "5",
        "RYZ_RELEASE_TTFT_RATIO": "50",
        "RYZ_RELEASE_SPEED_RATIO": "0.02",
        "RYZ_THREADS": "1",
    }.items():
        monkeypatch.setenv(k, v)
    reload_settings()
    yield {"home": home, "zoo": zoo}
    reload_settings()


@pytest.fixture
def fleet(home, monkeypatch, tmp_path):
    """Two replicas as RYZ_RELEASE_SERVERS, a bounded client load on them (their real traffic) and the probe."""
    from engine.serving.admin import Replicas
    from engine.serving.loadgen import SyntheticLoad
    from tests.fleet import Probe, Replica, free_port

    replicas = [Replica(free_port(), tmp_path / f"replica-{i}.log") for i in range(2)]
    bases = [r.base for r in replicas]
    for k, v in {
        "RYZ_ADMIN_TOKEN": "fleet-token",
        "RYZ_RELEASE_SERVERS": json.dumps(bases),
        "RYZ_RELEASE_POLICY": "not-worse",
        "RYZ_GATE_ACCURACY_MARGIN": "1.0",  # random tiny models: let beta through the gates to its canary
        "RYZ_RELEASE_SYNTHETIC_LOAD": "false",
        "RYZ_RELEASE_STEP_TIMEOUT": "120",
    }.items():
        monkeypatch.setenv(k, v)
    reload_settings()
    for replica in replicas:
        replica.start()
    probe = Probe(bases)
    try:
        # A request every 0.25 s per replica is plenty for a canary step (RYZ_RELEASE_MIN_REQUESTS=5); clients back to
        # back kept most of a core of a 2-core runner busy, slowing the pipeline this test waits on.
        with SyntheticLoad(bases, "ryzanstein", ["Once upon a time", "2 + 3 ="], 2, deadline_s=900, pause_s=0.25):
            yield {"replicas": Replicas(bases, "fleet-token"), "probe": probe}
    finally:
        probe.close()
        for replica in replicas:
            replica.stop()
    assert probe.sent and probe.failures == [], probe.failures


def test_pipeline_run_into_the_fleet_twice_and_resume_after_a_crash(home, fleet, prefect_harness, monkeypatch):
    """With RYZ_RELEASE_SERVERS set, the main job releases into those two replicas with their own traffic, starts
    no server of its own, and both replicas end on the same production; production answers the probe throughout."""
    import engine.model.quantize
    import evaluations.evaluate
    from flows.run import pipeline_run

    quantized = []
    real_quantize = engine.model.quantize.quantize_to_store
    monkeypatch.setattr(
        engine.model.quantize, "quantize_to_store", lambda *a, **k: quantized.append(a[0]) or real_quantize(*a, **k)
    )
    import tasks.quantize

    monkeypatch.setattr(tasks.quantize, "quantize_to_store", engine.model.quantize.quantize_to_store)

    # A crash while evaluating the second model: the first is released, the second is reported failed.
    real_evaluate = evaluations.evaluate.evaluate_model

    def crash_on_beta(artifact_id, **kw):
        manifest = open_store().get_manifest(artifact_id)
        if manifest["source"]["repo"] == "beta":
            raise RuntimeError("evaluation host lost")
        return real_evaluate(artifact_id, **kw)

    monkeypatch.setattr(evaluations.evaluate, "evaluate_model", crash_on_beta)
    first = pipeline_run(source="local", path=str(home["zoo"]), suite="demo_mc", limit=4)
    outcomes = {c["repo"]: c for c in first["candidates"]}
    assert outcomes["alpha"]["status"] == "production" and outcomes["alpha"]["release"] == "promoted"
    assert outcomes["beta"]["status"] == "failed" and "pipeline failed" in outcomes["beta"]["reason"]
    assert len(quantized) == 2
    report = (home["home"] / "reports").glob("pipeline-*.html")
    assert any("alpha:1" in p.read_text() for p in report)

    # Re-run: beta is still new (never registered); its quantized artifact is found, not made again.
    monkeypatch.setattr(evaluations.evaluate, "evaluate_model", real_evaluate)
    second = pipeline_run(source="local", path=str(home["zoo"]), suite="demo_mc", limit=4)
    assert [c["repo"] for c in second["candidates"]] == ["beta"]
    assert len(quantized) == 2
    assert second["candidates"][0]["status"] == "production", second["candidates"]
    assert "passed every canary step" in second["candidates"][0]["reason"]
    production = Registry(open_store()).get("production")
    served = [{n: v["ref"] for n, v in state["variants"].items()} for state in fleet["replicas"].state()]
    assert production.name == "beta" and served == [{"production": production.artifact_id}] * 2
    assert not (home["home"] / "logs" / "pipeline-serve.log").exists()  # no server of its own

    # Nothing new: a no-op that says so.
    third = pipeline_run(source="local", path=str(home["zoo"]), suite="demo_mc", limit=4)
    assert third["candidates"] == []
    assert "Nothing new" in open(third["report"]).read()
    registry = Registry(open_store())
    assert {v.name for v in registry.versions()} == {"alpha", "beta"}
    assert [e["action"] for e in registry.history()][:2] == ["register", "promote"]


def test_demo_zoo_story(tmp_path, kernel_build, monkeypatch, prefect_harness):
    """From an empty registry, `ryz pipeline run` as `make run` runs it (its own process, stderr not a terminal):
    ryz-demo-s becomes production, ryz-demo-m is promoted through the canary steps, the post-training-quantized
    model is rejected at the offline gate with its reason (DESIGN defaults). Its console says so in one line per
    stage per model and the final table: no Prefect INFO logs, no progress bars."""
    import os
    import subprocess
    import sys
    from collections import Counter
    from pathlib import Path

    from prefect.settings import PREFECT_API_URL

    root = Path(__file__).resolve().parents[1]
    home = tmp_path / "home"
    shutil.copytree(kernel_build.directory, home / "cache" / "kernels" / kernel_build.key)
    quiet = ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS", "PREFECT_LOGGING")
    env = {k: v for k, v in os.environ.items() if not k.startswith(quiet)}  # the CLI's own defaults, not ours
    env |= {"RYZ_HOME": str(home), "RYZ_DISCOVERY_HF_CACHE": "", "PREFECT_API_URL": str(PREFECT_API_URL.value())}
    # Each canary step judged on 5 canary requests (min_samples, so TTFT and speed are still compared), not the
    # default 20: at the 5 % step that is ~100 requests instead of ~400, most of this test's time.
    env["RYZ_RELEASE_MIN_REQUESTS"] = "5"
    run = subprocess.run(
        [sys.executable, "-m", "flows.cli", "pipeline", "run", "--path", str(root / "examples" / "zoo")]
        + ["--suite", "demo_mc,demo_gen", "--limit", "50"],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    models = ["ryz-demo-s", "ryz-demo-m", "ryz-demo-ptq"]
    lines = run.stderr.splitlines()
    assert "\r" not in run.stderr and "it/s" not in run.stderr, run.stderr[-4000:]  # no tqdm bar
    assert not [line for line in lines if "| INFO" in line or line.startswith(("ryz eval:", "[bench]"))]
    per_stage = Counter(tuple(line.split()[:2]) for line in lines if line.split()[:1] and line.split()[0] in models)
    stages = ["quantize", "kernels", "parity", "evaluate", "register", "release"]
    assert per_stage == Counter((m, s) for m in models for s in stages), run.stderr
    assert [line.split("(")[-1] for line in lines if line.split()[:2] == ["local", "discover"]] == ["3 new)"]
    assert len(lines) <= 1 + len(per_stage) + 3, run.stderr  # a stray warning at most, not the old log
    release_m = next(line for line in lines if line.split()[:2] == ["ryz-demo-m", "release"])
    assert "5% → 25% → 50% → 100% → promoted" in release_m, run.stderr + run.stdout
    # The final table (stdout): one row per model, its fate and why; then the report.
    rows = {line.split()[0]: line for line in run.stdout.splitlines() if line.split()[:1] and line.split()[0] in models}
    assert list(rows) == models, run.stdout
    fates = {m: rows[m].split()[2] for m in models}
    assert fates == {"ryz-demo-s": "production", "ryz-demo-m": "production", "ryz-demo-ptq": "rejected"}
    assert "first model" in rows["ryz-demo-s"] and "passed every canary step" in rows["ryz-demo-m"]
    assert "vs production" in rows["ryz-demo-ptq"]
    assert run.stdout.splitlines()[-1].startswith("report: ")
    # A quiet console, not quiet logs: the Prefect API (the UI) has the run's INFO lines, the stage lines included.
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName, LogFilter, LogFilterFlowRunId

    run_name = Path(run.stdout.splitlines()[-1].removeprefix("report: ")).stem.removeprefix("pipeline-")
    with get_client(sync_client=True) as client:
        (flow_run,) = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[run_name])))
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run.id])))
    assert {(log.level, log.message) for log in logs} >= {(20, release_m), (20, "Finished in state Completed()")}
    monkeypatch.setenv("RYZ_HOME", str(home))
    reload_settings()
    try:
        registry = Registry(open_store())
        assert registry.get("production").name == "ryz-demo-m" and registry.get("previous").name == "ryz-demo-s"
        actions = [e["action"] for e in registry.history()]
        assert actions.count("promote") == 2 and "status:rejected" in actions
        assert [a for a in actions if a.startswith("canary-")] == [f"canary-{w}%:pass" for w in (5, 25, 50, 100)]
    finally:
        reload_settings()


def test_verbose_keeps_everything_and_the_quiet_default_restores_the_environment(monkeypatch):
    """`--verbose` sets nothing (Prefect's INFO logs, our progress and the bars as before); the quiet default
    lowers only Prefect's console handler (the API handler still gets INFO: the UI keeps the run logs), hides
    bars only off a terminal, and puts the environment back when the run ends."""
    import io
    import os

    from flows.cli import build_parser
    from flows.progress import console, quiet_environment

    assert build_parser().parse_args(["pipeline", "run", "--verbose"]).verbose
    assert quiet_environment(verbose=True, stderr_tty=False) == {}
    assert "TQDM_DISABLE" not in quiet_environment(verbose=False, stderr_tty=True)
    quiet = quiet_environment(verbose=False, stderr_tty=False)
    assert quiet["PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"] == "WARNING" and quiet["TQDM_DISABLE"] == "1"
    assert not any(k in ("PREFECT_LOGGING_LEVEL", "PREFECT_LOGGING_TO_API_ENABLED") for k in quiet)
    for key in quiet:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "0")  # the user's own choice wins
    with console(verbose=False, stream=io.StringIO()):
        assert os.environ["TQDM_DISABLE"] == "1" and os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "0"
    assert "TQDM_DISABLE" not in os.environ and os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "0"


def test_an_unreadable_candidate_is_reported_not_nothing_new(home, prefect_harness, capsys):
    """A truncated checkpoint is seen, refused with its reason in the result, the printed table and the report."""
    from flows.cli import main

    broken = home["zoo"].parent / "broken-zoo" / "gamma"
    checkpoints.synth(broken, seed=3)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert main(["pipeline", "run", "--path", str(broken)]) == 0
    out = capsys.readouterr().out
    assert "nothing new" not in out
    row = next(line for line in out.splitlines() if line.startswith("gamma"))
    assert "refused" in row and "truncated" in row
    report = max((home["home"] / "reports").glob("pipeline-*.html"), key=lambda p: p.stat().st_mtime)
    assert "truncated" in report.read_text()
