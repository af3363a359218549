"""Prefect task that writes a version's serving bundle into the store and names it in the registry."""

from __future__ import annotations

import tempfile
from pathlib import Path

from prefect import get_run_logger, task
from prefect.runtime import flow_run

from engine.artifacts.bundle import build_bundle, store_bundle
from engine.artifacts.registry import Registry
from engine.artifacts.releases import ReleaseStore
from engine.artifacts.store import open_store
from engine.errors import ModelReferenceError
from engine.settings import get_settings


def _actor() -> str:
    run_id = flow_run.get_id()
    return f"flow-run:{run_id}" if run_id else "ryz"


@task(name="build-serving-bundle", retries=1, retry_delay_seconds=[5])
def build_serving_bundle(release_id: str, ref: str) -> str:
    """Build, store and attach the serving bundle of `ref` (run on promotion); a version that already has a
    stored bundle keeps it (the bytes a rollback redeploys never change).

    Args:
        release_id: the release this runs for (logged in its record; "" outside a release).
        ref: name:version or an alias, resolved once, so a moving alias cannot change what is bundled.

    Returns:
        the bundle's artifact id.
    """
    logger = get_run_logger()
    store = open_store()
    registry = Registry(store, actor=_actor())
    version = registry.get(ref)
    attached = (version.extra or {}).get("bundle")
    if attached and store.exists(attached):
        logger.info("%s already has the serving bundle %s", version.ref, attached[:19])
        return attached
    with tempfile.TemporaryDirectory(prefix="ryz-bundle-") as tmp:
        manifest = build_bundle(
            version.ref,
            Path(tmp) / "bundle",
            store,
            get_settings(),
            progress=lambda message: logger.info("%s", message),
        )
        artifact_id = store_bundle(Path(tmp) / "bundle", store)
    kernel = manifest["kernel_build"]
    reason = (
        f"serving bundle {artifact_id[:19]} of {version.ref}: kernels "
        + (f"{kernel['key']} for CPU {kernel['fingerprint_id']}" if kernel["library"] else "as sources only")
        + (f" (release {release_id})" if release_id else "")
    )
    registry.attach_bundle(version.ref, artifact_id, reason)
    if release_id:
        try:
            ReleaseStore(store).log(release_id, "bundle", reason, bundle=artifact_id)
        except ModelReferenceError:
            logger.warning("release %s not found; the bundle is recorded in the registry only", release_id)
    logger.info("%s", reason)
    return artifact_id
