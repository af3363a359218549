"""`ryz ci-bench` (the entry point of .github/workflows/ci-bench.yml): writes a baseline record; against a baseline
measured in the same run by another installation (the workflow's main-branch checkout; here this venv's `ryz` with
its own RYZ_HOME) an identical candidate passes on accuracy and interleaved speed; a candidate slowed on purpose
fails on speed; against records, a far better baseline fails and one with no task in common fails as comparing
nothing."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

pytest.importorskip("prefect")


def test_ci_bench_baseline_pass_and_regression(tmp_path, kernel_build, monkeypatch, capsys, prefect_harness):
    from engine.settings import get_settings, reload_settings
    from evaluations.gates import gate
    from flows.cli import main
    from tests import checkpoints

    home = tmp_path / "home"
    for kernels in (home / "cache" / "kernels", home / "ci-baseline" / "cache" / "kernels"):  # the baseline's own
        shutil.copytree(kernel_build.directory, kernels / kernel_build.key)
    monkeypatch.setenv("RYZ_HOME", str(home))
    # Two timings of one model on a shared machine: the identical candidate must pass, whatever the neighbours do.
    monkeypatch.setenv("RYZ_GATE_SPEED_MARGIN", "0.9")
    reload_settings()
    model = checkpoints.synth(tmp_path / "model", seed=3)
    baseline = tmp_path / "ci" / "baseline.json"
    args = ["ci-bench", "--model", str(model), "--suite", "demo_mc", "--limit", "8", "--baseline", str(baseline)]
    try:
        assert main(args) == 2  # no baseline yet: says how to make one
        assert main([*args, "--accuracy-only", "--write-baseline"]) == 0
        record = json.loads(baseline.read_text())
        assert record["tasks"]["demo_mc"]["n"] == 8 and record["bench"] is None
        capsys.readouterr()
        ryz = str(Path(sys.executable).with_name("ryz"))
        measured = [*args[:7], "--baseline-model", str(model), "--baseline-ryz", ryz, "--rounds", "2", "--json"]
        assert main(measured) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["passed"] is True and "runs BCCB" in result["baseline"]
        assert any(c.startswith("demo_mc acc") for c in result["checks"])
        assert any("medians, runs" in c for c in result["checks"])  # speed compared, from the interleaved runs
        candidate = json.loads(baseline.read_text())  # this model's own record: what the runs below evaluate
        for metric in record["tasks"]["demo_mc"]["metrics"].values():
            metric.update(value=1.0, stderr=0.0)  # a baseline this model cannot match
        baseline.write_text(json.dumps(record))
        assert main([*args, "--accuracy-only"]) == 1
        assert "accuracy: demo_mc" in capsys.readouterr().err
        # A baseline sharing no task (and no benchmark) compares nothing: the gate ci-bench runs, given this model's
        # record rather than a third evaluation of it (the CLI's failure path is the run just above).
        record["tasks"] = {"demo_gen": record["tasks"]["demo_mc"]}
        nothing = gate(candidate, record, get_settings(), require_tasks=True)
        assert not nothing.passed and nothing.reasons[0].startswith(
            "nothing compared: no task in common (candidate: demo_mc; baseline: demo_gen)"
        ), nothing.reasons
    finally:
        reload_settings()


def test_interleaved_speed_fails_a_slowed_candidate(tmp_path, kernel_build, monkeypatch):
    """The candidate computes the same outputs with 8x the layers (checkpoints.slower_twin): measured interleaved
    with its baseline on this machine, the CI gate fails it on speed alone."""
    from engine.artifacts.store import open_store
    from engine.model.quantize import quantize_to_store
    from engine.settings import Settings, reload_settings
    from evaluations.ci_bench import bench_here, bench_workload, interleaved_decode
    from evaluations.gates import gate
    from tests import checkpoints

    shutil.copytree(kernel_build.directory, tmp_path / "home" / "cache" / "kernels" / kernel_build.key)
    monkeypatch.setenv("RYZ_HOME", str(tmp_path / "home"))
    settings = reload_settings()
    try:
        store = open_store(settings=settings)
        base = checkpoints.synth(tmp_path / "base", seed=6)
        paths = [
            store.local_path(quantize_to_store(ckpt, store, tmp_path / "work")["artifact_id"])
            for ckpt in (base, checkpoints.slower_twin(base, tmp_path / "slow", factor=8))
        ]
        prompt, gen = bench_workload(paths[1])
        speeds = interleaved_decode(bench_here(paths[0], prompt, gen), bench_here(paths[1], prompt, gen), 2)
    finally:
        reload_settings()
    assert speeds["order"] == "BCCB" and len(speeds["candidate"]["decode_tok_s_runs"]) == 2
    same = {"tasks": {"demo_mc": {"metrics": {"acc": {"value": 0.5, "stderr": 0.05}}}}}
    env = {"cpu_fingerprint": "this-runner"}
    candidate = {**same, "bench": speeds["candidate"], "environment": env}
    result = gate(candidate, {**same, "bench": speeds["baseline"], "environment": env}, Settings(), require_speed=True)
    assert not result.passed, result.checks
    assert [r.split(":")[0] for r in result.reasons] == [
        "speed"
    ] and "slower beyond the runs' spread" in result.reasons[0]


def test_evaluate_flow_sharded_on_dask_equals_serial(tmp_path, kernel_build, monkeypatch, prefect_harness):
    """The evaluate flow fanned out over a Dask LocalCluster gives the same metrics as the serial run."""
    pytest.importorskip("prefect_dask")
    from engine.settings import reload_settings
    from flows.evaluate import with_runner
    from tests import checkpoints

    home = tmp_path / "home"
    shutil.copytree(kernel_build.directory, home / "cache" / "kernels" / kernel_build.key)
    monkeypatch.setenv("RYZ_HOME", str(home))
    monkeypatch.setenv("RYZ_GATE_FLOORS", "{}")
    reload_settings()
    model = str(checkpoints.synth(tmp_path / "model", seed=4))
    try:
        # Only the metrics are compared: the serial run skips the benchmark (the sharded run keeps it, merged in).
        serial = with_runner(None, 1)(model=model, suite="demo_mc,demo_gen", limit=6, baseline=None, bench=False)
        sharded = with_runner("dask", 2)(model=model, suite="demo_mc,demo_gen", limit=6, baseline=None, shards=2)
    finally:
        reload_settings()
    from engine.artifacts.store import open_store
    from evaluations.evaluate import load_record

    a, b = (load_record(r["record_id"], open_store()) for r in (serial, sharded))
    assert set(a["tasks"]) == set(b["tasks"]) == {"demo_mc", "demo_gen"}
    assert {t: v["metrics"] for t, v in a["tasks"].items()} == {t: v["metrics"] for t, v in b["tasks"].items()}
    assert b["shards"] == 2 and b["valid"]
