"""The serving benchmark behind `ryz bench-serve`: a bounded loopback load against `ryz serve`,
side by side with llama.cpp's `llama-server` on the same GGUF.

For each concurrency level (1, 4, 8 and 16 streams by default) every stream sends its requests one after
the other, each an OpenAI streaming completion (`POST /v1/completions`, `"stream": true`) with a prompt of
exactly `prompt_tokens` token ids (128), `max_tokens` = `gen_tokens` (128), `"ignore_eos": true` and
`"temperature": 0`. Every request gets its own random prompt (seeded, the same for both servers), so no
server can answer from a prefix cache. Measured per level (see `run_load` for the exact definitions):

* **decode tok/s**: aggregate decode throughput of the level, all streams together;
* **TTFT p50/p95**: time to the first streamed token of a request, from the moment it was sent;
* **step_profile** (our server): where its steps of exactly that many sequences went, by part (`level_profile`:
  the native forward's parts and the Python around it, from the engine's RYZ_PROFILE_STEPS profile);
* errors: a request that fails (HTTP error, server error event, stream cut short, fewer or more tokens than
  asked, no `[DONE]`, timeout) is counted and its message reported, never dropped silently.

Servers run as subprocesses on 127.0.0.1 (`start_server`), each started once and warmed up with one short
request; the levels are interleaved (level 1: ours then llama-server; level 4: llama-server then ours; ...)
so both see the same background load on a shared machine. Nothing leaves the loopback interface.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit

HELP = (
    "serving benchmark: aggregate decode tok/s and p50/p95 TTFT of `ryz serve` at 1/4/8/16 concurrent streams "
    "(and of llama-server on the same GGUF)"
)
SCHEMA = 1
STREAMS = (1, 4, 8, 16)
PROMPT_TOKENS = 128
GEN_TOKENS = 128
MIN_REQUESTS = 8  # per level: streams x requests_per_stream >= this (8 TTFT samples at 1 stream)
CTX_MARGIN = 16  # llama-server: per-slot context = prompt + gen + this
REQUEST_TIMEOUT = 600.0  # one request, first byte to [DONE]
READY_TIMEOUT = 600.0  # a server's start: load + warm-up
WARMUP_TOKENS = 8
LLAMA_SERVER = "llama-server"
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def log(message: str) -> None:
    print(f"[bench-serve] {message}", file=sys.stderr, flush=True)


# --- llama-server ----------------------------------------------------------------------------------


def build_llama_server(cache_dir: str | Path, jobs: int | None = None) -> Path:
    """llama.cpp's `llama-server`, built once in the same cached tree (same llama-cpp-python sdist, same
    commit) as `ryz bench`'s llama-bench: `evaluations.peers.ensure_llama_cpp` with the `llama-server`
    target, which reconfigures that tree with `-DLLAMA_BUILD_SERVER=ON` (no web UI, no download, no
    OpenSSL: plain-HTTP cpp-httplib) and builds incrementally."""
    from evaluations import peers

    return peers.ensure_llama_cpp(Path(cache_dir), (LLAMA_SERVER,), jobs=jobs).binaries[LLAMA_SERVER]


def llama_server_cmd(
    binary: str | Path, model: str | Path, port: int, threads: int, slots: int, prompt_tokens: int, gen_tokens: int
) -> list[str]:
    """llama-server's command line (flags of llama.cpp 0c1e570, `common/arg.cpp`): `slots` parallel
    sequences each with its own `prompt + gen + CTX_MARGIN` positions (`-c` is the total, split over
    `-np` slots), continuous batching (its default, made explicit), no web UI, and no RAM prompt cache
    (every prompt is distinct: the cache could only cost)."""
    return [
        str(binary),
        "-m",
        str(model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "-t",
        str(threads),
        "-tb",
        str(threads),
        "-np",
        str(slots),
        "-c",
        str(slots * slot_context(prompt_tokens, gen_tokens)),
        "--cont-batching",
        "--no-webui",
        "--cache-ram",
        "0",
    ]


def slot_context(prompt_tokens: int, gen_tokens: int) -> int:
    """Positions per sequence both servers are given: prompt + generated tokens + CTX_MARGIN."""
    return prompt_tokens + gen_tokens + CTX_MARGIN


def ours_cmd(model: str | Path, port: int, threads: int, slots: int, context: int) -> list[str]:
    """`ryz serve` on `model` (our OpenAI-compatible server, `/ready` when it accepts requests), with
    `slots` sequences of `context` positions each: the same as llama-server's per-slot context."""
    return [
        sys.executable,
        "-m",
        "flows.cli",
        "serve",
        "--model",
        str(model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--threads",
        str(threads),
        "--max-seqs",
        str(slots),
        "--max-context",
        str(context),
    ]


# --- servers as subprocesses ----------------------------------------------------------------------------


class ServerError(RuntimeError):
    """A server did not start (it exited, or was not ready in time); the message ends with its log's tail."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


def _get(url: str, timeout: float = 5.0, headers: dict | None = None) -> tuple[int, bytes]:
    # no proxies: a loopback benchmark must never be routed anywhere else
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(urllib.request.Request(url, headers=headers or {}), timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, b""


def _die_with_parent_hook():
    """A `preexec_fn` making the server die (SIGKILL) when the harness does, even if the harness itself is
    killed with SIGKILL and cannot clean up (Linux PR_SET_PDEATHSIG); None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here, not in the forked child
    except (OSError, AttributeError):
        return None

    def hook() -> None:
        prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG

    return hook


@contextlib.contextmanager
def start_server(
    cmd: list[str],
    port: int,
    ready_path: str,
    timeout: float = READY_TIMEOUT,
    log_path: str | Path | None = None,
    env: dict | None = None,
    cwd: str | Path | None = None,
    name: str | None = None,
):
    """Start `cmd` (which must listen on 127.0.0.1:`port`) in its own process group, wait until GET
    `ready_path` answers 200, yield the `subprocess.Popen`, and always kill the whole group on exit
    (SIGTERM, then SIGKILL after 10 s). stdout and stderr go to `log_path` (a temporary file when None);
    a server that exits or is not ready within `timeout` seconds raises `ServerError` with its log's tail.
    Should the harness die without cleaning up, the server gets SIGKILL too (`_die_with_parent_hook`)."""
    own_log = log_path is None
    if log_path is None:
        fd, temp_log = tempfile.mkstemp(prefix="server-", suffix=".log")
        os.close(fd)
        log_path = temp_log
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    url = f"http://127.0.0.1:{port}{ready_path}"
    name = name or Path(cmd[0]).name
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,
            preexec_fn=_die_with_parent_hook(),
        )
    try:
        deadline = time.monotonic() + timeout
        while True:
            code = proc.poll()
            if code is not None:
                raise ServerError(f"{name} exited with {code} before it was ready ({log_path}):\n{_log_tail(log_path)}")
            try:
                status, _ = _get(url, timeout=2.0)
                if status == 200:
                    break
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                raise ServerError(
                    f"{name} was not ready at {url} after {timeout:.0f} s ({log_path}):\n{_log_tail(log_path)}"
                )
            time.sleep(0.25)
        # callers find the log beside the process; Popen declares no such attribute
        proc.log_path = log_path  # type: ignore[attr-defined]
        yield proc
    finally:
        _kill_group(proc)
        if own_log:
            with contextlib.suppress(OSError):
                log_path.unlink()


def _kill_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    # the group leader is gone; make sure nothing it spawned survives
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def group_cpu_seconds(pgid: int) -> float:
    """User + system CPU seconds of the live processes of a process group (all their threads)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            text = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid:
            total += int(fields[11]) + int(fields[12])
    return total / tick


def served_model(base_url: str, fallback: str) -> str:
    """The first model id of GET /v1/models (both servers list the one model they serve)."""
    try:
        status, body = _get(base_url.rstrip("/") + "/v1/models")
        if status == 200:
            data = json.loads(body).get("data") or []
            if data and data[0].get("id"):
                return str(data[0]["id"])
    except (OSError, ValueError, urllib.error.URLError):
        pass
    return fallback


# --- the load generator ---------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100), linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return None
    v = sorted(values)
    pos = (len(v) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def decode_window(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of `[first, last]` intervals: the time during which some request was decoding."""
    total, end = 0.0, None
    for a, b in sorted(intervals):
        if end is None or a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total


def _is_loopback(base_url: str) -> bool:
    return (urlsplit(base_url).hostname or "") in LOOPBACK


async def _request(client, url: str, body: dict, gen_tokens: int, timeout_s: float, t0: float) -> dict:
    """One streaming completion. Token chunks: SSE `data:` events whose `choices` carry text, or carry no
    `finish_reason` yet (a final event with only a finish reason and/or usage is not a token)."""
    import asyncio

    rec: dict = {
        "sent_s": time.perf_counter() - t0,
        "first_s": None,
        "last_s": None,
        "chunks": 0,
        "usage_tokens": None,
        "prompt_tokens": None,
        "tokens": 0,
        "error": None,
    }
    done = False
    try:
        async with asyncio.timeout(timeout_s):
            async with client.stream("POST", url, json=body) as resp:
                if resp.status_code != 200:
                    text = (await resp.aread()).decode(errors="replace")
                    raise RuntimeError(f"HTTP {resp.status_code}: {text[:300]}")
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        done = True
                        break
                    now = time.perf_counter() - t0
                    event = json.loads(data)
                    if event.get("error"):
                        raise RuntimeError(f"server error event: {json.dumps(event['error'])[:300]}")
                    choices = event.get("choices") or []
                    if choices and (choices[0].get("text") or choices[0].get("finish_reason") is None):
                        rec["chunks"] += 1
                        if rec["first_s"] is None:
                            rec["first_s"] = now
                        rec["last_s"] = now
                    usage = event.get("usage")
                    if usage:
                        rec["usage_tokens"] = usage.get("completion_tokens")
                        rec["prompt_tokens"] = usage.get("prompt_tokens")
        rec["tokens"] = rec["usage_tokens"] if rec["usage_tokens"] is not None else rec["chunks"]
        if not done:
            rec["error"] = "the stream ended without data: [DONE]"
        elif rec["tokens"] != gen_tokens:
            rec["error"] = f"generated {rec['tokens']} tokens, expected {gen_tokens}"
        elif rec["first_s"] is None:
            rec["error"] = "no token chunk was streamed"
    except TimeoutError:
        rec["error"] = f"timed out after {timeout_s:g} s ({rec['chunks']} token chunks received)"
    except Exception as exc:  # noqa: BLE001 - every failure is counted and reported
        rec["error"] = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    rec["end_s"] = time.perf_counter() - t0
    return rec


async def _load(
    base_url: str,
    model: str,
    streams: int,
    requests_per_stream: int,
    prompts: list,
    gen_tokens: int,
    timeout_s: float,
    extra: dict,
) -> tuple[list[dict], float]:
    import asyncio

    import httpx

    url = base_url.rstrip("/") + "/v1/completions"
    timeout = httpx.Timeout(timeout_s, connect=min(30.0, timeout_s))
    limits = httpx.Limits(max_connections=streams + 2, max_keepalive_connections=streams + 2)
    records: list[dict] = []
    async with httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False) as client:
        t0 = time.perf_counter()

        async def stream(s: int) -> None:
            for r in range(requests_per_stream):
                i = s * requests_per_stream + r
                body = {
                    "model": model,
                    "prompt": prompts[i % len(prompts)],
                    "max_tokens": gen_tokens,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                    "ignore_eos": True,
                    "temperature": 0,
                    **extra,
                }
                rec = await _request(client, url, body, gen_tokens, timeout_s, t0)
                rec.update(stream=s, index=r)
                records.append(rec)

        await asyncio.gather(*(stream(s) for s in range(streams)))
        wall = time.perf_counter() - t0
    return records, wall


def run_load(
    base_url: str,
    model: str,
    streams: int,
    requests_per_stream: int,
    prompt_ids,
    gen_tokens: int = GEN_TOKENS,
    timeout_s: float = REQUEST_TIMEOUT,
    extra: dict | None = None,
) -> dict:
    """Drive `streams` concurrent streams against `base_url`'s `/v1/completions`, each sending
    `requests_per_stream` streaming requests back to back; return the level's measurements.

    `prompt_ids`: one prompt (a list of token ids, or a text) for every request, or a list of prompts used
    in turn (request r of stream s gets prompt `s * requests_per_stream + r`, cycling).

    Definitions (per request: sent at `sent`, first token chunk at `first`, last token chunk at `last`,
    `n` generated tokens = the final `usage.completion_tokens`, else the number of token chunks):

    * `ttft_ms`: `first - sent`; p50/p95 over the successful requests (linear interpolation);
    * `decode_tok_s` (aggregate decode throughput): sum over the successful requests of `n - 1` (the tokens
      after each request's first), divided by the level's decode time `decode_window_s`: the time during
      which at least one request was decoding (the union of the requests' `[first, last]` intervals).
      With one stream that is the sum of the requests' own decode times (the gaps between requests, i.e.
      the next prompt's prefill, are not decode time); with concurrent streams, prefill work the server
      does while others decode (a later request's prompt) counts against it, as it does in serving;
    * `request_decode_tok_s_p50`: the median of the per-request rates `(n - 1) / (last - first)`: what one
      client sees;
    * `throughput_tok_s`: all generated tokens / the level's whole wall time (first send to last byte,
      prefills included).

    A request fails when the server answers an HTTP error or an error event, when the stream ends without
    `[DONE]`, when it generated a number of tokens other than `gen_tokens`, or after `timeout_s` seconds;
    failures are counted in `errors` (and their distinct messages in `error_messages`) and excluded from
    the figures above. Every request is bounded by `timeout_s`, so every level ends by itself. Only
    loopback URLs are accepted."""
    if not _is_loopback(base_url):
        raise ValueError(f"the serving benchmark only runs against loopback servers, not {base_url}")
    if streams < 1 or requests_per_stream < 1 or gen_tokens < 1:
        raise ValueError("streams, requests_per_stream and gen_tokens must be positive")
    import asyncio

    prompts = (
        prompt_ids
        if (isinstance(prompt_ids, list) and prompt_ids and isinstance(prompt_ids[0], (list, str)))
        else [prompt_ids]
    )
    records, wall = asyncio.run(
        _load(base_url, model, streams, requests_per_stream, prompts, gen_tokens, timeout_s, extra or {})
    )
    ok = [r for r in records if r["error"] is None]
    failed = [r for r in records if r["error"] is not None]
    ttfts = [(r["first_s"] - r["sent_s"]) * 1e3 for r in ok]
    out: dict = {
        "streams": streams,
        "requests": len(records),
        "ok": len(ok),
        "errors": len(failed),
        "decode_tok_s": None,
        "ttft_p50_ms": _round(percentile(ttfts, 50)),
        "ttft_p95_ms": _round(percentile(ttfts, 95)),
        "request_decode_tok_s_p50": None,
        "throughput_tok_s": None,
        "wall_s": round(wall, 3),
    }
    if ok:
        window = decode_window([(r["first_s"], r["last_s"]) for r in ok])
        after_first = sum(r["tokens"] - 1 for r in ok)
        out["decode_window_s"] = round(window, 3)
        out["decode_tok_s"] = _round(after_first / window) if window > 0 else None
        rates = [(r["tokens"] - 1) / (r["last_s"] - r["first_s"]) for r in ok if r["last_s"] > r["first_s"]]
        out["request_decode_tok_s_p50"] = _round(statistics.median(rates)) if rates else None
        out["throughput_tok_s"] = _round(sum(r["tokens"] for r in ok) / wall) if wall > 0 else None
        out["completion_tokens"] = sum(r["tokens"] for r in ok)
        prompt_tokens = sorted({r["prompt_tokens"] for r in ok if r["prompt_tokens"] is not None})
        if prompt_tokens:
            out["prompt_tokens"] = prompt_tokens  # as the server counted them (usage.prompt_tokens)
        out["chunks_per_request_min"] = min(r["chunks"] for r in ok)
    out["ttft_ms"] = [_round(t, 1) for t in ttfts]
    if failed:
        messages: dict[str, int] = {}
        for r in failed:
            messages[r["error"]] = messages.get(r["error"], 0) + 1
        out["error_messages"] = [{"error": m, "count": c} for m, c in list(messages.items())[:10]]
    return out


def _round(value, digits: int = 3):
    return None if value is None else round(float(value), digits)


# --- prompts ------------------------------------------------------------------------------------------


def prompt_token_pool(path: str | Path) -> list[int]:
    """Token ids a random prompt may use: the GGUF vocabulary's normal tokens (type 1), without BOS/EOS
    and other control, byte or unused tokens; every id below the vocabulary size if the file has no
    token types."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(str(path), "r")
    specials = set()
    for key in ("bos", "eos", "eot", "eom", "unknown", "padding", "separator"):
        f = reader.get_field(f"tokenizer.ggml.{key}_token_id")
        if f is not None:
            specials.add(int(f.contents()))
    types = reader.get_field("tokenizer.ggml.token_type")
    if types is not None:
        t = np.asarray(types.contents())
        ids = np.flatnonzero(t == 1)
    else:
        tokens = reader.get_field("tokenizer.ggml.tokens")
        n = len(tokens.data) if tokens is not None else 0
        ids = np.arange(n)
    pool = [int(i) for i in ids if int(i) not in specials]
    if len(pool) < 2:
        raise ValueError(f"{path}: its vocabulary has no ordinary tokens to build a prompt from")
    return pool


def make_prompts(pool: list[int], count: int, length: int, seed: int) -> list[list[int]]:
    """`count` distinct random prompts of `length` token ids from `pool` (deterministic in `seed`)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    arr = np.asarray(pool)
    return [[int(x) for x in rng.choice(arr, size=length)] for _ in range(count)]


# --- the benchmark ------------------------------------------------------------------------------------


class _Server:
    """One engine under load: how to start it, its live process, and its per-level results."""

    def __init__(self, name: str, cmd_for, ready_path: str, meta: dict, env: dict | None = None):
        self.name, self.cmd_for, self.ready_path, self.meta, self.env = name, cmd_for, ready_path, meta, env
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self.model: str | None = None  # the served model's id, set with proc (or error) by start()
        self.levels: dict[str, dict] = {}
        self.error: str | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


PROFILE_PARTS = ("ternary_linears", "head", "attention", "other", "python")


def step_profile(base_url: str, admin_token: str) -> dict | None:
    """Our server's StepProfile (engine/serving/core.py): the production variant's `step_profile` in
    /admin/state; None when it has none (a server without RYZ_PROFILE_STEPS, or not answering)."""
    try:
        status, body = _get(
            base_url.rstrip("/") + "/admin/state", timeout=10.0, headers={"Authorization": f"Bearer {admin_token}"}
        )
        if status != 200:
            return None
        return (json.loads(body).get("variants") or {}).get("production", {}).get("step_profile")
    except (OSError, ValueError, urllib.error.URLError):
        return None


def _entry_delta(before: dict | None, after: dict | None) -> dict:
    before = before or {"steps": 0, "tokens": 0, "seconds": {}}
    after = after or {"steps": 0, "tokens": 0, "seconds": {}}
    return {
        "steps": after["steps"] - before["steps"],
        "tokens": after["tokens"] - before["tokens"],
        "seconds": {p: v - before["seconds"].get(p, 0.0) for p, v in after["seconds"].items()},
    }


def level_profile(before: dict, after: dict, streams: int, sizes: dict) -> dict:
    """Where a level's decode steps spent their time: the steps that decoded `streams` sequences at once (the
    level's steady state; steps with fewer are the ramps, listed in `decode_steps` by batch), per part ms per
    step, share of the step, and for the two weight-streaming parts the rate they read their bytes at (a step reads
    every weight once, whatever its batch). `mixed`: the steps that also fed prompt tokens."""
    decode = {
        n: _entry_delta(before["decode"].get(n), e)
        for n, e in after["decode"].items()
        if e["steps"] > (before["decode"].get(n) or {}).get("steps", 0)
    }
    mixed = _entry_delta(before.get("mixed"), after.get("mixed"))
    out: dict = {
        "isa": after.get("isa"),
        "batch": streams,
        "decode_steps": {n: e["steps"] for n, e in sorted(decode.items(), key=lambda kv: int(kv[0]))},
        "mixed": {
            "steps": mixed["steps"],
            "tokens": mixed["tokens"],
            "seconds": _round(sum(mixed["seconds"].values())),
        },
    }
    entry = decode.get(str(streams))
    if not entry or not entry["steps"]:
        return out
    steps = entry["steps"]
    order = [*PROFILE_PARTS, *sorted(set(entry["seconds"]) - set(PROFILE_PARTS))]
    ms = {p: entry["seconds"][p] / steps * 1e3 for p in order if p in entry["seconds"]}
    total = sum(ms.values())
    out["steps"] = steps
    out["step_ms"] = _round(total)
    out["tok_s"] = _round(streams / (total / 1e3)) if total > 0 else None
    out["ms_per_step"] = {p: _round(v) for p, v in ms.items()}
    out["share"] = {p: _round(v / total) for p, v in ms.items()} if total > 0 else {}
    read = {"ternary_linears": after.get("ternary_bytes") or sizes["ternary_bytes_engine"], "head": sizes["head_bytes"]}
    out["gb_s"] = {p: _round(b / (ms[p] / 1e3) / 1e9, 2) for p, b in read.items() if ms.get(p)}
    return out


def requests_per_stream(streams: int, min_requests: int) -> int:
    return max(1, math.ceil(min_requests / streams))


def _summary(ours: dict, peer: dict | None, levels: list[int]) -> dict:
    """The issue's targets: 8-stream decode >= 3.5x the 1-stream rate, and ahead of llama-server at every level."""
    out: dict = {}
    d1, d8 = (ours.get(str(n), {}).get("decode_tok_s") for n in (1, 8))
    if d1 and d8:
        out["scaling_8_vs_1"] = _round(d8 / d1)
        out["scaling_target_met"] = d8 >= 3.5 * d1
    if peer:
        ratios = {}
        for n in levels:
            a, b = ours.get(str(n), {}).get("decode_tok_s"), peer.get(str(n), {}).get("decode_tok_s")
            ratios[str(n)] = _round(a / b) if a and b else None
        out["decode_vs_llama_server"] = ratios
        known = [r for r in ratios.values() if r is not None]
        out["ahead_of_llama_server"] = bool(known) and len(known) == len(ratios) and all(r > 1 for r in known)
    return out


def run_serve_bench(
    target: str,
    streams=STREAMS,
    peers: bool = True,
    ours: bool = True,
    threads: int | None = None,
    prompt_tokens: int = PROMPT_TOKENS,
    gen_tokens: int = GEN_TOKENS,
    min_requests: int = MIN_REQUESTS,
    timeout_s: float = REQUEST_TIMEOUT,
    ready_timeout: float = READY_TIMEOUT,
    interleave: bool = True,
    llama_server: str | Path | None = None,
    seed: int = 0,
    settings=None,
) -> dict:
    """Benchmark `target` (a shape name, synthesized and cached as `ryz bench` does, or a model reference)
    under `ryz serve` and, with `peers`, llama-server; returns the `ryz bench-serve --json` record.

    `llama_server`: a prebuilt binary (default: build it once from the llama-cpp-python sdist into the
    cache). `interleave`: keep both servers up and alternate them level by level (needs memory for both
    models); else run all of ours' levels, stop it, then the peer's. Our server failing to start raises
    `BenchError`; a peer that cannot run is reported as `{"error": ...}`."""
    from engine.host import loadavg, machine_info
    from engine.model.loader import default_threads
    from engine.settings import get_settings
    from evaluations.bench import BenchError, decode_bytes, resolve_target

    settings = settings or get_settings()
    levels = sorted({int(n) for n in streams})
    if not levels or levels[0] < 1 or prompt_tokens < 1 or gen_tokens < 1 or min_requests < 1:
        raise ValueError("streams, --prompt, --gen and --min-requests must be positive")
    if not ours and not peers:
        raise ValueError("nothing to benchmark: neither our server nor a peer")
    started = datetime.now(timezone.utc)
    wall = time.perf_counter()
    load_start = loadavg()
    threads = threads or default_threads(settings)
    slots = max(levels)
    tgt = resolve_target(target, settings)
    pool = prompt_token_pool(tgt.path)
    sizes = decode_bytes(tgt.path)
    plan = {n: requests_per_stream(n, min_requests) for n in levels}
    prompts = {n: make_prompts(pool, n * plan[n], prompt_tokens, seed * 7919 + n) for n in levels}
    warmup_prompt = make_prompts(pool, 1, min(prompt_tokens, WARMUP_TOKENS), seed * 7919 + 104729)[0]

    stamp = started.strftime("%Y%m%dT%H%M%S")
    log_dir = settings.cache_dir / "serve-bench" / "logs"
    tmp_root = settings.cache_dir / "tmp"
    tmp_root.mkdir(parents=True, exist_ok=True)
    servers: list[_Server] = []
    peer_result: dict | None = None
    with tempfile.TemporaryDirectory(prefix="bench-serve-", dir=tmp_root) as tmp:
        # our step profile (RYZ_PROFILE_STEPS) is read from /admin/state: a token of this run only
        admin_token = secrets.token_hex(16)
        if ours:
            context = slot_context(prompt_tokens, gen_tokens)
            servers.append(
                _Server(
                    "ryzanstein",
                    lambda port: ours_cmd(tgt.path, port, threads, slots, context),
                    "/ready",
                    {"model_file": str(tgt.path)},
                    env={**os.environ, "RYZ_PROFILE_STEPS": "1", "RYZ_ADMIN_TOKEN": admin_token},
                )
            )
        if peers:
            peer = _Server(LLAMA_SERVER, None, "/health", {})
            try:
                if llama_server:
                    binary, info = Path(llama_server), {"binary": str(llama_server), "prebuilt": True}
                else:
                    from evaluations import peers as peers_mod

                    build = peers_mod.ensure_llama_cpp(settings.cache_dir, (LLAMA_SERVER,))
                    binary, info = build.binaries[LLAMA_SERVER], build.describe(LLAMA_SERVER)
                from evaluations.peers import write_llama_cpp_copy

                log("writing the llama.cpp copy of the model (architecture bitnet)")
                copy = write_llama_cpp_copy(tgt.path, Path(tmp) / "llama-server.gguf")
                peer.cmd_for = lambda port, binary=binary, copy=copy: llama_server_cmd(
                    binary, copy, port, threads, slots, prompt_tokens, gen_tokens
                )
                peer.meta = {
                    **info,
                    "note": "llama.cpp's bitnet graph (SiLU FFN) on the same tensors, architecture key renamed",
                }
            except Exception as exc:  # noqa: BLE001 - a peer never stops the benchmark
                peer.error = f"llama-server unavailable: {type(exc).__name__}: {exc}"
                log(peer.error)
            servers.append(peer)

        def start(stack: contextlib.ExitStack, s: _Server) -> bool:
            if s.error:
                return False
            s.port = free_port()
            cmd = s.cmd_for(s.port)
            s.meta["cmd"] = cmd
            s.meta["log"] = str(log_dir / f"{stamp}-{s.name}.log")
            log(f"starting {s.name} on port {s.port}")
            t = time.perf_counter()
            try:
                s.proc = stack.enter_context(
                    start_server(cmd, s.port, s.ready_path, ready_timeout, s.meta["log"], env=s.env, name=s.name)
                )
                s.meta["ready_seconds"] = round(time.perf_counter() - t, 2)
                s.model = served_model(s.base_url, tgt.path.name)
                warm = run_load(s.base_url, s.model, 1, 1, warmup_prompt, WARMUP_TOKENS, timeout_s)
                if warm["errors"]:
                    raise ServerError(f"warm-up request failed: {warm['error_messages'][0]['error']}")
            except Exception as exc:  # noqa: BLE001
                s.error = f"{type(exc).__name__}: {exc}"
                log(f"{s.name} failed: {s.error}")
                if s.name == "ryzanstein":
                    raise BenchError(f"our server failed: {s.error}") from exc
                return False
            return True

        def measure(s: _Server, n: int, others: list[_Server]) -> None:
            if s.error or s.proc is None or s.model is None:
                return
            log(
                f"{s.name}: {n} streams x {plan[n]} requests ({prompt_tokens} prompt + {gen_tokens} generated tokens "
                f"each)"
            )
            profile0 = step_profile(s.base_url, admin_token) if s.name == "ryzanstein" else None
            cpu0 = group_cpu_seconds(s.proc.pid)
            idle = [(o.name, o.proc) for o in others if o.proc is not None and o.proc.poll() is None]
            idle0 = [group_cpu_seconds(proc.pid) for _, proc in idle]
            try:
                r = run_load(s.base_url, s.model, n, plan[n], prompts[n], gen_tokens, timeout_s)
            except Exception as exc:  # noqa: BLE001 - recorded, the other levels go on
                r = {"streams": n, "error": f"{type(exc).__name__}: {exc}"}
            r["server_cpu_s"] = round(group_cpu_seconds(s.proc.pid) - cpu0, 2)
            if profile0 is not None:
                profile1 = step_profile(s.base_url, admin_token)
                if profile1 is not None:
                    r["step_profile"] = level_profile(profile0, profile1, n, sizes)
            if idle:  # an idle server that burns CPU would slow the measured one down: shown here
                r["idle_servers_cpu_s"] = {
                    name: round(group_cpu_seconds(proc.pid) - c, 2) for (name, proc), c in zip(idle, idle0)
                }
            if s.proc.poll() is not None:
                s.error = f"the server exited with {s.proc.returncode} during the {n}-stream level"
                r.setdefault("error", s.error)
            s.levels[str(n)] = r
            log(
                f"  decode {r.get('decode_tok_s')} tok/s, TTFT p50 {r.get('ttft_p50_ms')} ms p95 "
                f"{r.get('ttft_p95_ms')} ms, "
                f"{r.get('errors', '?')} errors"
            )

        live = [s for s in servers if not s.error]
        if interleave:
            with contextlib.ExitStack() as stack:
                up = [s for s in live if start(stack, s)]
                for i, n in enumerate(levels):
                    order = up if i % 2 == 0 else up[::-1]
                    for s in order:
                        measure(s, n, [o for o in up if o is not s])
        else:
            for s in live:
                with contextlib.ExitStack() as stack:
                    if start(stack, s):
                        for n in levels:
                            measure(s, n, [])

    by_name = {s.name: s for s in servers}
    ours_levels = by_name["ryzanstein"].levels if ours else {}
    peers_out: dict = {}
    if peers:
        p = by_name[LLAMA_SERVER]
        peers_out[LLAMA_SERVER] = (
            {"error": p.error, **p.meta}
            if p.error and not p.levels
            else {"streams": p.levels, **({"error": p.error} if p.error else {}), **p.meta}
        )
        peer_result = p.levels or None
    return {
        "schema": SCHEMA,
        "streams": ours_levels,
        "peers": peers_out,
        "summary": _summary(ours_levels, peer_result, levels) if ours else {},
        "ours": by_name["ryzanstein"].meta if ours else None,
        "target": tgt.label,
        "shape": tgt.shape,
        "file": str(tgt.path),
        "weights": tgt.weights,
        "head": tgt.head,
        "settings": {
            "streams": levels,
            "prompt_tokens": prompt_tokens,
            "gen_tokens": gen_tokens,
            "threads": threads,
            "isa": settings.isa,  # RYZ_ISA, which our server inherits (its step_profile names the kernels that ran)
            "slots": slots,
            "requests_per_stream": {str(n): plan[n] for n in levels},
            "min_requests": min_requests,
            "request_timeout_s": timeout_s,
            "interleaved": interleave,
            "seed": seed,
            "request": {
                "endpoint": "/v1/completions",
                "stream": True,
                "stream_options": {"include_usage": True},
                "max_tokens": gen_tokens,
                "ignore_eos": True,
                "temperature": 0,
                "prompt": f"{prompt_tokens} token ids, distinct random per request",
            },
        },
        "definitions": {
            "decode_tok_s": "sum over a level's successful requests of (generated tokens - 1) / decode_window_s, the "
            "time during "
            "which at least one request was decoding (union of the requests' first-token..last-token intervals)",
            "ttft_ms": "time from sending a request to its first streamed token chunk; p50/p95 over the level's "
            "successful "
            "requests (linear interpolation)",
            "request_decode_tok_s_p50": "median over requests of (generated tokens - 1) / (last token - first token)",
            "throughput_tok_s": "all generated tokens of the level / its wall time (first send to last byte, prefills "
            "included)",
            "generated tokens": "usage.completion_tokens of the final event, else the number of token chunks; must "
            "equal gen_tokens",
        },
        "machine": {**machine_info(), "loadavg_start": load_start, "loadavg_end": loadavg()},
        "started": started.isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - wall, 1),
    }


# --- the command ----------------------------------------------------------------------------------------


def format_report(r: dict) -> str:
    s = r["settings"]
    lines = [
        f"{r['target']} ({r['weights']}/{r['head']}), {s['threads']} threads, prompt {s['prompt_tokens']} + "
        f"{s['gen_tokens']} generated tokens per request",
        f"{'engine':<14}{'streams':>8}{'requests':>9}{'errors':>7}{'decode tok/s':>14}"
        f"{'TTFT p50 ms':>13}{'TTFT p95 ms':>13}",
    ]
    rows = [("ryzanstein", r["streams"])] if r.get("ours") is not None else []
    for name, peer in r["peers"].items():
        if "streams" in peer:
            rows.append((name, peer["streams"]))
        else:
            lines.append(f"{name:<14}  error: {peer.get('error')}")
    for name, levels in rows:
        for n, d in levels.items():
            if d.get("decode_tok_s") is None and d.get("error"):
                lines.append(f"{name:<14}{n:>8}  error: {d['error']}")
                continue
            lines.append(
                f"{name:<14}{n:>8}{d.get('requests', 0):>9}{d.get('errors', 0):>7}{d.get('decode_tok_s') or 0:>14.2f}"
                f"{d.get('ttft_p50_ms') or 0:>13.0f}{d.get('ttft_p95_ms') or 0:>13.0f}"
            )
            for e in d.get("error_messages", [])[:3]:
                lines.append(f"{'':<22}{e['count']} x {e['error']}")
            prof = d.get("step_profile") or {}
            if prof.get("ms_per_step"):
                lines.append(f"{'':<22}{profile_line(prof)}")
    summary = r.get("summary") or {}
    if "scaling_8_vs_1" in summary:
        lines.append(
            f"8-stream decode / 1-stream: {summary['scaling_8_vs_1']:.2f}x (target >= 3.5x: "
            f"{'met' if summary['scaling_target_met'] else 'not met'})"
        )
    if "decode_vs_llama_server" in summary:
        ratios = ", ".join(f"{n}: {v:.2f}x" if v else f"{n}: -" for n, v in summary["decode_vs_llama_server"].items())
        lines.append(f"decode vs llama-server per level: {ratios}")
    return "\n".join(lines)


def profile_line(prof: dict) -> str:
    """One level's decode-step profile in a line (also what scripts/bench_report.py prints)."""
    parts = ", ".join(
        f"{p.replace('_', ' ')} {ms:.1f} ms ({prof['share'][p]:.0%}"
        + (f", {prof['gb_s'][p]:.1f} GB/s" if p in prof.get("gb_s", {}) else "")
        + ")"
        for p, ms in prof["ms_per_step"].items()
    )
    return f"{prof['batch']}-token decode step {prof['step_ms']:.1f} ms over {prof['steps']} steps: {parts}"


def threading_is_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _streams_arg(text: str) -> list[int]:
    import argparse

    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"a comma-separated list of stream counts, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"stream counts must be positive, got {text!r}")
    return values


def add_arguments(parser) -> None:
    """The `ryz bench-serve` arguments (adds `--json` unless the parser has it already)."""
    parser.add_argument(
        "target",
        metavar="SHAPE_OR_ARTIFACT",
        help="a shape (tiny, medium, bitnet-2b4t: random weights, synthesized once and cached) or a model reference: "
        "name:version, an alias (production, canary, previous), an artifact id or prefix, or a .gguf path",
    )
    parser.add_argument(
        "--streams",
        type=_streams_arg,
        default=list(STREAMS),
        help="comma-separated concurrency levels (default 1,4,8,16)",
    )
    parser.add_argument(
        "--threads", type=int, help="server compute threads (default RYZ_THREADS, else all physical cores)"
    )
    parser.add_argument("--prompt", type=int, default=PROMPT_TOKENS, help="prompt token ids per request (default 128)")
    parser.add_argument("--gen", type=int, default=GEN_TOKENS, help="generated tokens per request (default 128)")
    parser.add_argument(
        "--min-requests",
        type=int,
        default=MIN_REQUESTS,
        help="requests per level at least (streams x requests per stream; default 8)",
    )
    parser.add_argument(
        "--timeout", type=float, default=REQUEST_TIMEOUT, help="seconds one request may take (default 600)"
    )
    parser.add_argument("--no-peers", dest="peers", action="store_false", help="only our server, no llama-server")
    parser.add_argument("--peers-only", dest="ours", action="store_false", help="only llama-server, not our server")
    parser.add_argument(
        "--llama-server",
        type=Path,
        help="a prebuilt llama-server binary (default: built once from the llama-cpp-python sdist)",
    )
    parser.add_argument(
        "--sequential",
        action="store_true",
        help="run the servers one after the other instead of "
        "interleaving them level by level (one model in memory at a time)",
    )
    if "--json" not in getattr(parser, "_option_string_actions", {}):
        parser.add_argument("--json", action="store_true", help="machine-readable output on stdout")


def main(args) -> int:
    def terminate(signum, frame):
        raise SystemExit(128 + signum)  # unwinds through start_server: the servers are stopped

    if threading_is_main():
        signal.signal(signal.SIGTERM, terminate)
    result = run_serve_bench(
        args.target,
        streams=args.streams,
        peers=args.peers,
        ours=args.ours,
        threads=args.threads,
        prompt_tokens=args.prompt,
        gen_tokens=args.gen,
        min_requests=args.min_requests,
        timeout_s=args.timeout,
        interleave=not args.sequential,
        llama_server=args.llama_server,
    )
    if args.json:
        sys.stdout.write(json.dumps(result, indent=2, default=str) + "\n")
    else:
        print(format_report(result))
    return 0


if __name__ == "__main__":
    import argparse

    _parser = argparse.ArgumentParser(prog="python -m evaluations.serve_bench", description=HELP)
    add_arguments(_parser)
    sys.exit(main(_parser.parse_args()))
