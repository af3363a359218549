"""A replica that follows the registry: what `ryz serve` without `--model` loads when it starts.

The release flow steers running replicas through the admin API. A replica that starts (or restarts in the middle
of a release) reads the same truth from the store: the registry's `production`, and, while a release is in
progress, its canary at the weight the release document records (`fleet`). So a restarted replica rejoins the
fleet in the state the release left the others in, and the next step's analysis sees the share it set.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from engine.artifacts.registry import Registry
from engine.artifacts.releases import ACTIVE, ReleaseStore
from engine.serving.router import CANARY, PRODUCTION
from engine.serving.variants import ServingState


@dataclass(frozen=True)
class FleetTarget:
    production: str | None  # artifact id of the registry's production
    canary: str | None  # artifact id of the release's canary, while one is on the replicas
    weight: int  # percent of routed traffic the canary gets
    release_id: str | None = None


def fleet_target(store) -> FleetTarget:
    """What every replica of the fleet should hold now, from the registry and the release in progress."""
    production = Registry(store).find("production")
    release = ReleaseStore(store).active()
    fleet = (release or {}).get("fleet") or {}
    canary = fleet.get("canary") if release and release["status"] in ACTIVE else None
    return FleetTarget(
        production.artifact_id if production else None,
        canary,
        int(fleet.get("weight", 0)) if canary else 0,
        release["id"] if canary and release else None,
    )


def join(state: ServingState, target: FleetTarget) -> None:
    """Load the target's variants and set the canary weight (a replica joining the fleet)."""
    if target.production:
        state.load(PRODUCTION, target.production)
    if target.canary:
        state.load(CANARY, target.canary)
        state.set_canary_weight(target.weight)


def join_logged(state: ServingState, store_factory) -> None:
    """Startup: read the target and join; the outcome goes to the log and /ready (a failure leaves the replica
    empty and not ready, never half-joined without saying so)."""
    try:
        target = fleet_target(store_factory())
        if target.production is None:
            print("ryz serve: the registry has no production yet; waiting for a release", file=sys.stderr, flush=True)
        join(state, target)
        joined = f"production {target.production and target.production[:19]}"
        if target.canary:
            joined += f", canary {target.canary[:19]} at {target.weight}% (release {target.release_id})"
        print(f"ryz serve: following the registry: {joined}", file=sys.stderr, flush=True)
    except Exception as exc:  # noqa: BLE001 - reported through /ready and the log
        state.load_errors["registry"] = str(exc)
        print(f"ryz serve: following the registry failed: {exc}", file=sys.stderr, flush=True)
    finally:
        state.loading.discard("registry")
