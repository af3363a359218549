"""`ryz bench` and its peers' building blocks. The peers' real builds and full-size runs are not run here
(minutes each); their pieces are: the GGUF copy llama.cpp loads, the MatMulNBits graph, error reporting."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from engine.model import quants
from engine.model.ggufio import ModelFile
from engine.model.quantize import quantize_checkpoint
from evaluations import peers
from tests import checkpoints

ROOT = Path(__file__).resolve().parents[1]
KEYS = (
    "decode_tok_s",
    "prefill_tok_s",
    "ttft_ms",
    "peak_rss_mb",
    "bandwidth_gb_s",
    "bytes_per_token",
    "roofline_fraction",
    "threads",
)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """A relu² tiny model: written as `ryz-bitnet`, which llama.cpp refuses as it is."""
    root = tmp_path_factory.mktemp("bench")
    path = root / "tiny.gguf"
    quantize_checkpoint(checkpoints.synth(root / "tiny"), path)
    return path


def test_bench_tiny_json(tmp_path, kernel_build):
    env = {**os.environ, "RYZ_HOME": str(tmp_path / "home")}
    env.pop("RYZ_STORE", None)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "flows.cli",
            "bench",
            "tiny",
            "--prompt",
            "16",
            "--gen",
            "8",
            "--repeats",
            "1",
            "--json",
            "--library",
            str(kernel_build.path),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)  # stdout holds the JSON object and nothing else
    for key in KEYS:
        assert isinstance(result[key], (int, float)) and result[key] > 0, (key, result[key])
    assert 0 < result["roofline_fraction"] < 1.5
    assert (
        len(result["bandwidth_samples"]) == 2 and len(result["round_bandwidth"]) == 1
    )  # a probe either side of the round
    assert result["peers"] == {}
    assert result["threads"] >= 1 and result["repeats"] == 1
    # the engine reads T2P (64 bytes / 256 weights), less than the file's TQ2_0 (66 / 256)
    assert result["bytes_per_token"] < result["bytes_per_token_gguf"]
    cached = tmp_path / "home" / "cache" / "bench" / "tiny-tq2_0-q8_0.gguf"
    assert Path(result["file"]) == cached and cached.is_file()
    # where a decode step's time goes: every part timed, the shares add up, and the parts (the forward's own wall
    # time) fit in the measured step
    decode = result["profile"]["decode"]
    assert set(decode["share"]) == {"ternary_linears", "head", "attention", "other"}
    assert abs(sum(decode["share"].values()) - 1) < 0.01 and all(v > 0 for v in decode["ms_per_call"].values())
    assert sum(decode["ms_per_call"].values()) <= 1e3 / result["decode_tok_s"] * 1.01
    assert decode["gb_s"]["ternary_linears"] > 0 and "prefill" in result["profile"]


def test_roofline_pairs_each_round_with_its_own_bandwidth():
    from evaluations.bench import roofline

    # a fast round on a quiet host and a slow one on a busy host are each 80 % of their own roofline;
    # the fraction of the medians (60 tok/s x 1 GB / 60 GB/s = 1.0) would mix the two
    assert roofline(1_000_000_000, [80.0, 40.0, 60.0], [100.0, 50.0, 75.0]) == 0.8
    assert roofline(1_000_000_000, [80.0, None], [100.0, 50.0]) == 0.8  # a round without a decode figure is skipped
    assert roofline(1_000_000_000, [], []) is None


def test_llama_cpp_copy_renames_architecture_only(tiny_gguf, tmp_path):
    copy = peers.write_llama_cpp_copy(tiny_gguf, tmp_path / "copy.gguf")
    src, dst = gguf.GGUFReader(tiny_gguf), gguf.GGUFReader(copy)
    assert dst.get_field("general.architecture").contents() == "bitnet"
    src_keys = {k.replace("ryz-bitnet.", "bitnet.") for k in src.fields if not k.startswith("GGUF.")}
    assert src_keys == {k for k in dst.fields if not k.startswith("GGUF.")}
    assert not any(k.startswith("ryz-bitnet.") for k in dst.fields)
    for a, b in zip(src.tensors, dst.tensors):
        assert (a.name, a.tensor_type) == (b.name, b.tensor_type)
        assert np.array_equal(np.asarray(a.data), np.asarray(b.data))
    assert ModelFile(copy).hparams.ffn_act == "relu2"  # the metadata still says what the model is


def test_llama_cpp_copy_transcodes_ternary(tiny_gguf, tmp_path):
    copy = peers.write_llama_cpp_copy(tiny_gguf, tmp_path / "tq1.gguf", weights="tq1_0")
    src, dst = ModelFile(tiny_gguf), ModelFile(copy)
    name = "blk.1.ffn_down.weight"
    assert dst.tensor_type(name) == "tq1_0" and dst.tensor_type("token_embd.weight") == "q8_0"
    shape = src.shape(name)
    assert np.array_equal(
        quants.unpack_ternary(np.asarray(src.raw(name)), "tq2_0", shape),
        quants.unpack_ternary(np.asarray(dst.raw(name)), "tq1_0", shape),
    )
    assert dst.get("general.file_type") == int(gguf.LlamaFileType.MOSTLY_TQ1_0)


@pytest.mark.interop
@pytest.mark.parametrize("weights", [None, "tq1_0"])
def test_llama_cpp_loads_the_copy(tiny_gguf, tmp_path, weights):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install '.[interop]')")
    copy = peers.write_llama_cpp_copy(tiny_gguf, tmp_path / "copy.gguf", weights=weights)
    llm = llama_cpp.Llama(model_path=str(copy), n_ctx=64, logits_all=True, verbose=False, n_threads=2)
    try:
        llm.eval([256, *b"hello"])
        scores = np.array(llm.scores[:6], dtype=np.float32)
    finally:
        llm.close()
    assert scores.shape == (6, 512) and np.isfinite(scores).all() and scores.std() > 0


def test_sdist_commit(tmp_path):
    version = "0.3.36"
    (tmp_path / "CHANGELOG.md").write_text(
        "# Changelog\n\n## [0.3.36]\n\n- feat: update llama.cpp to ggml-org/llama.cpp@0c1e57098\n\n## [0.3.35]\n\n"
        "- feat: update llama.cpp to ggml-org/llama.cpp@4df29be4f\n"
    )
    assert peers.sdist_llama_cpp_commit(tmp_path, version) == peers.KNOWN_LLAMA_CPP_COMMITS[version]
    assert peers.sdist_llama_cpp_commit(tmp_path, "0.3.35") == "4df29be4f"
    head = tmp_path / ".git" / "modules" / "vendor" / "llama.cpp" / "HEAD"
    head.parent.mkdir(parents=True)
    head.write_text("a" * 40 + "\n")
    assert peers.sdist_llama_cpp_commit(tmp_path, version) == "a" * 40


def test_sdist_extract_and_cached_build(tmp_path):
    import io
    import tarfile

    top = "llama_cpp_python-0.3.36"
    files = {
        f"{top}/vendor/llama.cpp/CMakeLists.txt": b"project(llama)\n",
        f"{top}/llama_cpp/__init__.py": b"",
        f"{top}/.git/modules/vendor/llama.cpp/HEAD": b"b" * 40 + b"\n",
        f"{top}/CHANGELOG.md": b"# Changelog\n",
    }
    archive = tmp_path / f"{top}.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    dest = peers._extract_sdist(archive, tmp_path / "x")
    assert (dest / "vendor" / "llama.cpp" / "CMakeLists.txt").is_file() and not (dest / "llama_cpp").exists()
    assert peers.sdist_llama_cpp_commit(dest, "0.3.36") == "b" * 40
    # a finished build of the known commit is reused without any download
    commit = peers.KNOWN_LLAMA_CPP_COMMITS["0.3.36"]
    build = tmp_path / "cache" / "peers" / f"llama.cpp-{commit[:7]}"
    (build / "build" / "bin").mkdir(parents=True)
    (build / "build" / "bin" / "llama-bench").write_text("#!/bin/sh\n")
    (build / "build.json").write_text(
        json.dumps({"commit": commit, "version": "0.3.36", "build_seconds": 1.0, "flags": []})
    )
    found = peers.ensure_llama_bench(tmp_path / "cache")
    assert found.cached and found.commit == commit and found.binary == build / "build" / "bin" / "llama-bench"


def test_matmulnbits_graph_is_a_ternary_matmul():
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install '.[bench]')")
    pytest.importorskip("onnx")
    rng = np.random.default_rng(0)
    k = 512
    mats = [
        ("q", rng.integers(-1, 2, size=(256, k), dtype=np.int8), 0.031),
        ("down", rng.integers(-1, 2, size=(384, k), dtype=np.int8), 0.5),
    ]
    x = rng.standard_normal((5, k)).astype(np.float32)
    for level, tol in ((0, 1e-5), (4, 0.02)):  # 4: int8 activations, as the benchmark runs it
        model = peers.build_matmulnbits_model(mats, block_size=peers.ORT_BLOCK_SIZE, accuracy_level=level)
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        outs = session.run(None, {"X": x})
        for (name, codes, scale), y in zip(mats, outs):
            want = x @ (codes.astype(np.float32) * np.float32(scale)).T
            assert np.linalg.norm(y - want) / np.linalg.norm(want) < tol, (name, level)


def test_layers_graph_runs():
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install '.[bench]')")
    pytest.importorskip("onnx")
    hp = {"hidden": 256, "layers": 2, "heads": 4, "kv_heads": 2, "head_dim": 64, "ffn": 768, "vocab": 512}
    model = peers.build_layers_model(hp)
    assert sum(n.op_type == "MatMulNBits" for n in model.graph.node) == 7 * 2 + 1
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for m in (1, 9):
        (logits,) = session.run(None, {"X": np.random.default_rng(m).standard_normal((m, 256)).astype(np.float32)})
        assert logits.shape == (1, 512) and np.isfinite(logits).all()


def test_failing_peers_are_reported_not_raised(tmp_path, kernel_build, monkeypatch):
    from engine.settings import Settings
    from evaluations import bench

    def no_compiler(*args, **kwargs):
        raise RuntimeError("building llama-bench needs cmake and a C++ compiler on PATH")

    monkeypatch.setattr(peers, "ensure_llama_bench", no_compiler)
    monkeypatch.setattr(peers, "ensure_ort_model", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    result = bench.run_bench(
        "tiny",
        threads=1,
        prompt=8,
        gen=4,
        repeats=1,
        peers=True,
        library=kernel_build.path,
        settings=Settings(home=tmp_path),
    )
    assert result["decode_tok_s"] > 0
    assert set(result["peers"]) == {"llama.cpp-tq2_0", "llama.cpp-tq1_0", "onnxruntime-matmulnbits"}
    for name in ("llama.cpp-tq2_0", "llama.cpp-tq1_0"):
        assert "C++ compiler" in result["peers"][name]["error"]
    assert "error" in result["peers"]["onnxruntime-matmulnbits"]


def test_peak_rss_is_the_childs_own():
    """A child's peak RSS must not inherit this (large) process's high-water mark."""
    ballast = np.ones(400 << 20, dtype=np.uint8)  # 400 MB resident here
    script = "b = bytearray(120 << 20); print(len(b))"
    done = peers.run_measured([sys.executable, "-S", "-c", script], timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == str(120 << 20)
    assert 120 <= done.peak_rss_mb < 300, done.peak_rss_mb
    assert ballast[-1] == 1
    failed = peers.run_measured([sys.executable, "-S", "-c", "import sys; sys.exit(3)"], timeout=60)
    assert failed.returncode == 3 and "@@ryz" not in failed.stderr
