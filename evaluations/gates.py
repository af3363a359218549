"""Offline gates: is a candidate's evaluation record good enough to release (DESIGN.md "Release" 1)?

Against a baseline (production's record): per task (a group's aggregate, not its subtasks), the headline metric may be
worse by at most the margin, and only a shortfall beyond the margin that is significant given both stderrs fails
(shortfall - margin > 1.96 x sqrt(se_c^2 + se_b^2); without stderr the point estimates decide). Decode tok/s (the
median of the record's bench runs) may be lower by at most the speed margin (a fraction: the floor). Below the floor
the noise comes from the measured runs (bench.decode_tok_s_runs, evaluations/evaluate.py BENCH_REPEATS = 3), never
from an absolute constant: it fails only when even the candidate's fastest run is below (1 - margin) x production's
slowest run, i.e. the two ranges, production's widened by the margin, do not overlap (non-parametric: no
distribution assumed, 3 runs a side). Records without runs (older ones, one run each) fall back to the ms-per-token
noise floor (RYZ_GATE_SPEED_MIN_DELTA_MS): below the floor it fails only if also slower by more than that, and the
check says the noise floor decided because a record has no runs. Each speed check states the comparison that
decided it. Speeds are compared only when both records were measured on the same CPU fingerprint (or either lacks
one); the check then says they were not compared, and a gate that `require_speed`s (the CI gate, `ryz ci-bench`)
fails on it. A gate that compared nothing (no task in common, no speed comparison) fails with that reason, and one
that `require_tasks` fails when no task is in common.

Promote only when better (RYZ_RELEASE_POLICY=improve, the default): passing is not enough to replace production.
The candidate must also be better beyond noise on at least one primary metric:
- a task's headline accuracy (a higher-is-better headline, both stderrs recorded):
  c - b > k x sqrt(se_c^2 + se_b^2), k = RYZ_GATE_IMPROVE_Z (1.96);
- decode speed, both records measured on the same (recorded) CPU fingerprint: with both records' runs, even the
  candidate's slowest run >= (1 + RYZ_GATE_IMPROVE_SPEED_MARGIN) x production's fastest run; without them,
  tok/s >= (1 + margin) x production and faster by more than the ms-per-token noise floor.
Perplexities (no stderr) guard against regressions but never count as better. A candidate that passes and
improves nothing is held (GateResult.held); under not-worse, or without a baseline, `improved` is None.

Without a baseline (the first model ever): absolute floors per task. Every verdict carries its numbers, because it
becomes a registry event.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

Z = 1.96
MIN_RUNS = 2  # per-run decode figures a record needs before its runs, not the ms floor, measure the speed noise
POLICIES = ("improve", "not-worse")
# Which metric speaks for a task, and whether higher is better.
HEADLINE = (
    ("acc_norm", True),
    ("acc", True),
    ("exact_match", True),
    ("pass@1", True),
    ("word_perplexity", False),
    ("byte_perplexity", False),
    ("bits_per_byte", False),
)


@dataclass
class GateResult:
    passed: bool
    reasons: list[str]  # every failed check, in words and numbers
    checks: list[str]  # every check made, passed or not
    # Policy improve against a baseline: better beyond noise on a primary metric? None: not asked (no baseline,
    # or policy not-worse).
    improved: bool | None = None
    improvements: list[str] = field(default_factory=list)  # the primary metrics better beyond noise, with numbers
    improvement_checks: list[str] = field(default_factory=list)  # every primary-metric comparison, better or not

    @property
    def held(self) -> bool:
        """Passed the gates but, under policy improve, not better than production: the release holds it."""
        return self.passed and self.improved is False

    def summary(self) -> str:
        if self.reasons:
            return "; ".join(self.reasons)
        text = f"all {len(self.checks)} gate checks passed"
        if self.improved:
            return f"{text}; better than production: {'; '.join(self.improvements)}"
        if self.improved is False:
            why = "; ".join(self.improvement_checks) or "no primary metric to compare"
            return f"{text}; no metric better beyond noise: {why}"
        return text


def headline(task_result: dict) -> tuple[str, bool] | None:
    metrics = task_result["metrics"]
    for name, higher in HEADLINE:
        if name in metrics and metrics[name]["value"] is not None:
            return name, higher
    return None


def compare_to_baseline(
    candidate: dict,
    baseline: dict,
    accuracy_margin: float,
    speed_margin: float,
    speed_min_delta_ms: float = 1.0,
    *,
    policy: str = "not-worse",
    improve_z: float = Z,
    improve_speed_margin: float = 0.10,
    require_tasks: bool = False,
    require_speed: bool = False,
) -> GateResult:
    """Not worse on any gated metric (passed), and under policy improve also whether better beyond noise on a
    primary one (improved). Comparing nothing fails; `require_tasks` / `require_speed` fail a gate that compared
    no task / no decode speed (a CI gate must compare both to mean anything)."""
    if policy not in POLICIES:
        raise ValueError(f"unknown release policy {policy!r}; one of {', '.join(POLICIES)}")
    improve = policy == "improve"
    reasons, checks, improvements, improvement_checks = [], [], [], []
    for task, result in sorted(candidate["tasks"].items()):
        # Subtasks of a group (MMLU's 57 subjects) are judged through the group: 57 noisy tests would fail by chance.
        if result.get("parent") or task not in baseline["tasks"] or (h := headline(result)) is None:
            continue
        metric, higher = h
        c, b = result["metrics"][metric], baseline["tasks"][task]["metrics"].get(metric)
        if b is None:
            continue
        # For lower-is-better metrics the margin is relative (perplexities have no fixed scale).
        shortfall = (b["value"] - c["value"]) if higher else (c["value"] - b["value"]) / max(b["value"], 1e-12)
        margin = accuracy_margin
        both_se = c["stderr"] is not None and b["stderr"] is not None
        se = math.hypot(c["stderr"] or 0.0, b["stderr"] or 0.0) if both_se else 0.0
        if not higher:
            se /= max(b["value"], 1e-12)
        excess = shortfall - margin
        worse = excess > Z * se
        noise = f"{Z} x stderr {se:.4f} = {Z * se:.4f}" if both_se else "no stderr"
        if shortfall <= 0:
            verdict = "not worse"
        elif shortfall <= margin:
            verdict = "within the margin"
        elif worse:
            verdict = f"{excess:.4f} beyond the margin" + (f" > {Z * se:.4f}" if both_se else "") + ": worse"
        else:
            verdict = f"{excess:.4f} beyond the margin <= {Z * se:.4f}: within noise"
        change = (-shortfall if higher else shortfall) + 0.0  # signed c - b (relative for perplexities); no -0.0
        text = (
            f"{task} {metric} {c['value']:.4f} vs production {b['value']:.4f} "
            f"({change:+.4f}{'' if higher else ' relative'}, margin {margin:.3f}, {noise}: {verdict})"
        )
        checks.append(text)
        if worse:
            reasons.append(f"accuracy: {text}")
        if improve and higher:
            # Better only beyond the noise of both measurements; without stderrs nothing says how noisy they are.
            gain, bar = c["value"] - b["value"] + 0.0, improve_z * se
            head = f"{task} {metric} {c['value']:.4f} vs production {b['value']:.4f}"
            if not both_se:
                improvement_checks.append(f"{head}: no stderr, not counted as better")
            elif gain > bar:
                improvement_checks.append(f"{head} ({gain:+.4f} > {improve_z} x stderr {se:.4f} = {bar:.4f})")
                improvements.append(improvement_checks[-1])
            else:
                improvement_checks.append(f"{head} ({gain:+.4f} <= {improve_z} x stderr {se:.4f} = {bar:.4f})")
    compared_tasks = len(checks)
    cb, bb = candidate.get("bench"), baseline.get("bench")
    cpu_c = (candidate.get("environment") or {}).get("cpu_fingerprint")
    cpu_b = (baseline.get("environment") or {}).get("cpu_fingerprint")
    speed_skipped = None  # why decode speed was not compared
    if cb and bb and cpu_c and cpu_b and cpu_c != cpu_b:
        # Speeds measured on different CPUs do not compare (a CI runner vs the machine that wrote the baseline).
        speed_skipped = f"baseline measured on CPU {cpu_b}, this run on {cpu_c}"
    elif cb and bb:
        slow, text = speed_regression(cb, bb, speed_margin, speed_min_delta_ms)
        checks.append(text)
        if slow:
            reasons.append(f"speed: {text}")
    else:
        missing = [who for who, b in (("candidate", cb), ("baseline", bb)) if not b]
        speed_skipped = f"no benchmark in the {' and '.join(missing)} record"
    if speed_skipped:
        checks.append(f"decode speed not compared: {speed_skipped}")
    no_task = None
    if not compared_tasks:
        common = sorted(set(candidate["tasks"]) & set(baseline["tasks"]))
        no_task = (
            f"no task in common (candidate: {', '.join(sorted(candidate['tasks'])) or 'none'}; baseline: "
            f"{', '.join(sorted(baseline['tasks'])) or 'none'})"
            if not common
            else f"no headline metric in common on {', '.join(common)}"
        )
    if no_task and speed_skipped:
        reasons.append(f"nothing compared: {no_task}, and decode speed not compared: {speed_skipped}")
    else:
        if no_task and require_tasks:
            reasons.append(f"accuracy not compared: {no_task}")
        if speed_skipped and require_speed:
            reasons.append(
                f"speed not compared: {speed_skipped}; measure the baseline on this machine "
                "(ryz ci-bench --baseline-model)"
            )
    if improve:
        improvement_checks.append(
            speed_improvement(cb, bb, cpu_c, cpu_b, improve_speed_margin, speed_min_delta_ms, improvements)
        )
    return GateResult(
        not reasons,
        reasons,
        checks,
        improved=bool(improvements) if improve else None,
        improvements=improvements,
        improvement_checks=improvement_checks,
    )


def decode_runs(bench: dict) -> list[float] | None:
    """The record's per-run decode tok/s (bench.decode_tok_s_runs), or None when it has fewer than MIN_RUNS
    usable ones (records written with BENCH_REPEATS = 1, before the runs were kept): one run measures no spread."""
    runs = bench.get("decode_tok_s_runs")
    if not isinstance(runs, list):
        return None
    values = [float(v) for v in runs if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0]
    values = [v for v in values if math.isfinite(v)]
    return values if len(values) >= MIN_RUNS and len(values) == len(runs) else None


def _no_runs(cb: dict, bb: dict) -> str:
    """Why the ms-per-token floor decides: which record lacks per-run figures."""
    missing = [who for who, b in (("candidate", cb), ("production", bb)) if decode_runs(b) is None]
    which = " and ".join(missing) + (" records" if len(missing) > 1 else " record")
    return f"no decode runs in the {which} to measure the noise"


def _runs_head(c_tok: float, b_tok: float, c_runs: list[float], b_runs: list[float]) -> str:
    return (
        f"decode {c_tok:.1f} tok/s vs production {b_tok:.1f} (medians, runs {min(c_runs):.1f}-{max(c_runs):.1f} "
        f"vs {min(b_runs):.1f}-{max(b_runs):.1f}, {1000 / c_tok - 1000 / b_tok:+.2f} ms per token)"
    )


def speed_regression(cb: dict, bb: dict, margin: float, noise_ms: float) -> tuple[bool, str]:
    """(slower beyond noise, the check in words). Decode tok/s (the median of the record's runs) may be lower than
    production by `margin` (the floor). Below the floor:
    - both records carry their runs (decode_runs): the noise is their measured spread, a non-parametric rule: it
      fails only when even the candidate's fastest run is below (1 - margin) x production's slowest run (the two
      ranges, production's widened by the margin, do not overlap); otherwise it is within the runs' spread;
    - either lacks them (older records, one run each): it fails only when also slower by more than `noise_ms`
      per token (RYZ_GATE_SPEED_MIN_DELTA_MS), and the check says the floor decided and why."""
    c_tok, b_tok = cb["decode_tok_s"], bb["decode_tok_s"]
    floor = b_tok * (1 - margin)
    of = f"{1 - margin:.2f} x production"
    c_runs, b_runs = decode_runs(cb), decode_runs(bb)
    if c_runs and b_runs:
        head = _runs_head(c_tok, b_tok, c_runs, b_runs)
        if c_tok >= floor:
            return False, f"{head}: median >= floor {floor:.1f} ({of})"
        fastest, slowest = max(c_runs), min(b_runs)
        bar = slowest * (1 - margin)
        runs = f"fastest run {fastest:.1f} {{}} {1 - margin:.2f} x production's slowest run {slowest:.1f} = {bar:.1f}"
        if fastest >= bar:
            return False, f"{head}: median < floor {floor:.1f} ({of}) but {runs.format('>=')}: within the runs' spread"
        return True, f"{head}: median < floor {floor:.1f} ({of}) and {runs.format('<')}: slower beyond the runs' spread"
    slower_ms = 1000 / c_tok - 1000 / b_tok
    head = f"decode {c_tok:.1f} tok/s vs production {b_tok:.1f}"
    noise = f"the {noise_ms:g} ms noise floor ({_no_runs(cb, bb)})"
    # Below the floor and by a time that matters: tiny models decode in microseconds, where a thread waking
    # up late moves tok/s by 10x (measured: the same 1.7 M-parameter model at 1,653 and 44,048 tok/s).
    if c_tok >= floor:
        return False, f"{head}: >= floor {floor:.1f} ({of}; {slower_ms:+.2f} ms per token)"
    if slower_ms <= noise_ms:
        return False, f"{head}: < floor {floor:.1f} ({of}) but {slower_ms:.2f} ms per token slower: within {noise}"
    return True, f"{head}: < floor {floor:.1f} ({of}) and {slower_ms:.2f} ms per token slower > {noise}"


def speed_improvement(
    cb: dict | None,
    bb: dict | None,
    cpu_c: str | None,
    cpu_b: str | None,
    margin: float,
    noise_ms: float,
    improvements: list[str],
) -> str:
    """Policy improve: is decode speed better beyond noise? The comparison in words (appended to `improvements`
    when it is). Stricter than the regression check: both CPU fingerprints must be recorded and equal, since a
    claimed gain is what replaces production. With both records' runs: better only when even the candidate's
    slowest run is >= (1 + margin) x production's fastest run (the ranges, production's widened by the margin, do
    not overlap). Without them: median >= (1 + margin) x production and faster by more than `noise_ms` per token."""
    if not (cb and bb):
        return f"decode speed not compared: no benchmark in the {'candidate' if not cb else 'production'} record"
    if not (cpu_c and cpu_b) or cpu_c != cpu_b:
        return f"decode speed not compared: production measured on CPU {cpu_b or '?'}, the candidate on {cpu_c or '?'}"
    c_tok, b_tok = cb["decode_tok_s"], bb["decode_tok_s"]
    c_runs, b_runs = decode_runs(cb), decode_runs(bb)
    if c_runs and b_runs:
        slowest, fastest = min(c_runs), max(b_runs)
        bar = fastest * (1 + margin)
        head = _runs_head(c_tok, b_tok, c_runs, b_runs)
        runs = f"slowest run {slowest:.1f} {{}} {1 + margin:.2f} x production's fastest run {fastest:.1f} = {bar:.1f}"
        if slowest < bar:
            return f"{head}: {runs.format('<')}"
        improvements.append(f"{head}: {runs.format('>=')}: faster beyond the runs' spread")
        return improvements[-1]
    target = b_tok * (1 + margin)
    faster_ms = 1000 / b_tok - 1000 / c_tok
    head = f"decode {c_tok:.1f} tok/s vs production {b_tok:.1f}"
    of = f"{1 + margin:.2f} x production = {target:.1f}"
    if c_tok < target:
        return f"{head} (< {of})"
    noise = f"the {noise_ms:g} ms noise floor, {_no_runs(cb, bb)}"
    if faster_ms <= noise_ms:
        # The same noise floor as the regression check: 10 % of a microsecond decode is thread wake-up jitter.
        return f"{head} (>= {of}, but {faster_ms:.2f} ms per token faster: within {noise})"
    improvements.append(f"{head} (>= {of}, {faster_ms:.2f} ms per token faster > {noise})")
    return improvements[-1]


def gate(
    candidate: dict, baseline: dict | None, settings, *, require_tasks: bool = False, require_speed: bool = False
) -> GateResult:
    """The one rule the release and the CI evaluation share: against the baseline's record with the settings'
    margins and release policy (`held`: passed but not better, under improve), or, with no baseline (the first
    model, or a production without a record), the settings' floors (improved None: nothing to be better than).
    `require_tasks` / `require_speed`: see compare_to_baseline (the CI gate sets both)."""
    if baseline is None:
        return check_floors(candidate, settings.gate_floors, settings.gate_min_decode_tok_s)
    return compare_to_baseline(
        candidate,
        baseline,
        settings.gate_accuracy_margin,
        settings.gate_speed_margin,
        settings.gate_speed_min_delta_ms,
        policy=settings.release_policy,
        improve_z=settings.gate_improve_z,
        improve_speed_margin=settings.gate_improve_speed_margin,
        require_tasks=require_tasks,
        require_speed=require_speed,
    )


def check_floors(candidate: dict, floors: dict[str, float], min_decode_tok_s: float) -> GateResult:
    """The first model ever: absolute floors (task -> minimum headline value; higher-is-better metrics)."""
    reasons, checks = [], []
    for task, floor in sorted(floors.items()):
        result = candidate["tasks"].get(task)
        if result is None:
            continue  # a floor for a task this suite did not run
        metric, higher = headline(result) or (None, True)
        if metric is None:
            continue
        value = result["metrics"][metric]["value"]
        ok = value >= floor if higher else value <= floor
        op = (">=" if ok else "<") if higher else ("<=" if ok else ">")  # the comparison that held
        text = f"{task} {metric} {value:.4f} {op} floor {floor:.4f}"
        checks.append(text)
        if not ok:
            reasons.append(f"floor: {task} {metric} {value:.4f} below the floor {floor:.4f}")
    if (bench := candidate.get("bench")) and min_decode_tok_s > 0:
        below = bench["decode_tok_s"] < min_decode_tok_s
        text = f"decode {bench['decode_tok_s']:.1f} tok/s {'<' if below else '>='} floor {min_decode_tok_s:.1f}"
        checks.append(text)
        if below:
            reasons.append(f"floor: decode {bench['decode_tok_s']:.1f} tok/s below {min_decode_tok_s:.1f}")
    return GateResult(not reasons, reasons, checks)
