"""prefect.yaml: every entrypoint loads through the loader workers use and its parameters fit the flow (fast);
then against a real (temporary) Prefect API, `prefect deploy --all` and a process worker on the `ryz-local` pool,
started outside the checkout, runs one deployment (discovery on a local folder) to completion."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("prefect", reason="Prefect is the `pipeline` extra")

ROOT = Path(__file__).resolve().parents[1]
PROJECT = yaml.safe_load((ROOT / "prefect.yaml").read_text())
DEPLOYMENTS = {d["name"]: d for d in PROJECT["deployments"]}
# Parameters with no value in prefect.yaml that every run of the deployment names (sample values).
RUN_TIME = {
    "pipeline": {"repo": "org/model", "revision": "0" * 40},
    "evaluate": {"model": "candidate:1"},
    "release": {"ref": "candidate:1"},
}


@pytest.mark.parametrize("name", list(DEPLOYMENTS))
def test_entrypoint_loads_as_a_flow_and_parameters_fit_it(name):
    from prefect.flows import load_flow_from_entrypoint
    from prefect.utilities.callables import parameter_schema
    from prefect.utilities.schema_tools import validate

    deployment = DEPLOYMENTS[name]
    entrypoint = deployment["entrypoint"]
    # A module path: workers import the installed package, never a file of the deployer's checkout.
    assert ".py" not in entrypoint and "/" not in entrypoint, entrypoint
    flow = load_flow_from_entrypoint(entrypoint, use_placeholder_flow=False)  # as a worker's flow run does
    schema = parameter_schema(flow).model_dump(exclude_unset=True)  # what `prefect deploy` registers
    params, run_time = deployment.get("parameters") or {}, RUN_TIME.get(name, {})
    assert set(params) <= set(schema["properties"]), f"{name}: not parameters of {entrypoint}"
    assert set(run_time) <= set(schema["properties"]) and not set(run_time) & set(params)
    missing = set(schema.get("required", [])) - set(params) - set(run_time)
    assert not missing, f"{name}: {sorted(missing)} have no default; add them to RUN_TIME or prefect.yaml"
    # The API's own checks: the deployment's values when it is created, and a run's full set when one starts.
    validate(params, schema, raise_on_error=True, ignore_required=True)
    validate({**params, **run_time}, schema, raise_on_error=True)


def test_the_main_job_is_scheduled_and_no_pull_step_pins_a_directory():
    from prefect.client.schemas.schedules import CronSchedule, IntervalSchedule

    scheduled = {name for name, d in DEPLOYMENTS.items() if d.get("schedules")}
    assert {"pipeline-run", "index", "watch"} <= scheduled and "discovery" not in scheduled
    for name in scheduled:
        for schedule in DEPLOYMENTS[name]["schedules"]:
            if "interval" in schedule:  # the watch's takeover check
                IntervalSchedule(interval=schedule["interval"])
            else:
                CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])
    assert DEPLOYMENTS["pipeline-run"]["concurrency_limit"] == 1
    assert DEPLOYMENTS["pipeline-run"]["parameters"]["source"] == "hf"
    # An explicit empty list: an omitted `pull` makes `prefect deploy` write one for its own working directory.
    assert PROJECT["pull"] == [] and not any("pull" in d for d in DEPLOYMENTS.values())
    assert "index" in DEPLOYMENTS and "corpus_dir" not in (DEPLOYMENTS["index"].get("parameters") or {})


def test_index_corpus_defaults_to_a_directory_that_exists(monkeypatch):
    from engine.settings import Settings

    monkeypatch.delenv("RYZ_INDEX_CORPUS", raising=False)
    assert Settings().index_corpus.is_dir()


def _prefect(args: list[str], env: dict, timeout: float = 180, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "prefect", "--no-prompt", *args],
        cwd=cwd,
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
    }
    created = _prefect(["work-pool", "create", "ryz-local", "--type", "process"], env)
    assert created.returncode == 0, created.stdout + created.stderr
    deployed = _prefect(["deploy", "--all"], env)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr

    async def deployments():
        async with get_client() as client:
            return {d.name: d for d in await client.read_deployments()}

    import asyncio

    registered = asyncio.run(deployments())
    assert sorted(registered) == sorted(DEPLOYMENTS)
    assert all(d.pull_steps == [] for d in registered.values())
    assert [s.schedule.cron for s in registered["pipeline-run"].schedules] == ["0 2 * * *"]
    assert registered["discovery"].schedules == []
    run = run_deployment(
        "discover-models/discovery", parameters={"source": "local", "local_paths": [str(zoo)]}, timeout=0
    )
    # Outside the checkout, as on another machine: the flow is imported from the installed package.
    elsewhere = tmp_path / "worker"
    elsewhere.mkdir()
    worker = _prefect(["worker", "start", "--pool", "ryz-local", "--run-once"], env, timeout=300, cwd=elsewhere)
    assert worker.returncode == 0, worker.stdout + worker.stderr

    async def final_state():
        async with get_client() as client:
            return (await client.read_flow_run(run.id)).state

    state = asyncio.run(final_state())
    assert state.is_completed(), (state, worker.stdout[-3000:], worker.stderr[-3000:])
