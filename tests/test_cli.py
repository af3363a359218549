"""`ryz` end to end in subprocesses, as a user runs it: synth -> quantize -> generate, --json contracts,
errors that name the fix, nothing stored on failure."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ID = re.compile(r"^sha256:[0-9a-f]{64}$")


@pytest.fixture
def ryz(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RYZ_")}
    env["RYZ_HOME"] = str(tmp_path / "home")

    def run(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [sys.executable, "-m", "flows.cli", *args], env=env, capture_output=True, text=True, timeout=120
        )
        if ok:
            assert proc.returncode == 0, proc.stderr
        return proc

    run.home = tmp_path / "home"
    return run


@pytest.fixture
def native(ryz, kernel_build):
    """`ryz`'s RYZ_HOME reusing the session's kernel build (the native engine, `generate`'s default)."""
    (ryz.home / "cache").mkdir(parents=True, exist_ok=True)
    (ryz.home / "cache" / "kernels").symlink_to(kernel_build.path.parent.parent)


@pytest.fixture
def tiny_dir(ryz, tmp_path):
    ryz("synth", "--shape", "tiny", "-o", str(tmp_path / "tiny"), "--seed", "3")
    return tmp_path / "tiny"


def test_synth_quantize_generate(ryz, tiny_dir):
    manifest = json.loads(ryz("quantize", str(tiny_dir), "--json").stdout)
    assert ID.match(manifest["artifact_id"]) and manifest["kind"] == "model"
    assert manifest["quantization"] == {
        "weights": "tq2_0",
        "head": "q8_0",
        "norms": "f32",
        "scale": "per-tensor f32, block scale 1",
    }
    prefix = manifest["artifact_id"].split(":")[1][:12]
    greedy = ["--engine", "reference", "--temperature", "0", "--max-tokens", "8", "--json"]
    out = json.loads(ryz("generate", prefix, "hello", *greedy).stdout)
    assert set(out) >= {"text", "token_ids"} and 1 <= len(out["token_ids"]) <= 8 and out["engine"] == "reference"
    again = json.loads(ryz("generate", manifest["artifact_id"], "hello", *greedy).stdout)
    assert again["token_ids"] == out["token_ids"]  # greedy is deterministic
    listed = json.loads(ryz("artifacts", "--json").stdout)
    assert [m["artifact_id"] for m in listed] == [manifest["artifact_id"]]


def test_quantize_human_output_and_types(ryz, tiny_dir):
    proc = ryz("quantize", str(tiny_dir), "--weights", "tq1_0", "--head", "q6_k")
    assert ID.match(proc.stdout.strip())  # stdout: the id alone; the summary goes to stderr
    assert "tq1_0" in proc.stderr and "q6_k" in proc.stderr and "bytes read per decoded token" in proc.stderr


def test_synth_is_deterministic(ryz, tmp_path):
    for name in ("a", "b"):
        ryz("synth", "--shape", "tiny", "-o", str(tmp_path / name), "--seed", "7")
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    ryz("synth", "--shape", "tiny", "-o", str(tmp_path / "c"), "--seed", "8")
    assert (tmp_path / "a" / "model.safetensors").read_bytes() != (tmp_path / "c" / "model.safetensors").read_bytes()


def test_bad_checkpoint_stores_nothing(ryz, tiny_dir):
    (tiny_dir / "tokenizer.json").unlink()
    proc = ryz("quantize", str(tiny_dir), ok=False)
    assert proc.returncode != 0 and "tokenizer.json is missing" in proc.stderr and proc.stdout == ""
    assert json.loads(ryz("artifacts", "--json").stdout) == []
    tmp = ryz.home / "cache" / "tmp"
    assert not tmp.exists() or list(tmp.iterdir()) == []


def test_errors_name_the_fix(ryz, tmp_path):
    proc = ryz("generate", "not-a-model", "hi", ok=False)
    assert proc.returncode != 0 and "artifact id" in proc.stderr
    proc = ryz("generate", "abcdef012345", "hi", ok=False)
    assert proc.returncode != 0 and "abcdef012345" in proc.stderr
    proc = ryz("synth", "--shape", "huge", "-o", str(tmp_path / "x"), ok=False)
    assert proc.returncode != 0 and "choose one of: tiny" in proc.stderr


def test_config_show(ryz):
    shown = json.loads(ryz("config", "show", "--json").stdout)
    assert shown["home"]["value"] == str(ryz.home) and shown["home"]["source"] == "env RYZ_HOME"
    assert shown["store_url"]["value"] == f"file://{ryz.home / 'store'}"
    assert shown["threads"]["source"] == "default"
    text = ryz("config", "show").stdout
    assert "RYZ_HOME" in text and "env RYZ_HOME" in text


def test_generate_accepts_a_gguf_path(ryz, native, tiny_dir, tmp_path):
    from engine.model.quantize import quantize_checkpoint

    path = tmp_path / "direct.gguf"
    quantize_checkpoint(tiny_dir, path)
    out = json.loads(ryz("generate", str(path), "hi", "--max-tokens", "3", "--json").stdout)
    assert len(out["token_ids"]) <= 3


def test_engine_commands_do_not_import_prefect():
    code = "import sys, flows.cli; flows.cli.build_parser(); print('prefect' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path(__file__).parents[1]
    )
    assert out.stdout.strip() == "False"


def test_generate_native_equals_reference(ryz, native, tiny_dir):
    model = json.loads(ryz("quantize", str(tiny_dir), "--json").stdout)["artifact_id"]
    greedy = ["--temperature", "0", "--max-tokens", "6", "--json"]
    reference = json.loads(ryz("generate", model, "hello", "--engine", "reference", *greedy).stdout)
    default = json.loads(ryz("generate", model, "hello", *greedy).stdout)
    assert default["engine"] == "native" and default["token_ids"] == reference["token_ids"]
    # sampling by default (temperature 0.8): a seed repeats it, a stop string ends it
    sampled = [ryz("generate", model, "hello", "--seed", "7", "--max-tokens", "12", "--json").stdout for _ in "ab"]
    assert sampled[0] == sampled[1]
    text = json.loads(sampled[0])["text"]
    stop = text.strip()[:1]
    cut = json.loads(
        ryz("generate", model, "hello", "--seed", "7", "--max-tokens", "12", "--stop", stop, "--json").stdout
    )
    assert cut["text"] == text[: text.index(stop)] and cut["finish_reason"] == "stop"


def test_every_model_argument_names_the_reference_forms():
    """Each argument that takes a model reference says which forms it accepts (DESIGN.md's names)."""
    import argparse

    from flows.cli import build_parser
    from flows.cli_common import MODEL_REF_HELP

    def walk(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from walk(sub, (*path, name))
            else:
                yield path, action

    model_args, registry_args = {}, {}
    for path, action in walk(build_parser(), ()):
        where = f"{' '.join(path)} {action.option_strings[0] if action.option_strings else action.dest}"
        if action.dest in ("model", "draft_model") or (action.dest == "target" and path[0].startswith("bench")):
            model_args[where] = action.help or ""
        elif action.dest == "ref" and path[0] in ("bundle", "release", "registry"):
            registry_args[where] = action.help or ""
    assert {"generate model", "run model", "serve --model", "bench target", "build-kernels --model"} <= set(model_args)
    for where, text in model_args.items():
        forms = ("name:version", "production, canary, previous", "prefix", ".gguf")
        assert MODEL_REF_HELP in text or all(form in text for form in forms), where
    assert len(registry_args) >= 3
    for where, text in registry_args.items():
        assert "name:version" in text and "production, canary, previous" in text, where


def test_max_tokens_must_be_positive(ryz):
    proc = ryz("generate", "x.gguf", "hi", "--max-tokens", "0", ok=False)
    assert proc.returncode == 2 and "must be at least 1" in proc.stderr


def test_pipeline_run_json_is_json_alone(monkeypatch, capsys):
    """`ryz pipeline run --json`: stdout parses as one JSON document; the report line goes to stderr."""
    import flows.run
    from flows.cli import main

    result = {"report": "/tmp/report.html", "candidates": [{"repo": "zoo/a", "status": "promoted", "reason": "ok"}]}
    monkeypatch.setattr(flows.run, "pipeline_run", lambda **kw: result)
    assert main(["pipeline", "run", "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == result and "report: /tmp/report.html" in err
