"""Offline gates: margins, stderr significance, perplexity direction, speed, floors."""

from __future__ import annotations

from engine.settings import Settings
from evaluations.gates import check_floors, compare_to_baseline, gate


def record(acc, se=0.02, ppl=10.0, decode=40.0):
    return {
        "tasks": {
            "demo_mc": {"metrics": {"acc": {"value": acc, "stderr": se}}, "n": 200},
            "demo_ppl": {"metrics": {"word_perplexity": {"value": ppl, "stderr": None}}, "n": 50},
        },
        "bench": {"decode_tok_s": decode, "prefill_tok_s": 100.0},
    }


def test_within_margin_or_noise_passes():
    assert compare_to_baseline(record(0.60), record(0.61), 0.02, 0.1).passed
    assert compare_to_baseline(record(0.55, se=0.04), record(0.60, se=0.04), 0.02, 0.1).passed  # 3 points short, noisy


def test_significant_shortfall_fails_with_numbers():
    result = compare_to_baseline(record(0.40, se=0.01), record(0.60, se=0.01), 0.02, 0.1)
    assert not result.passed
    assert "demo_mc acc 0.4000 vs production 0.6000" in result.reasons[0]


def test_perplexity_is_lower_is_better_and_relative():
    assert compare_to_baseline(record(0.6, ppl=9.0), record(0.6, ppl=10.0), 0.02, 0.1).passed
    bad = compare_to_baseline(record(0.6, ppl=12.0), record(0.6, ppl=10.0), 0.02, 0.1)
    assert not bad.passed and "word_perplexity" in bad.reasons[0]


def test_speed_margin():
    assert compare_to_baseline(record(0.6, decode=37.0), record(0.6, decode=40.0), 0.02, 0.1).passed
    slow = compare_to_baseline(record(0.6, decode=30.0), record(0.6, decode=40.0), 0.02, 0.1)
    assert not slow.passed and "decode 30.0 tok/s vs production 40.0" in slow.reasons[0]


def test_floors_for_the_first_model():
    assert check_floors(record(0.5), {"demo_mc": 0.35}, 0).passed
    low = check_floors(record(0.3), {"demo_mc": 0.35, "unknown_task": 0.9}, 50.0)
    assert not low.passed and len(low.reasons) == 2


def test_one_rule_for_release_and_ci():
    """`gate`: the baseline with the settings' margins, or the settings' floors when there is no baseline."""
    settings = Settings(
        gate_floors={"demo_mc": 0.35}, gate_min_decode_tok_s=0.0, gate_accuracy_margin=0.02, gate_speed_margin=0.1
    )
    assert gate(record(0.5), None, settings).checks == check_floors(record(0.5), {"demo_mc": 0.35}, 0.0).checks
    assert not gate(record(0.3), None, settings).passed
    worse = gate(record(0.40, se=0.01), record(0.60, se=0.01), settings)
    assert (
        worse.reasons
        == compare_to_baseline(
            record(0.40, se=0.01), record(0.60, se=0.01), 0.02, 0.1, settings.gate_speed_min_delta_ms
        ).reasons
        and not worse.passed
    )


def test_group_subtasks_are_judged_through_the_group():
    candidate, baseline = record(0.6), record(0.6)
    candidate["tasks"]["mmlu_offline_law"] = {
        "metrics": {"acc": {"value": 0.0, "stderr": 0.1}},
        "n": 4,
        "parent": "mmlu_offline",
    }
    baseline["tasks"]["mmlu_offline_law"] = {
        "metrics": {"acc": {"value": 1.0, "stderr": 0.1}},
        "n": 4,
        "parent": "mmlu_offline",
    }
    assert compare_to_baseline(candidate, baseline, 0.02, 0.1).passed


def test_speed_is_not_compared_across_cpus():
    candidate, baseline = record(0.6, decode=10.0), record(0.6, decode=40.0)
    candidate["environment"], baseline["environment"] = {"cpu_fingerprint": "a"}, {"cpu_fingerprint": "b"}
    result = compare_to_baseline(candidate, baseline, 0.02, 0.1)
    assert result.passed and any("not compared" in c for c in result.checks)


def test_canary_noise_floors():
    from engine.serving.canary import Thresholds, VariantStats, compare

    def stats(requests, ttft_s, tpot_s):
        return VariantStats(
            requests,
            0,
            {0.01: 0, ttft_s: requests, float("inf"): requests},
            tpot_s * 100,
            100,
            {tpot_s / 2: 0, tpot_s: 100, float("inf"): 100},
        )

    t = Thresholds(min_requests=10)
    jitter = compare(stats(20, 0.016, 0.0025), stats(20, 0.010, 0.0012), t, 50)  # 2x slower but by ms: noise
    assert jitter.outcome == "pass", jitter.reasons
    assert "within the 50 ms noise floor" in jitter.reasons[1] and "within the 2 ms noise floor" in jitter.reasons[2]
    slow = compare(stats(20, 1.5, 0.030), stats(20, 0.010, 0.020), t, 5)
    assert (
        slow.outcome == "fail" and any("TTFT" in r for r in slow.reasons) and any("decode" in r for r in slow.reasons)
    )


def test_speed_noise_floor_for_microsecond_decodes():
    fast_noise = compare_to_baseline(record(0.6, decode=1653.0), record(0.6, decode=44048.0), 0.02, 0.1)
    assert fast_noise.passed  # measured on one tiny model: 0.58 ms per token apart is thread wake-up noise
    slow_big_model = compare_to_baseline(record(0.6, decode=44.0), record(0.6, decode=50.0), 0.02, 0.1)
    assert not slow_big_model.passed  # 2.7 ms per token slower on a 2B model is a regression


def test_canary_speed_is_the_median_not_dragged_by_stalls():
    from engine.serving.canary import Thresholds, VariantStats, compare

    production = VariantStats(
        30, 0, {0.02: 30, float("inf"): 30}, 0.05, 100, {0.0005: 0, 0.001: 100, float("inf"): 100}
    )
    # the same per-token speed, but 3 tokens stalled 100 ms behind the other variant's step: the mean says 3x slower
    stalled = VariantStats(
        30, 0, {0.02: 30, float("inf"): 30}, 0.35, 100, {0.0005: 0, 0.001: 97, 0.1: 100, float("inf"): 100}
    )
    assert compare(stalled, production, Thresholds(min_requests=10), 5).outcome == "pass"


def test_canary_snapshot_reads_the_servers_own_metrics():
    """snapshot() over what ServerMetrics renders (parsed by prometheus_client's parser), quoted labels and all."""
    from engine.serving.canary import snapshot
    from engine.serving.metrics import ServerMetrics

    metrics = ServerMetrics()
    for status, n in (("200", 7), ("500", 2), ("400", 3)):
        for _ in range(n):
            metrics.requests.labels("canary", "/v1/completions", status).inc()
    metrics.requests.labels("production", "/v1/chat/completions", "200").inc(5)
    canary = metrics.for_variant("canary")
    for seconds in (0.01, 0.02, 0.03):
        canary.ttft(seconds)
        canary.token_latency(seconds / 10)
    stats = snapshot(metrics.render().decode())
    assert stats["canary"].requests == 9 and stats["canary"].errors == 2 and stats["production"].requests == 5
    assert stats["canary"].client_errors == 3  # 4xx: counted apart, not as answered requests
    assert stats["canary"].ttft_buckets[float("inf")] == 3 and stats["canary"].tpot_count == 3
    assert 0.0 < stats["canary"].ttft_p95 <= 0.05 and stats["canary"].decode_tok_s > 100


def test_canary_traffic_of_client_errors_only_never_passes():
    """Ten 400s are no evidence: inconclusive, with the 4xx reported; a server failure still counts."""
    from engine.serving.canary import Thresholds, VariantStats, compare

    production = VariantStats(20, 0, {0.02: 20, float("inf"): 20}, 0.02, 20, {0.001: 20, float("inf"): 20})
    only_400s = VariantStats(client_errors=10)
    verdict = compare(only_400s, production, Thresholds(min_requests=5), 50)
    assert verdict.outcome == "inconclusive"
    assert verdict.reasons == [
        "only 0 successful canary requests with latency samples at step 50% (need 5); "
        "10 client errors (4xx) not counted"
    ]
    # answered but failing: 5xx are server failures over answered requests, whatever else
    failing = VariantStats(10, 6, {0.02: 10, float("inf"): 10}, 0.01, 10, {0.001: 10, float("inf"): 10}, 30)
    assert compare(failing, production, Thresholds(min_requests=4), 50).outcome == "fail"
    # successes without latency samples (the histogram never saw them) are not evidence either
    no_samples = VariantStats(10, 0)
    assert compare(no_samples, production, Thresholds(min_requests=5), 50).outcome == "inconclusive"


def test_canary_reasons_state_true_comparisons():
    """Every "<=" / ">=" a reason states holds for the numbers it prints; a check the floor passed says so."""
    import random
    import re

    from engine.serving.canary import Thresholds, VariantStats, compare

    def stats(ttft_s, tpot_s):
        return VariantStats(
            30, 0, {ttft_s: 30, float("inf"): 30}, tpot_s * 30, 30, {tpot_s / 2: 0, tpot_s: 30, float("inf"): 30}
        )

    rng = random.Random(7)
    stated = re.compile(r"canary \S+(?: \S+)? ([\d.]+) (?:ms|tok/s) (<=|>=) ([\d.]+) x production ([\d.]+)")
    for _ in range(300):
        canary, production = (stats(rng.uniform(0.005, 0.5), rng.uniform(0.0002, 0.05)) for _ in range(2))
        for reason in compare(canary, production, Thresholds(min_requests=10), 25).reasons:
            if m := stated.search(reason):
                value, op, ratio, base = float(m[1]), m[2], float(m[3]), float(m[4])
                slack = 0.5 if "ms" in reason.split(" x ")[0] else 0.05  # the printed rounding
                assert value <= ratio * base + slack if op == "<=" else value >= ratio * base - slack, reason
