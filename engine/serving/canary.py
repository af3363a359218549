"""Canary analysis: compare the canary with production over one step.

Counts come from the server's Prometheus `/metrics`: counters are cumulative, so a step is judged on the difference
between a snapshot at its start and one at its end: answered requests and server failures (5xx) among them. Client
errors (4xx: bad input, unknown model, a full queue) are counted apart and reported, never as evidence either way:
ten 400s are not ten healthy canary requests. Too few successful canary requests with latency samples is not a
verdict but "inconclusive": the release pauses instead of passing on no evidence.

Latency is judged on per-request figures (`GET /admin/samples`, every replica, the step's window): each request's
TTFT and its median time per output token. The noise allowance is measured, not a constant: a percentile bootstrap
(both sides resampled, fixed seed) gives a 95 % interval of the canary/production ratio: of p95 TTFT, and of
the median time per token. A check passes when the ratio is within its limit; when it is over the limit but the
interval still reaches the limit, the difference is within the two variants' own spread and passes as noise (the
reason says so, with the interval); it fails only when the whole interval is beyond the limit. A ratio is the same
for a model at 0.3 ms per token as for one at 30 ms, which absolute floors (50 ms TTFT, 2 ms per token) were not:
they let a tiny candidate 3.5x slower per token pass every step.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
from prometheus_client.parser import text_string_to_metric_families


def parse_metrics(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Prometheus text exposition -> (name, labels, value) samples, by prometheus_client's own parser."""
    return [
        (sample.name, dict(sample.labels), float(sample.value))
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


@dataclass
class VariantStats:
    requests: float = 0.0  # answered: every status but 4xx
    errors: float = 0.0  # server failures (5xx) among them
    ttft_buckets: dict[float, float] = field(default_factory=dict)  # le -> cumulative count
    tpot_sum: float = 0.0
    tpot_count: float = 0.0
    tpot_buckets: dict[float, float] = field(default_factory=dict)  # le -> cumulative count
    client_errors: float = 0.0  # 4xx: not answered, not counted in requests

    def minus(self, earlier: VariantStats) -> VariantStats:
        return VariantStats(
            self.requests - earlier.requests,
            self.errors - earlier.errors,
            {le: c - earlier.ttft_buckets.get(le, 0.0) for le, c in self.ttft_buckets.items()},
            self.tpot_sum - earlier.tpot_sum,
            self.tpot_count - earlier.tpot_count,
            {le: c - earlier.tpot_buckets.get(le, 0.0) for le, c in self.tpot_buckets.items()},
            self.client_errors - earlier.client_errors,
        )

    @property
    def successes(self) -> float:
        return self.requests - self.errors

    @property
    def evidence(self) -> float:
        """Successful requests with a latency sample (TTFT observed): what a step may be judged on."""
        return min(self.successes, max(self.ttft_buckets.values(), default=0.0))

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @property
    def ttft_p95(self) -> float | None:
        return histogram_quantile(0.95, self.ttft_buckets)

    @property
    def decode_tok_s(self) -> float | None:
        """1 / median time per output token. The median, not the mean (count / sum): a few tokens stalled
        behind the other variant's step or a late thread wake-up must not pass for a slower model."""
        median = histogram_quantile(0.5, self.tpot_buckets)
        if median:
            return 1.0 / median
        return self.tpot_count / self.tpot_sum if self.tpot_sum > 0 else None


def snapshot(metrics_text: str) -> dict[str, VariantStats]:
    """Per variant: cumulative requests, 5xx errors, TTFT buckets and per-token latency totals."""
    stats: dict[str, VariantStats] = {}
    for name, labels, value in parse_metrics(metrics_text):
        variant = labels.get("variant")
        if variant is None:
            continue
        s = stats.setdefault(variant, VariantStats())
        if name == "ryz_requests_total":
            status = labels.get("status", "")
            if status.startswith("4"):
                s.client_errors += value
                continue
            s.requests += value
            if status.startswith("5"):
                s.errors += value
        elif name == "ryz_time_to_first_token_seconds_bucket":
            s.ttft_buckets[math.inf if labels["le"] == "+Inf" else float(labels["le"])] = value
        elif name == "ryz_time_per_output_token_seconds_bucket":
            s.tpot_buckets[math.inf if labels["le"] == "+Inf" else float(labels["le"])] = value
        elif name == "ryz_time_per_output_token_seconds_sum":
            s.tpot_sum = value
        elif name == "ryz_time_per_output_token_seconds_count":
            s.tpot_count = value
    return stats


def histogram_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """The q-quantile of a cumulative histogram, interpolated linearly inside its bucket."""
    if not buckets:
        return None
    bounds = sorted(buckets)
    total = buckets[bounds[-1]]
    if total <= 0:
        return None
    rank, lower, below = q * total, 0.0, 0.0
    for le in bounds:
        count = buckets[le]
        if count >= rank:
            if math.isinf(le):
                return lower  # beyond the last finite bound: report that bound, as Prometheus does
            return lower + (le - lower) * ((rank - below) / (count - below) if count > below else 1.0)
        lower, below = le, count
    return lower


@dataclass
class Thresholds:
    min_requests: int = 20
    max_error_rate_delta: float = 0.02  # canary error rate may exceed production's by this much (absolute)
    max_ttft_ratio: float = 1.2  # canary p95 TTFT <= ratio x production's
    min_speed_ratio: float = 0.9  # canary decode tok/s >= ratio x production's
    # Per-request figures each side needs for a latency check: fewer (production at the 100 % step gets no routed
    # traffic) and the check is not compared, which its reason says; the steps before it compared it.
    min_samples: int = 5


CONFIDENCE = 0.95
BOOTSTRAP_ROUNDS = 2000
BOOTSTRAP_SEED = 15  # fixed: the same samples always give the same interval, hence the same verdict


@dataclass
class Samples:
    """One variant's per-request figures over a step, in seconds."""

    ttft: list[float] = field(default_factory=list)  # every successful request with a first token
    tpot: list[float] = field(default_factory=list)  # each request's median time per output token (2+ tokens)

    @classmethod
    def merge(cls, answers: Iterable[dict], variant: str) -> Samples:
        """A variant's figures from every replica's `GET /admin/samples` answer."""
        merged = cls()
        for answer in answers:
            for _finished, ttft, tpot in answer.get("variants", {}).get(variant, []):
                merged.ttft.append(float(ttft))
                if tpot is not None:
                    merged.tpot.append(float(tpot))
        return merged

    @property
    def ttft_p95_ms(self) -> float | None:
        return float(np.quantile(self.ttft, 0.95)) * 1000 if self.ttft else None

    @property
    def tpot_median_s(self) -> float | None:
        return float(np.median(self.tpot)) if self.tpot else None

    @property
    def decode_tok_s(self) -> float | None:
        """1 / the median of the requests' own median time per token."""
        tpot = self.tpot_median_s
        return 1 / tpot if tpot else None


@dataclass(frozen=True)
class RatioEstimate:
    point: float  # statistic(canary) / statistic(production)
    low: float  # the central CONFIDENCE interval of that ratio
    high: float


def bootstrap_ratio(
    canary: Sequence[float],
    production: Sequence[float],
    q: float,
    rounds: int = BOOTSTRAP_ROUNDS,
    seed: int = BOOTSTRAP_SEED,
) -> RatioEstimate:
    """The ratio of the q-quantiles (0.5: medians) of two samples, and its percentile-bootstrap interval: each
    side resampled with replacement, independently, so both variants' spreads widen it."""
    c, p = np.asarray(canary, dtype=np.float64), np.asarray(production, dtype=np.float64)
    rng = np.random.default_rng(seed)
    tiny = 1e-12  # a zero denominator is a ratio beyond any limit, not a division error
    ratios = []
    chunk = max(1, 500_000 // max(len(c), len(p)))  # bounded memory: rounds x samples floats at a time
    for start in range(0, rounds, chunk):
        k = min(chunk, rounds - start)
        qc = np.quantile(c[rng.integers(0, len(c), (k, len(c)))], q, axis=1)
        qp = np.quantile(p[rng.integers(0, len(p), (k, len(p)))], q, axis=1)
        ratios.append(qc / np.maximum(qp, tiny))
    every = np.concatenate(ratios)
    tail = (1 - CONFIDENCE) / 2
    low, high = np.quantile(every, [tail, 1 - tail])
    point = float(np.quantile(c, q)) / max(float(np.quantile(p, q)), tiny)
    return RatioEstimate(point, float(low), float(high))


@dataclass
class Verdict:
    outcome: str  # "pass", "fail", "inconclusive"
    reasons: list[str]
    canary: dict
    production: dict
    # failed on latency alone (TTFT or speed), errors within bounds: a burst on the host can do that to an
    # unchanged model, so the release looks again in a fresh window (RYZ_RELEASE_LATENCY_WINDOWS)
    latency_only: bool = False

    def summary(self) -> str:
        return "; ".join(self.reasons)


def _describe(s: VariantStats, samples: Samples) -> dict:
    """Counts from /metrics; latency from the per-request figures the checks judged (None without any)."""
    tpot = samples.tpot_median_s
    return {
        "requests": int(s.requests),
        "errors": int(s.errors),
        "client_errors": int(s.client_errors),
        "error_rate": s.error_rate,
        "sampled": len(samples.ttft),
        "ttft_median_ms": float(np.median(samples.ttft)) * 1000 if samples.ttft else None,
        "ttft_p95_ms": samples.ttft_p95_ms,
        "tpot_median_ms": None if tpot is None else tpot * 1000,
        "decode_tok_s": samples.decode_tok_s,
    }


def _errors_ok(canary: VariantStats, production: VariantStats, t: Thresholds) -> bool:
    return canary.error_rate <= production.error_rate + t.max_error_rate_delta


def decided(canary: VariantStats, production: VariantStats, t: Thresholds) -> bool:
    """A step can be judged now: enough evidence, or enough answered requests failing to fail it."""
    failing = not _errors_ok(canary, production, t)
    return canary.evidence >= t.min_requests or (canary.requests >= t.min_requests and failing)


def compare(
    canary: VariantStats,
    production: VariantStats,
    t: Thresholds,
    step: int,
    *,
    canary_samples: Samples,
    production_samples: Samples,
) -> Verdict:
    """Judge one step: counts are the two variants' /metrics deltas over it, samples their per-request figures in
    its window. The failed checks, or every check if none failed."""
    c, p = _describe(canary, canary_samples), _describe(production, production_samples)
    n = c["requests"]
    errors_ok = _errors_ok(canary, production, t)
    checks = [  # (passed, reason): each reason states the comparison that decided it
        (
            errors_ok,
            f"canary error rate {c['error_rate']:.1%} {'<=' if errors_ok else '>'} production "
            f"{p['error_rate']:.1%} + {t.max_error_rate_delta:.1%} over {n} requests at step {step}%",
        )
    ]
    if n >= t.min_requests and not errors_ok:  # failing requests are evidence enough to fail
        return Verdict("fail", [checks[0][1]], c, p)
    if canary.evidence < t.min_requests:
        ignored = f"; {c['client_errors']} client errors (4xx) not counted" if c["client_errors"] else ""
        return Verdict(
            "inconclusive",
            [
                f"only {int(canary.evidence)} successful canary requests with latency samples at step {step}% "
                f"(need {t.min_requests}){ignored}"
            ],
            c,
            p,
        )
    checks.append(_ttft_check(canary_samples.ttft, production_samples.ttft, t, step))
    checks.append(_speed_check(canary_samples.tpot, production_samples.tpot, t, step))
    failed = [reason for ok, reason in checks if not ok]
    if failed:
        return Verdict("fail", failed, c, p, latency_only=True)
    return Verdict("pass", [reason for _ok, reason in checks], c, p)


def _ms(seconds: float) -> str:
    ms = seconds * 1000
    return f"{ms:,.0f}" if ms >= 100 else f"{ms:.3g}"  # 3 significant digits: 0.282 ms and 28.2 ms alike


def _rate(tok_s: float) -> str:
    return f"{tok_s:,.0f}" if tok_s >= 100 else f"{tok_s:.3g}"


def _short(what: str, canary: list[float], production: list[float], t: Thresholds, step: int) -> str | None:
    """Why a latency check cannot be compared, if it cannot."""
    if len(canary) >= t.min_samples and len(production) >= t.min_samples:
        return None
    alone = "; the canary takes all routed traffic" if step >= 100 else ""
    return (
        f"{what} not compared: {len(canary)} canary and {len(production)} production requests with figures at "
        f"step {step}% (each side needs {t.min_samples}){alone}"
    )


def _bound(r: RatioEstimate) -> str:
    return f"{CONFIDENCE * 100:.0f} % bound of the ratio {r.low:.2f}..{r.high:.2f}"


def _ttft_check(canary: list[float], production: list[float], t: Thresholds, step: int) -> tuple[bool, str]:
    """Lower is better: p95 TTFT, canary / production against max_ttft_ratio."""
    if short := _short("p95 TTFT", canary, production, t, step):
        return True, short
    r = bootstrap_ratio(canary, production, 0.95)
    c95, p95 = float(np.quantile(canary, 0.95)), float(np.quantile(production, 0.95))
    limit = t.max_ttft_ratio * p95
    head = f"canary p95 TTFT {_ms(c95)} ms"
    against = f"limit {_ms(limit)} ms ({t.max_ttft_ratio:g} x production {_ms(p95)} ms)"
    where = f"ratio {r.point:.2f}, {len(canary)} canary / {len(production)} production requests at step {step}%"
    if r.point <= t.max_ttft_ratio:
        return True, f"{head} <= {against}: {where} ({_bound(r)})"
    if r.low <= t.max_ttft_ratio:
        return True, f"{head} vs {against}: within noise ({_bound(r)} reaches {t.max_ttft_ratio:g}); {where}"
    return False, f"{head} > {against} beyond noise ({_bound(r)} above {t.max_ttft_ratio:g}); {where}"


def _speed_check(canary: list[float], production: list[float], t: Thresholds, step: int) -> tuple[bool, str]:
    """Higher is better: decode tok/s (1 / median time per token), judged as the time-per-token ratio canary /
    production against 1 / min_speed_ratio."""
    if short := _short("decode speed", canary, production, t, step):
        return True, short
    r = bootstrap_ratio(canary, production, 0.5)
    c_tpot, p_tpot = (max(float(np.median(x)), 1e-9) for x in (canary, production))  # a 0 s median: no crash
    most = 1 / t.min_speed_ratio  # the time-per-token ratio the limit allows
    head = f"canary decode {_rate(1 / c_tpot)} tok/s"
    against = (
        f"limit {_rate(t.min_speed_ratio / p_tpot)} tok/s ({t.min_speed_ratio:g} x production {_rate(1 / p_tpot)})"
    )
    where = (
        f"median time per token {_ms(c_tpot)} vs {_ms(p_tpot)} ms, ratio {r.point:.2f} (limit {most:.2f}); "
        f"{len(canary)} canary / {len(production)} production requests at step {step}%"
    )
    if r.point <= most:
        return True, f"{head} >= {against}: {where} ({_bound(r)})"
    if r.low <= most:
        return True, f"{head} vs {against}: within noise ({_bound(r)} reaches {most:.2f}); {where}"
    return False, f"{head} < {against} beyond noise ({_bound(r)} above {most:.2f}); {where}"
