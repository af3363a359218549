"""HTML reports of evaluation records (jinja2, autoescaped, one self-contained file each):

- render_report(record, others): the per-task table (value ± stderr, n) and an inline SVG chart of headline
  accuracy vs decode tok/s for this record and every other evaluated version (`others`, their records);
- render_comparison(record_a, record_b): per-task deltas, each judged against its standard error:
  significant when |b - a| > 1.96 * sqrt(se_a² + se_b²) (two-sided 95%, independent samples), "n/a" when
  either stderr is missing (lm-eval reports N/A for perplexities).

write_report(html, name) puts a report under $RYZ_HOME/reports/ atomically and returns its path.
"""

from __future__ import annotations

import math
import os
import re
import secrets
from pathlib import Path

from evaluations.evaluate import HEADLINE_ORDER, metric_kind

Z_95 = 1.96
TEMPLATES = Path(__file__).resolve().parent / "templates"
CHART = {"width": 640, "height": 360, "left": 64, "right": 24, "top": 24, "bottom": 48}


def _env():
    from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

    env = Environment(
        loader=FileSystemLoader(TEMPLATES),
        autoescape=select_autoescape(["html", "j2", "jinja2"]),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["num"] = format_number
    return env


def format_number(value, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}g}" if abs(value) < 10**digits else f"{value:,.0f}"


# --- headline and chart -------------------------------------------------------------------------------


def headline_metric(task: dict) -> str | None:
    """A task's headline accuracy metric: the first of HEADLINE_ORDER it reports, else any accuracy-like one."""
    metrics = task.get("metrics") or {}
    for name in HEADLINE_ORDER:
        if (metrics.get(name) or {}).get("value") is not None:
            return name
    return next((m for m, v in metrics.items() if metric_kind(m) == "accuracy" and v.get("value") is not None), None)


def headline_accuracy(record: dict) -> float | None:
    """Mean over the record's leaf tasks (groups counted once, not their subtasks) of each task's headline
    accuracy metric; None when no task has one."""
    tasks = record.get("tasks") or {}
    top = {t for call in record.get("plan") or [] for t in call.get("tasks", [])} or set(tasks)
    values = []
    for name, task in tasks.items():
        if name not in top:
            continue
        metric = headline_metric(task)
        if metric:
            values.append(task["metrics"][metric]["value"])
    return sum(values) / len(values) if values else None


def _label(record: dict) -> str:
    model = record.get("model") or {}
    return model.get("version") or model.get("name") or (model.get("artifact_id") or "?")[:19]


def chart_points(record: dict, others: list[dict]) -> list[dict]:
    """One point per record with both a headline accuracy and a decode rate, this record marked `current`.
    Records of another suite are left out (their accuracies are not comparable)."""
    points = []
    seen = set()
    for i, rec in enumerate([record, *others]):
        key = rec.get("record_id") or id(rec)
        if key in seen or (i and rec.get("suite") != record.get("suite")):
            continue
        seen.add(key)
        acc, decode = headline_accuracy(rec), (rec.get("bench") or {}).get("decode_tok_s")
        if acc is None or not decode:
            continue
        points.append({"label": _label(rec), "accuracy": acc, "decode": float(decode), "current": i == 0})
    return points


def _ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + 1
    raw = (hi - lo) / count
    step = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * step:
            step *= m
            break
    start = math.floor(lo / step) * step
    return [round(start + k * step, 10) for k in range(int(math.ceil((hi - start) / step)) + 1)]


def chart(points: list[dict]) -> dict | None:
    """SVG geometry for the template: axes, ticks and points in pixels (accuracy up, decode tok/s right)."""
    if not points:
        return None
    c = CHART
    xs = [p["decode"] for p in points]
    ys = [p["accuracy"] for p in points]
    xt = _ticks(0.0, max(xs) * 1.1)
    yt = _ticks(max(0.0, min(ys) - 0.1), min(1.0, max(ys) + 0.1) if max(ys) <= 1 else max(ys) * 1.1)
    x0, x1, y0, y1 = xt[0], xt[-1], yt[0], yt[-1]
    w, h = c["width"] - c["left"] - c["right"], c["height"] - c["top"] - c["bottom"]

    def px(x):
        return c["left"] + (x - x0) / (x1 - x0) * w

    def py(y):
        return c["top"] + h - (y - y0) / (y1 - y0) * h

    return {
        **c,
        "plot_w": w,
        "plot_h": h,
        "xticks": [{"x": px(t), "label": format_number(t, 3)} for t in xt],
        "yticks": [{"y": py(t), "label": format_number(t, 3)} for t in yt],
        "points": [{**p, "x": px(p["decode"]), "y": py(p["accuracy"])} for p in points],
    }


# --- rendering --------------------------------------------------------------------------------------


def task_rows(record: dict) -> list[dict]:
    rows = []
    for task, entry in (record.get("tasks") or {}).items():
        for metric, m in (entry.get("metrics") or {}).items():
            rows.append(
                {
                    "task": task,
                    "metric": metric,
                    "value": m.get("value"),
                    "stderr": m.get("stderr"),
                    "n": entry.get("n"),
                    "limit": entry.get("limit"),
                    "group": entry.get("group", False),
                    "higher": (entry.get("higher_is_better") or {}).get(metric),
                }
            )
    return rows


def render_report(record: dict, others: list[dict]) -> str:
    """The evaluation report of `record` (HTML); `others`: records of the other evaluated versions (chart)."""
    points = chart_points(record, others)
    return (
        _env()
        .get_template("evaluation.html.j2")
        .render(
            record=record,
            label=_label(record),
            rows=task_rows(record),
            bench=record.get("bench"),
            chart=chart(points),
            points=points,
            headline=headline_accuracy(record),
            failures=record.get("failures") or [],
            valid=record.get("valid"),
        )
    )


def compare_records(record_a: dict, record_b: dict) -> dict:
    """Per task and metric present in both: a, b, delta (b - a), the delta's standard error and whether the
    difference is significant (None: a stderr is missing) and which way is better; plus bench ratios."""
    tasks: dict[str, dict] = {}
    ta, tb = record_a.get("tasks") or {}, record_b.get("tasks") or {}
    for task in [t for t in ta if t in tb]:
        higher = {**(ta[task].get("higher_is_better") or {}), **(tb[task].get("higher_is_better") or {})}
        for metric, ma in (ta[task].get("metrics") or {}).items():
            mb = (tb[task].get("metrics") or {}).get(metric)
            if mb is None or ma.get("value") is None or mb.get("value") is None:
                continue
            tasks.setdefault(task, {})[metric] = compare_metric(ma, mb, higher.get(metric))
    only = {"a": sorted(set(ta) - set(tb)), "b": sorted(set(tb) - set(ta))}
    bench = {}
    ba, bb = record_a.get("bench") or {}, record_b.get("bench") or {}
    for key, higher_better in (
        ("decode_tok_s", True),
        ("prefill_tok_s", True),
        ("ttft_ms", False),
        ("peak_rss_mb", False),
        ("roofline_fraction", True),
    ):
        a, b = ba.get(key), bb.get(key)
        if a is not None and b is not None:
            bench[key] = {
                "a": a,
                "b": b,
                "delta": b - a,
                "ratio": (b / a) if a else None,
                "higher_is_better": higher_better,
            }
    return {"tasks": tasks, "only_in": only, "bench": bench}


def compare_metric(ma: dict, mb: dict, higher_is_better: bool | None = None) -> dict:
    a, b = float(ma["value"]), float(mb["value"])
    sa, sb = ma.get("stderr"), mb.get("stderr")
    delta = b - a
    se = math.sqrt(sa * sa + sb * sb) if sa is not None and sb is not None else None
    significant = None if se is None else (abs(delta) > Z_95 * se if se > 0 else delta != 0)
    verdict = (
        "n/a"
        if significant is None
        else "no significant difference"
        if not significant
        else ("b better" if (delta > 0) == (higher_is_better is not False) else "b worse")
    )
    return {
        "a": a,
        "b": b,
        "delta": delta,
        "stderr_a": sa,
        "stderr_b": sb,
        "stderr": se,
        "z": (delta / se) if se else None,
        "significant": significant,
        "verdict": verdict,
        "higher_is_better": higher_is_better,
    }


def render_comparison(record_a: dict, record_b: dict) -> str:
    """The comparison report of two records (HTML): per-task deltas with significance, bench ratios."""
    result = compare_records(record_a, record_b)
    rows = [{"task": t, "metric": m, **c} for t, metrics in result["tasks"].items() for m, c in metrics.items()]
    return (
        _env()
        .get_template("comparison.html.j2")
        .render(
            a=record_a,
            b=record_b,
            label_a=_label(record_a),
            label_b=_label(record_b),
            rows=rows,
            bench=result["bench"],
            only_in=result["only_in"],
            z=Z_95,
        )
    )


# --- files ------------------------------------------------------------------------------------------


def report_record(record: dict, store, settings=None) -> Path:
    """Render `record`'s report against every evaluated registry version (same suite) and write it; its path.
    The record should carry `record_id` (set after store_record) so it is not plotted twice."""
    from evaluations.evaluate import registry_records

    others = [r for r in registry_records(store) if r.get("record_id") != record.get("record_id")]
    model = record.get("model") or {}
    label = model.get("version") or model.get("name") or "model"
    suffix = (record.get("record_id") or "")[7:19] or record.get("started", "")
    return write_report(render_report(record, others), f"eval-{label}-{record.get('suite')}-{suffix}", settings)


def reports_dir(settings=None) -> Path:
    from engine.settings import get_settings

    return (settings or get_settings()).home / "reports"


def write_report(html: str, name: str, settings=None) -> Path:
    """Write `html` as reports/<name>.html under $RYZ_HOME atomically (temp file + rename); its path."""
    directory = reports_dir(settings)
    directory.mkdir(parents=True, exist_ok=True)
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "report"
    path = directory / f"{safe}.html"
    tmp = directory / f".tmp-{secrets.token_hex(6)}-{path.name}"
    try:
        tmp.write_text(html, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
