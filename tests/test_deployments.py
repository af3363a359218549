"""prefect.yaml against a real (temporary) Prefect API: `prefect deploy --all`, then a process worker on the
`ryz-local` pool runs one deployment (discovery on a local folder) to completion."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("prefect", reason="Prefect is the `pipeline` extra")

ROOT = Path(__file__).resolve().parents[1]


def _prefect(args: list[str], env: dict, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "prefect", "--no-prompt", *args],
        cwd=ROOT,
        env=env,
        timeout=timeout,
        capture_output=True,
        text=True,
    )


@pytest.fixture
def prefect_api(prefect_harness):
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


def test_deploy_all_and_run_one_through_a_worker(prefect_api, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    from tests import checkpoints

    zoo = tmp_path / "zoo"
    checkpoints.synth(zoo / "tiny-a", seed=1)
    env = {
        **os.environ,
        "PREFECT_API_URL": prefect_api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "RYZ_HOME": str(tmp_path / "home"),
        "RYZ_DISCOVERY_HF_CACHE": "",
        "PWD": str(ROOT),
    }
    created = _prefect(["work-pool", "create", "ryz-local", "--type", "process"], env)
    assert created.returncode == 0, created.stdout + created.stderr
    deployed = _prefect(["deploy", "--all"], env)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr

    async def names():
        async with get_client() as client:
            return sorted(d.name for d in await client.read_deployments())

    import asyncio

    assert asyncio.run(names()) == ["discovery", "evaluate", "index", "pipeline", "pipeline-run"]
    run = run_deployment(
        "discover-models/discovery", parameters={"source": "local", "local_paths": [str(zoo)]}, timeout=0
    )
    worker = _prefect(["worker", "start", "--pool", "ryz-local", "--run-once"], env, timeout=300)
    assert worker.returncode == 0, worker.stdout + worker.stderr

    async def final_state():
        async with get_client() as client:
            return (await client.read_flow_run(run.id)).state

    state = asyncio.run(final_state())
    assert state.is_completed(), (state, worker.stdout[-3000:], worker.stderr[-3000:])
