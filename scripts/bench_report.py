#!/usr/bin/env python3
"""Render docs/benchmarks.md's result tables from `ryz bench --json` records (and `ryz bench-serve --json` ones).

    python scripts/bench_report.py docs/bench/bitnet-2b4t-t2.json docs/bench/bitnet-2b4t-t1.json
    python scripts/bench_report.py --write docs/benchmarks.md docs/bench/*.json

Prints markdown (results per record, then the targets as met / not met; a bench-serve record gets its levels
and the per-part profile of their decode steps, one table for all of them). With --write, replaces the text
between `<!-- bench:begin -->` and `<!-- bench:end -->` in that file and leaves the rest alone.
The targets are the issue's: decode >= 1.75x llama.cpp's best ternary type and >= 70 % of the roofline
(multi-threaded run), prefill pp512 >= 3.5x, single-thread decode >= 1.5x, load < 3 s warm.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
LLAMA = ("llama.cpp-tq2_0", "llama.cpp-tq1_0")
TARGETS = {
    "decode_ratio": 1.75,
    "roofline": 0.70,
    "prefill_ratio": 3.5,
    "single_thread_ratio": 1.5,
    "load_seconds": 3.0,
}


def _num(value, fmt: str = ".2f") -> str:
    return "—" if value is None else format(value, fmt)


def _threads(record: dict) -> str:
    return f"{record['threads']} thread{'s' if record['threads'] != 1 else ''}"


def best_of(run: dict, key: str) -> float | None:
    """The fastest repeat's `key` (tok/s): the least disturbed run on a shared machine."""
    values = [v for v in (run.get("samples") or {}).get(key, []) if v is not None]
    return max(values) if values else None


def best_llama(record: dict, key: str, pick=lambda run, key: run.get(key)) -> tuple[str | None, float | None]:
    """The llama.cpp ternary type with the highest `key` (median, or as `pick` reads it) in this record."""
    runs = [(name, pick(record["peers"][name], key)) for name in LLAMA if name in record.get("peers", {})]
    runs = [(n, v) for n, v in runs if v]
    return max(runs, key=lambda nv: nv[1]) if runs else (None, None)


def _round_fractions(record: dict) -> list[tuple[float, float]]:
    """(fraction, bandwidth) per round, against the mean of the probes either side of our run."""
    from evaluations.bench import round_fractions

    return round_fractions(
        record["bytes_per_token"],
        (record.get("samples") or {}).get("decode_tok_s") or [],
        record.get("round_bandwidth") or [],
    )


def _best_round_roofline(record: dict) -> float | None:
    rounds = _round_fractions(record)
    return max(f for f, _ in rounds) if rounds else None


def roofline_rounds(record: dict) -> str:
    rounds = _round_fractions(record)
    if not rounds:  # a record from before the per-round probes
        return "—"
    per_round = " / ".join(f"{f * 100:.0f} % at {b:.0f} GB/s" for f, b in rounds)
    of_medians = _num((record.get("roofline_fraction_of_medians") or 0) * 100, ".0f")
    return f"per round: {per_round}; of the medians: {of_medians} %"


def results_table(record: dict, source: str, notes: bool = True) -> str:
    rows = [("ryzanstein", record)] + sorted(record.get("peers", {}).items())
    lines = [
        f"#### {record['target']}, {_threads(record)} (`{source}`)",
        "",
        f"pp{record['prompt']} / tg{record['gen']}, median of {record['repeats']} interleaved runs; "
        f"bandwidth probe {_num(record['bandwidth_gb_s'])} GB/s (samples {record.get('bandwidth_samples')}); "
        f"ISA {record['isa']}; started {record.get('started', '?')}.",
        "",
        "| engine | decode tok/s | prefill tok/s | TTFT ms | peak RSS MB | bytes/token | roofline | decode x "
        "| prefill x | best decode / prefill |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    ours_d, ours_p = record.get("decode_tok_s"), record.get("prefill_tok_s")
    for name, d in rows:
        if d.get("decode_tok_s") is None:
            lines.append(f"| {name} | error: {d.get('error', '?')} | | | | | | | | |")
            continue
        dx = ours_d / d["decode_tok_s"] if name != "ryzanstein" and ours_d else None
        px = ours_p / d["prefill_tok_s"] if name != "ryzanstein" and ours_p and d.get("prefill_tok_s") else None
        bpt = d.get("bytes_per_token")
        best = {k: best_of(d, k) for k in ("decode_tok_s", "prefill_tok_s")}
        lines.append(
            f"| {name} | {_num(d['decode_tok_s'])} | {_num(d.get('prefill_tok_s'), '.1f')} | "
            f"{_num(d.get('ttft_ms'), '.0f')} | "
            f"{_num(d.get('peak_rss_mb'), '.0f')} | {'—' if not bpt else f'{bpt / 1e6:.1f} MB'} | "
            f"{_num(d.get('roofline_fraction'))} | {'' if dx is None else f'{dx:.2f}x'} | "
            f"{'' if px is None else f'{px:.2f}x'} | "
            f"{_num(best.get('decode_tok_s'))} / {_num(best.get('prefill_tok_s'), '.1f')} |"
        )
    lines += [
        "",
        "decode x / prefill x: ryzanstein's median speed divided by that engine's (> 1: we are faster); "
        "best: the fastest of the repeats (the least disturbed run on a shared machine). "
        f"Load {_num(record.get('load_seconds'))} s (repack {_num(record.get('repack_seconds'))} s); "
        f"KV reads apart from bytes/token: {record.get('kv_bytes_per_token', 0) / 1e6:.1f} MB/token on average "
        f"over tg{record['gen']}.",
    ]
    lines += profile_lines(record)
    if notes:
        lines.append("")
        for name, d in record.get("peers", {}).items():
            if d.get("note"):
                lines.append(f"- {name}: {d['note']}")
    return "\n".join(lines)


def targets_table(records: list[dict]) -> str:
    """Each target judged on medians (the verdict) and, for information, on the best repeats."""
    multi = max(records, key=lambda r: r["threads"])
    single = next((r for r in records if r["threads"] == 1), None)
    rows = []

    def verdict(value, target, higher=True, best=None):
        if value is None:
            return "not measured"
        ok = (lambda v: v >= target) if higher else (lambda v: v < target)
        text = "**met**" if ok(value) else "**not met**"
        if best is not None and ok(best) != ok(value):  # medians and best runs disagree: too noisy to call
            text += f" (best repeats: {'met' if ok(best) else 'not met'}; noisy, re-run)"
        return text

    def ratio(record, key, pick):
        name, theirs = best_llama(record, key, pick)
        ours = pick(record, key)
        return (ours / theirs if ours and theirs else None), name

    def speed_row(label, record, key, target):
        if record is None:
            rows.append((label, "—", "—", "not measured"))
            return
        med, name = ratio(record, key, lambda run, k: run.get(k))
        best, best_name = ratio(record, key, best_of)
        rows.append(
            (
                label,
                f"{_num(med)}x vs {name or '—'}",
                f"{_num(best)}x vs {best_name or '—'}",
                verdict(med, target, best=best),
            )
        )

    speed_row(
        f"decode >= 1.75x llama.cpp best ternary type ({_threads(multi)})",
        multi,
        "decode_tok_s",
        TARGETS["decode_ratio"],
    )
    rows.append(
        (
            f"decode >= 70 % of roofline ({_threads(multi)}; median over rounds of each round's own bandwidth)",
            f"{_num(multi['roofline_fraction'] * 100, '.0f')} %",
            roofline_rounds(multi),
            verdict(multi["roofline_fraction"], TARGETS["roofline"], best=_best_round_roofline(multi)),
        )
    )
    speed_row(
        f"prefill pp{multi['prompt']} >= 3.5x llama.cpp best ternary type ({_threads(multi)})",
        multi,
        "prefill_tok_s",
        TARGETS["prefill_ratio"],
    )
    speed_row(
        "single-thread decode >= 1.5x llama.cpp best ternary type",
        single,
        "decode_tok_s",
        TARGETS["single_thread_ratio"],
    )
    load = max(r["load_seconds"] for r in records)
    best_load = min(min((r.get("samples") or {}).get("load_seconds") or [r["load_seconds"]]) for r in records)
    rows.append(
        (
            "load < 3 s warm (incl. repack; worst of the runs' medians)",
            f"{_num(load)} s",
            f"{_num(best_load)} s",
            verdict(load, TARGETS["load_seconds"], higher=False),
        )
    )
    lines = ["| target | measured (medians) | best repeats | verdict (medians) |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return "\n".join(lines)


def profile_lines(record: dict) -> list[str]:
    """Where our step's time goes (ryz bench's `profile`), one line per phase."""
    out = []
    for phase, entry in (record.get("profile") or {}).items():
        parts = ", ".join(
            f"{name.replace('_', ' ')} {entry['ms_per_call'][name]:.2f} ms ({entry['share'][name]:.0%}"
            + (f", {entry['gb_s'][name]:.1f} GB/s" if name in entry.get("gb_s", {}) else "")
            + ")"
            for name in entry["share"]
        )
        out.append(f"Per-part profile, {phase} (per forward call): {parts}.")
    return ["", *out] if out else []


SERVE_PARTS = ("ternary_linears", "head", "attention", "other", "python")


def is_serve_record(record: dict) -> bool:
    return "threads" not in record and "streams" in (record.get("settings") or {})


def serve_table(records: list[tuple[Path, dict]]) -> str:
    """bench-serve levels, one row each: decode tok/s and where a decode step of that many sequences went (ms per
    step and share; GB/s at which the ternary linears and the head read their bytes)."""
    lines = [
        "| record | ISA | streams | decode tok/s | 8 / 1 | steps | step ms | "
        + " | ".join(p.replace("_", " ") for p in SERVE_PARTS)
        + " |",
        "|---|---|---:|---:|---:|---:|---:|" + "---:|" * len(SERVE_PARTS),
    ]
    for path, record in records:
        ratio = (record.get("summary") or {}).get("scaling_8_vs_1")
        for n, level in sorted(record.get("streams", {}).items(), key=lambda kv: int(kv[0])):
            prof = level.get("step_profile") or {}
            isa = prof.get("isa") or record["settings"].get("isa") or "?"
            cells = []
            for part in SERVE_PARTS:
                ms = (prof.get("ms_per_step") or {}).get(part)
                if ms is None:
                    cells.append("—")
                    continue
                gb = (prof.get("gb_s") or {}).get(part)
                cells.append(f"{ms:.1f} ({prof['share'][part]:.0%}{f', {gb:.1f} GB/s' if gb else ''})")
            lines.append(
                f"| `{path.name}` | {isa} | {n} | {_num(level.get('decode_tok_s'))} | "
                f"{_num(ratio) + 'x' if ratio and n == '8' else ''} | {prof.get('steps', '—')} | "
                f"{_num(prof.get('step_ms'), '.1f')} | " + " | ".join(cells) + " |"
            )
    lines += [
        "",
        "Per part: ms per decode step of that many sequences (share of the step; GB/s: the part's weight bytes, read "
        "once per step, over its time). python: the engine step outside the native forward (scheduling, sampling, "
        "detokenizing, streaming).",
    ]
    return "\n".join(lines)


def render(paths: list[Path]) -> str:
    loaded = [(p, json.loads(p.read_text())) for p in paths]
    serve = [(p, r) for p, r in loaded if is_serve_record(r)]
    records = [(p, r) for p, r in loaded if not is_serve_record(r)]
    records.sort(key=lambda pr: -pr[1]["threads"])
    parts = []
    if records:
        parts += ["### Targets", "", targets_table([r for _, r in records]), "", "### Results", ""]
    for i, (path, record) in enumerate(records):
        parts += [results_table(record, path.as_posix(), notes=i == 0), ""]
    if serve:
        parts += ["### Serving: decode steps by part (`ryz bench-serve`)", "", serve_table(serve), ""]
    return "\n".join(parts).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "records", nargs="+", type=Path, help="`ryz bench --json` (or `ryz bench-serve --json`) outputs"
    )
    parser.add_argument("--write", type=Path, help="replace the marked section of this markdown file")
    args = parser.parse_args(argv)
    text = render(args.records)
    if not args.write:
        sys.stdout.write(text)
        return 0
    doc = args.write.read_text()
    if BEGIN not in doc or END not in doc:
        print(f"{args.write} has no {BEGIN} ... {END} section", file=sys.stderr)
        return 1
    head, rest = doc.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    args.write.write_text(f"{head}{BEGIN}\n{text}{END}{tail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
