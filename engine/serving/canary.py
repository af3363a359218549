"""Canary analysis: compare the canary with production from the server's Prometheus `/metrics`.

Counters and histograms are cumulative, so a step is judged on the difference between a snapshot at
its start and one at its end: answered requests and server failures (5xx) among them, p95 TTFT (linear
interpolation inside the histogram bucket, as Prometheus' histogram_quantile does), and decode speed (1 / the
median time between a request's tokens, from the per-token latency histogram). Client errors (4xx: bad input,
unknown model, a full queue) are counted apart and reported, never as evidence either way: ten 400s are not ten
healthy canary requests. Too few successful canary requests with latency samples is not a verdict but
"inconclusive": the release pauses instead of passing on no evidence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

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
    # Noise floors: a ratio alone fails on jitter when both sides are fast (a 10 ms TTFT doubling to 20 ms on a
    # busy host); a check fails only when the canary is worse by the ratio AND by this much in absolute terms.
    min_ttft_delta_ms: float = 50.0
    min_tpot_delta_ms: float = 2.0


@dataclass
class Verdict:
    outcome: str  # "pass", "fail", "inconclusive"
    reasons: list[str]
    canary: dict
    production: dict

    def summary(self) -> str:
        return "; ".join(self.reasons)


def _describe(s: VariantStats) -> dict:
    return {
        "requests": int(s.requests),
        "errors": int(s.errors),
        "client_errors": int(s.client_errors),
        "error_rate": s.error_rate,
        "ttft_p95_ms": None if s.ttft_p95 is None else s.ttft_p95 * 1000,
        "decode_tok_s": s.decode_tok_s,
    }


def _errors_ok(canary: VariantStats, production: VariantStats, t: Thresholds) -> bool:
    return canary.error_rate <= production.error_rate + t.max_error_rate_delta


def decided(canary: VariantStats, production: VariantStats, t: Thresholds) -> bool:
    """A step can be judged now: enough evidence, or enough answered requests failing to fail it."""
    failing = not _errors_ok(canary, production, t)
    return canary.evidence >= t.min_requests or (canary.requests >= t.min_requests and failing)


def compare(canary: VariantStats, production: VariantStats, t: Thresholds, step: int) -> Verdict:
    """Judge one step from the two variants' deltas over it: the failed checks, or every check if none failed."""
    c, p = _describe(canary), _describe(production)
    n = c["requests"]
    where = f"over {n} requests at step {step}%"
    errors_ok = _errors_ok(canary, production, t)
    checks = [  # (passed, reason): each reason states the comparison that decided it
        (
            errors_ok,
            f"canary error rate {c['error_rate']:.1%} {'<=' if errors_ok else '>'} production "
            f"{p['error_rate']:.1%} + {t.max_error_rate_delta:.1%} {where}",
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
    if c["ttft_p95_ms"] is not None and p["ttft_p95_ms"] is not None:
        checks.append(
            _worse_check(
                "p95 TTFT", "ms", c["ttft_p95_ms"], p["ttft_p95_ms"], t.max_ttft_ratio, t.min_ttft_delta_ms, where
            )
        )
    if c["decode_tok_s"] is not None and p["decode_tok_s"] is not None:
        checks.append(_speed_check(c["decode_tok_s"], p["decode_tok_s"], t, where))
    failed = [reason for ok, reason in checks if not ok]
    if failed:
        return Verdict("fail", failed, c, p)
    return Verdict("pass", [reason for _ok, reason in checks], c, p)


def _worse_check(
    what: str, unit: str, canary: float, production: float, ratio: float, floor: float, where: str
) -> tuple[bool, str]:
    """Lower is better: the canary fails only when over `ratio` x production AND by more than the noise floor."""
    limit = ratio * production
    if canary <= limit:
        return True, f"canary {what} {canary:.0f} {unit} <= {ratio} x production {production:.0f} {unit} {where}"
    if canary - production <= floor:
        return True, (
            f"canary {what} {canary:.0f} {unit} vs limit {limit:.0f} {unit} ({ratio} x {production:.0f} {unit}): "
            f"within the {floor:g} {unit} noise floor {where}"
        )
    return False, (
        f"canary {what} {canary:.0f} {unit} > {ratio} x production {production:.0f} {unit} and more than the "
        f"{floor:g} {unit} noise floor over it {where}"
    )


def _speed_check(canary: float, production: float, t: Thresholds, where: str) -> tuple[bool, str]:
    """Higher is better: the canary fails only when under the ratio AND slower per token by the noise floor."""
    limit = t.min_speed_ratio * production
    slower_ms = 1000 / canary - 1000 / production
    if canary >= limit:
        return (
            True,
            f"canary decode {canary:.1f} tok/s >= {t.min_speed_ratio} x production {production:.1f} tok/s {where}",
        )
    if slower_ms < t.min_tpot_delta_ms:
        return True, (
            f"canary decode {canary:.1f} tok/s vs limit {limit:.1f} tok/s ({t.min_speed_ratio} x {production:.1f}): "
            f"{slower_ms:.2f} ms per token slower, within the {t.min_tpot_delta_ms:g} ms noise floor {where}"
        )
    return False, (
        f"canary decode {canary:.1f} tok/s < {t.min_speed_ratio} x production {production:.1f} tok/s and "
        f"{slower_ms:.2f} ms per token slower (noise floor {t.min_tpot_delta_ms:g} ms) {where}"
    )
