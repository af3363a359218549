"""`ryz ci-bench` (the entry point of .github/workflows/ci-bench.yml): writes a baseline, passes against it, and
fails with exit 1 against a baseline that is far better."""

from __future__ import annotations

import json
import shutil

import pytest

pytest.importorskip("prefect")


def test_ci_bench_baseline_pass_and_regression(tmp_path, kernel_build, monkeypatch, capsys, prefect_harness):
    from engine.settings import reload_settings
    from flows.cli import main
    from tests import checkpoints

    home = tmp_path / "home"
    shutil.copytree(kernel_build.directory, home / "cache" / "kernels" / kernel_build.key)
    monkeypatch.setenv("RYZ_HOME", str(home))
    monkeypatch.setenv("RYZ_GATE_SPEED_MARGIN", "0.9")  # two timings on a shared machine: the accuracy path is tested
    reload_settings()
    model = checkpoints.synth(tmp_path / "model", seed=3)
    baseline = tmp_path / "ci" / "baseline.json"
    args = ["ci-bench", "--model", str(model), "--suite", "demo_mc", "--limit", "8", "--baseline", str(baseline)]
    try:
        assert main(args) == 2  # no baseline yet: says how to make one
        assert main([*args, "--write-baseline"]) == 0
        record = json.loads(baseline.read_text())
        assert record["tasks"]["demo_mc"]["n"] == 8
        capsys.readouterr()
        assert main([*args, "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["passed"] is True
        for metric in record["tasks"]["demo_mc"]["metrics"].values():
            metric.update(value=1.0, stderr=0.0)  # a baseline this model cannot match
        baseline.write_text(json.dumps(record))
        assert main(args) == 1
        assert "demo_mc" in capsys.readouterr().err
    finally:
        reload_settings()


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
        serial = with_runner(None, 1)(model=model, suite="demo_mc,demo_gen", limit=6, baseline=None)
        sharded = with_runner("dask", 2)(model=model, suite="demo_mc,demo_gen", limit=6, baseline=None, shards=2)
    finally:
        reload_settings()
    from engine.artifacts.store import open_store
    from evaluations.evaluate import load_record

    a, b = (load_record(r["record_id"], open_store()) for r in (serial, sharded))
    assert set(a["tasks"]) == set(b["tasks"]) == {"demo_mc", "demo_gen"}
    assert {t: v["metrics"] for t, v in a["tasks"].items()} == {t: v["metrics"] for t, v in b["tasks"].items()}
    assert b["shards"] == 2 and b["valid"]
