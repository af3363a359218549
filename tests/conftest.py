"""Shared pytest fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def moto_server():
    """A real S3 API (moto) over HTTP on 127.0.0.1; yields its endpoint URL. Dummy AWS credentials are set
    for the session (and the user's AWS config hidden) so boto3 never talks to AWS."""
    from moto.server import ThreadedMotoServer

    with pytest.MonkeyPatch.context() as mp:
        for name, value in {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_CONFIG_FILE": "/dev/null",
            "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
        }.items():
            mp.setenv(name, value)
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(name, raising=False)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        try:
            yield f"http://{host}:{port}"
        finally:
            server.stop()


@pytest.fixture(scope="session")
def kernel_build():
    """The native kernel build for this CPU, built once per machine: it lives in the real settings cache
    ($RYZ_HOME/cache/kernels/<key>, default ~/.ryzanstein) because the key makes reuse safe. Skips when
    no C++ compiler or CMake is installed; a failing build fails the tests that need it."""
    from engine.errors import ToolchainNotFoundError
    from engine.model.build import build_kernels
    from engine.settings import Settings

    try:
        return build_kernels(settings=Settings())
    except ToolchainNotFoundError as exc:
        pytest.skip(f"cannot build the native kernels: {exc}")


@pytest.fixture(scope="session")
def native_library(kernel_build):
    """engine.model.native.Library over the session's kernel build (RYZ_ISA from the environment applied)."""
    from engine.model.build import load_library
    from engine.settings import Settings

    return load_library(settings=Settings(), build_if_missing=False)


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    """A temporary Prefect API and database for the whole session (one server start, not one per module), and
    task results in a temporary directory."""
    pytest.importorskip("prefect", reason="Prefect is the `pipeline` extra")
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    with temporary_settings(updates={PREFECT_LOCAL_STORAGE_PATH: str(tmp_path_factory.mktemp("prefect-results"))}):
        with prefect_test_harness(server_startup_timeout=120):
            yield


@pytest.fixture(params=["file", "s3"])
def store(request, tmp_path):
    """An empty artifact store on each backend: a local directory, and a fresh bucket on the moto S3 server."""
    import uuid

    import boto3

    from engine.artifacts.store import open_store
    from engine.settings import Settings

    home = tmp_path / "home"
    if request.param == "file":
        return open_store(f"file://{tmp_path / 'store'}", Settings(home=home))
    endpoint = request.getfixturevalue("moto_server")
    bucket = f"ryz-test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
    return open_store(settings=Settings(home=home, store=f"s3://{bucket}/pfx", s3_endpoint_url=endpoint))
