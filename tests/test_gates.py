"""Offline gates: margins, stderr significance, perplexity direction, speed, floors."""

from __future__ import annotations

import pytest

from engine.settings import Settings
from evaluations.gates import check_floors, compare_to_baseline, gate


def record(acc, se=0.02, ppl=10.0, decode=40.0, cpu=None, runs=None):
    """`runs`: the bench's per-run decode tok/s (decode_tok_s_runs; `decode` becomes their median); None: an
    older record with one run and no runs field."""
    bench = {"decode_tok_s": decode, "prefill_tok_s": 100.0}
    if runs is not None:
        bench.update(decode_tok_s=sorted(runs)[len(runs) // 2], decode_tok_s_runs=list(runs))
    return {
        "tasks": {
            "demo_mc": {"metrics": {"acc": {"value": acc, "stderr": se}}, "n": 200},
            "demo_ppl": {"metrics": {"word_perplexity": {"value": ppl, "stderr": None}}, "n": 50},
        },
        "bench": bench,
        "environment": {"cpu_fingerprint": cpu} if cpu else {},
    }


def improve(candidate, baseline, **kw):
    return gate(candidate, baseline, Settings(release_policy="improve", **kw))


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


def test_speed_noise_floor_for_microsecond_decodes():
    fast_noise = compare_to_baseline(record(0.6, decode=1653.0), record(0.6, decode=44048.0), 0.02, 0.1)
    assert fast_noise.passed  # measured on one tiny model: 0.58 ms per token apart is thread wake-up noise
    slow_big_model = compare_to_baseline(record(0.6, decode=44.0), record(0.6, decode=50.0), 0.02, 0.1)
    assert not slow_big_model.passed  # 2.7 ms per token slower on a 2B model is a regression


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
    from engine.serving.canary import Samples, Thresholds, VariantStats, compare

    none = {"canary_samples": Samples(), "production_samples": Samples()}  # these rules read the counters only
    production = VariantStats(20, 0, {0.02: 20, float("inf"): 20}, 0.02, 20, {0.001: 20, float("inf"): 20})
    only_400s = VariantStats(client_errors=10)
    verdict = compare(only_400s, production, Thresholds(min_requests=5), 50, **none)
    assert verdict.outcome == "inconclusive"
    assert verdict.reasons == [
        "only 0 successful canary requests with latency samples at step 50% (need 5); "
        "10 client errors (4xx) not counted"
    ]
    # answered but failing: 5xx are server failures over answered requests, whatever else
    failing = VariantStats(10, 6, {0.02: 10, float("inf"): 10}, 0.01, 10, {0.001: 10, float("inf"): 10}, 30)
    assert compare(failing, production, Thresholds(min_requests=4), 50, **none).outcome == "fail"
    # successes without latency samples (the histogram never saw them) are not evidence either
    no_samples = VariantStats(10, 0)
    assert compare(no_samples, production, Thresholds(min_requests=5), 50, **none).outcome == "inconclusive"


def test_improved_on_accuracy_beyond_noise():
    result = improve(record(0.62, se=0.03), record(0.40, se=0.035))
    assert result.passed and result.improved is True and not result.held
    # 0.22 > 1.96 x hypot(0.03, 0.035) = 0.0904
    assert result.improvements == ["demo_mc acc 0.6200 vs production 0.4000 (+0.2200 > 1.96 x stderr 0.0461 = 0.0904)"]
    assert "better than production: demo_mc acc 0.6200 vs production 0.4000" in result.summary()


def test_improved_on_speed_on_the_same_cpu():
    # 125 vs 100 tok/s: 8.0 vs 10.0 ms per token, 2 ms faster > the 1 ms noise floor, and >= 1.10 x production
    result = improve(record(0.60, decode=125.0, cpu="a"), record(0.60, decode=100.0, cpu="a"))
    assert result.improved is True and not result.held
    assert result.improvements == [
        "decode 125.0 tok/s vs production 100.0 (>= 1.10 x production = 110.0, "
        "2.00 ms per token faster > the 1 ms noise floor, "
        "no decode runs in the candidate and production records to measure the noise)"
    ]
    # as fast again but in microseconds: 10 % of a 0.1 ms decode is jitter, not a gain
    tiny = improve(record(0.60, decode=12500.0, cpu="a"), record(0.60, decode=10000.0, cpu="a"))
    assert tiny.held and "0.02 ms per token faster: within the 1 ms noise floor, no decode runs" in tiny.summary()


def test_speed_is_not_an_improvement_across_cpus():
    other = improve(record(0.60, decode=125.0, cpu="a"), record(0.60, decode=100.0, cpu="b"))
    assert other.passed and other.improved is False and other.held
    assert "decode speed not compared: production measured on CPU b, the candidate on a" in other.summary()
    unknown = improve(record(0.60, decode=125.0), record(0.60, decode=100.0))  # no fingerprint: no claim either
    assert unknown.held


def test_equal_candidate_is_held_with_the_reason():
    result = improve(record(0.601, se=0.014, cpu="a"), record(0.600, se=0.014, cpu="a"))
    assert result.passed and result.improved is False and result.held and result.improvements == []
    assert result.summary() == (
        "all 3 gate checks passed; no metric better beyond noise: "
        "demo_mc acc 0.6010 vs production 0.6000 (+0.0010 <= 1.96 x stderr 0.0198 = 0.0388); "
        "decode 40.0 tok/s vs production 40.0 (< 1.10 x production = 44.0)"
    )


def test_worse_candidate_fails_and_is_not_held():
    result = improve(record(0.40, se=0.01, decode=80.0, cpu="a"), record(0.60, se=0.01, decode=40.0, cpu="a"))
    assert not result.passed and not result.held  # rejected, even though faster
    assert result.improved is True and result.summary().startswith("accuracy: demo_mc acc 0.4000 vs production 0.6000")


def test_not_worse_policy_asks_nothing_more():
    result = gate(record(0.60), record(0.60), Settings(release_policy="not-worse"))
    assert result.passed and result.improved is None and not result.held and result.improvement_checks == []
    assert result.summary() == "all 3 gate checks passed"
    first = gate(record(0.60), None, Settings(release_policy="improve", gate_floors={"demo_mc": 0.35}))
    assert first.passed and first.improved is None and not first.held  # no production: nothing to be better than
    with pytest.raises(ValueError, match="unknown release policy"):
        compare_to_baseline(record(0.6), record(0.6), 0.02, 0.1, policy="better")


def test_speed_check_says_what_decided_it():
    at_floor = compare_to_baseline(record(0.6, decode=90.0), record(0.6, decode=100.0), 0.02, 0.1)
    assert (
        at_floor.checks[-1]
        == "decode 90.0 tok/s vs production 100.0: >= floor 90.0 (0.90 x production; +1.11 ms per token)"
    )
    # 80 vs 100 tok/s: 1000/80 - 1000/100 = 2.5 ms per token slower, below the floor: the noise floor decides
    noisy = compare_to_baseline(record(0.6, decode=80.0), record(0.6, decode=100.0), 0.02, 0.1, 5.0)
    assert noisy.passed and noisy.checks[-1] == (
        "decode 80.0 tok/s vs production 100.0: < floor 90.0 (0.90 x production) but 2.50 ms per token slower: "
        "within the 5 ms noise floor (no decode runs in the candidate and production records to measure the noise)"
    )
    slow = compare_to_baseline(record(0.6, decode=80.0), record(0.6, decode=100.0), 0.02, 0.1, 1.0)
    assert slow.reasons == [
        "speed: decode 80.0 tok/s vs production 100.0: < floor 90.0 (0.90 x production) and 2.50 ms per token "
        "slower > the 1 ms noise floor (no decode runs in the candidate and production records to measure the noise)"
    ]


# Speed noise from the records' own runs (bench.decode_tok_s_runs, BENCH_REPEATS = 3), not from the ms floor.
TINY = [3480.0, 3543.0, 3560.0]  # production: a tiny model at 0.28 ms per token
TINY_3_5X = [1010.0, 1020.0, 1040.0]  # the candidate: 3.5x slower, 0.98 ms per token, 0.70 ms apart (< the 1 ms floor)


def test_tiny_model_3_5x_slower_fails_on_its_runs():
    slow = compare_to_baseline(record(0.6, runs=TINY_3_5X), record(0.6, runs=TINY), 0.02, 0.1)
    assert not slow.passed
    assert slow.reasons == [
        "speed: decode 1020.0 tok/s vs production 3543.0 (medians, runs 1010.0-1040.0 vs 3480.0-3560.0, "
        "+0.70 ms per token): median < floor 3188.7 (0.90 x production) and fastest run 1040.0 < 0.90 x "
        "production's slowest run 3480.0 = 3132.0: slower beyond the runs' spread"
    ]
    # the same medians from records without runs: the 1 ms floor lets it through, and the check says why
    old = compare_to_baseline(record(0.6, decode=1020.0), record(0.6, decode=3543.0), 0.02, 0.1)
    assert old.passed and old.checks[-1] == (
        "decode 1020.0 tok/s vs production 3543.0: < floor 3188.7 (0.90 x production) but 0.70 ms per token slower: "
        "within the 1 ms noise floor (no decode runs in the candidate and production records to measure the noise)"
    )


def test_noisy_equal_tiny_model_passes_within_its_runs():
    # the same 1.7 M-parameter model, measured twice: a late thread wake-up spreads a run over 1,653..44,048 tok/s
    noisy = compare_to_baseline(
        record(0.6, runs=[1653.0, 2400.0, 44048.0]), record(0.6, runs=[1700.0, 38000.0, 44000.0]), 0.02, 0.1
    )
    assert noisy.passed and noisy.checks[-1] == (
        "decode 2400.0 tok/s vs production 38000.0 (medians, runs 1653.0-44048.0 vs 1700.0-44000.0, "
        "+0.39 ms per token): median < floor 34200.0 (0.90 x production) but fastest run 44048.0 >= 0.90 x "
        "production's slowest run 1700.0 = 1530.0: within the runs' spread"
    )
    steady = compare_to_baseline(record(0.6, runs=[3400.0, 3500.0, 3600.0]), record(0.6, runs=TINY), 0.02, 0.1)
    assert steady.passed and steady.checks[-1].endswith("): median >= floor 3188.7 (0.90 x production)")


def test_speed_without_runs_on_either_side_falls_back_to_the_ms_floor():
    # production's record predates the runs (one run, no decode_tok_s_runs): the ms floor decides, and says why
    half = compare_to_baseline(record(0.6, runs=TINY_3_5X), record(0.6, decode=3543.0), 0.02, 0.1)
    assert half.passed and half.checks[-1].endswith(
        "within the 1 ms noise floor (no decode runs in the production record to measure the noise)"
    )
    # one run is no spread: a record with a single run counts as having none
    single = compare_to_baseline(record(0.6, runs=[1020.0]), record(0.6, runs=TINY), 0.02, 0.1)
    assert single.passed and "(no decode runs in the candidate record to measure the noise)" in single.checks[-1]
    big = compare_to_baseline(record(0.6, decode=44.0), record(0.6, runs=[49.0, 50.0, 51.0]), 0.02, 0.1)
    assert not big.passed and big.reasons[0].endswith(
        "2.73 ms per token slower > the 1 ms noise floor (no decode runs in the candidate record to measure the noise)"
    )


def test_speed_improvement_from_the_runs():
    # 12,500 vs 10,000 tok/s is 0.02 ms per token (within the old 1 ms floor), but the runs do not overlap
    fast = improve(
        record(0.60, cpu="a", runs=[12400.0, 12500.0, 12600.0]), record(0.60, cpu="a", runs=[9900.0, 10000.0, 10100.0])
    )
    assert fast.improved is True and not fast.held
    assert fast.improvements == [
        "decode 12500.0 tok/s vs production 10000.0 (medians, runs 12400.0-12600.0 vs 9900.0-10100.0, "
        "-0.02 ms per token): slowest run 12400.0 >= 1.10 x production's fastest run 10100.0 = 11110.0: "
        "faster beyond the runs' spread"
    ]
    # a faster median whose slowest run falls inside production's range widened by the margin: not a gain
    overlap = improve(
        record(0.60, cpu="a", runs=[9000.0, 12500.0, 30000.0]), record(0.60, cpu="a", runs=[9500.0, 10000.0, 11000.0])
    )
    assert overlap.held and overlap.improvement_checks[-1].endswith(
        "slowest run 9000.0 < 1.10 x production's fastest run 11000.0 = 12100.0"
    )
    # the same CPU is still required, runs or not
    other = improve(
        record(0.60, cpu="a", runs=[12400.0, 12500.0, 12600.0]), record(0.60, cpu="b", runs=[9900.0, 10000.0, 10100.0])
    )
    assert (
        other.held and "decode speed not compared: production measured on CPU b, the candidate on a" in other.summary()
    )


def test_floor_checks_state_the_comparison_that_held():
    low = check_floors(record(0.3, decode=10.0), {"demo_mc": 0.35}, 50.0)
    assert low.checks == ["demo_mc acc 0.3000 < floor 0.3500", "decode 10.0 tok/s < floor 50.0"]


# The gate-suite evaluation records of a `make run` on the demo zoo (s bootstraps on the floors, m is gated against
# s, ptq against m), measured on one machine (CPU aa0bbfbdb4ab88b2): headline metrics, stderrs, decode tok/s.
DEMO = {
    "ryz-demo-s": {
        "mc": (0.540, 0.03533),
        "gen": (0.26, 0.06266),
        "ppl": 5.4919,
        "mmlu": (0.2211, 0.02444),
        "tok_s": 10388.4,
    },
    "ryz-demo-m": {
        "mc": (0.995, 0.00500),
        "gen": (0.94, 0.03393),
        "ppl": 3.4358,
        "mmlu": (0.2491, 0.02566),
        "tok_s": 9160.2,
    },
    "ryz-demo-ptq": {
        "mc": (0.550, 0.03527),
        "gen": (0.12, 0.04642),
        "ppl": 9.8224,
        "mmlu": (0.2316, 0.02493),
        "tok_s": 9668.7,
    },
}


def demo_record(name):
    d = DEMO[name]

    def metric(key, value, se):
        return {"metrics": {key: {"value": value, "stderr": se}}}

    return {
        "tasks": {
            "demo_mc": metric("acc_norm", *d["mc"]),
            "demo_gen": metric("exact_match", *d["gen"]),
            "demo_ppl": metric("word_perplexity", d["ppl"], None),
            "mmlu_offline": metric("acc", *d["mmlu"]),
        },
        "bench": {"decode_tok_s": d["tok_s"]},
        "environment": {"cpu_fingerprint": "aa0bbfbdb4ab88b2"},
    }


def test_the_demo_story_under_policy_improve():
    m = improve(demo_record("ryz-demo-m"), demo_record("ryz-demo-s"))
    assert m.passed and m.improved and not m.held
    assert [i.split(" (")[0] for i in m.improvements] == [
        "demo_gen exact_match 0.9400 vs production 0.2600",  # +0.68 > 1.96 x 0.0713 = 0.1397
        "demo_mc acc_norm 0.9950 vs production 0.5400",  # +0.455 > 1.96 x 0.0357 = 0.0699
    ]
    # m decodes 12 % slower than s, but by 0.01 ms per token: the noise floor, and the check says so
    assert "but 0.01 ms per token slower: within the 1 ms noise floor (no decode runs in" in m.checks[-1]
    ptq = improve(demo_record("ryz-demo-ptq"), demo_record("ryz-demo-m"))
    assert not ptq.passed and not ptq.held
    assert {r.split(" ")[1] for r in ptq.reasons} == {"demo_gen", "demo_mc", "demo_ppl"}


def test_a_gate_that_compared_nothing_fails_with_the_reason():
    candidate, baseline = record(0.6), record(0.6)
    baseline["tasks"] = {"other_task": baseline["tasks"]["demo_mc"]}
    candidate["bench"] = None
    result = compare_to_baseline(candidate, baseline, 0.02, 0.1)
    assert not result.passed
    assert result.reasons == [
        "nothing compared: no task in common (candidate: demo_mc, demo_ppl; baseline: other_task), and decode "
        "speed not compared: no benchmark in the candidate record"
    ]
    # Speed alone was compared: the release's rule passes on it; the CI gate also requires a task in common.
    candidate["bench"] = record(0.6)["bench"]
    assert compare_to_baseline(candidate, baseline, 0.02, 0.1).passed
    ci = compare_to_baseline(candidate, baseline, 0.02, 0.1, require_tasks=True, require_speed=True)
    assert not ci.passed and ci.reasons[0].startswith("accuracy not compared: no task in common")


def test_the_ci_gate_fails_when_speed_was_measured_on_another_cpu():
    candidate, baseline = record(0.6, cpu="runner"), record(0.6, cpu="dev-box")
    result = gate(candidate, baseline, Settings(), require_tasks=True, require_speed=True)
    assert not result.passed
    assert result.reasons == [
        "speed not compared: baseline measured on CPU dev-box, this run on runner; measure the baseline on this "
        "machine (ryz ci-bench --baseline-model)"
    ]
    assert gate(record(0.6, cpu="a"), record(0.6, cpu="a"), Settings(), require_speed=True).passed
