"""The container image end to end (`make container-test`, docs/container.md): build it, serve a bundle from it.

    .venv/bin/python scripts/container_test.py [--engine docker|podman] [--keep]

Where no container engine answers (no docker or podman on PATH, or no daemon behind the client) it says so and exits 0:
the image is then checked by its lint only (tests/test_container.py). Otherwise:

1. `ENGINE build -t ryzanstein:latest .` (the image name the deployment templates default to, DEPLOY_DEFAULTS).
2. A serving bundle of the demo zoo's ryz-demo-s, made in a temporary RYZ_HOME (quantize, register, `build_bundle`)
   with a free port, so its rendered deploy/compose.yaml publishes that port on 127.0.0.1.
3. That compose file run as it is (`ENGINE compose -f deploy/compose.yaml up -d` from the bundle) when the engine has
   compose, else `ENGINE run IMAGE` with the image's own CMD, the bundle at /bundle and a volume at RYZ_HOME; the
   kernels are the bundle's, or built at first start into that volume.
4. GET /ready within 5 minutes, a completion from /v1/completions, the image's HEALTHCHECK turning healthy; then the
   container, its volume and (unless --keep) the image are removed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
READY_SECONDS = 300  # a first start may build the kernels (~30 s on 2 cores) before loading the model


def log(message: str) -> None:
    print(f"container-test: {message}", file=sys.stderr, flush=True)


def find_engine(requested: str | None) -> tuple[str | None, str]:
    """(engine, why): the first of docker/podman whose `info` answers, or None and why none does."""
    why = []
    for name in [requested] if requested else ["docker", "podman"]:
        exe = shutil.which(name)
        if exe is None:
            why.append(f"no {name} on PATH")
            continue
        done = subprocess.run([exe, "info"], capture_output=True, text=True, check=False)
        if done.returncode == 0:
            return exe, ""
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        why.append(f"{name} is installed but `{name} info` fails ({last})")
    return None, "; ".join(why)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_bundle(work: Path, port: int, image: str) -> Path:
    """A bundle of examples/zoo/ryz-demo-s built by this checkout's engine in a private RYZ_HOME."""
    from engine.artifacts.bundle import build_bundle
    from engine.artifacts.registry import Registry
    from engine.artifacts.store import open_store
    from engine.model.build import find_build
    from engine.model.quantize import quantize_to_store
    from engine.settings import Settings

    settings = Settings(home=work / "home", port=port)
    if (cached := find_build(Settings())) is not None:  # this CPU's build from the default RYZ_HOME: no rebuild
        shutil.copytree(cached.directory, settings.cache_dir / "kernels" / cached.key)
    store = open_store(settings=settings)
    model = quantize_to_store(ROOT / "examples" / "zoo" / "ryz-demo-s", store, work / "quantize")
    Registry(store, actor="container-test").register("ryz-demo-s", model["artifact_id"], {"repo": "ryz-demo-s"})
    out = work / "bundle"
    build_bundle("ryz-demo-s:1", out, store, settings, deploy={"image": image})
    return out


def serve(engine: str, bundle: Path, name: str, image: str, port: int) -> list[list[str]]:
    """Start the bundle's server; returns the commands that tear it down."""
    compose = subprocess.run([engine, "compose", "version"], capture_output=True, check=False).returncode == 0
    if compose:
        files = [engine, "compose", "-p", name, "-f", str(bundle / "deploy" / "compose.yaml")]
        subprocess.run([*files, "up", "-d"], cwd=bundle, check=True)
        return [[*files, "down", "--volumes"]]
    # Without compose: the image's own defaults (CMD, HEALTHCHECK on its port, RYZ_HOME volume), published on `port`.
    container_port = int(
        subprocess.run(
            [engine, "image", "inspect", "--format", "{{range $p, $_ := .Config.ExposedPorts}}{{$p}}{{end}}", image],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split("/")[0]
    )
    cmd = [engine, "run", "-d", "--name", name, f"--publish=127.0.0.1:{port}:{container_port}"]
    cmd += [f"--volume={bundle}:/bundle:ro", f"--volume={name}-home:/var/lib/ryzanstein", image]
    subprocess.run(cmd, check=True)
    return [[engine, "rm", "-f", name], [engine, "volume", "rm", "-f", f"{name}-home"]]


def wait_ready(port: int, engine: str, name: str) -> None:
    deadline = time.monotonic() + READY_SECONDS
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=3).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    subprocess.run([engine, "logs", "--tail", "50", container_id(engine, name)], check=False)
    raise SystemExit(f"container-test: FAILED: /ready not 200 within {READY_SECONDS} s (logs above)")


def container_id(engine: str, name: str) -> str:
    """The running container: ours by name under `run`, compose's by project label."""
    for selector in (f"name=^{name}$", f"label=com.docker.compose.project={name}"):
        out = subprocess.run([engine, "ps", "-q", "--filter", selector], capture_output=True, text=True, check=False)
        if out.stdout.strip():
            return out.stdout.split()[0]
    raise SystemExit(f"container-test: FAILED: no running container for {name}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--engine", choices=["docker", "podman"], help="default: the first that answers")
    parser.add_argument("--keep", action="store_true", help="keep the image afterwards")
    args = parser.parse_args()
    from engine.artifacts.bundle import DEPLOY_DEFAULTS

    engine, why = find_engine(args.engine)
    if engine is None:
        log(f"SKIPPED: no container engine here ({why}); the Dockerfile was checked by its lint only")
        return 0
    image = str(DEPLOY_DEFAULTS["image"])
    log(f"building {image} with {engine}")
    subprocess.run([engine, "build", "-t", image, str(ROOT)], check=True)
    port, name = free_port(), f"ryz-container-test-{int(time.time())}"
    with tempfile.TemporaryDirectory(prefix="ryz-container-test-") as tmp:
        os.chmod(tmp, 0o755)  # the image's user (10001) reads the bundle mounted from here
        bundle = make_bundle(Path(tmp), port, image)
        teardown = serve(engine, bundle, name, image, port)
        try:
            wait_ready(port, engine, name)
            model = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=10).json()["data"][0]["id"]
            reply = httpx.post(
                f"http://127.0.0.1:{port}/v1/completions",
                json={"model": model, "prompt": "The", "max_tokens": 8, "temperature": 0},
                timeout=60,
            )
            reply.raise_for_status()
            log(f"completion: {reply.json()['choices'][0]['text']!r}")
            cid, deadline, health = container_id(engine, name), time.monotonic() + 60, ""
            while time.monotonic() < deadline and health != "healthy":
                out = subprocess.run(
                    [engine, "inspect", "--format", "{{.State.Health.Status}}", cid],
                    capture_output=True,
                    text=True,
                    check=False,
                )
                health = out.stdout.strip()
                time.sleep(2)
            if health != "healthy":
                raise SystemExit(f"container-test: FAILED: health status {health!r} after /ready answered 200")
            log("PASSED: image built, bundle served from it, completion answered, healthcheck healthy")
        finally:
            for cmd in teardown:
                subprocess.run(cmd, check=False)
            if not args.keep:
                subprocess.run([engine, "rmi", image], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
