"""The watch after promotion as a flow of its own: it takes over a release in its bake period whose watcher died.

The release flow watches production itself after each promotion (RYZ_RELEASE_BAKE_S); the watch's state lives
in the release document (status `baking`, `watch.until`, `watch.baseline`), so a watcher that dies is found by its
stale lease and continued here, from where it was, to its end: promoted for good or rolled back on every replica.
The `watch` deployment runs this every few minutes; with nothing to take over it says so and ends.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from pydantic import SecretStr

from engine.artifacts.releases import ReleaseStore, stale_for
from engine.artifacts.store import open_store
from engine.settings import get_settings
from flows.release import release


@flow(name="watch")
def watch(
    release_id: str | None = None, servers: list[str] | None = None, admin_token: SecretStr | None = None
) -> dict:
    """Continue the bake period of `release_id` (default: the release now baking) if its watcher died.

    Returns:
        {"release": id or None, "status", "reason"}: the release's end, or why there was nothing to take over.
    """
    store = ReleaseStore(open_store())
    rel = store.get(release_id) if release_id else store.active()
    if rel is None or rel["status"] != "baking":
        reason = f"release {rel['id']} is {rel['status']}" if rel else "no release is in its bake period"
        get_run_logger().info("nothing to watch: %s", reason)
        return {"release": rel and rel["id"], "status": rel and rel["status"], "reason": reason}
    if stale_for(rel, get_settings().release_lease_s) is None:
        reason = f"release {rel['id']} is watched by {(rel.get('lease') or {}).get('owner', 'its release flow')}"
        get_run_logger().info("nothing to take over: %s", reason)
        return {"release": rel["id"], "status": "baking", "reason": reason}
    done = release(release_id=rel["id"], servers=servers, admin_token=admin_token)
    return {"release": done["id"], "status": done["status"], "reason": done["log"][-1]["reason"]}
