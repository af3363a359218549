"""The container image (Dockerfile, docs/container.md): hadolint finds nothing, and the image agrees with what the
deployment templates render (command, port, mounts, RYZ_HOME, user). No container engine runs here; where one
does, `make container-test` builds the image and serves a bundle from it (scripts/container_test.py)."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from deployments import render
from engine.artifacts.bundle import DEPLOY_DEFAULTS
from engine.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


def _tool(name: str) -> str:
    exe = Path(sys.executable).with_name(name)
    found = str(exe) if exe.is_file() else shutil.which(name)
    if not found:
        pytest.skip(f"{name} is not installed (the dev extras install it: make install-dev)")
    return found


def dockerfile_stages(path: Path = ROOT / "Dockerfile") -> list[list[tuple[str, str]]]:
    """The Dockerfile as stages of (INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    stages: list[list[tuple[str, str]]] = []
    logical = ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") or not (logical or line.strip()):
            continue
        logical += line.rstrip()
        if logical.endswith("\\"):
            logical = logical[:-1] + " "
            continue
        instruction, _, rest = logical.strip().partition(" ")
        if instruction.upper() == "FROM":
            stages.append([])
        stages[-1].append((instruction.upper(), rest.strip()))
        logical = ""
    return stages


def exec_form(arguments: str) -> list[str]:
    value = json.loads(arguments)
    assert isinstance(value, list), f"{arguments}: use the exec (JSON) form"
    return value


def image() -> dict:
    """What the final stage sets: entrypoint, cmd, env, user, volumes, exposed ports, healthcheck."""
    final = dockerfile_stages()[-1]
    found: dict = {"entrypoint": [], "cmd": [], "env": {}, "volumes": [], "expose": [], "user": None, "health": None}
    for instruction, rest in final:
        if instruction == "ENTRYPOINT":
            found["entrypoint"] = exec_form(rest)
        elif instruction == "CMD":
            found["cmd"] = exec_form(rest)
        elif instruction == "ENV":
            found["env"].update(dict(kv.split("=", 1) for kv in shlex.split(rest)))
        elif instruction == "VOLUME":
            found["volumes"] += exec_form(rest)
        elif instruction == "EXPOSE":
            found["expose"] += [int(p.split("/")[0]) for p in rest.split()]
        elif instruction == "USER":
            found["user"] = rest
        elif instruction == "HEALTHCHECK":
            found["health"] = exec_form(rest[rest.index("CMD ") + 4 :])
    return found


def rendered(template: str) -> dict | list:
    context = {
        **DEPLOY_DEFAULTS,
        "cpu": "2",
        "memory": "1Gi",
        "name": "m",
        "version": 1,
        "ref": "m:1",
        "artifact_id": "sha256:" + "0" * 64,
        "port": Settings.model_fields["port"].default,  # the port a bundle built with default settings serves
        "content_digest": "sha256:" + "1" * 64,
        "checksums": [],
    }
    return list(yaml.safe_load_all(render(template, **context)))


def test_hadolint_finds_nothing():
    done = subprocess.run(
        [_tool("hadolint"), "--no-color", "Dockerfile"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0 and not done.stdout.strip(), done.stdout + done.stderr


def test_the_image_runs_what_compose_and_kubernetes_render():
    img = image()
    port = Settings.model_fields["port"].default
    service = rendered("compose.yaml.j2")[0]["services"][DEPLOY_DEFAULTS["app_name"]]
    deployment = rendered("kubernetes.yaml.j2")[0]
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]

    # compose's `command` replaces CMD (ENTRYPOINT stays); Kubernetes' `command` replaces ENTRYPOINT and, with no
    # `args`, drops CMD. Both must end up running the same argv, which is also the image's default.
    assert service["image"] == container["image"] == DEPLOY_DEFAULTS["image"]
    compose_argv = img["entrypoint"] + service["command"]
    assert "args" not in container
    assert compose_argv == container["command"] == img["entrypoint"] + img["cmd"]
    assert compose_argv[:4] == ["ryz", "serve", "--bundle", "/bundle"]

    # The port: the image's default command, EXPOSE, the healthcheck and both templates.
    assert img["expose"] == [port]
    assert compose_argv[compose_argv.index("--port") + 1] == str(port)
    assert service["ports"] == [f"{DEPLOY_DEFAULTS['publish_host']}:{port}:{port}"]
    assert container["ports"][0]["containerPort"] == port
    assert img["health"][0] == "python" and f"http://127.0.0.1:{port}/ready" in img["health"][-1]
    assert service["healthcheck"]["test"][1] == "python"  # on PATH in the image (the venv's)

    # The bundle is mounted where the command reads it; RYZ_HOME is the image's volume in both templates.
    bundle_arg = compose_argv[compose_argv.index("--bundle") + 1]
    binds = {v["target"]: v for v in service["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert binds[bundle_arg]["read_only"] and mounts[bundle_arg]["readOnly"]
    home = img["env"]["RYZ_HOME"]
    assert service["environment"]["RYZ_HOME"] == home
    assert {e["name"]: e["value"] for e in container["env"]}["RYZ_HOME"] == home
    assert img["volumes"] == [home] and binds[home]["type"] == "volume" and home in mounts

    # The user: non-root, the uid/gid the pod's securityContext runs as.
    uid, _, gid = img["user"].partition(":")
    security = pod["securityContext"]
    assert security["runAsNonRoot"] and int(uid) == security["runAsUser"] != 0
    assert int(gid) == security["fsGroup"]
    assert any("ryz" in part for part in img["env"]["PATH"].split(":")), "the venv's bin (ryz, python) on PATH"


def test_the_image_copies_every_package_root_and_the_build_context_allows_them():
    """A new top-level package in pyproject.toml must reach the builder stage (COPY) and the context (.dockerignore
    whitelists)."""
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    roots = {tool["package-dir"].get(p, p).split("/")[0] for p in tool["packages"] if "." not in p}
    copied = {rest.split()[0] for instruction, rest in dockerfile_stages()[0] if instruction == "COPY"}
    assert roots <= copied, f"not copied into the builder: {sorted(roots - copied)}"
    allowed = {line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines() if line[:1] == "!"}
    assert copied - {"pyproject.toml", "README.md"} <= allowed and {"pyproject.toml", "README.md"} <= allowed
    assert dockerfile_stages()[0][0][1].startswith("python:3.11-slim-bookworm")  # pinned base, both stages
    assert dockerfile_stages()[-1][0][1] == "python:3.11-slim-bookworm"
