"""Serving bundles (engine/artifacts/bundle.py packs them, engine/serving/bundle.py serves them): built from a registry
version, verified, packed deterministically, stored
and fetched byte for byte, served with no store (same greedy tokens as the registry version's GGUF), and
deployment files that parse."""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from engine.artifacts import bundle as bundles
from engine.artifacts.registry import Registry
from engine.artifacts.store import open_store
from engine.errors import BundleError, ConflictError, ModelReferenceError
from engine.model.native import NativeModel
from engine.model.quantize import quantize_to_store
from engine.serving import bundle as served_bundles
from engine.settings import Settings, reload_settings
from tests import checkpoints
from tests.test_server import RunningServer, _free_port

ADMIN = "admin-secret-token-123"
API_KEY = "api-secret-key-456"
NAME = "tiny-bundle"


def _ryz_bin() -> str:
    """An executable that exists, so `systemd-analyze verify` accepts ExecStart."""
    here = Path(sys.executable).with_name("ryz")
    return str(here if here.is_file() else Path(shutil.which("ryz") or sys.executable))


@pytest.fixture(scope="module")
def world(tmp_path_factory, kernel_build):
    root = tmp_path_factory.mktemp("bundle")
    store_url = f"file://{root / 'store'}"
    store = open_store(store_url)
    model = quantize_to_store(checkpoints.synth(root / "ckpt", seed=5), store, root / "work")
    registry = Registry(store, actor="test")
    version = registry.register(
        NAME, model["artifact_id"], {"repo": NAME, "revision": "r1"}, kernel_build=kernel_build.key
    )
    # A private RYZ_HOME holding a copy of the session's kernel build (the key names it, so this is a cache hit).
    home = root / "home"
    shutil.copytree(kernel_build.directory, home / "cache" / "kernels" / kernel_build.key)
    settings = Settings(
        home=home,
        store=store_url,
        admin_token=ADMIN,
        api_keys=API_KEY,
        max_seqs=4,
        max_context=256,
        threads=2,
        prefill_chunk=32,
        port=8123,
    )
    manifest = bundles.build_bundle(
        version.ref, root / "bundle", store, settings, deploy={"ryz_bin": _ryz_bin()}, progress=lambda m: None
    )
    return {
        "root": root,
        "store": store,
        "store_url": store_url,
        "registry": registry,
        "version": version,
        "home": home,
        "settings": settings,
        "dir": root / "bundle",
        "manifest": manifest,
        "kernel_build": kernel_build,
    }


def _copy(world, name: str) -> Path:
    dest = world["root"] / name
    shutil.copytree(world["dir"], dest)
    return dest


def test_bundle_holds_model_kernels_sources_settings_and_deploy_files(world):
    d, m, kb = world["dir"], world["manifest"], world["kernel_build"]
    assert bundles.verify_bundle(d) == m
    assert (m["schema"], m["name"], m["version"], m["ref"]) == (1, NAME, 1, f"{NAME}:1")
    assert (
        "sha256:" + hashlib.sha256((d / "model.gguf").read_bytes()).hexdigest()
        == m["artifact_id"]
        == world["version"].artifact_id
    )
    assert (
        m["kernel_build"]["key"] == kb.key
        and m["kernel_build"]["fingerprint_id"] == kb.manifest["fingerprint"]["fingerprint_id"]
    )
    assert m["files"]["kernels/libryz.so"]["sha256"] == kb.manifest["library"]["sha256"]
    assert m["kernel_build"]["self_test"] == {
        "passed": True,
        "fallback_flags": [],
        "families": {isa: r["checks"] for isa, r in kb.manifest["self_test"]["families"].items()},
    }
    assert json.loads((d / "kernels/build.json").read_text())["key"] == kb.key
    assert (d / "kernels/native-src/CMakeLists.txt").is_file()
    from engine.model.build import source_hash

    assert source_hash(d / "kernels/native-src") == m["kernel_build"]["source_hash"] == kb.manifest["source_hash"]
    assert sorted(p for p in m["files"] if p.startswith("deploy/")) == [
        "deploy/compose.yaml",
        "deploy/kubernetes.yaml",
        "deploy/ryzanstein.service",
    ]
    serving = json.loads((d / "settings.json").read_text())["serving"]
    assert serving["max_context"] == 256 and serving["port"] == 8123 and set(serving) == set(bundles.SERVING_FIELDS)
    for path in m["files"]:  # no secret anywhere in the bundle
        data = (d / path).read_bytes()
        assert ADMIN.encode() not in data and API_KEY.encode() not in data, path
    for name in ("ryzanstein.service", "compose.yaml", "kubernetes.yaml"):  # each deploy file lists the checksums
        text = (d / "deploy" / name).read_text()
        assert (
            m["artifact_id"] in text
            and m["content_digest"] in text
            and m["files"]["kernels/libryz.so"]["sha256"] in text
        )


def test_verify_names_the_tampered_file(world):
    settings_edit = _copy(world, "tampered-settings")
    (settings_edit / "settings.json").write_text((settings_edit / "settings.json").read_text().replace("256", "257"))
    with pytest.raises(BundleError, match=r"settings\.json"):
        bundles.verify_bundle(settings_edit)
    model_edit = _copy(world, "tampered-model")
    data = bytearray((model_edit / "model.gguf").read_bytes())
    data[-1] ^= 1
    (model_edit / "model.gguf").write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"model\.gguf .*does not match"):
        bundles.verify_bundle(model_edit)
    extra = _copy(world, "extra-file")
    (extra / "kernels" / "libevil.so").write_bytes(b"\0")
    with pytest.raises(BundleError, match=r"kernels/libevil\.so"):
        bundles.verify_bundle(extra)
    with pytest.raises(BundleError, match="not empty"):  # never written over an existing bundle by accident
        bundles.build_bundle(world["version"].ref, world["dir"], world["store"], world["settings"])


def test_pack_store_fetch_is_byte_for_byte(world, tmp_path, monkeypatch):
    first = bundles.pack_bundle(world["dir"], tmp_path / "a.tar.gz")
    second = bundles.pack_bundle(world["dir"], tmp_path / "b.tar.gz")
    assert first.read_bytes() == second.read_bytes()
    store, registry, version = world["store"], world["registry"], world["version"]
    artifact_id = bundles.store_bundle(world["dir"], store)
    assert artifact_id == "sha256:" + hashlib.sha256(first.read_bytes()).hexdigest()
    stored = store.get_manifest(artifact_id)
    assert stored["kind"] == "bundle" and stored["refers_to"] == [version.artifact_id] and stored["name"] == NAME
    fetched = bundles.fetch_bundle(artifact_id[:20], store, tmp_path / "fetched")
    assert fetched == world["manifest"]
    assert bundles.pack_bundle(tmp_path / "fetched", tmp_path / "c.tar.gz").read_bytes() == first.read_bytes()

    # The registry names it once; gc keeps the bundle and the model it refers to.
    assert registry.attach_bundle(version.ref, artifact_id, "test").extra["bundle"] == artifact_id
    assert registry.attach_bundle(version.ref, artifact_id, "again").extra["bundle"] == artifact_id
    with pytest.raises(ConflictError, match="already has the serving bundle"):
        registry.attach_bundle(version.ref, "sha256:" + "0" * 64, "another")
    assert registry.history(NAME)[-1]["action"] == "bundle"
    from engine.artifacts.gc import referenced_artifacts

    assert {artifact_id, version.artifact_id} <= set(referenced_artifacts(store))

    # `ryz bundle REF -o DIR` of a version with a stored bundle writes exactly those bytes (what a rollback redeploys).
    from flows.bundle_cli import cmd_bundle

    monkeypatch.setenv("RYZ_HOME", str(world["home"]))
    monkeypatch.setenv("RYZ_STORE", world["store_url"])
    reload_settings()
    try:
        args = argparse.Namespace(
            ref=version.ref,
            output=tmp_path / "redeploy",
            rebuild=False,
            store=False,
            replace=False,
            fingerprint=None,
            image=None,
            install_dir=None,
            app_name=None,
            json=True,
        )
        assert cmd_bundle(args) == 0
    finally:
        monkeypatch.undo()
        reload_settings()
    assert bundles.pack_bundle(tmp_path / "redeploy", tmp_path / "d.tar.gz").read_bytes() == first.read_bytes()


def test_bundle_serves_the_registry_versions_greedy_tokens(world, native_library):
    from engine.model.tokenizer import ModelTokenizer

    opened = served_bundles.open_bundle(world["dir"], world["settings"])
    assert opened.kernel == "bundle" and opened.library.path.parent == world["dir"] / "kernels"

    version = world["version"]
    direct = NativeModel(world["store"].local_path(version.artifact_id), native_library, threads=1, max_positions=256)
    tok = ModelTokenizer(direct.file)
    prompts = ["the quick brown fox", "once upon a time"]
    expected = [direct.generate(tok.encode(p), 12, stop_ids=tok.stop_ids) for p in prompts]
    direct.close()

    # No store: the environment's store is a path that does not exist; the bundle's settings fill in the rest.
    base = Settings(home=world["home"], store=f"file://{world['root'] / 'no-such-store'}", admin_token=ADMIN)
    app, settings = served_bundles.bundle_app(world["dir"], base)
    assert settings.max_context == 256 and settings.max_seqs == 4 and settings.admin_token == ADMIN
    with RunningServer(app, _free_port()) as server:
        models = [m.id for m in server.client().models.list().data]
        assert f"{NAME}@{version.artifact_id[:19]}" in models or any(
            m.endswith(f"@{version.artifact_id[:19]}") for m in models
        )
        for prompt, ids in zip(prompts, expected):
            out = server.client().completions.create(
                model="ryzanstein", prompt=prompt, max_tokens=12, temperature=0, logprobs=0
            )
            choice = out.choices[0]
            assert choice.logprobs.tokens == [
                tok.tokenizer.decode([t], skip_special_tokens=False) for t in ids
            ]  # token for token
            assert choice.text == tok.decode(ids)
        state = server.admin("GET", "/admin/state", token=ADMIN).json()
        assert state["variants"]["production"]["ref"] == version.artifact_id  # what the release flow compares
        other = server.admin(
            "POST", "/admin/variants", token=ADMIN, json={"name": "canary", "model": "sha256:" + "1" * 64}
        )
        assert other.status_code == 404 and "no artifact" in other.json()["error"]["message"]
    assert not (world["root"] / "no-such-store").exists()
    bundles.verify_bundle(world["dir"])  # serving wrote nothing into the bundle


def test_sources_only_bundle_and_rebuild_decision(world, tmp_path, monkeypatch):
    other_cpu = {"fingerprint_id": "0" * 16, "arch": "x86_64", "isa": {}}
    manifest = bundles.build_bundle(
        world["version"].ref,
        tmp_path / "elsewhere",
        world["store"],
        world["settings"],
        target_fingerprint=other_cpu,
        progress=lambda m: None,
    )
    assert manifest["kernel_build"]["library"] is None and manifest["kernel_build"]["fingerprint_id"] == "0" * 16
    assert not (tmp_path / "elsewhere" / "kernels" / "libryz.so").exists()
    bundles.verify_bundle(tmp_path / "elsewhere")

    # On a CPU with another fingerprint the bundle's kernels are rebuilt from its sources; without a toolchain
    # that is a clear error, not a crash in the library.
    from engine import host
    from engine.errors import ToolchainNotFoundError
    from engine.model import build

    real = host.cpu_fingerprint()
    monkeypatch.setattr(host, "cpu_fingerprint", lambda: {**real, "fingerprint_id": "f" * 16})

    def no_toolchain(**kw):
        assert Path(kw["native_dir"]) == world["dir"] / "kernels" / "native-src"
        raise ToolchainNotFoundError("no C++ compiler found")

    monkeypatch.setattr(build, "build_kernels", no_toolchain)
    with pytest.raises(BundleError, match="rebuilding needs a C\\+\\+ toolchain"):
        served_bundles.open_bundle(world["dir"], world["settings"], verify=False, progress=lambda m: None)


def test_a_bundle_library_without_a_passed_self_test_is_not_loaded(world, monkeypatch):
    """Its kernels are rebuilt from the bundle's sources (which self-tests them) instead."""
    from engine.errors import ToolchainNotFoundError
    from engine.model import build

    manifest = json.loads((world["dir"] / "bundle.json").read_text())
    monkeypatch.setattr(
        build, "build_kernels", lambda **kw: (_ for _ in ()).throw(ToolchainNotFoundError("no C++ compiler found"))
    )
    for self_test in (None, {"passed": False, "families": {"scalar": 43}, "fallback_flags": []}):
        manifest["kernel_build"]["self_test"] = self_test
        with pytest.raises(
            BundleError, match="its kernel build carries no passed self-test, and rebuilding needs a C\\+\\+ toolchain"
        ):
            served_bundles._load_library(world["dir"], manifest, world["settings"], progress=lambda m: None)


def test_bundle_refuses_non_registry_references(world, tmp_path):
    with pytest.raises(BundleError, match="registry version"):
        bundles.build_bundle(world["version"].artifact_id, tmp_path / "x", world["store"], world["settings"])
    with pytest.raises(ModelReferenceError):
        bundles.build_bundle("no-such-model:3", tmp_path / "y", world["store"], world["settings"])
    with pytest.raises(BundleError, match="DNS label"):
        bundles.build_bundle(
            world["version"].ref,
            tmp_path / "z",
            world["store"],
            world["settings"],
            deploy={"app_name": "Bad Name\nExecStart=/bin/sh"},
        )
    assert not any((tmp_path / n).exists() for n in "xyz")


# --- deployment files ---------------------------------------------------------------------------------------


def test_systemd_unit_verifies(world):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed: the unit is only checked as text")
    unit = world["dir"] / "deploy" / "ryzanstein.service"
    text = unit.read_text()
    assert f"ExecStart={_ryz_bin()} serve --bundle /opt/ryzanstein/bundle" in text
    out = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


COMPOSE_SCHEMA = {
    "type": "object",
    "required": ["services"],
    "properties": {
        "services": {
            "type": "object",
            "minProperties": 1,
            "additionalProperties": {
                "type": "object",
                "required": ["image", "command", "ports", "healthcheck", "volumes"],
                "properties": {
                    "image": {"type": "string", "minLength": 1},
                    "command": {
                        "type": "array",
                        "items": {"type": "string"},
                        "allOf": [{"contains": {"const": "--bundle"}}, {"contains": {"const": "/bundle"}}],
                    },
                    "ports": {
                        "type": "array",
                        "minItems": 1,
                        "items": {"type": "string", "pattern": r"^[0-9.]+:\d+:\d+$"},
                    },
                    "healthcheck": {
                        "type": "object",
                        "required": ["test"],
                        "properties": {
                            "test": {
                                "type": "array",
                                "items": {"type": "string"},
                                "contains": {"type": "string", "pattern": "/ready"},
                            }
                        },
                    },
                    "environment": {"type": "object", "additionalProperties": {"type": "string"}},
                },
            },
        }
    },
}

_PROBE = {
    "type": "object",
    "required": ["httpGet"],
    "properties": {"httpGet": {"type": "object", "required": ["path", "port"]}},
}
DEPLOYMENT_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "apps/v1"},
        "kind": {"const": "Deployment"},
        "spec": {
            "type": "object",
            "required": ["selector", "template"],
            "properties": {
                "replicas": {"type": "integer", "minimum": 1},
                "template": {
                    "type": "object",
                    "required": ["metadata", "spec"],
                    "properties": {
                        "spec": {
                            "type": "object",
                            "required": ["containers", "volumes"],
                            "properties": {
                                "containers": {
                                    "type": "array",
                                    "minItems": 1,
                                    "prefixItems": [
                                        {
                                            "type": "object",
                                            "required": [
                                                "name",
                                                "image",
                                                "command",
                                                "ports",
                                                "readinessProbe",
                                                "livenessProbe",
                                                "resources",
                                            ],
                                            "properties": {
                                                "command": {
                                                    "type": "array",
                                                    "items": {"type": "string"},
                                                    "contains": {"const": "--bundle"},
                                                },
                                                "ports": {
                                                    "type": "array",
                                                    "minItems": 1,
                                                    "items": {
                                                        "type": "object",
                                                        "required": ["containerPort"],
                                                        "properties": {"containerPort": {"type": "integer"}},
                                                    },
                                                },
                                                "readinessProbe": {
                                                    **_PROBE,
                                                    "properties": {
                                                        "httpGet": {
                                                            "type": "object",
                                                            "properties": {"path": {"const": "/ready"}},
                                                        }
                                                    },
                                                },
                                                "livenessProbe": {
                                                    **_PROBE,
                                                    "properties": {
                                                        "httpGet": {
                                                            "type": "object",
                                                            "properties": {"path": {"const": "/health"}},
                                                        }
                                                    },
                                                },
                                                "resources": {"type": "object", "required": ["requests", "limits"]},
                                            },
                                        }
                                    ],
                                }
                            },
                        }
                    },
                },
            },
        },
    },
}
SERVICE_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "v1"},
        "kind": {"const": "Service"},
        "spec": {
            "type": "object",
            "required": ["selector", "ports"],
            "properties": {
                "ports": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["port", "targetPort"],
                        "properties": {"port": {"type": "integer"}},
                    },
                }
            },
        },
    },
}


def test_compose_and_kubernetes_files_match_their_schemas(world):
    d, m = world["dir"], world["manifest"]
    compose = yaml.safe_load((d / "deploy" / "compose.yaml").read_text())
    jsonschema.validate(compose, COMPOSE_SCHEMA)
    service = compose["services"]["ryzanstein"]
    assert service["ports"] == ["127.0.0.1:8123:8123"] and service["command"][-1] == "8123"
    assert (
        service["volumes"][0]["source"] == ".."
        and service["labels"]["dev.ryzanstein.content-digest"] == m["content_digest"]
    )

    docs = list(yaml.safe_load_all((d / "deploy" / "kubernetes.yaml").read_text()))
    assert [doc["kind"] for doc in docs] == ["Deployment", "Service"]
    jsonschema.validate(docs[0], DEPLOYMENT_SCHEMA)
    jsonschema.validate(docs[1], SERVICE_SCHEMA)
    pod = docs[0]["spec"]["template"]
    container = pod["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["ports"][0]["containerPort"] == 8123 and docs[1]["spec"]["ports"][0]["port"] == 8123
    assert docs[0]["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert docs[1]["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert pod["metadata"]["annotations"]["ryzanstein.dev/content-digest"] == m["content_digest"]
    assert (
        container["resources"]["requests"]["memory"].endswith("Mi") and container["resources"]["requests"]["cpu"] == "2"
    )


def test_release_task_builds_stores_and_attaches_once(world, monkeypatch):
    pytest.importorskip("prefect", reason="Prefect is the `pipeline` extra")
    from prefect.logging import disable_run_logger

    from tasks.bundle import build_serving_bundle

    registry, store = world["registry"], world["store"]
    v2 = registry.register(NAME, world["version"].artifact_id, {"repo": NAME, "revision": "r2"})
    monkeypatch.setenv("RYZ_HOME", str(world["home"]))
    monkeypatch.setenv("RYZ_STORE", world["store_url"])
    reload_settings()
    try:
        with disable_run_logger():
            first = build_serving_bundle.fn("", v2.ref)
            again = build_serving_bundle.fn("", v2.ref)
    finally:
        monkeypatch.undo()
        reload_settings()
    assert first == again == registry.get(v2.ref).extra["bundle"]
    assert store.get_manifest(first)["refers_to"] == [v2.artifact_id] and store.get_manifest(first)["version"] == 2
