"""Release records: where each release of a model version stands, in the store (CAS documents).

One document per release (`releases/<id>`): the version, the steps, the next step to run, the status
and a log of what happened with the numbers. A paused release resumes from its recorded step; a
retried release after an abort is a new document with a new id, so nothing of the aborted attempt
(cached task results included: tasks are keyed on the release id) is reused.

Statuses: `gating` -> `canary` -> `promoted`, or `rejected` (offline gates), `paused` (inconclusive or
by hand), `aborted` (failed step or by hand), `failed` (an error the flow could not handle; the
transaction undid the step). `pause_requested` / `abort_requested` are set by the CLI while a flow runs
and honoured by it at the next check.
"""

from __future__ import annotations

import time
import uuid

from engine.errors import ConflictError, ModelReferenceError, SchemaVersionError

SCHEMA = 1
PREFIX = "releases/"
STARTING_S = 60.0  # a pointer without its document yet: a start in progress, unless it is older than this
CURRENT = "release-current"  # {"id"} of the release that last started: the one compare-and-swap that starts one
ACTIVE = ("gating", "canary", "paused", "pause_requested", "abort_requested")


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

    def create(self, doc: dict) -> dict:
        """Start a release, unless one is active. Racing starts are decided by one compare-and-swap of the
        `release-current` pointer: exactly one wins, the others get a ConflictError naming it."""
        current, etag = self.store.read_document(CURRENT)
        active = self._get_or_none(current["id"]) if current else self.active()  # no pointer: older stores
        if current and active is None and time.time() - current["time"] < STARTING_S:
            raise ConflictError(f"release {current['id']} of {current['ref']} is starting; `ryz release status`")
        if active is not None and active["status"] in ACTIVE:
            raise ConflictError(
                f"release {active['id']} of {active['ref']} is {active['status']}: finish it first "
                f"(`ryz release resume`, `promote` or `abort`)"
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
        doc, _ = self.store.read_document(PREFIX + release_id)
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

    def log(self, release_id: str, event: str, reason: str, **fields) -> dict:
        def change(doc):
            doc["log"].append({"time": time.time(), "event": event, "reason": reason, **fields})

        return self.update(release_id, change)

    def set_status(self, release_id: str, status: str, reason: str, **fields) -> dict:
        def change(doc):
            doc["status"] = status
            doc["log"].append({"time": time.time(), "event": status, "reason": reason, **fields})

        return self.update(release_id, change)
