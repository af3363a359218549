"""Prefect tasks of a release: gates, canary moves on the servers and in the registry, step analysis, promotion.

Every task that changes a server or the registry has an `on_rollback` hook that undoes it, so the
transaction around a release step leaves servers and aliases as they were when anything in the step
fails. Tasks take the release id and step, which key their cache (a retried release never reuses an
aborted attempt's results), and log through the release record what they did and why.
"""

from __future__ import annotations

import time
from contextlib import AbstractContextManager, nullcontext

from prefect import get_run_logger, task
from prefect.transactions import BaseTransaction, Transaction, get_transaction
from pydantic import BaseModel, ConfigDict, SecretStr

from engine.artifacts.registry import Registry
from engine.artifacts.releases import ReleaseStore
from engine.artifacts.store import open_store
from engine.errors import RyzError
from engine.serving.admin import AdminError, Replicas
from engine.serving.canary import Samples, Thresholds, VariantStats, Verdict, compare, decided, snapshot
from engine.settings import Settings, get_settings


class Fleet(BaseModel):
    """The serving replicas a release steers and the admin token they take. The token is a secret: Prefect shows,
    logs and stores it masked; the tasks reach the value only to send it."""

    model_config = ConfigDict(frozen=True)

    servers: list[str]
    admin_token: SecretStr | None = None

    def replicas(self) -> Replicas:
        return Replicas(self.servers, self.admin_token.get_secret_value() if self.admin_token else None)


class FleetError(RyzError, RuntimeError):
    """The fleet is missing, or its replicas disagree and could not be brought in line (each one named)."""


def resolve_fleet(
    servers: list[str] | None = None, admin_token: SecretStr | str | None = None, settings: Settings | None = None
) -> Fleet:
    """The given servers and token, else the settings': RYZ_RELEASE_SERVERS and RYZ_ADMIN_TOKEN. No servers given
    and none set is no fleet, never a guess at this host's port."""
    settings = settings or get_settings()
    if not (servers or settings.release_servers):
        raise FleetError(
            "no serving fleet is configured: set RYZ_RELEASE_SERVERS to the replicas' base URLs "
            '(a JSON list, e.g. ["http://10.0.0.5:8000"]) or pass `servers` to the release flow'
        )
    token = admin_token if admin_token is not None else settings.admin_token
    return Fleet(
        servers=servers or settings.release_servers, admin_token=SecretStr(token) if isinstance(token, str) else token
    )


def fleet_configured(settings: Settings | None = None) -> bool:
    """RYZ_RELEASE_SERVERS is set: the main job releases to those replicas, not to a server of its own."""
    return bool((settings or get_settings()).release_servers)


def bring_in_line(fleet: Fleet, production: str | None, canary: str | None = None, weight: int = 0) -> list[str]:
    """Make every replica hold `production` (None: leave it) and `canary` at `weight`, or an empty canary slot:
    the one compensation every undo uses. It reaches every replica even when some fail.

    Returns:
        the replicas it could not bring in line, each with why (empty: the fleet agrees).
    """
    failed = []
    for client in fleet.replicas().clients:
        try:
            held = {n: v["ref"] for n, v in client.state()["variants"].items()}
            if production and held.get("production") != production:
                client.load("production", production)
            if canary is None and "canary" in held:
                client.set_weight(0)
                client.unload("canary")
            elif canary is not None:
                if held.get("canary") != canary:
                    client.load("canary", canary)
                client.set_weight(weight)
        except AdminError as exc:
            failed.append(str(exc))
    return failed


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
        {"passed", "held", "reason", "checks", "bootstrap"}: bootstrap is true when there is no production yet; held
        when it passed but is better than production on no primary metric (RYZ_RELEASE_POLICY=improve).
    """
    from evaluations.evaluate import load_record
    from evaluations.gates import gate as combine_gates

    settings = get_settings()
    store = open_store()
    reg = Registry(store)
    version = reg.get(ref)
    if version.status == "rejected":
        return {
            "passed": False,
            "held": False,
            "reason": f"{ref} was rejected by the pipeline",
            "checks": [],
            "bootstrap": False,
        }
    if not version.evaluation:
        return {
            "passed": False,
            "held": False,
            "reason": f"{ref} has no evaluation record",
            "checks": [],
            "bootstrap": False,
        }
    record = load_record(version.evaluation, store)
    if not record.get("valid"):
        return {
            "passed": False,
            "reason": "evaluation record invalid: " + "; ".join(record.get("failures", [])),
            "held": False,
            "checks": [],
            "bootstrap": False,
        }
    production = reg.find("production")  # none yet: the floors apply
    baseline = load_record(production.evaluation, store) if production and production.evaluation else None
    gate = combine_gates(record, baseline, settings)
    remeasured = ""
    if production and baseline and _speed_decided(gate):
        # Two records were benchmarked in different sessions; before speed alone rejects a candidate (or alone
        # makes it better), both models run again now, interleaved on this host.
        from engine.artifacts.refs import resolve_model
        from evaluations.evaluate import BENCH_REPEATS, paired_bench

        paths = [resolve_model(v.artifact_id, store) for v in (version, production)]
        fresh = paired_bench(paths, BENCH_REPEATS, None, settings)
        record = {**record, "bench": {**record["bench"], **fresh[0]}}
        baseline = {**baseline, "bench": {**baseline["bench"], **fresh[1]}}
        gate = combine_gates(record, baseline, settings)
        remeasured = f"decode speed re-measured now, interleaved with production ({BENCH_REPEATS} runs each): "
    if production is None:
        reason = ("first model: " + gate.summary()) if gate.passed else gate.summary()
    else:
        reason = remeasured + (
            gate.summary() if not gate.passed else f"offline gates vs production {production.ref}: {gate.summary()}"
        )
    get_run_logger().info("offline gates for %s: %s", ref, reason)
    return {
        "passed": gate.passed,
        "held": gate.held,
        "reason": reason,
        "checks": gate.checks,
        "bootstrap": production is None,
    }


def _speed_decided(gate) -> bool:
    """Speed alone failed the gates, or is the only thing that made the candidate better."""
    if not gate.passed:
        return all(r.startswith("speed: ") for r in gate.reasons)
    return bool(gate.improvements) and all(i.startswith("decode") for i in gate.improvements)


# -- server and registry moves, each undone by its rollback hook ------------------------------------------
@task(name="load-canary")
def load_canary(release_id: str, artifact_id: str, fleet: Fleet) -> None:
    """Load the version into every replica's canary slot (weight stays 0)."""
    _remember(release_id, fleet)
    releases().set_fleet(release_id, canary=artifact_id, weight=0)  # before the loads: a replica restarting now joins
    fleet.replicas().load("canary", artifact_id)
    releases().log(release_id, "canary-loaded", f"canary {artifact_id[:19]} loaded on the servers")


@load_canary.on_rollback
def _unload_canary(txn: Transaction) -> None:
    failed = bring_in_line(txn.get("fleet"), None)
    releases().set_fleet(txn.get("release_id"), canary=None, weight=0)
    _note_rollback(txn, "canary weight 0 and canary unloaded" + (f"; NOT on {'; '.join(failed)}" if failed else ""))


@task(name="set-canary-weight")
def set_canary_weight(release_id: str, step: int, weight: int, fleet: Fleet) -> None:
    """Send `weight` percent of routed traffic to the canary on every replica."""
    _remember(release_id, fleet)
    releases().set_fleet(release_id, weight=weight)
    fleet.replicas().set_weight(weight)
    releases().log(release_id, "weight", f"canary weight {weight}%", step=step)


@set_canary_weight.on_rollback
def _weight_to_zero(txn: Transaction) -> None:
    failed = txn.get("fleet").replicas().try_each("set_weight", 0)  # a 409 means that replica has no canary left
    releases().set_fleet(txn.get("release_id"), weight=0)
    _note_rollback(txn, "canary weight back to 0" + (f" (not answered: {'; '.join(failed)})" if failed else ""))


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
    releases().set_fleet(release_id, canary=None, weight=0)


@promote_on_servers.on_rollback
def _restore_production(txn: Transaction) -> None:
    """On every replica, also those that did promote before another refused (a split fleet is never left)."""
    artifact = txn.get("old_production_artifact")
    failed = bring_in_line(txn.get("fleet"), artifact, canary=None) if artifact else []
    note = f"; NOT on {'; '.join(failed)}" if failed else ""
    _note_rollback(txn, f"servers' production restored to {artifact[:19] if artifact else 'nothing'}{note}")


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


def _observe_window(
    release_id: str,
    group: Replicas,
    thresholds: Thresholds,
    weight: int,
    synthetic_load: bool,
    fleet: Fleet,
    settings: Settings,
) -> tuple[str | None, Verdict]:
    """One window of a step: wait for enough canary requests (or the deadline, or a pause/abort request), then
    compare the variants on what the window saw. Returns (paused|aborted by request, else None; the verdict)."""
    store = releases()
    # Each replica's own clock opens the step's window of per-request figures: hosts' clocks need not agree.
    starts = [answer["now"] for answer in group.samples(time.time())]
    before = [snapshot(text) for text in group.metrics()]
    load = synthetic_traffic(fleet, synthetic_load, settings.release_step_timeout)
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
    answers = [client.samples(since) for client, since in zip(group.clients, starts)]
    verdict = compare(
        _sum(after, "canary").minus(_sum(before, "canary")),
        _sum(after, "production").minus(_sum(before, "production")),
        thresholds,
        weight,
        canary_samples=Samples.merge(answers, "canary"),
        production_samples=Samples.merge(answers, "production"),
    )
    return outcome, verdict


@task(name="observe-canary-step")
def observe_canary_step(
    release_id: str, ref: str, actor: str, step: int, weight: int, synthetic_load: bool, fleet: Fleet
) -> dict:
    """Wait for enough canary requests (or the deadline, or a pause/abort request), then compare the variants;
    a window failing on latency alone is followed by a fresh one, up to RYZ_RELEASE_LATENCY_WINDOWS in all.

    Returns:
        {"outcome": pass|fail|inconclusive|paused|aborted, "reasons", "canary", "production"}.
    """
    settings = get_settings()
    group = fleet.replicas()
    store = releases()
    thresholds = Thresholds(
        min_requests=settings.release_min_requests,
        max_error_rate_delta=settings.release_error_margin,
        max_ttft_ratio=settings.release_ttft_ratio,
        min_speed_ratio=settings.release_speed_ratio,
        min_samples=settings.release_min_samples,
    )
    windows = settings.release_latency_windows
    latency_failures = []  # the summaries of windows that failed on latency alone
    for window in range(1, windows + 1):
        outcome, verdict = _observe_window(release_id, group, thresholds, weight, synthetic_load, fleet, settings)
        if outcome is not None or verdict.outcome != "fail" or not verdict.latency_only:
            break
        latency_failures.append(verdict.summary())
        if window < windows:
            note = f"window {window} of {windows} failed on latency alone: {verdict.summary()}"
            store.log(release_id, "step-retry", note)
    if outcome is None and latency_failures:
        if verdict.outcome == "fail" and verdict.latency_only:
            verdict.reasons.append(f"latency failed in each of {windows} windows")
        else:
            earlier = " | ".join(latency_failures)
            verdict.reasons.append(f"{len(latency_failures)} earlier window(s) failed on latency alone: {earlier}")
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


# -- the watch after promotion ---------------------------------------------------------------------------------
def synthetic_traffic(fleet: Fleet, on: bool, deadline_s: float) -> AbstractContextManager[object]:
    """Bounded synthetic load spread over every replica, when asked; else nothing (real traffic only)."""
    if not on:
        return nullcontext()
    from engine.serving.loadgen import SyntheticLoad

    settings = get_settings()
    return SyntheticLoad(
        fleet.servers,
        settings.served_model_name,
        _load_prompts(),
        settings.release_load_concurrency,
        api_key=_first_api_key(settings),
        deadline_s=deadline_s,
    )


def watch_baseline(rel: dict) -> dict:
    """The previous production's figures while it served beside the canary (most of the traffic at the 5/25/50 %
    steps): request-weighted over the steps the release logged."""
    rows = [e["production"] for e in rel["log"] if e["event"].startswith("step-") and e.get("production")]
    requests = sum(r["requests"] for r in rows)

    def weighted(key: str) -> float | None:
        pairs = [(r[key], r["requests"]) for r in rows if r.get(key) is not None and r["requests"]]
        total = sum(n for _, n in pairs)
        return sum(v * n for v, n in pairs) / total if total else None

    return {
        "requests": requests,
        "error_rate": sum(r["errors"] for r in rows) / requests if requests else 0.0,
        "ttft_p95_ms": weighted("ttft_p95_ms"),
        "decode_tok_s": weighted("decode_tok_s"),
    }


def regressions(seen: VariantStats, samples: Samples, baseline: dict, settings: Settings) -> list[str]:
    """Why production, as watched (counts from /metrics, latency from its per-request figures), is worse than the
    previous production's figures beyond the watch's thresholds."""
    found, ratio, n = [], settings.release_watch_latency_ratio, int(seen.requests)
    limit = baseline["error_rate"] + settings.release_watch_error_margin
    if seen.error_rate > limit:
        found.append(
            f"error rate {seen.error_rate:.1%} > previous {baseline['error_rate']:.1%} + "
            f"{settings.release_watch_error_margin:.1%} over {n} requests"
        )
    p95, before = samples.ttft_p95_ms, baseline["ttft_p95_ms"]
    if p95 is not None and before and p95 > ratio * before:
        found.append(f"p95 TTFT {p95:.0f} ms > {ratio} x previous {before:.0f} ms over {len(samples.ttft)} requests")
    speed, before = samples.decode_tok_s, baseline["decode_tok_s"]
    if speed and before and 1 / speed > ratio / before:
        found.append(
            f"decode {speed:.1f} tok/s: time per token over {ratio} x previous ({before:.1f} tok/s) over "
            f"{len(samples.tpot)} requests"
        )
    return found


@task(name="watch-production")
def watch_production(release_id: str, actor: str, synthetic_load: bool, fleet: Fleet) -> dict:
    """After a promotion, watch production on every replica until the bake period (its `watch.until`) has passed
    and RYZ_RELEASE_BAKE_MIN_REQUESTS requests were answered; on a regression against the previous production's
    figures (`watch.baseline`), roll back to `previous` on every replica.

    Returns:
        {"outcome": "promoted" | "rolled_back", "reason"}: the reason carries the numbers.
    """
    settings = get_settings()
    store = releases()
    watch = store.get(release_id)["watch"]
    group = fleet.replicas()
    before = _sum([snapshot(t) for t in group.metrics()], "production")
    starts = [answer["now"] for answer in group.samples(time.time())]  # each replica's own clock
    give_up = watch["until"] + settings.release_step_timeout  # too little traffic: stop watching, say so
    with synthetic_traffic(fleet, synthetic_load, max(1.0, give_up - time.time())):
        while True:
            time.sleep(0.5)
            doc = store.heartbeat(release_id)  # renews the lease: a dead watcher is seen and resumed
            seen = _sum([snapshot(t) for t in group.metrics()], "production").minus(before)
            samples = Samples.merge([c.samples(t) for c, t in zip(group.clients, starts)], "production")
            enough = seen.requests >= settings.release_min_requests
            found = regressions(seen, samples, watch["baseline"], settings) if enough else []
            if doc["status"] == "abort_requested":
                found = ["rollback requested during the watch"]
            if found:
                reason = f"watch after promotion: {'; '.join(found)}; rolled back to previous"
                back = rollback_production(actor, reason, fleet)
                store.log(release_id, "watch-regressed", reason, production=back["production"])
                return {"outcome": "rolled_back", "reason": reason}
            now, n = time.time(), int(seen.requests)
            if now >= watch["until"] and n >= settings.release_bake_min_requests:
                return {
                    "outcome": "promoted",
                    "reason": f"watched {n} production requests for the bake period: error rate "
                    f"{seen.error_rate:.1%}, p95 TTFT {_ms(samples.ttft_p95_ms)}, "
                    f"decode {_rate(samples.decode_tok_s)}; no regression against the previous production",
                }
            if now >= give_up:
                return {
                    "outcome": "promoted",
                    "reason": f"watch ended unjudged: {n} production requests by the end of the bake period "
                    f"(need {settings.release_bake_min_requests}); production kept",
                }


def _ms(ms: float | None) -> str:
    return "n/a" if ms is None else f"{ms:.0f} ms"


def _rate(tok_s: float | None) -> str:
    return "n/a" if tok_s is None else f"{tok_s:.1f} tok/s"


# -- outcomes -------------------------------------------------------------------------------------------------
def abort_actions(release_id: str, ref: str, reason: str, actor: str, fleet: Fleet) -> str:
    """Canary weight 0 and unloaded on every replica, each holding the registry's production; registry status
    rolled_back (production untouched); release aborted, or `degraded` naming the replicas that could not be
    brought in line (`ryz release abort` again retries them).

    Returns:
        the release's new status.
    """
    reg = registry(actor)
    production = reg.find("production")
    if releases().get(release_id).get("watch"):  # promoted, in its bake period: aborting it is a rollback
        if production and production.ref == ref:
            rollback_production(actor, reason, fleet)
        releases().set_status(release_id, "rolled_back", reason)
        return "rolled_back"
    failed = bring_in_line(fleet, production.artifact_id if production else None, canary=None)
    releases().set_fleet(release_id, canary=None, weight=0)
    canary = reg.aliases().get("canary")
    if canary and f"{canary['name']}:{canary['version']}" == ref:
        reg.set_alias("canary", None, f"release {release_id} aborted")
    if reg.get(ref).status != "rolled_back":
        reg.set_status(ref, "rolled_back", reason)
    if failed:
        why = f"{reason}; replicas not brought in line: {'; '.join(failed)}; `ryz release abort` retries them"
        releases().set_status(release_id, "degraded", why)
        return "degraded"
    releases().set_status(release_id, "aborted", reason)
    return "aborted"


@task(name="abort-release")
def abort_release(release_id: str, ref: str, reason: str, actor: str, fleet: Fleet) -> str:
    """Abort: see abort_actions. Returns the release's new status (aborted, or degraded)."""
    status = abort_actions(release_id, ref, reason, actor, fleet)
    get_run_logger().warning("release %s of %s %s: %s", release_id, ref, status, reason)
    return status


@task(name="hold-version")
def hold_version(release_id: str, ref: str, reason: str, actor: str) -> None:
    """Passed the gates but is not better than production: registered as held with the numbers, not released."""
    registry(actor).set_status(ref, "held", reason)
    releases().set_status(release_id, "held", reason)
    get_run_logger().info("%s held: %s", ref, reason)


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
    failed = bring_in_line(fleet, back.artifact_id)
    if failed:  # all or nothing: put every replica back on `before`, and the registry with them
        stuck = bring_in_line(fleet, before.artifact_id)
        reg.update(
            lambda state: state["aliases"].update(
                {
                    "production": {"name": before.name, "version": before.version},
                    "previous": {"name": back.name, "version": back.version},
                }
            ),
            "undoing a rollback the servers refused",
        )
        raise FleetError(
            f"rollback to {back.ref} refused by {'; '.join(failed)}; production stays {before.ref}"
            + (f"; NOT restored on {'; '.join(stuck)}" if stuck else " on every replica")
        )
    # The replicas load the version's model artifact: the same bytes as its bundle's model.gguf (content-addressed);
    # hosts deployed from bundles redeploy `bundle` itself (`ryz bundle previous -o DIR` fetches it byte for byte).
    return {"production": back.ref, "rolled_back": before.ref, "bundle": (back.extra or {}).get("bundle")}
