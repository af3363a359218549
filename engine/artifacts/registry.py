"""The model registry: versions, aliases and the event log, in the artifact store (DESIGN.md "Registry").

Everything lives in one JSON document (`registry/state`) written with compare-and-swap, so every
change, however many versions and aliases it touches, is one atomic write: a promotion moves
`previous` and `production` and updates both versions' statuses together, and its event is appended
in the same write. Two writers racing: the loser's write fails its etag check (local: flock + re-check
+ rename; S3: conditional PUT, atomic in S3 itself), re-reads and re-applies its change on the new
state, up to a bound, and then raises ConflictError naming what it tried. Nothing is lost and nothing
is ever deleted: rollbacks move aliases and statuses and append events.

Versions are immutable in what they point at (artifact, kernel build, evaluation record, source);
only their status moves: candidate -> canary -> production -> retired, or rejected (a gate failed) / held
(passed the gates but not better than production under RYZ_RELEASE_POLICY=improve: not released) /
rolled_back. A `pulled` version (`ryz pull`, engine/artifacts/pull.py) is for local use only: it never gets an
alias, so nothing the fleet serves can name it, and it does not count as "registered" for the pipeline's novelty
test, so discovery still sends its source through the gates and the release.
"""

from __future__ import annotations

import copy
import getpass
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from engine.errors import ConflictError, ModelReferenceError, SchemaVersionError

SCHEMA = 1
STATE_KEY = "registry/state"
ALIASES = ("production", "canary", "previous")
# held: passed the gates, not better than production beyond noise (policy improve), so not released.
# pulled: fetched by `ryz pull` for local use, never served by the fleet (no alias, no release).
STATUSES = ("candidate", "canary", "production", "retired", "rejected", "held", "rolled_back", "pulled")
_NAME_VERSION = re.compile(r"^(?P<name>[^:\s]+):(?P<version>\d+)$")
_MAX_ATTEMPTS = 8


def default_actor() -> str:
    try:
        return f"user:{getpass.getuser()}"
    except Exception:  # noqa: BLE001 - no passwd entry in some containers
        return "user:unknown"


def _empty_state() -> dict:
    return {"schema": SCHEMA, "models": {}, "aliases": {}, "events": []}


@dataclass(frozen=True)
class Version:
    name: str
    version: int
    artifact_id: str
    status: str
    created: float
    source: dict
    evaluation: str | None = None  # artifact id of the evaluation record
    kernel_build: str | None = None  # kernel build key
    extra: dict | None = None

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "version": self.version,
            "artifact_id": self.artifact_id,
            "status": self.status,
            "created": self.created,
            "source": self.source,
            "evaluation": self.evaluation,
            "kernel_build": self.kernel_build,
            **({"extra": self.extra} if self.extra else {}),
        }

    @classmethod
    def from_json(cls, doc: dict) -> Version:
        return cls(
            doc["name"],
            doc["version"],
            doc["artifact_id"],
            doc["status"],
            doc["created"],
            doc.get("source", {}),
            doc.get("evaluation"),
            doc.get("kernel_build"),
            doc.get("extra"),
        )


class Registry:
    def __init__(self, store, actor: str | None = None):
        self.store = store
        self.actor = actor or default_actor()

    # -- reading ------------------------------------------------------------------------------------
    def _read(self) -> tuple[dict, str | None]:
        doc, etag = self.store.read_document(STATE_KEY)
        if doc is None:
            return _empty_state(), None
        if doc.get("schema") != SCHEMA:
            raise SchemaVersionError(
                f"registry document in {self.store.url} has schema {doc.get('schema')!r}; this "
                f"version of ryzanstein reads schema {SCHEMA}: upgrade ryzanstein"
            )
        return doc, etag

    def versions(self, name: str | None = None) -> list[Version]:
        state, _ = self._read()
        return [Version.from_json(v) for n, vs in sorted(state["models"].items()) if name in (None, n) for v in vs]

    def aliases(self) -> dict[str, dict]:
        return dict(self._read()[0]["aliases"])

    def history(self, name: str | None = None) -> list[dict]:
        events = self._read()[0]["events"]
        return [e for e in events if name is None or e.get("name") == name]

    def get(self, ref: str) -> Version:
        """A version by `name:version`, alias, or bare name (its newest version)."""
        state, _ = self._read()
        return _lookup(state, ref)

    def find(self, ref: str) -> Version | None:
        """`get`, or None when nothing answers to `ref` (an alias that is not set, a name or version not
        registered): "production, if there is one". A store that cannot be read still raises."""
        try:
            return self.get(ref)
        except ModelReferenceError:
            return None

    def find_source(self, repo: str, revision: str | None, pulled: bool = False) -> Version | None:
        """The version registered from this exact source revision, if any (discovery's novelty test). Pulled
        versions count only with `pulled`: a pull must not hide a model from discovery and the release."""
        return _from_source(self._read()[0], repo, revision, pulled)

    # -- writing (one CAS write per change) -----------------------------------------------------------
    def update(self, change: Callable[[dict], Any], describe: str) -> Any:
        """Apply `change` to a copy of the state and write it if nobody wrote in between; re-read and
        re-apply on conflict. `change` raises to refuse, returns the caller's result."""
        for _attempt in range(_MAX_ATTEMPTS):
            state, etag = self._read()
            new = copy.deepcopy(state)
            result = change(new)
            try:
                self.store.write_document(STATE_KEY, new, etag)
                return result
            except ConflictError:
                time.sleep(0.01 * (_attempt + 1))
        raise ConflictError(
            f"registry in {self.store.url}: {describe} lost {_MAX_ATTEMPTS} compare-and-swap races in a "
            "row to other writers; nothing was changed. Retry, or find the process writing in a loop"
        )

    def register(
        self,
        name: str,
        artifact_id: str,
        source: dict,
        evaluation: str | None = None,
        kernel_build: str | None = None,
        reason: str = "registered",
        status: str = "candidate",
        extra: dict | None = None,
    ) -> Version:
        """A new version of `name` (the next integer), status candidate."""
        _check_status(status)

        def change(state: dict) -> Version:
            return self._add_version(state, name, artifact_id, source, evaluation, kernel_build, reason, status, extra)

        return self.update(change, f"registering {name}")

    def register_once(
        self,
        name: str,
        artifact_id: str,
        source: dict,
        evaluation: str | None = None,
        kernel_build: str | None = None,
        reason: str = "registered",
        status: str = "candidate",
    ) -> tuple[Version, bool]:
        """`register`, unless a version from the same source (repo, revision) exists: then that one and False.
        The check and the write are one compare-and-swap, so two pipelines of one candidate register it once.
        A pulled version of the source counts only when registering a pull (see `find_source`)."""
        _check_status(status)
        repo, revision = source.get("repo", name), source.get("revision")

        def change(state: dict) -> tuple[Version, bool]:
            if (existing := _from_source(state, repo, revision, status == "pulled")) is not None:
                return existing, False
            return self._add_version(state, name, artifact_id, source, evaluation, kernel_build, reason, status), True

        return self.update(change, f"registering {name}")

    def _add_version(
        self,
        state: dict,
        name: str,
        artifact_id: str,
        source: dict,
        evaluation: str | None,
        kernel_build: str | None,
        reason: str,
        status: str,
        extra: dict | None = None,
    ) -> Version:
        versions = state["models"].setdefault(name, [])
        version = Version(
            name,
            1 + max((v["version"] for v in versions), default=0),
            artifact_id,
            status,
            time.time(),
            source,
            evaluation,
            kernel_build,
            extra,
        )
        versions.append(version.to_json())
        self._event(state, "register", version, reason)
        return version

    def set_status(self, ref: str, status: str, reason: str) -> Version:
        _check_status(status)

        def change(state: dict) -> Version:
            version = _lookup(state, ref)
            _store_version(state, version, status)
            self._event(state, f"status:{status}", version, reason, previous_status=version.status)
            return _lookup(state, version.ref)

        return self.update(change, f"setting {ref} to {status}")

    def set_alias(self, alias: str, ref: str | None, reason: str, expected: str | None = "any") -> None:
        """Point `alias` at `ref` (None removes it). `expected` (a `name:version` or None) makes the move
        conditional on what the alias names now, for callers that read it earlier."""
        _check_alias(alias)

        def change(state: dict) -> None:
            current = state["aliases"].get(alias)
            current_ref = f"{current['name']}:{current['version']}" if current else None
            if expected != "any" and expected != current_ref:
                raise ConflictError(
                    f"alias {alias} names {current_ref}, not {expected}: someone moved it; re-read and retry"
                )
            if ref is None:
                state["aliases"].pop(alias, None)
                self._event(state, f"alias:{alias}", None, reason, alias_from=current_ref, alias_to=None)
                return
            version = _lookup(state, ref)
            refuse_pulled(version, f"be given the alias {alias}")
            state["aliases"][alias] = {"name": version.name, "version": version.version}
            self._event(state, f"alias:{alias}", version, reason, alias_from=current_ref, alias_to=version.ref)

        self.update(change, f"moving alias {alias}")

    def promote(self, ref: str, reason: str) -> dict:
        """`previous` <- production, `production` <- ref, canary alias cleared; statuses follow. One write.
        Returns what it changed ({"aliases": {alias: [before, after]}, "statuses": {ref: [before, after]}}), for
        `undo`."""

        def change(state: dict) -> dict:
            aliases_before, statuses_before = {a: state["aliases"].get(a) for a in ALIASES}, _statuses(state)
            _promote(state, reason)
            statuses_after = _statuses(state)
            return {
                "aliases": {
                    a: [aliases_before[a], state["aliases"].get(a)]
                    for a in ALIASES
                    if aliases_before[a] != state["aliases"].get(a)
                },
                "statuses": {
                    r: [statuses_before[r], after] for r, after in statuses_after.items() if statuses_before[r] != after
                },
            }

        def _promote(state: dict, reason: str) -> None:
            version = _lookup(state, ref)
            refuse_pulled(version, "be promoted")
            old = state["aliases"].get("production")
            if old:
                old_version = _lookup(state, f"{old['name']}:{old['version']}")
                if old_version.ref == version.ref:
                    raise ConflictError(f"{version.ref} is already production")
                state["aliases"]["previous"] = old
                _store_version(state, old_version, "retired")
            state["aliases"]["production"] = {"name": version.name, "version": version.version}
            if (canary := state["aliases"].get("canary")) and (canary["name"], canary["version"]) == (
                version.name,
                version.version,
            ):
                state["aliases"].pop("canary")
            _store_version(state, version, "production")
            self._event(
                state,
                "promote",
                version,
                reason,
                alias_from=f"{old['name']}:{old['version']}" if old else None,
                alias_to=version.ref,
            )

        return self.update(change, f"promoting {ref}")

    def undo(self, changed: dict, reason: str) -> list[str]:
        """Put back what a `promote` changed (its return value), in one write, where it still stands as that
        promotion left it; what somebody changed since stays as they left it. Returns those, described."""

        def change(state: dict) -> list[str]:
            kept = []
            for alias, (before, after) in changed["aliases"].items():
                if state["aliases"].get(alias) != after:
                    kept.append(f"alias {alias} (moved since)")
                elif before is None:
                    state["aliases"].pop(alias, None)
                else:
                    state["aliases"][alias] = before
            for ref, (before, after) in changed["statuses"].items():
                version = _lookup(state, ref)
                if version.status != after:
                    kept.append(f"status of {ref} (now {version.status})")
                else:
                    _store_version(state, version, before)
            self._event(state, "undo", None, reason, kept=", ".join(kept) or None)
            return kept

        return self.update(change, "undoing a promotion")

    def rollback(self, reason: str) -> Version:
        """Undo the last promotion: `previous` serves again as production; the demoted version is rolled_back."""

        def change(state: dict) -> Version:
            prev, prod = state["aliases"].get("previous"), state["aliases"].get("production")
            if not prev:
                raise ModelReferenceError("nothing to roll back to: the alias `previous` is not set")
            back = _lookup(state, f"{prev['name']}:{prev['version']}")
            if prod:
                _store_version(state, _lookup(state, f"{prod['name']}:{prod['version']}"), "rolled_back")
            state["aliases"]["production"] = prev
            state["aliases"].pop("previous")
            _store_version(state, back, "production")
            self._event(
                state,
                "rollback",
                back,
                reason,
                alias_from=f"{prod['name']}:{prod['version']}" if prod else None,
                alias_to=back.ref,
            )
            return _lookup(state, back.ref)

        return self.update(change, "rolling back")

    def attach_bundle(self, ref: str, artifact_id: str, reason: str) -> Version:
        """Record the version's serving bundle (`extra["bundle"]`, engine/artifacts/bundle.py): set once, the one a
        rollback redeploys byte for byte. The same id again changes nothing; a different one is refused
        (ConflictError)."""
        current = self.get(ref)
        if (current.extra or {}).get("bundle") == artifact_id:
            return current

        def change(state: dict) -> Version:
            version = _lookup(state, ref)
            attached = (version.extra or {}).get("bundle")
            if attached == artifact_id:
                return version
            if attached:
                raise ConflictError(
                    f"{version.ref} already has the serving bundle {attached}; a version's bundle is "
                    f"set once (rollbacks redeploy it byte for byte), so {artifact_id} is not attached"
                )
            for doc in state["models"][version.name]:
                if doc["version"] == version.version:
                    doc["extra"] = {**(doc.get("extra") or {}), "bundle": artifact_id}
            self._event(state, "bundle", version, reason, bundle=artifact_id)
            return _lookup(state, version.ref)

        return self.update(change, f"attaching a bundle to {ref}")

    def note(self, ref: str, action: str, reason: str, **fields) -> None:
        """An event about a version that changes nothing else (a canary step's analysis, a pause)."""

        def change(state: dict) -> None:
            self._event(state, action, _lookup(state, ref), reason, **fields)

        self.update(change, f"noting {action} for {ref}")

    def _event(self, state: dict, action: str, version: Version | None, reason: str, **fields) -> None:
        state["events"].append(
            {
                "time": time.time(),
                "actor": self.actor,
                "action": action,
                "name": version.name if version else None,
                "version": version.version if version else None,
                "reason": reason,
                **{k: v for k, v in fields.items() if v is not None},
            }
        )


def _check_status(status: str) -> None:
    if status not in STATUSES:
        raise ValueError(f"unknown status {status!r}; one of {', '.join(STATUSES)}")


def _check_alias(alias: str) -> None:
    if alias not in ALIASES:
        raise ValueError(f"unknown alias {alias!r}; one of {', '.join(ALIASES)}")


def refuse_pulled(version: Version, action: str) -> None:
    """Raise for a pulled version: the fleet never serves one, so it is never released nor given an alias."""
    if version.status == "pulled":
        raise ModelReferenceError(
            f"{version.ref} was fetched by `ryz pull` for local use (status pulled, no evaluation record): the fleet "
            f"never serves it, so it cannot {action}. To release this model, let the pipeline take its source through "
            "the gates (`ryz pipeline run`); discovery still lists it as new"
        )


def _from_source(state: dict, repo: str, revision: str | None, pulled: bool = False) -> Version | None:
    for doc in (v for _name, versions in sorted(state["models"].items()) for v in versions):  # as versions()
        if doc.get("status") == "pulled" and not pulled:
            continue
        if doc.get("source", {}).get("repo") == repo and doc.get("source", {}).get("revision") == revision:
            return Version.from_json(doc)
    return None


def _statuses(state: dict) -> dict[str, str]:
    """Every version's status by ref."""
    return {f"{n}:{v['version']}": v["status"] for n, versions in state["models"].items() for v in versions}


def _store_version(state: dict, version: Version, status: str) -> None:
    for doc in state["models"][version.name]:
        if doc["version"] == version.version:
            doc["status"] = status


def _lookup(state: dict, ref: str) -> Version:
    if ref in ALIASES:
        target = state["aliases"].get(ref)
        if not target:
            raise ModelReferenceError(f"the alias {ref!r} is not set; `ryz registry aliases` shows the ones that are")
        ref = f"{target['name']}:{target['version']}"
    match = _NAME_VERSION.match(ref)
    name, number = (match["name"], int(match["version"])) if match else (ref, None)
    versions = state["models"].get(name)
    if not versions:
        raise ModelReferenceError(f"no model named {name!r} in the registry; `ryz registry list` shows what is there")
    if number is None:
        return Version.from_json(max(versions, key=lambda v: v["version"]))
    for doc in versions:
        if doc["version"] == number:
            return Version.from_json(doc)
    raise ModelReferenceError(
        f"{name} has no version {number} (versions: {', '.join(str(v['version']) for v in versions)})"
    )


def is_registry_ref(ref: str) -> bool:
    """An alias or `name:version` (as opposed to an artifact id or a path)."""
    return ref in ALIASES or bool(_NAME_VERSION.match(ref))
