"""A `ryz serve` process on 127.0.0.1 for the length of a `with` block (the main job's own server).

It gets a fresh port and a generated admin token, and is always stopped (its process group) on exit,
so `ryz pipeline run` never leaves a server running.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from engine.errors import RyzError


class LocalServer:
    def __init__(self, log_path: Path, extra_env: dict[str, str] | None = None, startup_timeout: float = 120.0):
        self.token = secrets.token_urlsafe(24)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path, self.extra_env, self.startup_timeout = Path(log_path), extra_env or {}, startup_timeout
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> LocalServer:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.extra_env, "RYZ_ADMIN_TOKEN": self.token}
        with self.log_path.open("w") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "flows.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port)],
                env=env,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RyzError(f"ryz serve exited with {self.process.returncode}: {self.log_path.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.1)
        self.__exit__(None, None, None)
        raise RyzError(
            f"ryz serve did not come up on {self.url} within {self.startup_timeout:.0f} s; log: {self.log_path}"
        )

    def __exit__(self, *exc) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
