"""How far apart the canary analysis sees two identical models: the noise floor of its speed check.

Not a test (tests/ never runs it): a measurement whose figures go in docs/serving.md ("Variants take turns on the
cores") and the issue notes.

    .venv/bin/python scripts/canary_noise.py --windows 12 --seconds 1.5 --weight 50 --json build/canary-noise.json

It quantizes the demo zoo model into a temporary RYZ_HOME (as scripts/soak.py), starts a real `ryz serve`, loads
the same artifact as production and as canary at --weight percent, and runs the release's synthetic load
(engine/serving/loadgen.py, --clients clients) for --windows windows of --seconds each. Per window, from the
server's `GET /admin/samples` (what a canary step judges): each variant's median of the requests' median time per
token, and the ratio canary / production. Identical models should read 1.0; the spread is what a step's speed
check must tolerate (RYZ_RELEASE_SPEED_RATIO 0.9 allows 1.11).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.soak import cpu_info, prepare_home  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=12)
    ap.add_argument("--seconds", type=float, default=1.5, help="length of a window")
    ap.add_argument("--weight", type=int, default=50, help="canary traffic percent")
    ap.add_argument("--clients", type=int, default=4, help="concurrent synthetic clients (the release's default)")
    ap.add_argument("--json", type=Path, help="write the record here")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="ryz-canary-noise-") as tmp:
        artifact = prepare_home(Path(tmp))
        from engine.serving.admin import AdminClient
        from engine.serving.loadgen import SyntheticLoad
        from engine.serving.localserver import LocalServer
        from engine.settings import get_settings
        from tasks.release import _load_prompts

        rows = []
        with LocalServer(Path(tmp) / "serve.log") as server:
            admin = AdminClient(server.url, server.token)
            admin.load("production", artifact)
            admin.load("canary", artifact)
            admin.set_weight(args.weight)
            for window in range(args.windows):
                since = admin.samples(time.time())["now"]  # the server's clock, as a canary step reads it
                with SyntheticLoad(
                    server.url, get_settings().served_model_name, _load_prompts(), args.clients, seed=window
                ):
                    time.sleep(args.seconds)
                variants = admin.samples(since)["variants"]
                row = {"window": window}
                for name in ("production", "canary"):
                    tpot = [s[2] for s in variants.get(name, []) if s[2] is not None]
                    row[name] = {
                        "requests": len(tpot),
                        "tpot_median_ms": statistics.median(tpot) * 1000 if tpot else None,
                    }
                if row["production"]["tpot_median_ms"] and row["canary"]["tpot_median_ms"]:
                    row["ratio"] = row["canary"]["tpot_median_ms"] / row["production"]["tpot_median_ms"]
                rows.append(row)
                print(
                    f"window {window:2d}: production {row['production']['tpot_median_ms'] or 0:.3f} ms "
                    f"({row['production']['requests']}), canary {row['canary']['tpot_median_ms'] or 0:.3f} ms "
                    f"({row['canary']['requests']}), ratio {row.get('ratio', float('nan')):.2f}",
                    flush=True,
                )
    ratios = sorted(r["ratio"] for r in rows if "ratio" in r)
    print(f"ratios: {', '.join(f'{r:.2f}' for r in ratios)}; median {statistics.median(ratios):.2f}")
    if args.json:
        record = {
            "args": {k: str(v) for k, v in vars(args).items()},
            "cpu": cpu_info(),
            "windows": rows,
            "ratios": ratios,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
