"""Release records: where each release of a model version stands, in the store (CAS documents).

One document per release (`releases/<id>`): the version, the steps, the next step to run, the status
and a log of what happened with the numbers. A paused release resumes from its recorded step; a
retried release after an abort is a new document with a new id, so nothing of the aborted attempt
(cached task results included: tasks are keyed on the release id) is reused.

Statuses: `gating` -> `canary` -> (`baking` ->) `promoted`, or `rejected` (offline gates), `held` (passed
the gates but not better than production under RYZ_RELEASE_POLICY=improve: not released), `paused`
(inconclusive or by hand), `aborted` (failed step, a promotion some replica refused, or by hand),
`rolled_back` (the watch after promotion saw production regress and restored `previous`), `degraded` (a
replica could not be brought in line with the others: named in the log; `ryz release abort` retries), `failed`
(an error the flow could not handle; the transaction undid the step). `pause_requested` / `abort_requested` are
set by the CLI while a flow runs and honoured by it at the next check.

`fleet` records what the release has put on the replicas (`canary`: artifact id or None, `weight`): a replica
that restarts reads it to rejoin in that state (engine/serving/follow.py).

Leases: the flow running a release holds a lease in its document (`lease`: owner and heartbeat, renewed while it
waits on traffic). A release in a state that needs a running flow (`OWNED`) whose lease is older than
RYZ_RELEASE_LEASE_S is stale: its flow died. `ryz release abort` then performs the abort itself and
`ryz release resume` continues it from its recorded step (docs/release.md "When a release's flow dies").
"""

from __future__ import annotations

import time
import uuid

from engine.errors import ConflictError, ModelReferenceError, SchemaVersionError

SCHEMA = 1
PREFIX = "releases/"
STARTING_S = 60.0  # a pointer without its document yet: a start in progress, unless it is older than this
CURRENT = "release-current"  # {"id"} of the release that last started: the one compare-and-swap that starts one
ACTIVE = ("gating", "canary", "baking", "paused", "pause_requested", "abort_requested", "degraded")
OWNED = ("gating", "canary", "baking", "pause_requested", "abort_requested")  # statuses a running flow moves on


def stale_for(doc: dict, ttl: float, now: float | None = None) -> float | None:
    """Seconds since the last heartbeat of a release whose flow should be running but is not; None when its
    state needs no flow or its lease is live."""
    if doc["status"] not in OWNED:
        return None
    lease = doc.get("lease")
    since = (now or time.time()) - (lease["heartbeat"] if lease else doc["updated"])
    return since if since >= ttl else None


def new_release(name: str, version: int, artifact_id: str, steps: list[int]) -> dict:
    now = time.time()
    return {
        "schema": SCHEMA,
        "id": f"{name.replace('/', '--')}-{version}-{uuid.uuid4().hex[:8]}",
        "name": name,
        "version": version,
        "ref": f"{name}:{version}",
        "artifact_id": artifact_id,
        "steps": steps,
        "step_index": 0,
        "status": "gating",
        "created": now,
        "updated": now,
        "log": [],
    }


class ReleaseStore:
    def __init__(self, store):
        self.store = store

    def create(self, doc: dict, lease_s: float = 60.0) -> dict:
        """Start a release, unless one is active. Racing starts are decided by one compare-and-swap of the
        `release-current` pointer: exactly one wins, the others get a ConflictError naming it."""
        current, etag = self.store.read_document(CURRENT)
        active = self._get_or_none(current["id"]) if current else self.active()  # no pointer: older stores
        if current and active is None and time.time() - current["time"] < STARTING_S:
            raise ConflictError(f"release {current['id']} of {current['ref']} is starting; `ryz release status`")
        if active is not None and active["status"] in ACTIVE:
            dead = stale_for(active, lease_s)
            raise ConflictError(
                f"release {active['id']} of {active['ref']} is {active['status']}"
                + (f" and its flow has not been seen for {dead:.0f} s" if dead else "")
                + ": finish it first (`ryz release resume`, `promote` or `abort`)"
            )
        try:
            self.store.write_document(CURRENT, {"id": doc["id"], "ref": doc["ref"], "time": time.time()}, etag)
        except ConflictError:
            winner, _ = self.store.read_document(CURRENT)
            raise ConflictError(
                f"release {winner['id'] if winner else '?'} of {winner['ref'] if winner else '?'} started at the "
                f"same moment and won; `ryz release status` shows it"
            ) from None
        self.store.write_document(PREFIX + doc["id"], doc, None)
        return doc

    def _get_or_none(self, release_id: str) -> dict | None:
        doc, _ = self.store.read_document(PREFIX + release_id)
        return doc

    def get(self, release_id: str) -> dict:
        doc = self._get_or_none(release_id)
        if doc is None:
            raise ModelReferenceError(f"no release {release_id!r}; `ryz release status` shows the latest")
        if doc.get("schema") != SCHEMA:
            raise SchemaVersionError(
                f"release {release_id} has schema {doc.get('schema')!r}; this version reads {SCHEMA}"
            )
        return doc

    def all(self) -> list[dict]:
        docs = [self.store.read_document(k)[0] for k in self.store.list_documents(PREFIX)]
        return sorted((d for d in docs if d), key=lambda d: d["created"])

    def latest(self) -> dict | None:
        docs = self.all()
        return docs[-1] if docs else None

    def active(self) -> dict | None:
        return next((d for d in reversed(self.all()) if d["status"] in ACTIVE), None)

    def take_lease(self, release_id: str, owner: str, ttl: float) -> dict:
        """Hold the release for `owner` (a flow run starting or resuming it); ConflictError if another owner's
        lease is live."""

        def change(doc: dict) -> None:
            lease = doc.get("lease")
            if lease and lease["owner"] != owner and stale_for(doc, ttl) is None and doc["status"] in OWNED:
                raise ConflictError(
                    f"release {release_id} is run by {lease['owner']} (heartbeat "
                    f"{time.time() - lease['heartbeat']:.0f} s ago); wait for it, or `ryz release pause` / `abort`"
                )
            doc["lease"] = {"owner": owner, "heartbeat": time.time()}

        return self.update(release_id, change)

    def drop_lease(self, release_id: str) -> dict:
        """The flow is done with the release (it finished, paused or ended it)."""
        return self.update(release_id, lambda doc: doc.update(lease=None))

    def heartbeat(self, release_id: str) -> dict:
        """Renew the lease (the flow holding it calls this while it waits); returns the document."""

        def change(doc: dict) -> None:
            if doc.get("lease"):
                doc["lease"]["heartbeat"] = time.time()

        return self.update(release_id, change)

    def update(self, release_id: str, change) -> dict:
        """Apply `change(doc)` with compare-and-swap (re-read and re-apply on a lost race)."""
        for _ in range(8):
            doc, etag = self.store.read_document(PREFIX + release_id)
            if doc is None:
                raise ModelReferenceError(f"no release {release_id!r}")
            change(doc)
            doc["updated"] = time.time()
            try:
                self.store.write_document(PREFIX + release_id, doc, etag)
                return doc
            except ConflictError:
                continue
        raise ConflictError(f"release {release_id}: 8 compare-and-swap races lost in a row")

    def set_fleet(self, release_id: str, **held) -> dict:
        """Record what the replicas now hold for this release (`canary`: artifact id or None, `weight`): what a
        restarting replica rejoins to."""
        return self.update(
            release_id,
            lambda doc: doc.__setitem__("fleet", {"canary": None, "weight": 0, **doc.get("fleet", {}), **held}),
        )

    def log(self, release_id: str, event: str, reason: str, **fields) -> dict:
        def change(doc):
            doc["log"].append({"time": time.time(), "event": event, "reason": reason, **fields})

        return self.update(release_id, change)

    def set_status(self, release_id: str, status: str, reason: str, **fields) -> dict:
        def change(doc):
            doc["status"] = status
            doc["log"].append({"time": time.time(), "event": status, "reason": reason, **fields})

        return self.update(release_id, change)
