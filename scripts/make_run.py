"""`make run`: the longest chain of the main job that exists today, on the embedded defaults.

Until the Prefect pipeline lands (issue 6), that chain is: synthesize the tiny shape -> quantize it
into the artifact store -> build the native kernels for this CPU -> greedy-generate with the native
engine and with the numpy reference, which must agree token for token. It starts no server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

RYZ = [sys.executable, "-m", "flows.cli"]


def ryz_json(*args: str) -> dict:
    started = time.perf_counter()
    out = subprocess.run([*RYZ, *args, "--json"], check=True, stdout=subprocess.PIPE, text=True).stdout
    result = json.loads(out)
    print(f"  ryz {' '.join(args)}  ({time.perf_counter() - started:.1f} s)", file=sys.stderr)
    return result


def main() -> int:
    run_dir = Path(os.environ.get("RYZ_RUN_DIR", "runs/make-run")).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    print("make run: the Prefect pipeline does not exist yet (issue 6); running the longest chain that does:\n"
          "  synth (tiny shape) -> quantize (TQ2_0 + Q8_0 into the artifact store) -> build kernels -> generate (native and reference)",
          file=sys.stderr)
    model_dir = run_dir / "tiny-checkpoint"
    synth = ryz_json("synth", "--shape", "tiny", "-o", str(model_dir), "--seed", "0")
    manifest = ryz_json("quantize", str(model_dir))
    build = ryz_json("build-kernels")
    generated = ryz_json("generate", manifest["artifact_id"], "hello", "--max-tokens", "8")
    native = ryz_json("generate", manifest["artifact_id"], "hello", "--max-tokens", "8", "--engine", "native")
    if native["token_ids"] != generated["token_ids"]:
        print(f"native engine disagrees with the reference: {native['token_ids']} != {generated['token_ids']}", file=sys.stderr)
        return 1
    report = {
        "chain": ["synth", "quantize", "build-kernels", "generate"],
        "kernel_build": {"key": build["key"], "isa_flags": build["fingerprint"]["isa"]},
        "checkpoint": synth["path"],
        "artifact_id": manifest["artifact_id"],
        "bytes_per_token": manifest["bytes_per_token"],
        "gguf_architecture": manifest["architecture"]["gguf"],
        "generated": generated,
    }
    report_path = run_dir / "report.json"
    report_path.write_text(json.dumps(report, indent=2))
    print(f"\nartifact {manifest['artifact_id']}\nkernel build {build['key']}\n"
          f"generated token ids {generated['token_ids']}, native = reference (random weights: the text is noise)")
    print(f"report: {report_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
