"""The CI gate's baseline measured in the same job (`ryz ci-bench --baseline-model`, docs/evaluation.md "CI gate").

A committed baseline record was measured on another machine, so its speed says nothing about a CI runner's. Here the
baseline model is evaluated on the same suite in the same job, and the two models' decode speeds are measured on the
same runner, interleaved: one run of each per round, the order alternating (B C, C B, B C, ...) so a drift of the
host's load during the job falls on both sides alike. The gate then compares medians and runs (evaluations/gates.py)
of two benches that share a CPU, a kernel build and a time window.

The baseline is measured either by this installation (`ryz` = None: a registry version such as production, an
artifact, or a checkpoint directory quantized here) or by another installation's `ryz` executable (the main branch's
checkout: its quantizer, kernels and engine), driven through its CLI (`quantize --json`, `eval --no-bench --json`,
`bench --repeats 1 --json`) with its own RYZ_HOME so the two versions never share a store or a kernel cache.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from engine.errors import BaselineRunError

MIN_ROUNDS = 2  # the gate needs two runs a side to see their spread (gates.MIN_RUNS)


def bench_workload(path: Path) -> tuple[int, int]:
    """(prompt, gen) of the evaluation's small benchmark, clamped to the model's context (as run_suite_bench)."""
    from engine.model.ggufio import ModelFile
    from evaluations.bench import WARMUP_TOKENS
    from evaluations.evaluate import BENCH_GEN, BENCH_PROMPT

    context = int(ModelFile(path).hparams.context or 4096)
    return max(8, min(BENCH_PROMPT, context - WARMUP_TOKENS)), max(1, min(BENCH_GEN, context - WARMUP_TOKENS - 1))


def bench_here(path: Path, prompt: int, gen: int, settings=None) -> Callable[[], float]:
    """One decode measurement of `path` by this installation: `ryz bench --repeats 1`'s code, in a fresh worker."""
    from evaluations.bench import run_bench

    return lambda: float(run_bench(str(path), prompt=prompt, gen=gen, repeats=1, settings=settings)["decode_tok_s"])


class ExternalRyz:
    """Another installation's `ryz` (e.g. the main branch's checkout in its own venv), with its own RYZ_HOME."""

    def __init__(self, executable: str | Path, home: Path):
        self.executable = str(executable)
        self.home = Path(home)

    def run(self, *args: str) -> dict:
        env = {**os.environ, "RYZ_HOME": str(self.home)}
        cmd = [self.executable, *args, "--json"]
        print(f"ryz ci-bench: baseline: {' '.join(cmd)}", file=sys.stderr, flush=True)
        try:
            done = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, check=False)
        except OSError as exc:
            raise BaselineRunError(
                f"cannot run the baseline's ryz {self.executable!r}: {exc}; pass --baseline-ryz the `ryz` of an "
                "installed checkout (e.g. base/.venv/bin/ryz after `make -C base install`)"
            ) from exc
        try:
            result = json.loads(done.stdout)
        except json.JSONDecodeError:
            result = None
        # `ryz eval` exits 1 on an invalid record and still prints it (its `failures` say why); others exit 0.
        allowed = (0, 1) if args[0] == "eval" else (0,)
        if not isinstance(result, dict) or done.returncode not in allowed:
            raise BaselineRunError(
                f"the baseline's `{' '.join(cmd)}` exited {done.returncode} without its JSON result (its stderr is "
                "above); check that it is an installed ryzanstein checkout with that command"
            )
        return result

    def resolve(self, model: str) -> str:
        """A checkpoint directory is quantized by the baseline's own quantizer; other references pass through."""
        if Path(model).expanduser().is_dir():
            return str(self.run("quantize", str(Path(model).expanduser()))["artifact_id"])
        return model

    def evaluate(self, model: str, suite: str, limit: int | None) -> dict:
        """The baseline's evaluation record (no benchmark: speed is measured interleaved)."""
        args = ["eval", model, "--suite", suite, "--no-bench"]
        return self.run(*args, *(["--limit", str(limit)] if limit else []))

    def bench(self, model: str, prompt: int, gen: int) -> Callable[[], float]:
        args = ("bench", model, "--prompt", str(prompt), "--gen", str(gen), "--repeats", "1")
        return lambda: float(self.run(*args)["decode_tok_s"])


def interleaved_decode(baseline: Callable[[], float], candidate: Callable[[], float], rounds: int) -> dict:
    """`rounds` decode runs of each side, alternating which goes first; {"baseline", "candidate"}: each a bench
    dict with `decode_tok_s` (the median) and `decode_tok_s_runs` (every run, in order), and `order`."""
    if rounds < MIN_ROUNDS:
        raise ValueError(f"--rounds must be at least {MIN_ROUNDS} (the gate needs two runs a side), got {rounds}")
    runs: dict[str, list[float]] = {"baseline": [], "candidate": []}
    order = []
    for r in range(rounds):
        pair = (("baseline", baseline), ("candidate", candidate))
        for side, measure in pair if r % 2 == 0 else reversed(pair):
            runs[side].append(measure())
            order.append(side[0].upper())
            print(f"ryz ci-bench: round {r + 1}/{rounds} {side}: {runs[side][-1]:.1f} tok/s", file=sys.stderr)
    out: dict = {
        side: {"decode_tok_s": float(statistics.median(values)), "decode_tok_s_runs": values}
        for side, values in runs.items()
    }
    out["order"] = "".join(order)
    return out
