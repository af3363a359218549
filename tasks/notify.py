"""Prefect task: announce a release decision as a Prefect event and to RYZ_NOTIFY_WEBHOOK."""

from __future__ import annotations

import threading
import time

import httpx
from prefect import get_run_logger, task
from prefect.events import emit_event

from engine.settings import get_settings


def _post_webhook(url: str, payload: dict, attempts: int = 3) -> None:
    for attempt in range(attempts):
        try:
            if httpx.post(url, json=payload, timeout=5).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5 * 2**attempt)


@task(name="notify-release")
def notify_release(
    kind: str, name: str, version: int, reason: str, release_id: str, details: dict | None = None
) -> dict:
    """Emit `ryzanstein.release.<kind>` (resource: the model version) and POST it to the webhook, never blocking.

    Args:
        kind: rejected, aborted, paused, promoted or rolled-back.
    """
    event = f"ryzanstein.release.{kind}"
    payload = {
        "event": event,
        "model": f"{name}:{version}",
        "reason": reason,
        "release_id": release_id,
        "details": details or {},
    }
    emit_event(
        event=event,
        resource={
            "prefect.resource.id": f"ryzanstein.model.{name}:{version}",
            "prefect.resource.name": f"{name}:{version}",
        },
        related=[{"prefect.resource.id": f"ryzanstein.release.{release_id}", "prefect.resource.role": "release"}],
        payload={"reason": reason, **(details or {})},
    )
    if url := get_settings().notify_webhook:
        # A slow or dead webhook must not hold the release: bounded retries on a daemon thread.
        threading.Thread(target=_post_webhook, args=(url, payload), daemon=True).start()
    get_run_logger().info("notified %s: %s:%s %s", kind, name, version, reason)
    return payload
