"""Prometheus metrics of the server, every series labelled by model variant (production / canary).

One registry per server (not the process-global one), so tests and several apps in one process do
not share counters. The release flow reads these from `/metrics` to compare canary with production:
requests and errors from `ryz_requests_total`, requests with a first token from the TTFT histogram's count. Latency
is judged on per-request figures instead (`RequestSamples`, served at `GET /admin/samples`): a histogram bucket is
too coarse for a sub-millisecond model, and the spread between requests is what tells a regression from noise. The
latency histograms stay for dashboards.
"""

from __future__ import annotations

import threading
import time
from collections import deque

from prometheus_client import (
    CONTENT_TYPE_LATEST,  # noqa: F401 - re-exported for the server
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 40.0)
TPOT_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.015,
    0.02,
    0.025,
    0.03,
    0.04,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    1.0,
    2.5,
)
SAMPLES_PER_VARIANT = 2000  # per-request figures kept per variant: a step's window, at any traffic the canary sees


class RequestSamples:
    """Per-request figures of each variant, the last SAMPLES_PER_VARIANT: (finish unix time, TTFT seconds,
    that request's median seconds per output token, None with fewer than two tokens)."""

    def __init__(self, size: int = SAMPLES_PER_VARIANT):
        self._size = size
        self._lock = threading.Lock()  # a reader's copy must not race the engine threads' appends
        self._by_variant: dict[str, deque[tuple[float, float, float | None]]] = {}

    def add(self, variant: str, ttft: float, tpot: float | None) -> None:
        with self._lock:
            ring = self._by_variant.setdefault(variant, deque(maxlen=self._size))
            ring.append((time.time(), ttft, tpot))

    def since(self, since: float) -> dict[str, list[tuple[float, float, float | None]]]:
        with self._lock:
            return {v: [s for s in ring if s[0] >= since] for v, ring in self._by_variant.items()}


class ServerMetrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "ryz_requests", "Finished HTTP inference requests", ["variant", "endpoint", "status"], registry=r
        )
        self.errors = Counter(
            "ryz_request_errors", "Failed inference requests by kind", ["variant", "kind"], registry=r
        )
        self.queue_depth = Gauge("ryz_queue_depth", "Requests waiting for a sequence slot", ["variant"], registry=r)
        self.running = Gauge("ryz_running_sequences", "Sequences in the running batch", ["variant"], registry=r)
        self.kv_bytes = Gauge("ryz_kv_cache_bytes", "KV cache memory allocated", ["variant"], registry=r)
        self.ttft = Histogram(
            "ryz_time_to_first_token_seconds",
            "Arrival to first generated token",
            ["variant"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "ryz_time_per_output_token_seconds",
            "Time between generated tokens of one request, "
            "less the time its steps waited for another variant's forward",
            ["variant"],
            buckets=TPOT_BUCKETS,
            registry=r,
        )
        self.compute_wait = Counter(
            "ryz_compute_wait_seconds",
            "Time this variant's steps waited for another variant's forward (one forward runs at a time)",
            ["variant"],
            registry=r,
        )
        self.prompt_tokens = Counter("ryz_prompt_tokens", "Prompt tokens processed", ["variant"], registry=r)
        self.generation_tokens = Counter("ryz_generation_tokens", "Tokens generated", ["variant"], registry=r)
        self.step_tokens = Counter("ryz_engine_step_tokens", "Tokens fed through the model", ["variant"], registry=r)
        self.prefix_reused = Gauge(
            "ryz_prefix_cache_tokens_reused", "Prompt tokens served from the prefix cache", ["variant"], registry=r
        )
        # speculative decoding: acceptance rate = accepted / drafted; tokens per step = emitted / steps
        self.spec_drafted = Counter(
            "ryz_spec_draft_tokens", "Speculative decoding: tokens drafted and verified", ["variant"], registry=r
        )
        self.spec_accepted = Counter(
            "ryz_spec_accepted_tokens", "Speculative decoding: drafted tokens accepted", ["variant"], registry=r
        )
        self.spec_steps = Counter(
            "ryz_spec_verify_steps",
            "Speculative decoding: verification steps (one per request per step)",
            ["variant"],
            registry=r,
        )
        self.spec_emitted = Counter(
            "ryz_spec_emitted_tokens",
            "Speculative decoding: tokens emitted by verification steps (accepted drafts plus the token after them)",
            ["variant"],
            registry=r,
        )
        self.spec_tokens_per_step = Histogram(
            "ryz_spec_tokens_per_step",
            "Speculative decoding: tokens one verification step emitted for its request",
            ["variant"],
            buckets=tuple(range(1, 18)),
            registry=r,
        )
        self.spec_skipped = Counter(
            "ryz_spec_skipped_requests",
            "Requests that asked for speculation but ran without it (structured output, a failed drafter)",
            ["variant"],
            registry=r,
        )
        self.spec_paused = Counter(
            "ryz_spec_paused_steps",
            "Speculative decoding: steps a speculating request decoded plainly because its low acceptance paused "
            "drafting (adaptive draft length)",
            ["variant"],
            registry=r,
        )
        self.canary_weight = Gauge(
            "ryz_canary_weight_percent", "Share of routed traffic sent to the canary", registry=r
        )
        self.variant_info = Gauge(
            "ryz_variant_info", "Loaded variants (value 1) with their model", ["variant", "model"], registry=r
        )
        self.samples = RequestSamples()

    def for_variant(self, variant: str) -> VariantMetrics:
        return VariantMetrics(self, variant)

    def refresh(self, variants: dict) -> None:
        """Update the gauges from each variant's engine (called on scrape)."""
        for name, engine in variants.items():
            s = engine.stats()
            self.queue_depth.labels(name).set(s["waiting"])
            self.running.labels(name).set(s["running"])
            self.kv_bytes.labels(name).set(s["kv_bytes"])
            self.prefix_reused.labels(name).set(s["prefix_tokens_reused"])

    def render(self) -> bytes:
        return generate_latest(self.registry)


class VariantMetrics:
    """The engine core's view: what it observes, already labelled with its variant."""

    def __init__(self, metrics: ServerMetrics, variant: str):
        self._variant, self._samples = variant, metrics.samples
        self._ttft = metrics.ttft.labels(variant)
        self._tpot = metrics.tpot.labels(variant)
        self._prompt = metrics.prompt_tokens.labels(variant)
        self._generated = metrics.generation_tokens.labels(variant)
        self._step = metrics.step_tokens.labels(variant)
        self._wait = metrics.compute_wait.labels(variant)
        self._spec = [
            m.labels(variant)
            for m in (metrics.spec_drafted, metrics.spec_accepted, metrics.spec_steps, metrics.spec_emitted)
        ]
        self._spec_per_step = metrics.spec_tokens_per_step.labels(variant)
        self._spec_skipped = metrics.spec_skipped.labels(variant)
        self._spec_paused = metrics.spec_paused.labels(variant)

    def ttft(self, seconds: float) -> None:
        self._ttft.observe(seconds)

    def token_latency(self, seconds: float) -> None:
        self._tpot.observe(seconds)

    def request(self, ttft: float, tpot: float | None) -> None:
        """A request finished with tokens: its TTFT and median time per output token, for canary analysis.
        Kept under this object's variant, so a promoted canary's requests count as production's, like its series."""
        self._samples.add(self._variant, ttft, tpot)

    def step(self, tokens: int, waited: float = 0.0) -> None:
        self._step.inc(tokens)
        self._wait.inc(waited)

    def spec_step(self, drafted: int, accepted: int, emitted: int) -> None:
        for counter, value in zip(self._spec, (drafted, accepted, 1, emitted)):
            counter.inc(value)
        self._spec_per_step.observe(emitted)

    def spec_skipped(self) -> None:
        self._spec_skipped.inc()

    def spec_paused(self) -> None:
        self._spec_paused.inc()

    def finished(self, delta) -> None:
        self._prompt.inc(delta.prompt_tokens)
        self._generated.inc(delta.completion_tokens)
