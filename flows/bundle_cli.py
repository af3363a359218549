"""`ryz bundle REF -o DIR` and `ryz serve --bundle DIR`: the handlers flows/cli.py wires (no Prefect import)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_bundle_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "ref",
        metavar="VERSION_OR_ALIAS",
        help="a registry version: name:version (ryz-demo-m:1) or an alias (production, canary, previous)",
    )
    p.add_argument(
        "-o", "--output", required=True, type=Path, help="the bundle directory to write (must not exist, or be empty)"
    )
    p.add_argument(
        "--rebuild",
        action="store_true",
        help="build a new bundle even if the version has a stored one (default: the stored bundle, byte for byte)",
    )
    p.add_argument(
        "--store",
        action="store_true",
        help="also store the new bundle and attach it to the version (what the release flow does on promotion)",
    )
    p.add_argument(
        "--replace", action="store_true", help="replace an existing directory once the new bundle is complete"
    )
    p.add_argument(
        "--fingerprint",
        type=Path,
        help="JSON of the target CPU's fingerprint (`ryz build-kernels --json` "
        "or the detect-cpu task there); default this CPU",
    )
    p.add_argument("--image", help="container image in compose.yaml / kubernetes.yaml (must contain ryzanstein)")
    p.add_argument(
        "--install-dir",
        help="where the bundle will live on the host (systemd unit, Kubernetes hostPath; "
        "default /opt/ryzanstein/bundle)",
    )
    p.add_argument("--app-name", help="systemd unit / compose service / Kubernetes name (default ryzanstein)")


def cmd_bundle(args) -> int:
    """Write VERSION_OR_ALIAS's serving bundle: the stored one when it has one, else a new one."""
    from engine.artifacts.bundle import build_bundle, describe_bundle, fetch_bundle, store_bundle
    from engine.artifacts.registry import Registry
    from engine.artifacts.store import open_store
    from engine.errors import BundleError
    from engine.settings import get_settings

    settings = get_settings()
    store = open_store(settings=settings)
    registry = Registry(store)
    version = registry.get(args.ref)
    attached = (version.extra or {}).get("bundle")
    if attached and not args.rebuild:
        if args.fingerprint or args.image or args.install_dir or args.app_name:
            raise BundleError(
                f"{version.ref} has a stored bundle ({attached[:19]}), served byte for byte; "
                "--fingerprint/--image/--install-dir/--app-name need --rebuild"
            )
        manifest = fetch_bundle(attached, store, args.output, replace=args.replace)
        record = describe_bundle(manifest, args.output.resolve(), attached, origin="store")
    else:
        if args.store and attached:
            raise BundleError(
                f"{version.ref} already has the stored bundle {attached[:19]}; a version's bundle is set "
                "once: drop --store to write a new one without storing it"
            )
        fingerprint = json.loads(args.fingerprint.read_text()) if args.fingerprint else None
        if fingerprint and "fingerprint" in fingerprint and "fingerprint_id" not in fingerprint:
            fingerprint = fingerprint["fingerprint"]  # a build manifest: its fingerprint
        deploy = {"image": args.image, "install_dir": args.install_dir, "app_name": args.app_name}
        manifest = build_bundle(
            version.ref,
            args.output,
            store,
            settings,
            target_fingerprint=fingerprint,
            deploy={k: v for k, v in deploy.items() if v},
            replace=args.replace,
        )
        artifact_id = None
        if args.store:
            artifact_id = store_bundle(args.output, store)
            registry.attach_bundle(
                version.ref, artifact_id, f"serving bundle {artifact_id[:19]} stored by `ryz bundle`"
            )
        record = describe_bundle(manifest, args.output.resolve(), artifact_id)
    if args.json:
        sys.stdout.write(json.dumps(record, indent=2) + "\n")
    else:
        kernel = (
            f"kernels {record['kernel_build']} for CPU {record['fingerprint_id']}"
            if not record["rebuild_needed_elsewhere"]
            else "kernel sources only (rebuilt on first serve)"
        )
        print(
            f"{record['ref']} ({record['artifact_id'][:19]}) -> {record['directory']} [{record['origin']}"
            + (f", {record['bundle_artifact'][:19]}" if record["bundle_artifact"] else "")
            + f"]: {kernel}, "
            f"{record['files']} files, {record['bytes'] / 1e6:.1f} MB"
        )
        print(f"serve it: ryz serve --bundle {record['directory']}   deploy files: {record['directory']}/deploy/")
    return 0


def cmd_serve_bundle(args) -> int:
    """`ryz serve --bundle DIR`: the bundle's model, kernels and settings; no registry or store."""
    from engine.serving.bundle import serve_bundle
    from engine.settings import get_settings

    overrides = {
        k: v
        for k, v in {"threads": args.threads, "max_seqs": args.max_seqs, "max_context": args.max_context}.items()
        if v is not None
    }
    serve_bundle(args.bundle, host=args.host, port=args.port, settings=get_settings().model_copy(update=overrides))
    return 0
