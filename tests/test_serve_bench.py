"""`ryz bench-serve`'s harness (evaluations/serve_bench.py): the load generator against an in-test fake SSE
server (TTFT, token counting, error counting, timeouts), the server lifecycle, and llama-server built from
the llama-cpp-python sdist serving the tiny GGUF under the harness (skipped when it cannot be built)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from evaluations import serve_bench

ROOT = Path(__file__).resolve().parents[1]
PROMPT = list(range(100, 228))  # 128 token ids


# --- a fake OpenAI-style streaming server ---------------------------------------------------------------


class Fake:
    """Behaviour by the prompt's first token id: 1 -> HTTP 500, 2 -> one token short, 3 -> never answers,
    4 -> an error event mid-stream, 5 -> no [DONE]; anything else -> `max_tokens` token chunks after a
    `first_delay` prefill, `token_delay` apart, then a final chunk with usage and [DONE]."""

    def __init__(self, first_delay: float = 0.05, token_delay: float = 0.002, usage: bool = True):
        self.first_delay, self.token_delay, self.usage = first_delay, token_delay, usage
        self.bodies: list[dict] = []
        self.active = 0
        self.max_active = 0

    def app(self):
        from starlette.applications import Starlette
        from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
        from starlette.routing import Route

        async def ready(request):
            return PlainTextResponse("ok")

        async def models(request):
            return JSONResponse({"object": "list", "data": [{"id": "fake-model", "object": "model"}]})

        async def completions(request):
            body = await request.json()
            self.bodies.append(body)
            mode = body["prompt"][0] if isinstance(body["prompt"], list) else 0
            if mode == 1:
                return JSONResponse({"error": {"message": "boom"}}, status_code=500)
            n = body["max_tokens"] - (1 if mode == 2 else 0)

            async def events():
                self.active += 1
                self.max_active = max(self.max_active, self.active)
                try:
                    if mode == 3:
                        await asyncio.sleep(3600)
                    await asyncio.sleep(self.first_delay)
                    for i in range(n):
                        if mode == 4 and i == 3:
                            yield "data: " + json.dumps({"error": {"message": "slot died"}}) + "\n\n"
                            return
                        yield (
                            "data: "
                            + json.dumps({"choices": [{"text": f" t{i}", "index": 0, "finish_reason": None}]})
                            + "\n\n"
                        )
                        await asyncio.sleep(self.token_delay)
                    final = {"choices": [{"text": "", "index": 0, "finish_reason": "length"}]}
                    if self.usage:
                        final["usage"] = {
                            "prompt_tokens": len(body["prompt"]),
                            "completion_tokens": n,
                            "total_tokens": n + len(body["prompt"]),
                        }
                    yield "data: " + json.dumps(final) + "\n\n"
                    if mode != 5:
                        yield "data: [DONE]\n\n"
                finally:
                    self.active -= 1

            return StreamingResponse(events(), media_type="text/event-stream")

        return Starlette(
            routes=[
                Route("/ready", ready),
                Route("/v1/models", models),
                Route("/v1/completions", completions, methods=["POST"]),
            ]
        )


@pytest.fixture()
def fake_server():
    """Start a `Fake` under uvicorn on 127.0.0.1 in a thread; yields (base_url, fake)."""
    import uvicorn

    servers = []

    def start(fake: Fake):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(fake.app(), log_level="warning", lifespan="off"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        deadline = time.monotonic() + 10
        while not server.started:
            assert time.monotonic() < deadline, "the fake server did not start"
            time.sleep(0.01)
        servers.append((server, thread, sock))
        return f"http://127.0.0.1:{port}"

    yield start
    for server, thread, sock in servers:
        server.should_exit = True
        server.force_exit = True
        thread.join(timeout=10)
        sock.close()


# --- the load generator -----------------------------------------------------------------------------------


def test_load_measures_ttft_and_counts_tokens(fake_server):
    fake = Fake(first_delay=0.08, token_delay=0.002)
    url = fake_server(fake)
    prompts = [[100 + i] + PROMPT[1:] for i in range(6)]
    r = serve_bench.run_load(
        url, "fake-model", streams=3, requests_per_stream=2, prompt_ids=prompts, gen_tokens=16, timeout_s=30
    )
    assert (r["requests"], r["ok"], r["errors"]) == (6, 6, 0)
    assert "error_messages" not in r
    assert r["completion_tokens"] == 96 and r["prompt_tokens"] == [128] and r["chunks_per_request_min"] == 16
    assert len(r["ttft_ms"]) == 6 and all(t >= 75 for t in r["ttft_ms"])
    assert 75 <= r["ttft_p50_ms"] <= r["ttft_p95_ms"] < 5000
    # 15 tokens after the first per request, ~2 ms apart: well below 500 tok/s per request
    assert 0 < r["request_decode_tok_s_p50"] < 500
    assert r["decode_tok_s"] > r["request_decode_tok_s_p50"]  # 3 streams decode concurrently
    assert r["decode_window_s"] < r["wall_s"] and 0 < r["throughput_tok_s"] < r["decode_tok_s"]
    assert fake.max_active == 3
    # exactly the request the spec asks for, each request with its own prompt
    assert len(fake.bodies) == 6
    for body in fake.bodies:
        assert body["stream"] is True and body["max_tokens"] == 16 and body["ignore_eos"] is True
        assert body["temperature"] == 0 and body["model"] == "fake-model" and len(body["prompt"]) == 128
        assert body["stream_options"] == {"include_usage": True}
    assert sorted(b["prompt"][0] for b in fake.bodies) == list(range(100, 106))


def test_token_count_without_usage_comes_from_chunks(fake_server):
    url = fake_server(Fake(first_delay=0.0, usage=False))
    r = serve_bench.run_load(url, "m", 1, 2, PROMPT, gen_tokens=8, timeout_s=30)
    assert r["ok"] == 2 and r["completion_tokens"] == 16 and "prompt_tokens" not in r


def test_failed_requests_are_counted_not_dropped(fake_server):
    url = fake_server(Fake(first_delay=0.0))
    prompts = [[mode] + PROMPT[1:] for mode in (1, 2, 4, 5, 100, 101)]
    r = serve_bench.run_load(url, "m", streams=6, requests_per_stream=1, prompt_ids=prompts, gen_tokens=8, timeout_s=30)
    assert (r["requests"], r["ok"], r["errors"]) == (6, 2, 4)
    messages = " | ".join(f"{e['count']}x {e['error']}" for e in r["error_messages"])
    assert "HTTP 500" in messages and "boom" in messages
    assert "generated 7 tokens, expected 8" in messages
    assert "slot died" in messages
    assert "without data: [DONE]" in messages
    assert len(r["ttft_ms"]) == 2 and r["completion_tokens"] == 16  # only the successful ones


def test_every_level_is_bounded_by_the_request_timeout(fake_server):
    url = fake_server(Fake())
    start = time.perf_counter()
    r = serve_bench.run_load(
        url, "m", streams=2, requests_per_stream=1, prompt_ids=[[3] + PROMPT[1:], PROMPT], gen_tokens=4, timeout_s=1.0
    )
    assert time.perf_counter() - start < 10
    assert (r["ok"], r["errors"]) == (1, 1)
    assert "timed out after 1 s" in r["error_messages"][0]["error"]


def test_connection_refused_is_an_error(tmp_path):
    port = serve_bench.free_port()  # nothing listens there
    r = serve_bench.run_load(f"http://127.0.0.1:{port}", "m", 2, 1, PROMPT, gen_tokens=4, timeout_s=5)
    assert (r["ok"], r["errors"]) == (0, 2) and r["decode_tok_s"] is None and r["ttft_p50_ms"] is None
    assert "Connect" in r["error_messages"][0]["error"]


def test_only_loopback():
    with pytest.raises(ValueError, match="loopback"):
        serve_bench.run_load("http://example.com:8080", "m", 1, 1, PROMPT)


def test_percentile():
    assert serve_bench.percentile([], 50) is None
    assert serve_bench.percentile([5.0], 95) == 5.0
    assert serve_bench.percentile([1, 2, 3, 4], 50) == 2.5
    assert serve_bench.percentile(list(range(1, 21)), 95) == pytest.approx(19.05)


def test_served_model_and_fallback(fake_server):
    url = fake_server(Fake())
    assert serve_bench.served_model(url, "x") == "fake-model"
    assert serve_bench.served_model(f"http://127.0.0.1:{serve_bench.free_port()}", "x") == "x"


# --- server lifecycle ------------------------------------------------------------------------------------------


def _http_server_cmd(port: int, directory: Path) -> list[str]:
    return [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(directory)]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_start_server_waits_for_ready_and_kills_the_group(tmp_path):
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "ready").write_text("ok")
    port = serve_bench.free_port()
    log = tmp_path / "server.log"
    with serve_bench.start_server(
        _http_server_cmd(port, tmp_path / "www"), port, "/ready", timeout=30, log_path=log
    ) as proc:
        assert proc.poll() is None
        assert serve_bench._get(f"http://127.0.0.1:{port}/ready")[0] == 200
        assert serve_bench.group_cpu_seconds(proc.pid) >= 0
        pid = proc.pid
    assert proc.poll() is not None and not _alive(pid)
    assert "GET /ready" in log.read_text()  # the server's output is kept in the log


def test_start_server_reports_an_early_exit_with_its_log(tmp_path):
    cmd = [sys.executable, "-c", "import sys; print('cannot load model: bad magic', file=sys.stderr); sys.exit(3)"]
    with pytest.raises(serve_bench.ServerError, match="exited with 3(.|\n)*bad magic"):
        with serve_bench.start_server(cmd, serve_bench.free_port(), "/ready", timeout=30, log_path=tmp_path / "x.log"):
            pass


def test_start_server_times_out(tmp_path):
    (tmp_path / "www").mkdir()  # no "ready" file: GET /ready is a 404 forever
    port = serve_bench.free_port()
    start = time.perf_counter()
    with pytest.raises(serve_bench.ServerError, match="not ready"):
        with serve_bench.start_server(
            _http_server_cmd(port, tmp_path / "www"), port, "/ready", timeout=2, log_path=tmp_path / "y.log"
        ):
            pass
    assert time.perf_counter() - start < 20


def test_cli_arguments():
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", action="store_true")  # what flows/cli.py's command() adds
    serve_bench.add_arguments(parser)
    args = parser.parse_args(["bitnet-2b4t", "--json", "--streams", "1,8", "--no-peers"])
    assert args.target == "bitnet-2b4t" and args.json and args.streams == [1, 8] and not args.peers and args.ours
    args = parser.parse_args(["tiny"])
    assert (
        args.streams == [1, 4, 8, 16] and args.prompt == 128 and args.gen == 128 and args.peers and not args.sequential
    )
    with pytest.raises(SystemExit):
        parser.parse_args(["tiny", "--streams", "0,4"])
    bare = argparse.ArgumentParser()
    serve_bench.add_arguments(bare)  # adds its own --json
    assert bare.parse_args(["tiny", "--json"]).json


def test_llama_server_command_line():
    cmd = serve_bench.llama_server_cmd("/x/llama-server", "/m.gguf", 8080, 2, 16, 128, 128)
    assert cmd[cmd.index("-np") + 1] == "16" and cmd[cmd.index("-c") + 1] == str(
        16 * (128 + 128 + serve_bench.CTX_MARGIN)
    )
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and "--cont-batching" in cmd
    ours = serve_bench.ours_cmd("/m.gguf", 8081, 2, 16, serve_bench.slot_context(128, 128))
    assert ours[1:4] == ["-m", "flows.cli", "serve"] and ours[ours.index("--max-seqs") + 1] == "16"
    assert ours[ours.index("--max-context") + 1] == str(128 + 128 + serve_bench.CTX_MARGIN)


# --- llama-server on the tiny GGUF, under the harness -------------------------------------------------------


@pytest.fixture(scope="session")
def llama_server_binary():
    """llama-server built once per machine in the real settings cache ($RYZ_HOME/cache/peers, next to
    `ryz bench`'s llama-bench: the first build takes minutes). Skips when it cannot be built."""
    from engine.settings import Settings

    try:
        return serve_bench.build_llama_server(Settings().cache_dir)
    except Exception as exc:  # noqa: BLE001 - no compiler, no sdist (offline), a failed build: skip with why
        pytest.skip(f"llama-server is unavailable: {type(exc).__name__}: {exc}")


def test_llama_server_serves_tiny_under_the_harness(tmp_path, llama_server_binary):
    from engine.settings import Settings

    result = serve_bench.run_serve_bench(
        "tiny",
        streams=(1, 4),
        peers=True,
        ours=False,
        threads=2,
        min_requests=4,
        timeout_s=60,
        ready_timeout=60,
        llama_server=llama_server_binary,
        settings=Settings(home=tmp_path / "home"),
    )
    peer = result["peers"]["llama-server"]
    assert "error" not in peer, peer.get("error")
    assert set(peer["streams"]) == {"1", "4"}
    for n, level in peer["streams"].items():
        assert level["errors"] == 0, level.get("error_messages")
        assert level["requests"] == 4 and level["ok"] == 4
        assert level["completion_tokens"] == 4 * 128
        assert level["prompt_tokens"] == [128]  # the token-id prompt reached the model as it is
        assert level["decode_tok_s"] > 0 and 0 < level["ttft_p50_ms"] <= level["ttft_p95_ms"]
    assert peer["cmd"][0] == str(llama_server_binary)
    assert result["streams"] == {} and result["settings"]["gen_tokens"] == 128
    assert result["machine"]["loadavg_start"] is not None
    json.dumps(result)  # the --json record is plain JSON


def test_decode_window_is_the_union_of_decode_intervals():
    assert serve_bench.decode_window([]) == 0
    assert serve_bench.decode_window([(0, 2), (3, 4)]) == 3  # one stream: the gap is not decode time
    assert serve_bench.decode_window([(0, 2), (1, 4), (5, 6)]) == 5  # overlapping streams count once
    assert serve_bench.decode_window([(1, 4), (0, 2), (2, 3)]) == 4


def test_ours_and_llama_server_interleaved_on_tiny(tmp_path, llama_server_binary, kernel_build):
    """The whole harness: `ryz serve` and llama-server both up, levels interleaved, the summary computed."""
    pytest.importorskip("engine.serving.app", reason="`ryz serve` (engine/serving/app.py) is not importable yet")
    from engine.settings import Settings

    result = serve_bench.run_serve_bench(
        "tiny",
        streams=(1, 4),
        threads=2,
        min_requests=4,
        timeout_s=60,
        ready_timeout=120,
        llama_server=llama_server_binary,
        settings=Settings(home=tmp_path / "home"),
    )
    for levels, other in (
        (result["streams"], "llama-server"),
        (result["peers"]["llama-server"]["streams"], "ryzanstein"),
    ):
        assert set(levels) == {"1", "4"}
        for level in levels.values():
            assert (level["ok"], level["errors"]) == (4, 0), level.get("error_messages")
            assert level["completion_tokens"] == 4 * 128 and level["prompt_tokens"] == [128]
            assert level["decode_tok_s"] > 0 and set(level["idle_servers_cpu_s"]) == {other}  # both were up
    assert set(result["summary"]["decode_vs_llama_server"]) == {"1", "4"}
    assert result["ours"]["cmd"][3] == "serve" and Path(result["ours"]["log"]).is_file()
    # our server's decode steps by part (RYZ_PROFILE_STEPS, read from /admin/state around each level)
    for n, level in result["streams"].items():
        prof = level["step_profile"]
        assert prof["batch"] == int(n) and prof["steps"] > 0 and prof["decode_steps"][n] == prof["steps"]
        assert list(prof["ms_per_step"]) == ["ternary_linears", "head", "attention", "other", "python"]
        assert all(v >= 0 for v in prof["ms_per_step"].values()) and prof["ms_per_step"]["ternary_linears"] > 0
        assert sum(prof["ms_per_step"].values()) == pytest.approx(prof["step_ms"], abs=0.01)
        assert sum(prof["share"].values()) == pytest.approx(1, abs=0.01)
        assert set(prof["gb_s"]) == {"ternary_linears", "head"} and prof["tok_s"] > 0
        # every decoded token went through a profiled step: the level's requests x (tokens after the first)
        decoded = sum(int(b) * steps for b, steps in prof["decode_steps"].items()) + prof["mixed"]["tokens"]
        assert decoded >= 4 * 127
    assert "step_profile" not in result["peers"]["llama-server"]["streams"]["4"]
    assert "4-token decode step" in serve_bench.format_report(result)
    record = tmp_path / "serve.json"
    record.write_text(json.dumps(result))
    report = subprocess.run(
        [sys.executable, "scripts/bench_report.py", str(record)],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "decode steps by part" in report and report.count("| `serve.json` |") == 2


def test_llama_server_is_added_to_the_llama_bench_tree(tmp_path, monkeypatch):
    """A tree that built llama-bench (a record from before there were several targets) gets llama-server
    by reconfiguring the same build directory with LLAMA_BUILD_SERVER=ON: no download, llama-bench kept."""
    from evaluations import peers

    commit = peers.KNOWN_LLAMA_CPP_COMMITS[peers.LLAMA_CPP_PYTHON_VERSION]
    tree = tmp_path / "cache" / "peers" / f"llama.cpp-{commit[:7]}"
    (tree / "src").mkdir(parents=True)
    (tree / "src" / "CMakeLists.txt").write_text("project(llama)\n")
    (tree / "build" / "bin").mkdir(parents=True)
    (tree / "build" / "bin" / "llama-bench").write_text("#!/bin/sh\n")
    old_flags = ["-DLLAMA_BUILD_SERVER=OFF"]
    (tree / "build.json").write_text(
        json.dumps({"commit": commit, "version": "0.3.36", "build_seconds": 500.0, "flags": old_flags})
    )
    commands = []

    def fake_run(cmd, timeout, env=None, cwd=None):
        commands.append(cmd)
        if cmd[:2] == ["cmake", "--build"]:
            for target in cmd[cmd.index("--target") + 1 : cmd.index("-j")]:
                (tree / "build" / "bin" / target).write_text("#!/bin/sh\n")
        return peers.Completed(0, "", "", 0.0, 0.1)

    monkeypatch.setattr(peers, "run_measured", fake_run)
    monkeypatch.setattr(peers.shutil, "which", lambda name: f"/usr/bin/{name}")  # no toolchain needed
    monkeypatch.setattr(peers, "_download_sdist", lambda *a: pytest.fail("the cached source must be reused"))
    binary = serve_bench.build_llama_server(tmp_path / "cache", jobs=2)
    assert binary == tree / "build" / "bin" / "llama-server"
    configure, build = commands
    assert configure[:2] == ["cmake", "-S"] and configure[configure.index("-B") + 1] == str(tree / "build")
    assert "-DLLAMA_BUILD_SERVER=ON" in configure and "-DLLAMA_OPENSSL=OFF" in configure
    assert "-DLLAMA_USE_PREBUILT_UI=OFF" in configure and f"-DLLAMA_BUILD_COMMIT={commit[:7]}" in configure
    assert build == ["cmake", "--build", str(tree / "build"), "--target", "llama-server", "-j", "2"]
    meta = json.loads((tree / "build.json").read_text())
    assert meta["targets"]["llama-bench"] == {"flags": old_flags, "build_seconds": 500.0}  # the old record kept
    assert "-DLLAMA_BUILD_SERVER=ON" in meta["targets"]["llama-server"]["flags"]
    # both are cached now: no command runs again, and llama-bench is still found
    assert serve_bench.build_llama_server(tmp_path / "cache") == binary and len(commands) == 2
    bench = peers.ensure_llama_bench(tmp_path / "cache")
    assert bench.cached and bench.binary == tree / "build" / "bin" / "llama-bench" and bench.build_seconds == 500.0


def test_servers_die_with_a_killed_harness(tmp_path):
    """SIGKILL leaves the harness no chance to clean up: the server must go with it (PR_SET_PDEATHSIG)."""
    import signal
    import subprocess

    if not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_PDEATHSIG is Linux-only")
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "ready").write_text("ok")
    port = serve_bench.free_port()
    script = (
        f"import sys, time\nsys.path.insert(0, {str(ROOT)!r})\nfrom evaluations import serve_bench\n"
        f"with serve_bench.start_server({_http_server_cmd(port, tmp_path / 'www')!r}, {port}, '/ready', 30) as p:\n"
        f"    print(p.pid, flush=True)\n    time.sleep(600)\n"
    )
    harness = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(harness.stdout.readline())
        assert _alive(pid)
        harness.send_signal(signal.SIGKILL)
        harness.wait(timeout=10)
        deadline = time.monotonic() + 10
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        # the server was our grandchild: once dead it is reaped by init, never a lingering zombie of ours
        assert not _alive(pid) or Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] == "Z"
    finally:
        harness.kill()
