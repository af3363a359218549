"""Serving bundles (DESIGN.md "Serving bundle"): what a host needs to serve one registry version with no
registry or store access, as a directory and as a stored artifact.

    bundle.json              schema 1: name, version, ref, artifact_id, kernel build, created, sha256 of every file
    model.gguf               the version's model artifact (its sha256 is the artifact id)
    settings.json            the serving settings (RYZ_* serving fields; never secrets)
    kernels/libryz.so        the kernel build for the target CPU fingerprint, and its build.json manifest
    kernels/build.json       (both absent when no build for that fingerprint exists: `ryz serve` rebuilds)
    kernels/native-src/      the native sources + CMakeLists.txt, to rebuild on a CPU with another fingerprint
    deploy/                  ryzanstein.service (systemd), compose.yaml, kubernetes.yaml (Deployment + Service),
                             rendered from deployments/*.j2, each listing the bundle's checksums

A bundle directory is written atomically (a temporary directory renamed into place). Stored, it is a tar.gz
with sorted entries, zeroed times and owners and a zero gzip mtime, so packing the same directory twice gives
the same bytes; the registry names it (`extra["bundle"]` of the version, `Registry.attach_bundle`) and a
rollback fetches the previous version's bundle byte for byte (`fetch_bundle`). Serving one is
`engine.serving.bundle`.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import secrets
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from engine import host
from engine.artifacts.registry import Registry
from engine.artifacts.store import ArtifactStore
from engine.errors import BuildError, BundleError, SchemaVersionError, ToolchainNotFoundError
from engine.fsutil import atomic_directory
from engine.model import build
from engine.model.ggufio import ModelFile
from engine.settings import Settings, get_settings

SCHEMA = 1
KIND = "bundle"  # the artifact kind in the store
MANIFEST = "bundle.json"
MODEL = "model.gguf"
SETTINGS = "settings.json"
KERNELS = "kernels"
NATIVE_SRC = f"{KERNELS}/native-src"
DEPLOY = "deploy"
# deployments/ template -> file under deploy/
TEMPLATES = {
    "systemd.service.j2": "ryzanstein.service",
    "compose.yaml.j2": "compose.yaml",
    "kubernetes.yaml.j2": "kubernetes.yaml",
}
# Settings fields a bundle carries: how the server serves, never who may call it (admin token, API keys), where
# the store is, or test-only fault injection.
SERVING_FIELDS = (
    "host",
    "port",
    "served_model_name",
    "threads",
    "isa",
    "max_seqs",
    "max_context",
    "max_queue",
    "max_tokens_limit",
    "prefill_chunk",
    "kv_budget_mb",
    "prefix_cache_slots",
    "max_request_bytes",
    "max_header_bytes",
    "body_timeout_s",
    "max_json_depth",
    "max_prompts",
    "max_stops",
    "max_stop_chars",
    "parse_special",
)
# Template variables `build_bundle(deploy=...)` may set; their defaults are what the files say.
DEPLOY_DEFAULTS = {
    "app_name": "ryzanstein",  # systemd unit / compose service / Kubernetes object name
    "image": "ryzanstein:latest",  # a container image that contains ryzanstein (and `ryz` on PATH)
    "install_dir": "/opt/ryzanstein/bundle",  # where the bundle directory lives on the host / node
    "ryz_bin": "/usr/local/bin/ryz",  # the `ryz` executable systemd starts
    "publish_host": "127.0.0.1",  # compose: the host address the port is published on
    "replicas": 1,
    "cpu": None,  # Kubernetes cpu request (default: RYZ_THREADS, else 2)
    "memory": None,  # Kubernetes memory request = limit (default: model + KV + 512 MiB)
}
_CHUNK = 1 << 20


# --- hashing ------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _files(root: Path) -> list[str]:
    """Every regular file under root, as sorted relative POSIX paths."""
    out = []
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            out.append(Path(dirpath, name).relative_to(root).as_posix())
    return sorted(out)


def content_digest(files: dict[str, dict]) -> str:
    """sha256 over the sorted (path, sha256) pairs of the payload files (everything but deploy/ and bundle.json)."""
    h = hashlib.sha256()
    for path in sorted(files):
        if not path.startswith(f"{DEPLOY}/") and path != MANIFEST:
            h.update(f"{path}\0{files[path]['sha256']}\n".encode())
    return h.hexdigest()


def _dump(doc: dict) -> str:
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"


# --- building -----------------------------------------------------------------------------------------


def serving_settings(settings: Settings) -> dict:
    """The serving fields of `settings` (no secrets, no store, no paths)."""
    return {name: getattr(settings, name) for name in SERVING_FIELDS}


def _target_build(
    settings: Settings, target_fingerprint: dict | None, progress
) -> tuple[build.KernelBuild | None, dict]:
    """The kernel build to ship and the fingerprint it is for. This host's fingerprint (or none given): the
    cached build for this CPU, built now if missing (no toolchain: sources only). Another fingerprint: a
    complete build of the same sources for it in the kernels cache (built there and copied here), else none."""
    here = host.cpu_fingerprint()
    target = target_fingerprint or here
    if "fingerprint_id" not in target:
        raise BundleError(
            "the target fingerprint has no fingerprint_id: pass what `engine.host.cpu_fingerprint()` "
            "(or the detect-cpu task) returns on the target machine"
        )
    if target["fingerprint_id"] == here["fingerprint_id"]:
        found = build.find_build(settings)
        if found is None:
            try:
                found = build.build_kernels(settings=settings, progress=progress)
            except ToolchainNotFoundError as exc:
                progress(f"no kernel build for this CPU and none can be built ({exc}); the bundle carries sources only")
        return found, target
    found = build.find_compatible(settings, target["fingerprint_id"])
    if found is None:
        progress(
            f"no kernel build for fingerprint {target['fingerprint_id']} in {build.kernels_dir(settings)}; "
            "the bundle carries sources only (the target rebuilds them once)"
        )
    return found, target


def _copy_sources(dest: Path) -> str:
    """native/'s sources (what the build hashes) into dest; returns their source hash."""
    for path in build._source_files(build.NATIVE_DIR):
        target = dest / path.relative_to(build.NATIVE_DIR)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    return build.source_hash(dest)


def _resources(model_path: Path, settings: Settings) -> dict:
    """Kubernetes requests: the model's bytes + its full KV cache over the slots + 512 MiB, and the threads."""
    hp = ModelFile(model_path).hparams
    per_position = 2 * hp.layers * hp.kv_heads * hp.head_dim * 2  # f16 keys + values
    per_seq = per_position * settings.max_context
    slots = max(1, min(settings.max_seqs, (settings.kv_budget_mb << 20) // max(per_seq, 1)))
    mib = -(-(model_path.stat().st_size + slots * per_seq) // (1 << 20)) + 512
    return {"memory": f"{mib}Mi", "cpu": str(settings.threads or 2)}


def _check_deploy(deploy: dict) -> None:
    """Template variables end up in unit files and YAML: names must be DNS labels, paths absolute and plain."""
    unknown = sorted(set(deploy) - set(DEPLOY_DEFAULTS))
    if unknown:
        raise BundleError(f"unknown deployment variables {unknown}; known: {', '.join(DEPLOY_DEFAULTS)}")
    name = deploy.get("app_name")
    if name is not None and not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", str(name)):
        raise BundleError(
            f"app name {name!r} must be a DNS label (lowercase letters, digits and '-', at most 63) "
            "as Kubernetes and systemd need"
        )
    for key in ("install_dir", "ryz_bin"):
        value = deploy.get(key)
        if value is not None and not re.fullmatch(r"/[A-Za-z0-9._/+@-]*", str(value)):
            raise BundleError(f"{key} {value!r} must be an absolute path without spaces or special characters")
    if "replicas" in deploy and not (isinstance(deploy["replicas"], int) and deploy["replicas"] >= 0):
        raise BundleError(f"replicas must be a whole number >= 0, got {deploy['replicas']!r}")
    for key in ("image", "publish_host", "cpu", "memory"):
        value = deploy.get(key)
        if value is not None and not re.fullmatch(r"[A-Za-z0-9._:/@+-]+", str(value)):
            raise BundleError(f"{key} {value!r} has characters a deployment file cannot carry")


def _render_deploy(dest: Path, context: dict) -> None:
    from deployments import render

    dest.mkdir()
    for template, name in TEMPLATES.items():
        (dest / name).write_text(render(template, **context))


def _version_of(ref: str, store: ArtifactStore):
    looks_like_file = ref.endswith(".gguf") or "/" in ref and Path(ref).expanduser().exists()
    if looks_like_file or ref.startswith("sha256:"):
        raise BundleError(
            f"a bundle serves a registry version, not {ref!r}: pass name:version or an alias "
            "(production, canary, previous); `ryz registry list` shows them"
        )
    return Registry(store).get(ref)


def build_bundle(
    ref: str,
    out_dir: str | Path,
    store: ArtifactStore,
    settings: Settings | None = None,
    target_fingerprint: dict | None = None,
    deploy: dict | None = None,
    replace: bool = False,
    progress: Callable[[str], None] = build.print_to_stderr,
) -> dict:
    """Write the serving bundle of registry version `ref` (name:version or an alias) to `out_dir`; returns its
    bundle.json.

    `target_fingerprint`: the CPU it will run on (`engine.host.cpu_fingerprint()` there; default this one).
    `deploy`: template variables (DEPLOY_DEFAULTS) for the deployment files. `out_dir` must not exist, or be
    empty, unless `replace` (the old directory is swapped out only once the new one is complete)."""
    settings = settings or get_settings()
    out_dir = Path(out_dir).expanduser().resolve()
    _check_deploy(deploy or {})
    _check_destination(out_dir, replace)
    version = _version_of(ref, store)
    with _bundle_directory(out_dir, replace) as work:
        progress(f"bundling {version.ref} ({version.artifact_id[:19]})")
        store.fetch(version.artifact_id, work / MODEL)  # verified against the artifact id
        kernel, target = _target_build(settings, target_fingerprint, progress)
        (work / KERNELS).mkdir()
        source = _copy_sources(work / NATIVE_SRC)
        if kernel is not None:
            if kernel.manifest["source_hash"] != source:
                raise BuildError(
                    f"native/ changed while bundling (kernel build {kernel.key} is of sources "
                    f"{kernel.manifest['source_hash'][:16]}, native/ now hashes {source[:16]}); run again"
                )
            shutil.copyfile(kernel.path, work / KERNELS / build.LIBRARY_NAME)
            shutil.copyfile(kernel.directory / build.MANIFEST_NAME, work / KERNELS / build.MANIFEST_NAME)
        (work / SETTINGS).write_text(_dump({"schema": SCHEMA, "serving": serving_settings(settings)}))
        files = {path: {"sha256": _sha256(work / path), "size": (work / path).stat().st_size} for path in _files(work)}
        digest = content_digest(files)
        shown = [MODEL, f"{KERNELS}/{build.LIBRARY_NAME}", f"{KERNELS}/{build.MANIFEST_NAME}", SETTINGS]
        context = {
            **DEPLOY_DEFAULTS,
            **_resources(work / MODEL, settings),
            **{k: v for k, v in (deploy or {}).items() if v is not None},
            "name": version.name,
            "version": version.version,
            "ref": version.ref,
            "artifact_id": version.artifact_id,
            "port": settings.port,
            "content_digest": f"sha256:{digest}",
            "checksums": [(p, f"sha256:{files[p]['sha256']}") for p in shown if p in files],
        }
        _render_deploy(work / DEPLOY, context)
        for path in _files(work / DEPLOY):
            full = work / DEPLOY / path
            files[f"{DEPLOY}/{path}"] = {"sha256": _sha256(full), "size": full.stat().st_size}
        manifest = {
            "schema": SCHEMA,
            "kind": "serving-bundle",
            "name": version.name,
            "version": version.version,
            "ref": version.ref,
            "artifact_id": version.artifact_id,
            "registered_kernel_build": version.kernel_build,
            "kernel_build": {
                "key": kernel.key if kernel else None,
                "library": f"{KERNELS}/{build.LIBRARY_NAME}" if kernel else None,
                "fingerprint": kernel.manifest["fingerprint"] if kernel else target,
                "fingerprint_id": target["fingerprint_id"],
                "source_hash": source,
                "sources": NATIVE_SRC,
                # the proof the shipped library gave on the build host (engine/model/selftest.py), and any fall-back
                # flags
                "self_test": _self_test_summary(kernel.manifest) if kernel else None,
            },
            "settings": SETTINGS,
            "deploy": {name: f"{DEPLOY}/{name}" for name in TEMPLATES.values()},
            "content_digest": f"sha256:{digest}",
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "ryzanstein": _package_version(),
            "files": files,
        }
        (work / MANIFEST).write_text(_dump(manifest))
    progress(
        f"bundle of {version.ref} written to {out_dir}"
        + ("" if manifest["kernel_build"]["library"] else " (kernel sources only: rebuilt on first serve)")
    )
    return manifest


def _package_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("ryzanstein")
    except Exception:  # noqa: BLE001 - running from a checkout without metadata
        return None


def _check_destination(out_dir: Path, replace: bool) -> None:
    if out_dir.exists() and not replace:
        if not out_dir.is_dir() or any(out_dir.iterdir()):
            raise BundleError(
                f"{out_dir} already exists and is not empty: choose another directory or replace it (`--replace`)"
            )


@contextmanager
def _bundle_directory(out_dir: Path, replace: bool) -> Iterator[Path]:
    """A bundle is written beside `out_dir` and renamed into place when complete (a bundle is read by the service
    user: 0755)."""
    try:
        with atomic_directory(out_dir, prefix=f".tmp-bundle-{out_dir.name}-", replace=replace) as work:
            yield work
    except FileExistsError:
        raise BundleError(f"{out_dir} appeared while the bundle was being written; nothing was replaced") from None


# --- checking ------------------------------------------------------------------------------------------


def read_bundle_manifest(bundle_dir: str | Path) -> dict:
    """bundle.json of a bundle directory (schema checked, not the files: see verify_bundle)."""
    bundle_dir = Path(bundle_dir)
    try:
        manifest = json.loads((bundle_dir / MANIFEST).read_text())
    except FileNotFoundError:
        raise BundleError(
            f"{bundle_dir} is not a serving bundle (no {MANIFEST}); write one with `ryz bundle REF -o DIR`"
        ) from None
    except ValueError as exc:
        raise BundleError(f"{bundle_dir / MANIFEST} is not valid JSON ({exc}); fetch the bundle again") from None
    if manifest.get("schema") != SCHEMA or manifest.get("kind") != "serving-bundle":
        raise SchemaVersionError(
            f"{bundle_dir / MANIFEST} is schema {manifest.get('schema')!r} kind {manifest.get('kind')!r}; "
            f"this Ryzanstein reads serving-bundle schema {SCHEMA}: upgrade Ryzanstein"
        )
    return manifest


def bundle_library(bundle_dir: str | Path, manifest: dict) -> Path | None:
    """The kernel library bundle.json names (kernel_build.library), resolved, or None when it names none. A path
    that resolves outside the bundle directory (`..`, an absolute path, a symlink to elsewhere) is a BundleError:
    only the bundle's own files are ever handed to dlopen."""
    name = (manifest.get("kernel_build") or {}).get("library")
    if not name:
        return None
    root = Path(bundle_dir).resolve()
    if not isinstance(name, str):
        raise BundleError(f"{root / MANIFEST}: kernel_build.library must be a path inside the bundle, got {name!r}")
    path = (root / name).resolve()
    if not path.is_relative_to(root) or path == root:
        raise BundleError(
            f"{root / MANIFEST}: kernel_build.library {name!r} resolves to {path}, outside the bundle {root}; a "
            "bundle's kernel library must be one of its own files, so this one is refused (the bundle was tampered "
            "with or is not a Ryzanstein bundle: build or fetch it again)"
        )
    return path


def verify_bundle(bundle_dir: str | Path) -> dict:
    """Check every file against bundle.json (size, sha256), that nothing else is there, that model.gguf is the
    artifact it names and that its kernel library is inside it (bundle_library). Raises BundleError naming the first
    file that fails; returns bundle.json."""
    bundle_dir = Path(bundle_dir)
    manifest = read_bundle_manifest(bundle_dir)
    bundle_library(bundle_dir, manifest)
    files = manifest.get("files") or {}
    again = "the bundle was modified or damaged; fetch it again (`ryz bundle REF -o DIR --replace`)"
    for path, expected in sorted(files.items()):
        full = bundle_dir / path
        if not full.is_file():
            raise BundleError(f"{path} is missing from the bundle {bundle_dir}; {again}")
        if full.stat().st_size != expected["size"]:
            raise BundleError(
                f"{path} in {bundle_dir} has {full.stat().st_size} bytes, bundle.json says {expected['size']}; {again}"
            )
        actual = _sha256(full)
        if actual != expected["sha256"]:
            raise BundleError(
                f"{path} in {bundle_dir} does not match bundle.json (sha256 {actual[:16]}..., expected "
                f"{expected['sha256'][:16]}...); {again}"
            )
    extra = [p for p in _files(bundle_dir) if p != MANIFEST and p not in files]
    if extra:
        raise BundleError(f"{bundle_dir} holds files bundle.json does not list: {', '.join(extra[:5])}; {again}")
    if f"sha256:{files.get(MODEL, {}).get('sha256')}" != manifest["artifact_id"]:
        raise BundleError(f"{MODEL} in {bundle_dir} is not {manifest['artifact_id']}; {again}")
    if content_digest(files) != manifest["content_digest"].removeprefix("sha256:"):
        raise BundleError(f"the content digest of {bundle_dir} does not match bundle.json; {again}")
    return manifest


# --- packing and the store -------------------------------------------------------------------------------


def pack_bundle(bundle_dir: str | Path, dest: str | Path | None = None) -> Path:
    """A deterministic tar.gz of the bundle (default `<dir>.tar.gz` beside it): entries sorted, regular files
    only, mtime 0, owner 0/0 without names, modes 0644 or 0755, gzip mtime 0 and no file name, so the same
    directory always packs to the same bytes."""
    bundle_dir = Path(bundle_dir)
    read_bundle_manifest(bundle_dir)
    dest = Path(dest) if dest else bundle_dir.with_name(bundle_dir.name + ".tar.gz")
    tmp = dest.with_name(f".tmp-{secrets.token_hex(4)}-{dest.name}")
    try:
        with (
            open(tmp, "wb") as raw,
            gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6) as gz,
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
        ):
            for rel in _files(bundle_dir):
                path = bundle_dir / rel
                info = tarfile.TarInfo(rel)
                info.size = path.stat().st_size
                info.mode = 0o755 if path.stat().st_mode & 0o100 else 0o644
                info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
                with open(path, "rb") as f:
                    tar.addfile(info, f)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def store_bundle(bundle_dir: str | Path, store: ArtifactStore) -> str:
    """Verify, pack and store the bundle (kind "bundle"); returns its artifact id. The manifest names the model
    artifact in `refers_to`, so `ryz gc` keeps the GGUF as long as the bundle."""
    manifest = verify_bundle(bundle_dir)
    with tempfile.TemporaryDirectory(prefix="ryz-bundle-pack-") as tmp:
        packed = pack_bundle(bundle_dir, Path(tmp) / "bundle.tar.gz")
        return store.put_file(
            packed,
            KIND,
            manifest={
                "name": manifest["name"],
                "version": manifest["version"],
                "ref": manifest["ref"],
                "format": "tar.gz",
                "model_artifact": manifest["artifact_id"],
                "kernel_build": manifest["kernel_build"]["key"],
                "fingerprint_id": manifest["kernel_build"]["fingerprint_id"],
                "content_digest": manifest["content_digest"],
                "bundle_created": manifest["created"],
                "refers_to": [manifest["artifact_id"]],
            },
        )


def fetch_bundle(artifact_id: str, store: ArtifactStore, out_dir: str | Path, replace: bool = False) -> dict:
    """Unpack a stored bundle into `out_dir` (atomically, as build_bundle) and verify every file; returns
    bundle.json."""
    out_dir = Path(out_dir).expanduser().resolve()
    _check_destination(out_dir, replace)
    artifact_id = store.resolve(artifact_id)
    kind = store.get_manifest(artifact_id).get("kind")
    if kind != KIND:
        raise BundleError(f"{artifact_id} is a {kind!r} artifact, not a serving bundle")
    with _bundle_directory(out_dir, replace) as work:
        packed = store.fetch(artifact_id, work.with_name(f"{work.name}.tar.gz"))  # sha256-checked against the id
        try:
            with tarfile.open(packed, "r:gz") as tar:
                if any(not m.isfile() for m in tar.getmembers()):
                    raise BundleError(
                        f"{artifact_id} holds entries that are not regular files; it is not a serving bundle"
                    )
                tar.extractall(work, filter="data")
        finally:
            packed.unlink(missing_ok=True)
        manifest = verify_bundle(work)
    return manifest


def _self_test_summary(build_manifest: dict) -> dict:
    test = build_manifest["self_test"]
    return {
        "passed": test["passed"],
        "families": {isa: r["checks"] for isa, r in test.get("families", {}).items()},
        "fallback_flags": (build_manifest.get("fallback") or {}).get("extra_flags", []),
    }


def describe_bundle(
    manifest: dict, directory: str | Path, artifact_id: str | None = None, origin: str = "built"
) -> dict:
    """The `ryz bundle --json` record."""
    kernel = manifest["kernel_build"]
    return {
        "directory": str(directory),
        "ref": manifest["ref"],
        "artifact_id": manifest["artifact_id"],
        "bundle_artifact": artifact_id,
        "origin": origin,
        "kernel_build": kernel["key"],
        "fingerprint_id": kernel["fingerprint_id"],
        "rebuild_needed_elsewhere": kernel["library"] is None,
        "content_digest": manifest["content_digest"],
        "created": manifest["created"],
        "files": len(manifest["files"]) + 1,
        "bytes": sum(f["size"] for f in manifest["files"].values()),
        "deploy": manifest["deploy"],
    }
