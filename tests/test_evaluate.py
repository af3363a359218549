"""`ryz eval` / `ryz compare`: the evaluation record, its Great Expectations suite, the HTML reports.

One real `ryz eval` (tiny synthetic model, demo_mc with a limit of 6, the small benchmark) in a subprocess;
everything else on hand-made records, so the rejections are exactly the ones planted.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("great_expectations")

from engine.artifacts.registry import Registry  # noqa: E402
from engine.artifacts.store import open_store  # noqa: E402
from engine.model.quantize import quantize_checkpoint  # noqa: E402
from engine.settings import Settings  # noqa: E402
from evaluations import evaluate, report  # noqa: E402
from tests import checkpoints  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL_ID = "sha256:" + "ab" * 32


def good_record(**changes) -> dict:
    record = {
        "schema": 1,
        "model": {"ref": "demo:1", "artifact_id": MODEL_ID, "path": "/x.gguf", "name": "demo", "version": "demo:1"},
        "suite": "demo",
        "limit": 8,
        "engine": "native",
        "started": "2026-01-01T00:00:00+00:00",
        "seconds": 1.0,
        "plan": [{"tasks": ["demo_mc", "demo_ppl"], "limit": 8, "num_fewshot": None}],
        "skipped": [],
        "tasks": {
            "demo_mc": {
                "metrics": {"acc": {"value": 0.5, "stderr": 0.17}, "acc_norm": {"value": 0.375, "stderr": 0.18}},
                "n": 8,
                "limit": 8,
                "size": 400,
                "higher_is_better": {"acc": True, "acc_norm": True},
            },
            "demo_ppl": {
                "metrics": {
                    "word_perplexity": {"value": 113.0, "stderr": None},
                    "bits_per_byte": {"value": 3.1, "stderr": None},
                },
                "n": 8,
                "limit": 8,
                "size": 100,
                "higher_is_better": {"word_perplexity": False, "bits_per_byte": False},
            },
        },
        "bench": {
            "prefill_tok_s": 2000.0,
            "decode_tok_s": 300.0,
            "ttft_ms": 70.0,
            "peak_rss_mb": 80.0,
            "threads": 2,
            "roofline_fraction": 0.3,
            "bandwidth_gb_s": 10.0,
            "bytes_per_token": 10_000_000,
            "prompt": 128,
            "gen": 32,
            "repeats": 1,
            "isa": "avx2",
        },
        "environment": {"python": "3.11"},
    }
    record.update(changes)
    return record


# --- Great Expectations ------------------------------------------------------------------------------


def test_good_record_passes():
    assert evaluate.validate_record(good_record()) == []  # an older record: one run, no decode_tok_s_runs
    runs = {**good_record()["bench"], "repeats": 3, "decode_tok_s_runs": [310.0, 290.0, 300.0]}
    assert evaluate.validate_record(good_record(bench=runs)) == []  # decode_tok_s 300 is their median
    # with runs, roofline_fraction is the median of per-run fractions; the medians' fraction is what must add up
    runs.update(roofline_fraction=0.27, roofline_fraction_of_medians=0.3)
    assert evaluate.validate_record(good_record(bench=runs)) == []
    runs.update(roofline_fraction_of_medians=0.27)
    assert "roofline_fraction_of_medians 0.27 is off by 0.1" in evaluate.validate_record(good_record(bench=runs))[0]


@pytest.mark.parametrize(
    "spoil, expected",
    [
        (lambda r: r["tasks"]["demo_mc"]["metrics"].pop("acc_norm"), "demo_mc/acc_norm is missing"),
        (lambda r: r["tasks"]["demo_mc"]["metrics"]["acc"].update(value=1.7), "demo_mc/acc = 1.7"),
        (
            lambda r: r["tasks"]["demo_ppl"]["metrics"]["word_perplexity"].update(stderr=float("nan")),
            "demo_ppl/word_perplexity stderr is nan",
        ),
        (lambda r: r["bench"].update(decode_tok_s=-3.0), "bench.decode_tok_s = -3"),
        (lambda r: r["tasks"]["demo_mc"].update(n=5), "demo_mc: n = 5, expected 8"),
        (lambda r: r["tasks"].pop("demo_ppl"), "no results for demo_ppl"),
        (
            lambda r: r["tasks"]["demo_ppl"]["metrics"]["word_perplexity"].update(value=0.5),
            "demo_ppl/word_perplexity = 0.5",
        ),
        (lambda r: r["bench"].update(ttft_ms=1.0), "ttft_ms = 1 <"),
        (lambda r: r["bench"].update(roofline_fraction=8.0), "bench.roofline_fraction = 8"),
        (
            lambda r: r["bench"].update(repeats=3, decode_tok_s_runs=[290.0, 300.0, float("nan")]),
            "bench.decode_tok_s_runs [290, 300, nan] is nan",
        ),
        (lambda r: r["bench"].update(decode_tok_s_runs=[290.0, 300.0, 310.0]), "is 3 runs for repeats 1"),
        (
            lambda r: r["bench"].update(repeats=3, decode_tok_s_runs=[200.0, 250.0, 310.0]),
            "decode_tok_s 300 vs the median of runs [200, 250, 310]",
        ),
    ],
)
def test_gx_rejects_a_bad_record(spoil, expected):
    record = good_record()
    spoil(record)
    failures = evaluate.validate_record(record)
    assert any(expected in f for f in failures), failures


def test_gx_lists_every_failing_expectation():
    record = good_record()
    record["tasks"]["demo_mc"]["metrics"].pop("acc_norm")
    record["tasks"]["demo_mc"]["metrics"]["acc"]["value"] = 1.7
    record["tasks"]["demo_ppl"]["metrics"]["word_perplexity"]["stderr"] = float("nan")
    record["bench"]["decode_tok_s"] = -3.0
    record["tasks"]["demo_ppl"]["n"] = 5
    failures = evaluate.validate_record(record)
    text = "\n".join(failures)
    for expected in (
        "demo_mc/acc_norm is missing",
        "demo_mc/acc = 1.7",
        "word_perplexity stderr is nan",
        "bench.decode_tok_s = -3",
        "demo_ppl: n = 5, expected 8",
    ):
        assert expected in text, text
    assert len(failures) == 5, text  # one line per failing expectation, rows named inside it
    with pytest.raises(evaluate.EvaluationRecordError, match="5 failing expectations"):
        evaluate.require_valid({**record, "failures": failures, "valid": False})


def test_n_may_be_the_dataset_size_and_bench_may_be_absent():
    record = good_record(bench=None)
    record["tasks"]["demo_ppl"].update(limit=500, n=100)  # limit above the dataset: all 100 documents
    assert evaluate.validate_record(record) == []


def test_results_to_record_tasks():
    out = {
        "results": {
            "t": {
                "alias": "t",
                "acc,none": 0.5,
                "acc_stderr,none": 0.1,
                "word_perplexity,none": 3.0,
                "word_perplexity_stderr,none": "N/A",
                "exact_match,strict": 1.0,
                "exact_match_stderr,strict": 0.0,
            }
        },
        "n-samples": {"t": {"original": 50, "effective": 4}},
        "higher_is_better": {"t": {"acc": True}},
    }
    tasks = evaluate.tasks_from_results(out, 4)
    assert tasks["t"]["metrics"] == {
        "acc": {"value": 0.5, "stderr": 0.1},
        "word_perplexity": {"value": 3.0, "stderr": None},
        "exact_match,strict": {"value": 1.0, "stderr": 0.0},
    }
    assert (tasks["t"]["n"], tasks["t"]["limit"], tasks["t"]["size"]) == (4, 4, 50)


def test_group_n_is_the_sum_over_subtasks():
    out = {
        "results": {
            "g": {"acc,none": 0.5, "acc_stderr,none": 0.2},
            "g_a": {"acc,none": 0.4, "acc_stderr,none": 0.2},
            "g_b": {"acc,none": 1.0, "acc_stderr,none": 0.0},
        },
        "group_subtasks": {"g": ["g_a", "g_b"], "g_a": [], "g_b": []},
        "n-samples": {"g_a": {"original": 100, "effective": 5}, "g_b": {"original": 3, "effective": 3}},
    }
    tasks = evaluate.tasks_from_results(out, 5)
    assert tasks["g"]["group"] and (tasks["g"]["n"], tasks["g"]["n_expected"], tasks["g"]["size"]) == (8, 8, 103)
    record = good_record(tasks=tasks, bench=None, plan=[{"tasks": ["g"], "limit": 5, "num_fewshot": None}])
    assert evaluate.validate_record(record) == []  # g_b has 3 documents < limit 5


# --- reports -----------------------------------------------------------------------------------------


def test_comparison_significance():
    a, b = good_record(), good_record()
    a["tasks"]["demo_mc"]["metrics"]["acc"] = {"value": 0.50, "stderr": 0.02}
    b["tasks"]["demo_mc"]["metrics"]["acc"] = {"value": 0.60, "stderr": 0.02}  # 0.1 > 1.96 * 0.0283
    b["tasks"]["demo_mc"]["metrics"]["acc_norm"] = {"value": 0.40, "stderr": 0.18}  # 0.025 < 1.96 * 0.255
    b["tasks"]["demo_ppl"]["metrics"]["word_perplexity"]["value"] = 90.0  # no stderr: n/a
    result = report.compare_records(a, b)["tasks"]
    acc, norm, ppl = result["demo_mc"]["acc"], result["demo_mc"]["acc_norm"], result["demo_ppl"]["word_perplexity"]
    assert acc["significant"] is True and acc["verdict"] == "b better" and math.isclose(acc["delta"], 0.1)
    assert math.isclose(acc["stderr"], math.sqrt(2) * 0.02)
    assert norm["significant"] is False and norm["verdict"] == "no significant difference"
    assert ppl["significant"] is None and ppl["verdict"] == "n/a"
    worse = report.compare_metric({"value": 0.9, "stderr": 0.01}, {"value": 0.5, "stderr": 0.01}, True)
    assert worse["verdict"] == "b worse"
    lower_better = report.compare_metric({"value": 3.0, "stderr": 0.01}, {"value": 2.0, "stderr": 0.01}, False)
    assert lower_better["verdict"] == "b better"
    html = report.render_comparison(a, b)
    assert 'id="deltas"' in html and "b better" in html and "n/a" in html


def test_report_html_renders_table_and_svg(tmp_path):
    record = good_record()
    record["tasks"]["demo_mc"]["metrics"]["acc"]["value"] = 0.6
    other = good_record(record_id="sha256:" + "cd" * 32)
    other["model"] = {**other["model"], "version": "demo:0", "artifact_id": "sha256:" + "ef" * 32}
    other["bench"] = {**other["bench"], "decode_tok_s": 150.0}
    other["model"]["name"] = "<script>alert(1)</script>"  # autoescaped
    other["model"]["version"] = "<script>alert(1)</script>"
    html = report.render_report(record, [other, good_record(suite="other-suite")])
    assert '<table id="tasks">' in html and "demo_mc" in html and "&plusmn; 0.17" in html
    assert "<svg" in html and html.count("<circle") == 2  # this record and the same-suite other
    assert "<script>alert" not in html and "&lt;script&gt;" in html
    path = report.write_report(html, "eval-demo:1/gate", settings=Settings(home=tmp_path))
    assert path.parent == tmp_path / "reports" and path.read_text() == html and not list(path.parent.glob(".tmp-*"))
    browser = shutil.which("chromium-headless-shell") or shutil.which("chromium")
    if browser is None:
        pytest.skip("no headless Chromium (apt-get install chromium-headless-shell) for the screenshot")
    png = tmp_path / "report.png"
    subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--window-size=1100,1400",
            f"--screenshot={png}",
            path.as_uri(),
        ],
        capture_output=True,
        timeout=60,
        check=True,
    )
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000


# --- `ryz eval` and `ryz compare` end to end -----------------------------------------------------------


@pytest.fixture(scope="module")
def home(tmp_path_factory, kernel_build):
    """A fresh RYZ_HOME whose kernel cache is the session's build (no rebuild), with the tiny model stored."""
    root = tmp_path_factory.mktemp("eval")
    home = root / "home"
    (home / "cache").mkdir(parents=True)
    (home / "cache" / "kernels").symlink_to(kernel_build.path.parent.parent)
    gguf = root / "tiny.gguf"
    quantize_checkpoint(checkpoints.synth(root / "ckpt", seed=5), gguf)
    store = open_store(settings=Settings(home=home))
    model_id = store.put_file(gguf, "model", {"name": "tiny-eval"})
    return home, model_id


def _ryz(home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "RYZ_HOME": str(home), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("RYZ_STORE", None)
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args], env=env, capture_output=True, text=True, cwd=ROOT, timeout=300
    )


def test_ryz_eval_json_then_compare(home):
    home, model_id = home
    proc = _ryz(home, "eval", model_id[:19], "--suite", "demo_mc", "--limit", "6", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(proc.stdout)
    assert record["schema"] == 1 and record["valid"] is True and record["failures"] == []
    assert record["model"]["artifact_id"] == model_id and record["suite"] == "demo_mc" and record["limit"] == 6
    task = record["tasks"]["demo_mc"]
    assert set(task["metrics"]) == {"acc", "acc_norm"} and task["n"] == 6
    assert all(0 <= m["value"] <= 1 and m["stderr"] >= 0 for m in task["metrics"].values())
    bench = record["bench"]
    assert all(
        bench[k] > 0
        for k in ("prefill_tok_s", "decode_tok_s", "ttft_ms", "peak_rss_mb", "threads", "roofline_fraction")
    )
    assert (bench["prompt"], bench["gen"], bench["repeats"]) == (
        evaluate.BENCH_PROMPT,
        evaluate.BENCH_GEN,
        evaluate.BENCH_REPEATS,
    )
    runs = bench["decode_tok_s_runs"]  # every repeat's decode tok/s; decode_tok_s is their median
    assert len(runs) == evaluate.BENCH_REPEATS and sorted(runs)[len(runs) // 2] == bench["decode_tok_s"]
    assert record["environment"]["cpu_fingerprint"] and record["environment"]["kernel_build"]
    html = Path(record["report"]).read_text()
    assert Path(record["report"]).parent == home / "reports" and '<table id="tasks">' in html and "<svg" in html

    store = open_store(settings=Settings(home=home))
    record_id = record["record_id"]
    manifest = store.get_manifest(record_id)
    assert manifest["kind"] == "evaluation" and manifest["refers_to"] == [model_id] and manifest["suite"] == "demo_mc"
    assert evaluate.load_record(record_id, store)["tasks"] == record["tasks"]

    Registry(store).register("tiny-eval", model_id, {"path": "tiny"}, evaluation=record_id)
    proc = _ryz(home, "compare", "tiny-eval:1", model_id, "--json")  # the version's record vs the model's newest
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["a"]["record_id"] == result["b"]["record_id"] == record_id
    acc = result["tasks"]["demo_mc"]["acc"]
    assert acc["delta"] == 0 and acc["significant"] is False
    assert Path(result["report"]).is_file()


def test_ryz_eval_invalid_record_exits_1(tmp_path, monkeypatch, capsys):
    from engine.settings import reload_settings
    from flows import cli

    monkeypatch.setenv("RYZ_HOME", str(tmp_path))
    monkeypatch.delenv("RYZ_STORE", raising=False)
    reload_settings()
    bad = good_record()
    bad["tasks"]["demo_mc"]["metrics"]["acc"]["value"] = 1.7

    def fake_evaluate(model, **kw):
        record = copy.deepcopy(bad)
        record["failures"] = evaluate.validate_record(record)
        record["valid"] = not record["failures"]
        return record

    monkeypatch.setattr(evaluate, "evaluate_model", fake_evaluate)
    try:
        assert cli.main(["eval", "demo:1", "--suite", "demo_mc", "--json"]) == 1
        out = capsys.readouterr()
        printed = json.loads(out.out)
        assert printed["valid"] is False and any("demo_mc/acc = 1.7" in f for f in printed["failures"])
        assert "failed expectation: accuracy-like metrics in [0, 1]: demo_mc/acc = 1.7" in out.err
        assert cli.main(["compare", "sha256:" + "0" * 64, printed["record_id"]]) == 1  # unknown artifact
    finally:
        monkeypatch.undo()
        reload_settings()
