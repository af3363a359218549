"""Bounded synthetic traffic against a server, for canary analysis where there are no real users.

Clients post short completions with prompts drawn from a list, without session keys, so the router
draws each request independently; every client stops when told to or at its deadline. Responses are
not checked here: the server's own metrics are what the analysis reads. Given several replicas, the clients are
dealt out among them in turn, as a load balancer in front of a fleet would.
"""

from __future__ import annotations

import random
import threading
import time

import httpx


class SyntheticLoad:
    def __init__(
        self,
        base_url: str | list[str],
        model: str,
        prompts: list[str],
        concurrency: int = 4,
        max_tokens: int = 16,
        api_key: str | None = None,
        deadline_s: float = 900.0,
        seed: int = 0,
        pause_s: float = 0.0,
    ):
        """pause_s: what each client waits between requests (0: back to back, as busy users)."""
        if not prompts:
            raise ValueError("synthetic load needs at least one prompt")
        urls = [base_url] if isinstance(base_url, str) else base_url
        self.base_urls, self.model, self.prompts = [u.rstrip("/") for u in urls], model, prompts
        self.concurrency, self.max_tokens, self.deadline_s, self.pause_s = concurrency, max_tokens, deadline_s, pause_s
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.sent = self.failed = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._client, args=(seed + i, self.base_urls[i % len(self.base_urls)]), daemon=True)
            for i in range(max(concurrency, len(self.base_urls)))
        ]

    def __enter__(self) -> SyntheticLoad:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)

    def _client(self, seed: int, base_url: str) -> None:
        rng = random.Random(seed)
        end = time.monotonic() + self.deadline_s
        with httpx.Client(base_url=base_url, timeout=60, headers=self.headers) as client:
            while not self._stop.is_set() and time.monotonic() < end:
                body = {
                    "model": self.model,
                    "prompt": rng.choice(self.prompts),
                    "max_tokens": self.max_tokens,
                    "temperature": 0.7,
                    "seed": rng.randrange(1 << 30),
                }
                try:
                    ok = client.post("/v1/completions", json=body).status_code < 500
                except httpx.HTTPError:
                    ok = False
                with self._lock:
                    self.sent += 1
                    self.failed += not ok
                if not ok or self.pause_s:
                    self._stop.wait(max(self.pause_s, 0.0 if ok else 0.05))
