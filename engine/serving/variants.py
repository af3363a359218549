"""The variants a server holds and their lifecycle.

Up to two variants, `production` and `canary`, each an `EngineClient` (engine/serving/client.py); the
`CanaryRouter` splits the served model name's traffic between them. Loads, unloads and promotions happen
under one lock and never drop a request in flight: a replaced variant finishes what it started, then closes.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field

from engine.artifacts.registry import ALIASES, Registry, is_registry_ref
from engine.artifacts.store import open_store
from engine.retrieval.search import Retriever
from engine.serving.client import ClientFactory, EngineClient, local_clients
from engine.serving.metrics import ServerMetrics
from engine.serving.protocol import APIError, draining_error
from engine.serving.router import CANARY, PRODUCTION, CanaryRouter
from engine.settings import Settings


@dataclass
class Variant:
    name: str
    ref: str
    client: EngineClient
    loaded_at: float = field(default_factory=time.time)
    # Requests routed here that have not reached the engine yet (faults, retrieval, parsing in between): a variant
    # replaced meanwhile must not close under them.
    claims: int = 0

    @property
    def model_id(self) -> str:
        return self.client.model_id


class ServingState:
    """Variants, router and lifecycle; every change happens under one lock."""

    def __init__(self, settings: Settings, connect: ClientFactory | None = None):
        self.settings = settings
        self.connect = connect or local_clients()
        self.metrics = ServerMetrics()
        self.router = CanaryRouter()
        self.variants: dict[str, Variant] = {}
        self.retiring: list[Variant] = []
        self.draining = False
        self.loading: set[str] = set()
        self.load_errors: dict[str, str] = {}
        # Release drills (POST /admin/faults): per slot, so a regression can be injected into production after a
        # promotion; loading a new production clears production's (the faulty model is gone).
        self.faults = {
            "canary_error_rate": settings.fault_canary_error_rate,
            "canary_latency_ms": settings.fault_canary_latency_ms,
            "production_error_rate": 0.0,
            "production_latency_ms": 0.0,
            "refuse_promote": 0.0,  # 1: this replica answers promote with a 500 (all-or-nothing drills)
        }
        self.retrieval = Retriever(settings)  # embedder and indexes load on first use
        self.compute_lock = threading.Lock()  # one variant's forward at a time (engine.serving.core.EngineCore)
        self._versions: dict[str, str | None] = {}  # artifact id -> name:version (loaded())
        self._lock = threading.Lock()

    def load(self, name: str, ref: str) -> Variant:
        """Load `ref` as variant `name`, replacing what was there once the new one is ready."""
        with self._lock:
            self.loading.add(name)
        try:
            client = self.connect(ref, self.settings, self.metrics.for_variant(name), self.compute_lock)
        except Exception as exc:
            with self._lock:
                self.loading.discard(name)
                self.load_errors[name] = str(exc)
            raise
        variant = Variant(name, ref, client)
        with self._lock:
            if name == PRODUCTION:
                self.faults.update(production_error_rate=0.0, production_latency_ms=0.0)
            old = self.variants.get(name)
            self.variants[name] = variant
            self.loading.discard(name)
            self.load_errors.pop(name, None)
            if old is not None:
                self._retire(old)
            self._publish_info()
        return variant

    def unload(self, name: str) -> None:
        with self._lock:
            variant = self.variants.pop(name, None)
            if variant is None:
                raise APIError(404, f"no variant {name!r} is loaded", code="variant_not_found")
            if name == CANARY:
                self.router.set_weight(0)
                self.metrics.canary_weight.set(0)
            self._retire(variant)
            self._publish_info()

    def promote(self) -> None:
        """The canary becomes production; the old production finishes its requests and closes."""
        with self._lock:
            if self.faults["refuse_promote"]:
                raise APIError(
                    500, "injected fault: this replica refuses promotion", "server_error", code="injected_fault"
                )
            canary = self.variants.pop(CANARY, None)
            if canary is None:
                raise APIError(409, "no canary is loaded to promote", code="no_canary")
            old = self.variants.get(PRODUCTION)
            canary.name = PRODUCTION
            canary.client.use_metrics(self.metrics.for_variant(PRODUCTION))
            self.variants[PRODUCTION] = canary
            self.router.set_weight(0)
            self.metrics.canary_weight.set(0)
            if old is not None:
                self._retire(old)
            self._publish_info()

    def set_canary_weight(self, weight: object) -> None:
        """Route `weight` percent of the served name's traffic to the canary (ValueError unless an int 0-100)."""
        with self._lock:
            self.router.set_weight(weight)
            if self.router.weight and CANARY not in self.variants:
                self.router.set_weight(0)
                raise APIError(
                    409, "no canary is loaded: POST /admin/variants with name 'canary' first", code="no_canary"
                )
            self.metrics.canary_weight.set(self.router.weight)

    def _retire(self, variant: Variant) -> None:
        self.retiring.append(variant)
        threading.Thread(target=self._close_when_idle, args=(variant,), daemon=True).start()

    def _close_when_idle(self, variant: Variant) -> None:
        while variant.client.in_flight or variant.claims:
            time.sleep(0.05)
        variant.client.close()
        with self._lock:
            if variant in self.retiring:
                self.retiring.remove(variant)

    def _publish_info(self) -> None:
        self.metrics.variant_info.clear()
        for name, v in self.variants.items():
            self.metrics.variant_info.labels(name, v.model_id).set(1)

    def in_flight(self) -> int:
        return sum(v.client.in_flight for v in [*self.variants.values(), *self.retiring])

    def describe(self) -> dict:
        with self._lock:
            return {
                "variants": {
                    name: {"model": v.model_id, "ref": v.ref, "loaded_at": v.loaded_at, **v.client.stats()}
                    for name, v in self.variants.items()
                },
                "weights": {CANARY: self.router.weight if CANARY in self.variants else 0},
                "draining": self.draining,
                "loading": sorted(self.loading),
                "load_errors": dict(self.load_errors),
                "in_flight": self.in_flight(),
                "served_model_name": self.settings.served_model_name,
                "faults": dict(self.faults),
            }

    def loaded(self) -> list[dict]:
        """What `GET /ps` (and `ryz ps`) shows, per variant: its model (name:version when the registry has its
        artifact, the artifact id, the file and its size), its share of the served name's traffic, its slots and
        KV use. Runs on a worker thread: the first call per model may hash its file and read the registry."""
        with self._lock:
            variants = list(self.variants.values())
            canary_weight = self.router.weight if CANARY in self.variants else 0
        rows = []
        for v in variants:
            info, stats = v.client.model_info(), v.client.stats()
            rows.append(
                {
                    "variant": v.name,
                    "model": v.model_id,
                    "ref": v.ref,
                    "version": self._version_of(v.ref, info["artifact_id"]),
                    "artifact_id": info["artifact_id"],
                    "weight": canary_weight if v.name == CANARY else 100 - canary_weight,
                    "loaded_at": v.loaded_at,
                    "path": info["path"],
                    "weights_bytes": info["size_bytes"],
                    "parameters": info["parameters"],
                    "weights_type": info["weights_type"],
                    "slots": stats.get("slots", 0),
                    "active": stats.get("running", 0),
                    "waiting": stats.get("waiting", 0),
                    "kv_positions": stats.get("kv_positions", 0),
                    "kv_capacity": stats.get("kv_capacity", 0),
                    "kv_bytes": stats.get("kv_bytes", 0),
                    "context_length": info["served_context"],
                }
            )
        return rows

    def _version_of(self, ref: str, artifact_id: str) -> str | None:
        """`name:version` of the registry version holding this artifact (the latest if several do); None when the
        registry has none or cannot be read. Cached per artifact: versions are immutable."""
        if artifact_id in self._versions:
            return self._versions[artifact_id]
        found = None
        try:
            versions = Registry(open_store(self.settings.store_url, settings=self.settings)).versions()
            matches = [v for v in versions if v.artifact_id == artifact_id]
            found = max(matches, key=lambda v: v.version).ref if matches else None
        except Exception:  # noqa: BLE001 - a listing nicety: no store here, or unreachable
            found = None
        if found is None and is_registry_ref(ref) and ref not in ALIASES:
            found = ref
        self._versions[artifact_id] = found
        return found

    def close(self) -> None:
        with self._lock:
            variants = [*self.variants.values(), *self.retiring]
            self.variants.clear()
        for v in variants:
            v.client.close()
        self.retrieval.close()

    def route(self, model: str, session_key: str | None) -> Variant:
        """The variant serving a request for `model`: the served name goes through the router; `production` or
        production's model id always to production; the canary by name only with RYZ_CANARY_BY_NAME. The variant
        is claimed for the request until `unclaim` (after its submit), so a replacement cannot close it first."""
        with self._lock:
            variant = self._choose(model, session_key)
            variant.claims += 1
            return variant

    def production(self) -> Variant:
        """The production variant, or the 503 (with Retry-After) that tells a client to come back."""
        production = self.variants.get(PRODUCTION)
        if production is None:
            raise APIError(
                503,
                "no model is loaded yet" if self.loading else "no production model is loaded",
                "server_error",
                code="not_ready",
                headers={"Retry-After": "2"},
            )
        return production

    def _choose(self, model: str, session_key: str | None) -> Variant:
        if self.draining:
            raise draining_error()
        production, canary = self.variants.get(PRODUCTION), self.variants.get(CANARY)
        if canary is not None and model in (CANARY, canary.model_id):
            if not self.settings.canary_by_name:
                raise APIError(
                    404,
                    f"the canary is not served by name ({model!r}): ask for "
                    f"{self.settings.served_model_name!r}, or start the server with RYZ_CANARY_BY_NAME=true",
                    param="model",
                    code="model_not_found",
                )
            return canary
        if model not in (self.settings.served_model_name, PRODUCTION, CANARY) and not (
            production is not None and model == production.model_id
        ):
            raise APIError(
                404,
                f"the model {model!r} does not exist; served models: {', '.join(self.model_names())}",
                param="model",
                code="model_not_found",
            )
        production = self.production()
        if model != self.settings.served_model_name:  # `production`, its model id, or `canary` with none loaded
            return production
        return self.variants[self.router.choose(session_key, canary is not None)]

    def unclaim(self, variant: Variant) -> None:
        """The request `route` gave `variant` to has been submitted to its engine, or has failed before."""
        with self._lock:
            variant.claims -= 1

    def model_names(self) -> list[str]:
        """What a client may ask for: the served name and the model ids it may address directly."""
        names = [self.settings.served_model_name]
        names += [v.model_id for n, v in self.variants.items() if n == PRODUCTION or self.settings.canary_by_name]
        return list(dict.fromkeys(names))


def load_logged(state: ServingState, name: str, ref: str) -> None:
    """Load in the background at startup; the outcome goes to the log and /ready."""
    try:
        state.load(name, ref)
        print(f"ryz serve: {name} = {state.variants[name].model_id} ready", file=sys.stderr, flush=True)
    except Exception as exc:  # noqa: BLE001 - reported through /ready and the log
        print(f"ryz serve: loading {ref!r} failed: {exc}", file=sys.stderr, flush=True)
