"""Prefect tasks of a release: gates, canary moves on the servers and in the registry, step analysis, promotion.

Every task that changes a server or the registry has an `on_rollback` hook that undoes it, so the
transaction around a release step leaves servers and aliases as they were when anything in the step
fails. Tasks take the release id and step, which key their cache (a retried release never reuses an
aborted attempt's results), and log through the release record what they did and why.
"""

from __future__ import annotations

import time

from prefect import get_run_logger, task
from prefect.transactions import BaseTransaction, Transaction, get_transaction
from pydantic import BaseModel, ConfigDict, SecretStr

from engine.artifacts.registry import Registry
from engine.artifacts.releases import ReleaseStore
from engine.artifacts.store import open_store
from engine.serving.admin import Replicas
from engine.serving.canary import Thresholds, VariantStats, compare, decided, snapshot
from engine.settings import Settings, get_settings


class Fleet(BaseModel):
    """The serving replicas a release steers and the admin token they take. The token is a secret: Prefect shows,
    logs and stores it masked; the tasks reach the value only to send it."""

    model_config = ConfigDict(frozen=True)

    servers: list[str]
    admin_token: SecretStr | None = None

    def replicas(self) -> Replicas:
        return Replicas(self.servers, self.admin_token.get_secret_value() if self.admin_token else None)


def resolve_fleet(
    servers: list[str] | None = None, admin_token: SecretStr | str | None = None, settings: Settings | None = None
) -> Fleet:
    """The given servers and token, else the settings': RYZ_RELEASE_SERVERS (else this host's RYZ_HOST:RYZ_PORT)
    and RYZ_ADMIN_TOKEN."""
    settings = settings or get_settings()
    token = admin_token if admin_token is not None else settings.admin_token
    return Fleet(
        servers=servers or settings.release_servers or [f"http://{settings.host}:{settings.port}"],
        admin_token=SecretStr(token) if isinstance(token, str) else token,
    )


def registry(actor: str) -> Registry:
    return Registry(open_store(), actor=actor)


def releases() -> ReleaseStore:
    return ReleaseStore(open_store())


def _transaction() -> BaseTransaction:
    """The transaction this task runs in (Prefect opens one around every task run): its rollback hook reads it."""
    txn = get_transaction()
    if txn is None:
        raise RuntimeError("no active Prefect transaction: release tasks must run as Prefect tasks")
    return txn


def _remember(release_id: str, fleet: Fleet) -> BaseTransaction:
    """What the step's rollback hooks need: the release to log to and the fleet to undo on."""
    txn = _transaction()
    txn.set("release_id", release_id)
    txn.set("fleet", fleet)
    return txn


def _note_rollback(txn: Transaction, what: str) -> None:
    release_id = txn.get("release_id", None)
    if release_id:
        releases().log(release_id, "rollback-hook", f"transaction rolled back: {what}")


# -- offline gates ----------------------------------------------------------------------------------------
@task(name="check-offline-gates")
def check_offline_gates(release_id: str, ref: str) -> dict:
    """Parity, then accuracy and speed against production's record (or the floors for the first model).

    Returns:
        {"passed", "reason", "checks", "bootstrap"}: bootstrap is true when there is no production yet.
    """
    from evaluations.evaluate import load_record
    from evaluations.gates import gate as combine_gates

    settings = get_settings()
    store = open_store()
    reg = Registry(store)
    version = reg.get(ref)
    if version.status == "rejected":
        return {"passed": False, "reason": f"{ref} was rejected by the pipeline", "checks": [], "bootstrap": False}
    if not version.evaluation:
        return {"passed": False, "reason": f"{ref} has no evaluation record", "checks": [], "bootstrap": False}
    record = load_record(version.evaluation, store)
    if not record.get("valid"):
        return {
            "passed": False,
            "reason": "evaluation record invalid: " + "; ".join(record.get("failures", [])),
            "checks": [],
            "bootstrap": False,
        }
    production = reg.find("production")  # none yet: the floors apply
    baseline = load_record(production.evaluation, store) if production and production.evaluation else None
    gate = combine_gates(record, baseline, settings)
    if production is None:
        reason = ("first model: " + gate.summary()) if gate.passed else gate.summary()
    else:
        reason = (
            gate.summary() if not gate.passed else f"offline gates vs production {production.ref}: {gate.summary()}"
        )
    get_run_logger().info("offline gates for %s: %s", ref, reason)
    return {"passed": gate.passed, "reason": reason, "checks": gate.checks, "bootstrap": production is None}


# -- server and registry moves, each undone by its rollback hook ------------------------------------------
@task(name="load-canary")
def load_canary(release_id: str, artifact_id: str, fleet: Fleet) -> None:
    """Load the version into every replica's canary slot (weight stays 0)."""
    _remember(release_id, fleet)
    fleet.replicas().load("canary", artifact_id)
    releases().log(release_id, "canary-loaded", f"canary {artifact_id[:19]} loaded on the servers")


@load_canary.on_rollback
def _unload_canary(txn: Transaction) -> None:
    group = txn.get("fleet").replicas()
    for action in (lambda: group.set_weight(0), lambda: group.unload("canary")):
        try:
            action()
        except Exception:  # noqa: BLE001 - a replica without a canary is already undone
            pass
    _note_rollback(txn, "canary weight 0 and canary unloaded")


@task(name="set-canary-weight")
def set_canary_weight(release_id: str, step: int, weight: int, fleet: Fleet) -> None:
    """Send `weight` percent of routed traffic to the canary on every replica."""
    _remember(release_id, fleet)
    fleet.replicas().set_weight(weight)
    releases().log(release_id, "weight", f"canary weight {weight}%", step=step)


@set_canary_weight.on_rollback
def _weight_to_zero(txn: Transaction) -> None:
    try:
        txn.get("fleet").replicas().set_weight(0)
    except Exception:  # noqa: BLE001 - canary already gone
        pass
    _note_rollback(txn, "canary weight back to 0")


@task(name="mark-canary")
def mark_canary(release_id: str, ref: str, actor: str) -> None:
    """Registry: alias `canary` -> ref, status canary."""
    txn = _transaction()
    txn.set("release_id", release_id)
    reg = registry(actor)
    txn.set("previous_canary", reg.aliases().get("canary"))
    txn.set("ref", ref)
    txn.set("actor", actor)
    reg.set_alias("canary", ref, f"release {release_id}: canary steps start")
    reg.set_status(ref, "canary", f"release {release_id}: in canary")


@mark_canary.on_rollback
def _unmark_canary(txn: Transaction) -> None:
    reg = registry(txn.get("actor"))
    previous = txn.get("previous_canary")
    reason = "transaction rollback: canary step undone"
    reg.set_alias("canary", f"{previous['name']}:{previous['version']}" if previous else None, reason)
    reg.set_status(txn.get("ref"), "candidate", reason)
    _note_rollback(txn, "registry canary alias and status restored")


@task(name="ensure-production-served")
def ensure_production_served(release_id: str, artifact_id: str, fleet: Fleet) -> None:
    """A replica that (re)started without the registry's production loads it, so the canary has a baseline."""
    group = fleet.replicas()
    for client, state in zip(group.clients, group.state()):
        if state["variants"].get("production", {}).get("ref") != artifact_id:
            client.load("production", artifact_id)
            releases().log(
                release_id, "production-loaded", f"{client.base_url} had no production: loaded {artifact_id[:19]}"
            )


@task(name="promote-on-servers")
def promote_on_servers(release_id: str, old_production_artifact: str | None, fleet: Fleet) -> None:
    """The canary's engine becomes production on every replica; the canary slot empties."""
    _remember(release_id, fleet).set("old_production_artifact", old_production_artifact)
    fleet.replicas().promote()


@promote_on_servers.on_rollback
def _restore_production(txn: Transaction) -> None:
    artifact = txn.get("old_production_artifact")
    if artifact:
        txn.get("fleet").replicas().load("production", artifact)
    _note_rollback(txn, f"servers' production restored to {artifact[:19] if artifact else 'nothing'}")


@task(name="load-production")
def load_production(release_id: str, artifact_id: str, old_production_artifact: str | None, fleet: Fleet) -> None:
    """Load a version straight into production (first model, or a rollback)."""
    _remember(release_id, fleet).set("old_production_artifact", old_production_artifact)
    fleet.replicas().load("production", artifact_id)


load_production.on_rollback(_restore_production)


@task(name="promote-in-registry")
def promote_in_registry(release_id: str, ref: str, reason: str, actor: str) -> None:
    """Registry: previous <- production, production <- ref (one compare-and-swap write)."""
    txn = _transaction()
    txn.set("release_id", release_id)
    txn.set("actor", actor)
    txn.set("promoted", registry(actor).promote(ref, reason))


@promote_in_registry.on_rollback
def _restore_aliases(txn: Transaction) -> None:
    changed = txn.get("promoted", None)
    if not changed:  # the promotion itself failed: nothing to undo
        return
    kept = registry(txn.get("actor")).undo(changed, "transaction rollback: promotion undone")
    note = f"; left as others changed them: {', '.join(kept)}" if kept else ""
    _note_rollback(txn, f"registry aliases and statuses restored{note}")


# -- analysis -----------------------------------------------------------------------------------------------
def _sum(stats: list[dict[str, VariantStats]], variant: str) -> VariantStats:
    total = VariantStats()
    for s in stats:
        v = s.get(variant)
        if v is None:
            continue
        total.requests += v.requests
        total.errors += v.errors
        total.client_errors += v.client_errors
        total.tpot_sum += v.tpot_sum
        total.tpot_count += v.tpot_count
        for le, c in v.ttft_buckets.items():
            total.ttft_buckets[le] = total.ttft_buckets.get(le, 0.0) + c
        for le, c in v.tpot_buckets.items():
            total.tpot_buckets[le] = total.tpot_buckets.get(le, 0.0) + c
    return total


@task(name="observe-canary-step")
def observe_canary_step(
    release_id: str, ref: str, actor: str, step: int, weight: int, synthetic_load: bool, fleet: Fleet
) -> dict:
    """Wait for enough canary requests (or the deadline, or a pause/abort request), then compare the variants.

    Returns:
        {"outcome": pass|fail|inconclusive|paused|aborted, "reasons", "canary", "production"}.
    """
    from contextlib import AbstractContextManager, nullcontext

    settings = get_settings()
    group = fleet.replicas()
    store = releases()
    thresholds = Thresholds(
        settings.release_min_requests,
        settings.release_error_margin,
        settings.release_ttft_ratio,
        settings.release_speed_ratio,
        settings.release_ttft_min_delta_ms,
        settings.release_tpot_min_delta_ms,
    )
    before = [snapshot(text) for text in group.metrics()]
    load: AbstractContextManager[object] = nullcontext()
    if synthetic_load:
        from engine.serving.loadgen import SyntheticLoad

        load = SyntheticLoad(
            group.clients[0].base_url,
            settings.served_model_name,
            _load_prompts(),
            settings.release_load_concurrency,
            api_key=_first_api_key(settings),
            deadline_s=settings.release_step_timeout,
        )
    deadline = time.monotonic() + settings.release_step_timeout
    outcome = None
    with load:
        while time.monotonic() < deadline:
            time.sleep(0.5)
            status = store.heartbeat(release_id)["status"]  # renews the flow's lease while it waits
            if status in ("pause_requested", "abort_requested"):
                outcome = status.removesuffix("_requested").replace("pause", "paused").replace("abort", "aborted")
                break
            now = [snapshot(text) for text in group.metrics()]
            canary_now = _sum(now, "canary").minus(_sum(before, "canary"))
            if decided(canary_now, _sum(now, "production").minus(_sum(before, "production")), thresholds):
                break
    after = [snapshot(text) for text in group.metrics()]
    verdict = compare(
        _sum(after, "canary").minus(_sum(before, "canary")),
        _sum(after, "production").minus(_sum(before, "production")),
        thresholds,
        weight,
    )
    result = {
        "outcome": outcome or verdict.outcome,
        "reasons": verdict.reasons if outcome is None else [f"{outcome} by request"],
        "canary": verdict.canary,
        "production": verdict.production,
    }
    store.log(
        release_id,
        f"step-{result['outcome']}",
        "; ".join(result["reasons"]),
        step=step,
        weight=weight,
        canary=verdict.canary,
        production=verdict.production,
    )
    registry(actor).note(ref, f"canary-{weight}%:{result['outcome']}", "; ".join(result["reasons"]), release=release_id)
    get_run_logger().info("step %d%%: %s: %s", weight, result["outcome"], "; ".join(result["reasons"]))
    return result


def _first_api_key(settings: Settings) -> str | None:
    keys = [k.strip() for k in (settings.api_keys or "").split(",") if k.strip()]
    return keys[0] if keys else None


def _load_prompts() -> list[str]:
    """Prompts from the demo gate tasks (the suite the candidates were judged on), else fixed sentences."""
    import json
    from pathlib import Path

    prompts = []
    for path in sorted((Path(__file__).resolve().parents[1] / "evaluations" / "tasks" / "demo").glob("*.jsonl")):
        with path.open() as handle:
            for line in handle:
                item = json.loads(line)
                text = item.get("prompt") or item.get("question") or item.get("context") or item.get("text")
                if isinstance(text, str) and text.strip():
                    prompts.append(text[:400])
                if len(prompts) >= 200:
                    return prompts
    return prompts or ["The quick brown fox", "Once upon a time", "def add(a, b):", "2 + 3 ="]


# -- outcomes -------------------------------------------------------------------------------------------------
def abort_actions(release_id: str, ref: str, reason: str, actor: str, fleet: Fleet) -> None:
    """Canary weight 0 and unloaded everywhere, registry status rolled_back (production untouched), release aborted."""
    group = fleet.replicas()
    for action in (lambda: group.set_weight(0), lambda: group.unload("canary")):
        try:
            action()
        except Exception:  # noqa: BLE001 - nothing to undo on that replica
            pass
    reg = registry(actor)
    canary = reg.aliases().get("canary")
    if canary and f"{canary['name']}:{canary['version']}" == ref:
        reg.set_alias("canary", None, f"release {release_id} aborted")
    reg.set_status(ref, "rolled_back", reason)
    releases().set_status(release_id, "aborted", reason)


@task(name="abort-release")
def abort_release(release_id: str, ref: str, reason: str, actor: str, fleet: Fleet) -> None:
    """Abort: see abort_actions."""
    abort_actions(release_id, ref, reason, actor, fleet)
    get_run_logger().warning("release %s of %s aborted: %s", release_id, ref, reason)


@task(name="reject-version")
def reject_version(release_id: str, ref: str, reason: str, actor: str) -> None:
    """Offline gates failed: the version is rejected with the reason; servers are not touched."""
    registry(actor).set_status(ref, "rejected", reason)
    releases().set_status(release_id, "rejected", reason)
    get_run_logger().warning("%s rejected: %s", ref, reason)


def rollback_production(actor: str, reason: str, fleet: Fleet) -> dict:
    """Undo the last promotion: `previous` serves as production again (registry and every replica)."""
    reg = registry(actor)
    before = reg.get("production")
    back = reg.rollback(reason)
    try:
        fleet.replicas().load("production", back.artifact_id)
    except Exception:
        reg.update(
            lambda state: state["aliases"].update(
                {
                    "production": {"name": before.name, "version": before.version},
                    "previous": {"name": back.name, "version": back.version},
                }
            ),
            "undoing a rollback the servers refused",
        )
        raise
    # The replicas load the version's model artifact: the same bytes as its bundle's model.gguf (content-addressed);
    # hosts deployed from bundles redeploy `bundle` itself (`ryz bundle previous -o DIR` fetches it byte for byte).
    return {"production": back.ref, "rolled_back": before.ref, "bundle": (back.extra or {}).get("bundle")}
