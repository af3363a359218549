"""A soak of `ryz serve`: a bounded mixed load for a few minutes, watching for 5xx and memory growth.

Not a timed test (tests/ never runs it): a benchmark script whose record goes in docs/benchmarks.md "Soak".

    .venv/bin/python scripts/soak.py --seconds 180 --json build/soak.json      # or: make soak

It quantizes the demo zoo model (examples/zoo/ryz-demo-s) into a file store under a temporary RYZ_HOME (the kernel
build for this CPU copied from ~/.ryzanstein/cache/kernels when there is one, so nothing is rebuilt), starts a real
`ryz serve --model <artifact id>` subprocess on 127.0.0.1 (RYZ_MAX_SEQS 8, RYZ_THREADS 2) and runs --clients threads
against it for --seconds, each drawing a request kind at random:

    ~60%  ok          non-streaming completions and chat, and streaming chat read to [DONE]
    ~20%  disconnect  streaming requests dropped after a few events; non-streaming ones dropped by a short timeout
    ~10%  ...         (the disconnect share is split evenly between those two)
    ~10%  bad         malformed JSON, max_tokens 10^9, a 60 kB stop string, an unknown model, an invalid UTF-8 body

Meanwhile one thread samples the server's RSS every second and another times GET /health every 0.5 s. The report:
requests by kind and status, every 5xx with its body, RSS at the end of warm-up / at the end / peak, growth after
warm-up and a least-squares slope (MB/min), /health latency, tokens generated, the CPU and the load averages.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL_DIR = ROOT / "examples" / "zoo" / "ryz-demo-s"
SERVED = "ryzanstein"
PROMPTS = [
    "The quick brown fox",
    "Once upon a time",
    "def add(a, b):",
    "In the beginning",
    "Hello, my name is",
    "The capital of France is",
    "1, 2, 3, 4,",
    "Roses are red,",
]
# (kind, weight): ok 60, disconnect 20, bad 10+10 is the brief's 60/20/10/10; the bad kinds share the last 20 so the
# five malformed shapes each come up often enough to matter, and disconnects are split between stream and timeout.
KINDS = [
    ("completion", 20),
    ("chat", 20),
    ("chat_stream", 20),
    ("stream_disconnect", 10),
    ("timeout_disconnect", 10),
    ("bad_json", 4),
    ("bad_max_tokens", 4),
    ("bad_long_stop", 4),
    ("bad_unknown_model", 4),
    ("bad_utf8", 4),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_bytes(pid: int) -> int | None:
    try:
        import psutil

        return psutil.Process(pid).memory_info().rss
    except ImportError:
        pass
    except Exception:  # noqa: BLE001 - the process is gone
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def cpu_info() -> dict:
    info: dict = {"model_name": None, "flags": {}}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "Model name":
                info["model_name"] = value.strip()
            elif key.strip() in ("CPU family", "Model", "Hypervisor vendor"):
                info[key.strip().lower().replace(" ", "_")] = value.strip()
            elif key.strip() == "CPU(s)":
                info["cpus"] = int(value.strip())
            elif key.strip() == "Flags":
                flags = set(value.split())
                info["flags"] = {f: f in flags for f in ("avx512f", "avx512_vnni", "avx_vnni", "amx_int8")}
    except (OSError, subprocess.SubprocessError, ValueError):
        pass
    return info


def prepare_home(home: Path) -> str:
    """Kernel build copied into `home`, the demo model quantized into its store; returns the artifact id."""
    os.environ["RYZ_HOME"] = str(home)
    from engine.artifacts.store import open_store
    from engine.model.build import plan_build
    from engine.model.quantize import quantize_to_store
    from engine.settings import Settings

    settings = Settings(home=home)
    plan = plan_build(settings)
    cached = Path.home() / ".ryzanstein" / "cache" / "kernels" / plan.key
    if (cached / "build.json").is_file():
        shutil.copytree(cached, plan.directory, ignore=shutil.ignore_patterns("*.lock"))
        print(f"soak: kernel build {plan.key} reused from {cached}", file=sys.stderr)
    else:
        print(f"soak: no cached kernel build {plan.key}: the server builds it on start (~30 s)", file=sys.stderr)
    store = open_store(settings.store_url)
    manifest = quantize_to_store(MODEL_DIR, store, home / "work")
    return manifest["artifact_id"]


class Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.sent: Counter = Counter()
        self.status: dict[str, Counter] = defaultdict(Counter)
        self.server_errors: list[dict] = []
        self.stream_errors: list[dict] = []
        self.unexpected: list[dict] = []
        self.client_errors: Counter = Counter()
        self.completion_tokens = 0
        self.latency: dict[str, list[float]] = defaultdict(list)

    def record(self, kind: str, status: str, seconds: float, body: str = "", tokens: int = 0) -> None:
        with self.lock:
            self.status[kind][status] += 1
            self.completion_tokens += tokens
            self.latency[kind].append(seconds)
            if status.isdigit() and int(status) >= 500:
                self.server_errors.append({"kind": kind, "status": int(status), "body": body[:2000], "t": time.time()})


def _usage_tokens(data: dict) -> int:
    return int(((data or {}).get("usage") or {}).get("completion_tokens") or 0)


class Client(threading.Thread):
    def __init__(self, url: str, seed: int, deadline: float, tally: Tally):
        super().__init__(daemon=True)
        self.url, self.rng, self.deadline, self.tally = url, random.Random(seed), deadline, tally
        self.kinds, self.weights = zip(*KINDS)

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=120) as http:
            while time.monotonic() < self.deadline:
                kind = self.rng.choices(self.kinds, self.weights)[0]
                with self.tally.lock:
                    self.tally.sent[kind] += 1
                t0 = time.monotonic()
                try:
                    getattr(self, kind)(http, kind, t0)
                except httpx.HTTPError as exc:  # a transport failure the kind did not expect
                    name = type(exc).__name__
                    self.tally.record(kind, f"client:{name}", time.monotonic() - t0)
                    with self.tally.lock:
                        self.tally.client_errors[f"{kind}:{name}"] += 1

    # -- the well-formed kinds --------------------------------------------------------------------------------------
    def _max_tokens(self) -> int:
        return self.rng.choice([8, 16, 32, 48])

    def _messages(self) -> list[dict]:
        return [{"role": "user", "content": self.rng.choice(PROMPTS)}]

    def _post(self, http, kind, t0, path, body, check_usage=True):
        r = http.post(path, json=body)
        tokens = _usage_tokens(r.json()) if r.status_code == 200 and check_usage else 0
        self.tally.record(
            kind, str(r.status_code), time.monotonic() - t0, r.text if r.status_code >= 400 else "", tokens
        )
        return r

    def completion(self, http, kind, t0):
        body = {"model": SERVED, "prompt": self.rng.choice(PROMPTS), "max_tokens": self._max_tokens()}
        body["temperature"] = self.rng.choice([0, 0.8])
        self._post(http, kind, t0, "/v1/completions", body)

    def chat(self, http, kind, t0):
        body = {"model": SERVED, "messages": self._messages(), "max_tokens": self._max_tokens(), "temperature": 0.7}
        self._post(http, kind, t0, "/v1/chat/completions", body)

    def chat_stream(self, http, kind, t0):
        body = {
            "model": SERVED,
            "messages": self._messages(),
            "max_tokens": self._max_tokens(),
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        tokens, done, errors = 0, False, []
        with http.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                r.read()
                self.tally.record(kind, str(r.status_code), time.monotonic() - t0, r.text)
                return
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    continue
                event = json.loads(data)
                if "error" in event:
                    errors.append(event)
                tokens += _usage_tokens(event)
        status = "200" if done and not errors else ("200:stream_error" if errors else "200:no_done")
        self.tally.record(kind, status, time.monotonic() - t0, tokens=tokens)
        if errors or not done:
            with self.tally.lock:
                self.tally.stream_errors.append({"kind": kind, "done": done, "errors": errors[:3], "t": time.time()})

    # -- disconnects ------------------------------------------------------------------------------------------------
    def stream_disconnect(self, http, kind, t0):
        """A streaming request dropped after a few events: closing an unread response closes the connection."""
        chat = self.rng.random() < 0.5
        path = "/v1/chat/completions" if chat else "/v1/completions"
        body = {"model": SERVED, "max_tokens": 200, "stream": True, "temperature": 0.8}
        body.update({"messages": self._messages()} if chat else {"prompt": self.rng.choice(PROMPTS)})
        keep = self.rng.randint(1, 4)
        with http.stream("POST", path, json=body) as r:
            status = str(r.status_code)
            if r.status_code == 200:
                seen = 0
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        seen += 1
                        if seen >= keep:
                            break
                status = "200:dropped"
            else:
                r.read()
        self.tally.record(kind, status, time.monotonic() - t0, r.text if not status.startswith("200") else "")

    def timeout_disconnect(self, http, kind, t0):
        """A non-streaming request whose client gives up (read timeout 50-300 ms) before the reply."""
        body = {"model": SERVED, "prompt": self.rng.choice(PROMPTS), "max_tokens": 200, "temperature": 0.8}
        timeout = httpx.Timeout(5.0, read=self.rng.uniform(0.05, 0.3))
        try:
            r = http.post("/v1/completions", json=body, timeout=timeout)
        except httpx.ReadTimeout:
            self.tally.record(kind, "timeout:dropped", time.monotonic() - t0)
            return
        self.tally.record(
            kind, f"{r.status_code}:finished", time.monotonic() - t0, r.text if r.status_code >= 400 else ""
        )

    # -- bad requests -----------------------------------------------------------------------------------------------
    def _raw(self, http, kind, t0, content: bytes, path="/v1/chat/completions"):
        r = http.post(path, content=content, headers={"content-type": "application/json"})
        self.tally.record(kind, str(r.status_code), time.monotonic() - t0, r.text)

    def bad_json(self, http, kind, t0):
        self._raw(http, kind, t0, b'{"model": "ryzanstein", "messages": [{"role": "user", "content": "hi"}')

    def bad_max_tokens(self, http, kind, t0):
        body = {"model": SERVED, "prompt": "hi", "max_tokens": 10**9}
        r = http.post("/v1/completions", json=body)
        self.tally.record(kind, str(r.status_code), time.monotonic() - t0, r.text)

    def bad_long_stop(self, http, kind, t0):
        body = {"model": SERVED, "messages": self._messages(), "max_tokens": 8, "stop": "x" * 60_000}
        r = http.post("/v1/chat/completions", json=body)
        self.tally.record(kind, str(r.status_code), time.monotonic() - t0, r.text)

    def bad_unknown_model(self, http, kind, t0):
        body = {"model": "no-such-model", "messages": self._messages(), "max_tokens": 8}
        r = http.post("/v1/chat/completions", json=body)
        self.tally.record(kind, str(r.status_code), time.monotonic() - t0, r.text)

    def bad_utf8(self, http, kind, t0):
        body = b'{"model": "ryzanstein", "prompt": "\xff\xfe\xc3(", "max_tokens": 4}'
        self._raw(http, kind, t0, body, "/v1/completions")


def sample_rss(pid: int, stop: threading.Event, t_start: float, out: list) -> None:
    while not stop.is_set():
        rss = rss_bytes(pid)
        if rss is not None:
            out.append((round(time.monotonic() - t_start, 2), rss))
        stop.wait(1.0)


def sample_health(url: str, stop: threading.Event, out: list, failures: list) -> None:
    with httpx.Client(timeout=30) as http:
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                r = http.get(f"{url}/health")
                dt = time.monotonic() - t0
                out.append(dt)
                if r.status_code != 200:
                    failures.append({"status": r.status_code, "body": r.text[:500]})
            except httpx.HTTPError as exc:
                failures.append({"error": repr(exc)})
            stop.wait(max(0.0, 0.5 - (time.monotonic() - t0)))


def slope_mb_per_min(points: list[tuple[float, int]]) -> float | None:
    if len(points) < 3:
        return None
    xs = [t / 60 for t, _ in points]
    ys = [r / 2**20 for _, r in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else None


def scrape_metrics(url: str) -> dict:
    try:
        text = httpx.get(f"{url}/metrics", timeout=30).text
    except httpx.HTTPError as exc:
        return {"error": repr(exc)}
    requests: dict[str, float] = {}
    generated = 0.0
    for line in text.splitlines():
        m = re.match(r"ryz_requests_total\{([^}]*)\} ([0-9.e+]+)", line)
        if m:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
            key = f"{labels.get('endpoint')}:{labels.get('status')}"
            requests[key] = requests.get(key, 0) + float(m.group(2))
        m = re.match(r"ryz_generation_tokens_total\{[^}]*\} ([0-9.e+]+)", line)
        if m:
            generated += float(m.group(1))
    return {"requests_by_endpoint_status": requests, "generation_tokens": generated}


def wait_ready(url: str, proc: subprocess.Popen, timeout: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"ryz serve exited with {proc.returncode} before it was ready")
        try:
            if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                return time.monotonic() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"ryz serve not ready after {timeout} s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=180, help="length of the mixed load (default 180)")
    ap.add_argument("--warmup", type=float, default=30, help="seconds counted as warm-up for RSS growth (default 30)")
    ap.add_argument("--clients", type=int, default=8, help="client threads (default 8)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="write the whole record here")
    ap.add_argument("--keep-home", action="store_true", help="keep the temporary RYZ_HOME (server log inside)")
    args = ap.parse_args(argv)

    home = Path(tempfile.mkdtemp(prefix="ryz-soak-"))
    record: dict = {
        "command": " ".join([".venv/bin/python", "scripts/soak.py", *(argv if argv is not None else sys.argv[1:])]),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "settings": {"seconds": args.seconds, "warmup": args.warmup, "clients": args.clients, "seed": args.seed},
        "kinds": dict(KINDS),
        "cpu": cpu_info(),
    }
    proc = None
    log = None
    try:
        t = time.monotonic()
        artifact = prepare_home(home)
        record["model"] = {"checkpoint": str(MODEL_DIR.relative_to(ROOT)), "artifact_id": artifact}
        record["prepare_seconds"] = round(time.monotonic() - t, 1)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = {
            **os.environ,
            "RYZ_HOME": str(home),
            "RYZ_MAX_SEQS": "8",
            "RYZ_THREADS": "2",
            "RYZ_HOST": "127.0.0.1",
            "RYZ_PORT": str(port),
        }
        record["server_env"] = {k: env[k] for k in ("RYZ_MAX_SEQS", "RYZ_THREADS", "RYZ_HOST")}
        ryz = Path(sys.executable).with_name("ryz")
        cmd = [str(ryz), "serve", "--model", artifact]
        log = open(home / "serve.log", "wb")
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        record["server_start_seconds"] = round(wait_ready(url, proc, 300), 1)

        record["loadavg_start"] = list(os.getloadavg())
        tally = Tally()
        stop = threading.Event()
        rss: list[tuple[float, int]] = []
        health: list[float] = []
        health_failures: list = []
        t_start = time.monotonic()
        monitors = [
            threading.Thread(target=sample_rss, args=(proc.pid, stop, t_start, rss), daemon=True),
            threading.Thread(target=sample_health, args=(url, stop, health, health_failures), daemon=True),
        ]
        for m in monitors:
            m.start()
        deadline = t_start + args.seconds
        clients = [Client(url, args.seed * 1000 + i, deadline, tally) for i in range(args.clients)]
        for c in clients:
            c.start()
        for c in clients:
            c.join(timeout=args.seconds + 300)
        elapsed = time.monotonic() - t_start
        time.sleep(2)  # let the server finish aborting the last dropped requests before the last RSS samples
        stop.set()
        for m in monitors:
            m.join(timeout=40)
        record["loadavg_end"] = list(os.getloadavg())
        record["server_metrics"] = scrape_metrics(url)
        record["server_alive_at_end"] = proc.poll() is None

        mb = 2**20
        after = [(t, r) for t, r in rss if t >= args.warmup]
        warm = after[0][1] if after else None
        end = rss[-1][1] if rss else None
        statuses = {k: dict(v) for k, v in sorted(tally.status.items())}
        five = sum(n for v in tally.status.values() for s, n in v.items() if s[:1] == "5")
        record.update(
            {
                "elapsed_seconds": round(elapsed, 1),
                "requests": {
                    "sent": dict(sorted(tally.sent.items())),
                    "total_sent": sum(tally.sent.values()),
                    "completed": sum(sum(v.values()) for v in tally.status.values()),
                    "by_kind_status": statuses,
                    "served_ok": sum(
                        v.get("200", 0) for k, v in tally.status.items() if k in ("completion", "chat", "chat_stream")
                    ),
                },
                "5xx_count": five,
                "5xx": tally.server_errors,
                "stream_errors": tally.stream_errors,
                "client_errors": dict(tally.client_errors),
                "completion_tokens_from_usage": tally.completion_tokens,
                "latency_median_s": {k: round(statistics.median(v), 3) for k, v in sorted(tally.latency.items())},
                "rss": {
                    "source": "psutil" if _has_psutil() else "/proc/<pid>/status VmRSS",
                    "first_mb": round(rss[0][1] / mb, 1) if rss else None,
                    "warmup_end_mb": round(warm / mb, 1) if warm else None,
                    "end_mb": round(end / mb, 1) if end else None,
                    "peak_mb": round(max(r for _, r in rss) / mb, 1) if rss else None,
                    "growth_after_warmup_mb": round((end - warm) / mb, 2) if warm and end else None,
                    "growth_after_warmup_pct": round(100 * (end - warm) / warm, 2) if warm and end else None,
                    "peak_after_warmup_mb": round(max(r for _, r in after) / mb, 1) if after else None,
                    "slope_after_warmup_mb_per_min": _round(slope_mb_per_min(after), 3),
                    "series": [(t, round(r / mb, 2)) for t, r in rss],
                },
                "health": {
                    "samples": len(health),
                    "median_ms": round(1000 * statistics.median(health), 1) if health else None,
                    "p99_ms": round(1000 * sorted(health)[int(0.99 * (len(health) - 1))], 1) if health else None,
                    "worst_ms": round(1000 * max(health), 1) if health else None,
                    "failures": health_failures,
                },
            }
        )
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if log is not None:
            log.close()
            tail = (home / "serve.log").read_text(errors="replace").splitlines()
            record["server_log_tail"] = tail[-40:]
            record["server_log_tracebacks"] = sum("Traceback" in line for line in tail)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(record, indent=1) + "\n")
        if args.keep_home:
            print(f"soak: RYZ_HOME kept at {home}", file=sys.stderr)
        else:
            shutil.rmtree(home, ignore_errors=True)

    print(summary(record))
    return 1 if record.get("5xx_count") or not record.get("server_alive_at_end") else 0


def _has_psutil() -> bool:
    try:
        import psutil  # noqa: F401
    except ImportError:
        return False
    return True


def _round(x: float | None, n: int) -> float | None:
    return None if x is None else round(x, n)


def summary(r: dict) -> str:
    req, rss, h, cpu = r["requests"], r["rss"], r["health"], r["cpu"]
    flags = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in cpu.get("flags", {}).items())
    lines = [
        f"soak: {r['elapsed_seconds']} s, {r['settings']['clients']} clients, model {r['model']['artifact_id'][:19]}",
        f"cpu: {cpu.get('model_name')} ({flags}); load average start {r['loadavg_start']} end {r['loadavg_end']}",
        f"requests: {req['total_sent']} sent, {req['served_ok']} well-formed served 200, 5xx: {r['5xx_count']}, "
        f"stream errors: {len(r['stream_errors'])}, unexpected client errors: {sum(r['client_errors'].values())}",
    ]
    for kind, statuses in req["by_kind_status"].items():
        lines.append(f"  {kind:20s} sent {req['sent'].get(kind, 0):5d}  {statuses}")
    lines += [
        f"tokens: {r['completion_tokens_from_usage']} from usage, "
        f"{r['server_metrics'].get('generation_tokens')} generated (server metric)",
        f"rss: warm-up end {rss['warmup_end_mb']} MB, end {rss['end_mb']} MB, peak {rss['peak_mb']} MB, growth after "
        f"warm-up {rss['growth_after_warmup_mb']} MB ({rss['growth_after_warmup_pct']}%), slope "
        f"{rss['slope_after_warmup_mb_per_min']} MB/min",
        f"/health: {h['samples']} samples, median {h['median_ms']} ms, p99 {h['p99_ms']} ms, worst {h['worst_ms']} ms, "
        f"failures {len(h['failures'])}",
    ]
    for e in r["5xx"][:5]:
        lines.append(f"  5xx {e['kind']} {e['status']}: {e['body'][:300]}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
