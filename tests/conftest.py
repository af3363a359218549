"""Shared pytest fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def moto_server():
    """A real S3 API (moto) over HTTP on 127.0.0.1; yields its endpoint URL. Dummy AWS credentials are set
    for the session (and the user's AWS config hidden) so boto3 never talks to AWS."""
    from moto.server import ThreadedMotoServer

    with pytest.MonkeyPatch.context() as mp:
        for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                            "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": "/dev/null",
                            "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"}.items():
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
    from engine.build import build_kernels
    from engine.errors import ToolchainNotFoundError
    from engine.settings import Settings

    try:
        return build_kernels(settings=Settings())
    except ToolchainNotFoundError as exc:
        pytest.skip(f"cannot build the native kernels: {exc}")


@pytest.fixture(scope="session")
def native_library(kernel_build):
    """engine.native.Library over the session's kernel build (RYZ_ISA from the environment applied)."""
    from engine.build import load_library
    from engine.settings import Settings

    return load_library(settings=Settings(), build_if_missing=False)
