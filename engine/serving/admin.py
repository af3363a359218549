"""Client of the server's admin API (docs/serving.md "Canary variants and admin"), for one or many replicas.

The release flow steers every replica listed in settings the same way; a replica that does not answer
fails the step (and its transaction rolls the others back), because a canary weight that holds on
some replicas only is not the weight the analysis assumes.
"""

from __future__ import annotations

import httpx

from engine.errors import RyzError


class AdminError(RyzError, RuntimeError):
    """An admin call failed: `POST http://127.0.0.1:8000/admin/weights -> 401: admin routes need ...`."""


class AdminClient:
    def __init__(self, base_url: str, token: str | None, timeout: float = 120.0):
        self.base_url = base_url.rstrip("/")
        self._client = httpx.Client(
            base_url=self.base_url, timeout=timeout, headers={"Authorization": f"Bearer {token}"} if token else {}
        )

    def _call(self, method: str, path: str, **kw) -> dict:
        try:
            response = self._client.request(method, path, **kw)
        except httpx.HTTPError as exc:
            raise AdminError(f"{method} {self.base_url}{path} failed: {exc}; is `ryz serve` running there?") from exc
        if response.status_code >= 400:
            try:
                message = response.json()["error"]["message"]
            except Exception:  # noqa: BLE001 - not our error shape
                message = response.text[:300]
            raise AdminError(f"{method} {self.base_url}{path} -> {response.status_code}: {message}")
        return response.json() if response.headers.get("content-type", "").startswith("application/json") else {}

    def state(self) -> dict:
        return self._call("GET", "/admin/state")

    def load(self, name: str, model: str) -> dict:
        return self._call("POST", "/admin/variants", json={"name": name, "model": model})

    def unload(self, name: str) -> dict:
        return self._call("DELETE", f"/admin/variants/{name}")

    def set_weight(self, canary: int) -> dict:
        return self._call("POST", "/admin/weights", json={"canary": canary})

    def promote(self) -> dict:
        return self._call("POST", "/admin/promote")

    def set_faults(self, **faults: float) -> dict:
        return self._call("POST", "/admin/faults", json=faults)

    def drain(self, drain: bool = True) -> dict:
        return self._call("POST", "/admin/drain", json={"drain": drain})

    def samples(self, since: float) -> dict:
        """Per-request figures finished since `since` (this replica's unix time): GET /admin/samples."""
        return self._call("GET", "/admin/samples", params={"since": since})

    def metrics(self) -> str:
        try:
            response = self._client.get("/metrics")
            response.raise_for_status()
        except httpx.HTTPError as exc:
            raise AdminError(f"GET {self.base_url}/metrics failed: {exc}") from exc
        return response.text

    def close(self) -> None:
        self._client.close()


class Replicas:
    """The same admin call on every replica, in order."""

    def __init__(self, urls: list[str], token: str | None):
        if not urls:
            raise AdminError("no serving replicas configured: set RYZ_RELEASE_SERVERS (JSON list of base URLs)")
        self.clients = [AdminClient(u, token) for u in urls]

    def __getattr__(self, name: str):
        def each(*args, **kw):
            return [getattr(c, name)(*args, **kw) for c in self.clients]

        return each

    def try_each(self, method: str, *args, **kw) -> list[str]:
        """The call on every replica even when some fail (compensation must reach them all): the failures,
        each naming its replica."""
        failures = []
        for c in self.clients:
            try:
                getattr(c, method)(*args, **kw)
            except AdminError as exc:
                failures.append(str(exc))
        return failures

    def close(self) -> None:
        for c in self.clients:
            c.close()
