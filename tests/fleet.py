"""A fleet for tests: `ryz serve` replicas that follow the registry (restartable on their ports), and the probe
that asks production throughout a test, as a load balancer with readiness checks would."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Replica:
    """One `ryz serve` process without --model (it follows the registry), restartable on its port."""

    def __init__(self, port: int, log_path):
        self.port, self.log_path, self.process = port, log_path, None
        self.base = f"http://127.0.0.1:{port}"

    def start(self) -> Replica:
        log = open(self.log_path, "a")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "serve", "--port", str(self.port)],
            env={**os.environ},
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.base}/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.1)
        raise TimeoutError(self.log_path.read_text())

    def stop(self, sig=signal.SIGTERM) -> None:
        os.killpg(self.process.pid, sig)
        self.process.wait(timeout=30)


class Probe:
    """Production by name, on each ready replica in turn (as a load balancer with readiness checks sends it),
    every 0.3 s: a non-2xx answer or none within 10 s is a failed probe. Like a balancer configured for it, it
    tries the next replica when one refuses the connection or answers 503 `draining` (no work was done)."""

    def __init__(self, bases: list[str]):
        self.bases, self.sent, self.failures = bases, 0, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        body = {"model": "production", "prompt": "probe", "max_tokens": 2, "temperature": 0}
        i = 0
        while not self._stop.wait(0.3):
            i += 1
            up = [b for b in self.bases if ready(b)]
            if not up:
                if self.sent:  # before the first production there is nothing to probe
                    self.failures.append("no replica ready")
                continue
            status: object = "no replica accepted the connection"
            for base in up[i % len(up) :] + up[: i % len(up)]:
                try:
                    answer = httpx.post(f"{base}/v1/completions", json=body, timeout=10)
                except httpx.ConnectError:  # a balancer tries the next replica when one refuses the connection
                    continue
                except httpx.HTTPError as exc:
                    status = f"{base}: {type(exc).__name__}"
                    break
                status = answer.status_code
                if status == 503 and answer.json()["error"]["code"] == "draining":
                    continue  # refused before any work (drain began after the readiness check): safe to retry
                break
            self.sent += 1
            if status != 200:
                self.failures.append(str(status))

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=20)


def ready(base: str) -> bool:
    try:
        return httpx.get(f"{base}/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
