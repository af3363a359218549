"""Offline gates: is a candidate's evaluation record good enough to release (DESIGN.md "Release" 1)?

Against a baseline (production's record): per task (a group's aggregate, not its subtasks), the headline metric may be
worse by at most the
margin, and only a shortfall beyond the margin that is significant given both stderrs fails
(shortfall - margin > 1.96 x sqrt(se_c^2 + se_b^2); without stderr the point estimates decide); decode
tok/s may be lower by at most the speed margin (a fraction), and must also be slower by more than a noise floor
in ms per token before it fails. Without a baseline (the first model ever):
absolute floors per task. Every verdict carries its numbers, because it becomes a registry event.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

Z = 1.96
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

    def summary(self) -> str:
        return "; ".join(self.reasons) if self.reasons else f"all {len(self.checks)} gate checks passed"


def headline(task_result: dict) -> tuple[str, bool] | None:
    metrics = task_result["metrics"]
    for name, higher in HEADLINE:
        if name in metrics and metrics[name]["value"] is not None:
            return name, higher
    return None


def compare_to_baseline(
    candidate: dict, baseline: dict, accuracy_margin: float, speed_margin: float, speed_min_delta_ms: float = 1.0
) -> GateResult:
    reasons, checks = [], []
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
        se = (
            math.hypot(c["stderr"] or 0.0, b["stderr"] or 0.0)
            if (c["stderr"] is not None and b["stderr"] is not None)
            else 0.0
        )
        if not higher:
            se /= max(b["value"], 1e-12)
        worse = shortfall - margin > Z * se
        text = (
            f"{task} {metric} {c['value']:.4f} vs production {b['value']:.4f} "
            f"({'-' if higher else '+'}{abs(shortfall):.4f}{'' if higher else ' relative'}, margin {margin:.3f}, "
            f"{Z} x stderr {Z * se:.4f})"
        )
        checks.append(text)
        if worse:
            reasons.append(f"accuracy: {text}")
    cb, bb = candidate.get("bench"), baseline.get("bench")
    cpu_c = (candidate.get("environment") or {}).get("cpu_fingerprint")
    cpu_b = (baseline.get("environment") or {}).get("cpu_fingerprint")
    if cb and bb and cpu_c and cpu_b and cpu_c != cpu_b:
        # Speeds measured on different CPUs do not compare (a CI runner vs the machine that wrote the baseline).
        checks.append(f"decode speed not compared: baseline measured on CPU {cpu_b}, this run on {cpu_c}")
    elif cb and bb:
        floor = bb["decode_tok_s"] * (1 - speed_margin)
        slower_ms = 1000 / cb["decode_tok_s"] - 1000 / bb["decode_tok_s"]
        text = (
            f"decode {cb['decode_tok_s']:.1f} tok/s vs production {bb['decode_tok_s']:.1f} "
            f"(floor {floor:.1f} = {1 - speed_margin:.2f} x production; {slower_ms:+.2f} ms per token)"
        )
        checks.append(text)
        # Below the floor and by a time that matters: tiny models decode in microseconds, where a thread waking
        # up late moves tok/s by 10x (measured: the same 1.7 M-parameter model at 1,653 and 44,048 tok/s).
        if cb["decode_tok_s"] < floor and slower_ms > speed_min_delta_ms:
            reasons.append(f"speed: {text}")
    return GateResult(not reasons, reasons, checks)


def gate(candidate: dict, baseline: dict | None, settings) -> GateResult:
    """The one rule the release and the CI evaluation share: against the baseline's record with the settings'
    margins, or, with no baseline (the first model, or a production without a record), the settings' floors."""
    if baseline is None:
        return check_floors(candidate, settings.gate_floors, settings.gate_min_decode_tok_s)
    return compare_to_baseline(
        candidate, baseline, settings.gate_accuracy_margin, settings.gate_speed_margin, settings.gate_speed_min_delta_ms
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
        text = f"{task} {metric} {value:.4f} {'>=' if higher else '<='} floor {floor:.4f}"
        checks.append(text)
        if not ok:
            reasons.append(f"floor: {task} {metric} {value:.4f} below the floor {floor:.4f}")
    if (bench := candidate.get("bench")) and min_decode_tok_s > 0:
        text = f"decode {bench['decode_tok_s']:.1f} tok/s >= floor {min_decode_tok_s:.1f}"
        checks.append(text)
        if bench["decode_tok_s"] < min_decode_tok_s:
            reasons.append(f"floor: decode {bench['decode_tok_s']:.1f} tok/s below {min_decode_tok_s:.1f}")
    return GateResult(not reasons, reasons, checks)
