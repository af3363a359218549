"""Canary traffic split: which variant serves a request.

With a session key (the `X-Session-Id` header or the request's `user` field) the choice is a pure
function of the key and the weight: the key hashes to a bucket 0-99 and goes to the canary when its
bucket is below the weight. A session therefore stays on its variant while the weight is unchanged,
and a session already on the canary stays there as the weight grows (buckets below 5 are below 25).
Without a key each request draws independently. Weight 0 and 100 are exact.
"""

from __future__ import annotations

import hashlib
import random

PRODUCTION, CANARY = "production", "canary"


def session_bucket(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % 100


class CanaryRouter:
    def __init__(self, weight: int = 0, seed: int | None = None):
        self.weight = weight
        self._random = random.Random(seed)

    def set_weight(self, weight: object) -> None:
        """Checked here: /admin/weights passes the request body's value, whatever its type."""
        if not isinstance(weight, int) or isinstance(weight, bool) or not 0 <= weight <= 100:
            raise ValueError(f"canary weight must be an integer 0-100, got {weight!r}")
        self.weight = weight

    def choose(self, session_key: str | None, canary_loaded: bool) -> str:
        if not canary_loaded or self.weight <= 0:
            return PRODUCTION
        if self.weight >= 100:
            return CANARY
        bucket = session_bucket(session_key) if session_key else self._random.randrange(100)
        return CANARY if bucket < self.weight else PRODUCTION
