"""Serving a bundle (docs/bundles.md): `ryz serve --bundle DIR` with no registry or store. The bundle is
verified, its kernels are the bundle's own build when it fits this CPU and passed its self-test (else rebuilt
from the bundle's sources), and the server loads only the bundle's model.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from engine import host
from engine.artifacts.bundle import (
    KERNELS,
    MODEL,
    NATIVE_SRC,
    SCHEMA,
    SERVING_FIELDS,
    SETTINGS,
    bundle_library,
    read_bundle_manifest,
    verify_bundle,
)
from engine.errors import BundleError, ModelReferenceError, SchemaVersionError, ToolchainNotFoundError
from engine.model import build
from engine.model.loader import open_model
from engine.model.native import Library
from engine.model.tokenizer import ModelTokenizer
from engine.serving.app import create_app
from engine.serving.client import LoadedModel
from engine.settings import Settings, get_settings


@dataclass
class OpenedBundle:
    """A verified bundle ready to serve: its GGUF, a native library for this CPU and its serving settings."""

    directory: Path
    manifest: dict
    model_path: Path
    library: Library
    kernel: str  # "bundle" (its own build) or "rebuilt:<key>" (rebuilt from native-src)
    build_manifest: dict = field(default_factory=dict)
    overrides: dict = field(default_factory=dict)  # settings.json's serving fields

    @property
    def artifact_id(self) -> str:
        return self.manifest["artifact_id"]


def bundle_settings(bundle_dir: str | Path, base: Settings | None = None) -> Settings:
    """`base` (default: the environment's settings) with the bundle's serving fields wherever `base` does not
    set them itself: explicit settings (RYZ_* variables, constructor arguments) win over the bundle, the bundle
    wins over defaults. Secrets only ever come from `base`."""
    base = base or get_settings()
    doc = json.loads((Path(bundle_dir) / SETTINGS).read_text())
    if doc.get("schema") != SCHEMA:
        raise SchemaVersionError(
            f"{Path(bundle_dir) / SETTINGS} has schema {doc.get('schema')!r}; this Ryzanstein reads {SCHEMA}"
        )
    serving = {k: v for k, v in doc["serving"].items() if k in SERVING_FIELDS and k not in base.model_fields_set}
    return Settings.model_validate({**base.model_dump(), **serving})


def _load_library(
    bundle_dir: Path, manifest: dict, settings: Settings, progress: Callable[[str], None]
) -> tuple[Library, str, dict]:
    """The bundle's own library when it was built for this CPU's fingerprint, else one rebuilt from its sources
    into RYZ_HOME's kernel cache (once: the key makes it a cache hit afterwards)."""
    kernel = manifest["kernel_build"]
    here = host.cpu_fingerprint()
    proven = bool((kernel.get("self_test") or {}).get("passed"))
    if kernel.get("library") and proven and kernel["fingerprint"].get("fingerprint_id") == here["fingerprint_id"]:
        path = bundle_library(bundle_dir, manifest)  # inside the bundle, or a BundleError: never dlopen'd
        assert path is not None
        library = build._LOADED.get(path) or Library(path)
        built_from = (library.lib.ryz_source_hash() or b"").decode()
        if built_from != kernel["source_hash"]:
            raise BundleError(
                f"{kernel['library']} reports sources {built_from[:16]!r}, bundle.json {kernel['source_hash'][:16]!r}; "
                "the bundle is inconsistent: build it again"
            )
        build._LOADED[path] = library
        library.set_isa(settings.isa)
        return library, "bundle", json.loads((bundle_dir / KERNELS / build.MANIFEST_NAME).read_text())
    why = (
        "it carries no kernel build"
        if not kernel.get("library")
        else "its kernel build carries no passed self-test"
        if not proven
        else f"its kernels were built for CPU fingerprint {kernel['fingerprint'].get('fingerprint_id')}, this CPU is "
        f"{here['fingerprint_id']}"
    )
    progress(
        f"bundle {manifest['ref']}: {why}; building the kernels from its sources (once, into "
        f"{build.kernels_dir(settings)})"
    )
    try:
        built = build.build_kernels(settings=settings, native_dir=bundle_dir / NATIVE_SRC, progress=progress)
    except ToolchainNotFoundError as exc:
        raise BundleError(
            f"cannot serve the bundle {bundle_dir} on this CPU: {why}, and rebuilding needs a C++ "
            f"toolchain: {exc}. Or build the bundle on (or for) this CPU: `ryz bundle {manifest['ref']} -o DIR`"
        ) from None
    library = build.load_library(
        settings, build_if_missing=False, native_dir=bundle_dir / NATIVE_SRC, progress=progress
    )
    return library, f"rebuilt:{built.key}", built.manifest


def open_bundle(
    bundle_dir: str | Path,
    settings: Settings | None = None,
    verify: bool = True,
    progress: Callable[[str], None] = build.print_to_stderr,
) -> OpenedBundle:
    """What `ryz serve --bundle DIR` needs, with no registry or store: the bundle verified, its GGUF, a loaded
    native library for this CPU (the bundle's, or rebuilt from its sources) and its serving settings."""
    bundle_dir = Path(bundle_dir).expanduser().resolve()
    manifest = verify_bundle(bundle_dir) if verify else read_bundle_manifest(bundle_dir)
    settings = settings or bundle_settings(bundle_dir)
    library, kernel, build_manifest = _load_library(bundle_dir, manifest, settings, progress)
    overrides = json.loads((bundle_dir / SETTINGS).read_text())["serving"]
    return OpenedBundle(bundle_dir, manifest, bundle_dir / MODEL, library, kernel, build_manifest, overrides)


def bundle_loader(
    bundle_dir: str | Path,
    opened: OpenedBundle | None = None,
    verify: bool = True,
) -> Callable[[str, Settings], LoadedModel]:
    """A loader for engine.serving.app.create_app(loader=...) that serves the bundle's model and nothing else: it
    accepts the bundle's artifact id (or a prefix of it), its name:version, or its GGUF path; any other reference
    is refused (the server has no store to load it from). The bundle is opened on the first load (in the
    server's background loader, so /health answers while kernels rebuild)."""
    bundle_dir = Path(bundle_dir).expanduser().resolve()
    manifest = opened.manifest if opened else read_bundle_manifest(bundle_dir)
    state = {"opened": opened}

    def load(ref: str, settings: Settings) -> LoadedModel:
        hex_ = ref.removeprefix("sha256:")
        ours = ref in (manifest["ref"], str(bundle_dir / MODEL)) or (
            len(hex_) >= 12 and manifest["artifact_id"].removeprefix("sha256:").startswith(hex_)
        )
        if not ours:
            raise ModelReferenceError(
                f"this server serves the bundle of {manifest['ref']} ({manifest['artifact_id'][:19]}) and has no "
                f"artifact "
                f"store to load {ref!r} from; deploy that version's bundle instead (`ryz bundle REF -o DIR`)"
            )
        bundle = state["opened"]
        if bundle is None:
            bundle = state["opened"] = open_bundle(bundle_dir, settings, verify=verify)
        model = open_model(bundle.model_path, "serve", settings=settings, library=bundle.library)
        name = model.file.metadata.get("general.name")
        model_id = (
            f"{name}@{bundle.artifact_id[:19]}" if name else bundle.artifact_id[:19]
        )  # as a store-loaded artifact
        return LoadedModel(model, ModelTokenizer(model.file, settings.parse_special), model_id)

    return load


def bundle_app(bundle_dir: str | Path, settings: Settings | None = None, verify: bool = True):
    """The server app for a bundle (engine.serving.app.create_app with the bundle loader), and its settings. The
    settings' store points at an empty directory inside the bundle, so nothing in the server can reach a real
    store or registry."""

    bundle_dir = Path(bundle_dir).expanduser().resolve()
    manifest = verify_bundle(bundle_dir) if verify else read_bundle_manifest(bundle_dir)
    settings = bundle_settings(bundle_dir, settings)
    settings = settings.model_copy(update={"store": f"file://{bundle_dir / '.no-store'}", "s3_endpoint_url": None})
    app = create_app(settings, manifest["artifact_id"], loader=bundle_loader(bundle_dir, verify=False))
    return app, settings


def serve_bundle(
    bundle_dir: str | Path, host: str | None = None, port: int | None = None, settings: Settings | None = None
) -> None:
    """Verify the bundle and serve it until interrupted (what `ryz serve --bundle DIR` calls); `host`/`port`
    override the bundle's and the environment's."""
    import uvicorn  # only when serving for real

    base = settings or get_settings()
    overrides = {k: v for k, v in {"host": host, "port": port}.items() if v is not None}
    if overrides:
        base = base.model_copy(update=overrides)
    app, settings = bundle_app(bundle_dir, base)
    if settings.host not in ("127.0.0.1", "localhost", "::1") and not settings.api_keys:
        print(
            f"ryz serve: warning: binding {settings.host} without RYZ_API_KEYS: anyone who can reach it can use it",
            file=sys.stderr,
        )
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info", timeout_graceful_shutdown=10)
