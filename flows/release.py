"""Release flow: offline gates -> canary steps (weight, traffic, analysis) -> promote, or reject / pause / abort."""

from __future__ import annotations

import os
import socket
import time

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run
from prefect.transactions import transaction
from pydantic import SecretStr

from engine.artifacts.registry import Registry, refuse_pulled
from engine.artifacts.releases import ReleaseStore, new_release
from engine.artifacts.store import open_store
from engine.settings import get_settings
from tasks.bundle import build_serving_bundle
from tasks.notify import notify_release
from tasks.release import (
    Fleet,
    FleetError,
    abort_release,
    check_offline_gates,
    ensure_production_served,
    hold_version,
    load_canary,
    load_production,
    mark_canary,
    observe_canary_step,
    promote_in_registry,
    promote_on_servers,
    reject_version,
    resolve_fleet,
    set_canary_weight,
    watch_baseline,
    watch_production,
)


class StepFailed(RuntimeError):
    """Raised inside a step's transaction so its rollback hooks undo the step."""


@flow(name="release")
def release(
    ref: str | None = None,
    release_id: str | None = None,
    synthetic_load: bool | None = None,
    force_promote: bool = False,
    servers: list[str] | None = None,
    admin_token: SecretStr | None = None,
) -> dict:
    """Release `ref` (a registry version), or resume `release_id` from its recorded step, on `servers` (default
    RYZ_RELEASE_SERVERS) with `admin_token` (default RYZ_ADMIN_TOKEN; a secret, masked wherever Prefect shows it).

    Returns:
        the release record (engine/artifacts/releases.py): status promoted, held, rejected, paused, aborted,
        rolled_back (the watch after promotion) or degraded (a replica out of line, named), with its log.
    """
    settings, store = get_settings(), ReleaseStore(open_store())
    fleet = resolve_fleet(servers, admin_token, settings)
    actor = f"flow-run:{flow_run.get_id() or 'local'}"
    load = settings.release_synthetic_load if synthetic_load is None else synthetic_load
    rel = store.get(release_id) if release_id else _open(store, ref, settings.release_lease_s)
    rid, ref = rel["id"], rel["ref"]
    rel = store.take_lease(rid, f"{actor} (pid {os.getpid()} on {socket.gethostname()})", settings.release_lease_s)
    old_production = _production_artifact()
    if rel["status"] == "baking":  # promoted; its watcher died: watch the rest of the bake period
        return _bake(store, rid, actor, load, fleet)
    if rel["status"] == "abort_requested":  # its flow died before honouring the request: abort it here
        reason = next((e["reason"] for e in reversed(rel["log"]) if e["event"] == "abort_requested"), "abort")
        return _finish(store, rid, abort_release(rid, ref, reason, actor, fleet), reason)
    # Offline gates: reject, bootstrap the first model straight to production, or go on to the canary.
    if rel["status"] == "gating":
        gate = check_offline_gates(rid, ref)
        if not gate["passed"]:
            reject_version(rid, ref, gate["reason"], actor)
            return _finish(store, rid, "rejected", gate["reason"])
        if gate["held"]:
            hold_version(rid, ref, gate["reason"], actor)
            return _finish(store, rid, "held", gate["reason"])
        if gate["bootstrap"]:
            with transaction():
                load_production(rid, rel["artifact_id"], None, fleet)
                promote_in_registry(rid, ref, gate["reason"], actor)
            store.set_status(rid, "promoted", gate["reason"])
            _bundle(rid, ref)
            return _finish(store, rid, "promoted", gate["reason"])
        store.set_status(rid, "canary", gate["reason"])
    elif rel["status"] in ("paused", "pause_requested"):
        store.set_status(
            rid, "canary", f"resumed at step {rel['steps'][min(rel['step_index'], len(rel['steps']) - 1)]}%"
        )
    # Canary steps: each one transaction; a failed analysis raises inside it, so its hooks undo the step.
    if old_production:
        ensure_production_served(rid, old_production, fleet)
    for i in range(store.get(rid)["step_index"], 0 if force_promote else len(rel["steps"])):
        weight = rel["steps"][i]
        try:
            with transaction():
                if not _canary_loaded(rel["artifact_id"], fleet):  # first step, or a replica lost it
                    load_canary(rid, rel["artifact_id"], fleet)
                    if i == 0:
                        mark_canary(rid, ref, actor)
                set_canary_weight(rid, i, weight, fleet)
                result = observe_canary_step(rid, ref, actor, i, weight, load, fleet)
                if result["outcome"] in ("fail", "aborted"):
                    raise StepFailed("; ".join(result["reasons"]))
        except StepFailed as failed:
            reason = f"canary step {weight}% failed: {failed}"
            return _finish(store, rid, abort_release(rid, ref, reason, actor, fleet), reason)
        except Exception as exc:  # a replica down, a bug: the hooks undid the step on every replica that answers
            reason = f"{type(exc).__name__}: {exc}; the step's transaction restored servers and registry"
            store.set_status(rid, "failed", reason)
            _finish(store, rid, "failed", reason)
            raise
        if result["outcome"] in ("inconclusive", "paused"):
            reason = "; ".join(result["reasons"])
            store.update(rid, lambda doc: doc.update(step_index=i))
            store.set_status(rid, "paused", f"paused at step {weight}%: {reason}; `ryz release resume` continues here")
            return _finish(store, rid, "paused", reason)
        store.update(rid, lambda doc, i=i: doc.update(step_index=i + 1))
    # Promote: servers and registry in one transaction.
    reason = (
        f"forced promotion of {ref}"
        if force_promote
        else f"{ref} passed every canary step ({', '.join(f'{s}%' for s in rel['steps'])})"
    )
    try:  # all or nothing: a replica refusing undoes the promotion on every replica and in the registry
        with transaction():
            promote_on_servers(rid, old_production, fleet)
            promote_in_registry(rid, ref, reason, actor)
    except Exception as exc:  # noqa: BLE001 - the transaction's hooks compensated; say where it stands
        return _promotion_refused(store, rid, ref, old_production, f"{type(exc).__name__}: {exc}", actor, fleet)
    _bundle(rid, ref)
    bake_s = settings.release_bake_s
    if old_production is None or bake_s <= 0:
        store.set_status(rid, "promoted", reason)
        return _finish(store, rid, "promoted", reason)
    watch = {"until": time.time() + bake_s, "baseline": watch_baseline(store.get(rid))}
    store.update(rid, lambda doc: doc.update(watch=watch))
    store.set_status(rid, "baking", f"{reason}; watching production for {bake_s:g} s")
    return _bake(store, rid, actor, load, fleet)


def _bake(store: ReleaseStore, rid: str, actor: str, load: bool, fleet: Fleet) -> dict:
    """The watch after promotion: promoted for good, or rolled back on every replica with the numbers."""
    try:
        watched = watch_production(rid, actor, load, fleet)
    except FleetError as exc:  # the rollback itself was refused: the fleet is named in the reason
        store.set_status(rid, "degraded", f"watch rollback failed: {exc}")
        return _finish(store, rid, "degraded", f"watch rollback failed: {exc}")
    store.set_status(rid, watched["outcome"], watched["reason"])
    return _finish(store, rid, watched["outcome"], watched["reason"])


def _promotion_refused(
    store: ReleaseStore, rid: str, ref: str, old_production: str | None, error: str, actor: str, fleet: Fleet
) -> dict:
    """A replica (or the registry) refused the promotion and the transaction's hooks put production back; the
    abort then empties the canary slot everywhere and checks every replica: `aborted` when the fleet agrees again,
    `degraded` naming the replicas that do not."""
    reason = f"promotion of {ref} refused ({error}); promotion undone, production stays {str(old_production)[:19]}"
    status = abort_release(rid, ref, reason, actor, fleet)
    return _finish(store, rid, status, store.get(rid)["log"][-1]["reason"])


def _bundle(rid: str, ref: str) -> None:
    """The promoted version's serving bundle; a failure here is logged, not fatal (the promotion happened)."""
    bundled = build_serving_bundle(rid, ref, return_state=True)
    if not bundled.is_completed():
        get_run_logger().warning(
            "release %s: serving bundle of %s not built (%s); `ryz bundle %s -o DIR` makes one",
            rid,
            ref,
            bundled.message,
            ref,
        )


def _open(store: ReleaseStore, ref: str | None, lease_s: float) -> dict:
    if not ref:
        raise ValueError("release needs a model reference (name:version) or a release_id to resume")
    version = Registry(open_store()).get(ref)
    refuse_pulled(version, "be released")  # before a release document exists: nothing to clean up
    steps = get_settings().release_steps
    return store.create(new_release(version.name, version.version, version.artifact_id, steps), lease_s)


def _production_artifact() -> str | None:
    production = Registry(open_store()).find("production")
    return production.artifact_id if production else None


def _canary_loaded(artifact_id: str, fleet: Fleet) -> bool:
    return all(s["variants"].get("canary", {}).get("ref") == artifact_id for s in fleet.replicas().state())


def _finish(store: ReleaseStore, rid: str, outcome: str, reason: str) -> dict:
    rel = store.drop_lease(rid)
    kind = {"rolled_back": "rolled-back"}.get(outcome, outcome)
    notify_release(kind, rel["name"], rel["version"], reason, rid)
    lines = [f"# Release {rid}: {rel['ref']} {outcome}", "", reason, "", "| when | event | reason |", "|---|---|---|"]
    lines += [f"| {e['time']:.0f} | {e['event']} | {e['reason']} |" for e in rel["log"]]
    create_markdown_artifact(key="release", markdown="\n".join(lines), description=f"{rel['ref']}: {outcome}")
    get_run_logger().info("release %s: %s %s: %s", rid, rel["ref"], outcome, reason)
    return rel
