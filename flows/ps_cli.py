"""`ryz ps`: what a running `ryz serve` has loaded (its `GET /ps`): each variant's model (name:version, artifact
id), its share of the served name's traffic, the weights' size, its sequence slots and KV use. flows/cli.py adds
it with `add_ps_command(sub, command)`.
"""

from __future__ import annotations

import sys

from flows.cli_common import EXIT_ERROR
from flows.cli_common import print_json as _print_json

_COLUMNS = ("VARIANT", "MODEL", "VERSION", "ARTIFACT", "WEIGHT", "WEIGHTS", "SLOTS", "KV")


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def _row(v: dict) -> tuple[str, ...]:
    capacity = v["kv_capacity"] or 1
    return (
        v["variant"],
        v["model"],
        v["version"] or "-",
        v["artifact_id"][:19],
        f"{v['weight']}%",
        _size(v["weights_bytes"]),
        f"{v['active']}/{v['slots']} active" + (f", {v['waiting']} waiting" if v["waiting"] else ""),
        f"{v['kv_positions']}/{v['kv_capacity']} ({100 * v['kv_positions'] / capacity:.0f}%)",
    )


def format_table(doc: dict) -> str:
    rows = [_COLUMNS, *(_row(v) for v in doc["variants"])]
    widths = [max(len(r[i]) for r in rows) for i in range(len(_COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    if not doc["variants"]:
        lines.append("(nothing loaded" + (f"; loading: {', '.join(doc['loading'])}" if doc["loading"] else "") + ")")
    for name, error in doc.get("load_errors", {}).items():
        lines.append(f"{name}: load failed: {error}")
    if doc.get("draining"):
        lines.append("draining: new requests are refused")
    return "\n".join(lines)


def cmd_ps(args) -> int:
    import httpx

    from engine.settings import get_settings

    settings = get_settings()
    url = (args.url or f"http://{settings.host}:{settings.port}").rstrip("/")
    key = args.api_key or (settings.api_keys or "").split(",")[0].strip()
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        response = httpx.get(f"{url}/ps", headers=headers, timeout=30)
    except httpx.HTTPError as exc:
        print(f"ryz ps: cannot reach {url}/ps ({exc}); start `ryz serve` first or pass --url", file=sys.stderr)
        return EXIT_ERROR
    if response.status_code == 401:
        print(f"ryz ps: {url} needs an API key: pass --api-key KEY (one of the server's RYZ_API_KEYS)", file=sys.stderr)
        return EXIT_ERROR
    if response.status_code != 200:
        print(f"ryz ps: {url}/ps answered {response.status_code}: {response.text[:300]}", file=sys.stderr)
        return EXIT_ERROR
    doc = response.json()
    if args.json:
        _print_json(doc)
    else:
        print(format_table(doc))
    return 0


def add_ps_command(sub, command) -> None:
    """Add `ryz ps` to `ryz`'s subparsers (`command(name, handler, help)` makes one with --json)."""
    p = command(
        "ps",
        cmd_ps,
        "list what a running `ryz serve` has loaded: variants (production, canary) with name:version, artifact id "
        "and traffic weight, weights size, slots in use, KV positions used of the capacity",
    )
    p.add_argument("--url", default=None, help="server base URL (default http://RYZ_HOST:RYZ_PORT)")
    p.add_argument(
        "--api-key", help="a key the server accepts (default: the first of RYZ_API_KEYS, if set), when it needs one"
    )
