"""`ryz run`: the terminal chat driven through a pseudo-terminal (pexpect) on the demo zoo's ryz-demo-m, as a user
types it: turns that see each other, /set, /clear, multi-line messages, Ctrl-C during a reply and at the prompt,
/bye; and the one-shot form for scripts."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from engine.model.quantize import quantize_checkpoint
from flows.run_cli import read_message

pexpect = pytest.importorskip("pexpect")

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 60  # seconds per expectation: the 2 shared cores may be busy with other work
STATS = re.compile(r"prompt: (\d+) tokens \((\d+) reused.*?\r?\nreply:  (\d+) tokens.*?conversation: (\d+) messages")


@pytest.fixture(scope="module")
def chat(tmp_path_factory, kernel_build):
    """ryz-demo-m as a GGUF, and the environment of a `ryz` whose RYZ_HOME reuses the session's kernel build."""
    root = tmp_path_factory.mktemp("run")
    gguf = root / "ryz-demo-m.gguf"
    quantize_checkpoint(ROOT / "examples" / "zoo" / "ryz-demo-m", gguf)
    home = root / "home"
    (home / "cache").mkdir(parents=True)
    (home / "cache" / "kernels").symlink_to(kernel_build.path.parent.parent)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RYZ_")}
    # a long context, so that an unbounded reply (this model never ends its turn) runs until interrupted
    env.update(RYZ_HOME=str(home), RYZ_MAX_CONTEXT="16384", TERM="dumb", PYTHONUNBUFFERED="1")
    return {"gguf": str(gguf), "env": env}


def _spawn(chat, *args: str):
    child = pexpect.spawn(
        sys.executable,
        ["-m", "flows.cli", "run", chat["gguf"], *args],
        env=chat["env"],
        cwd=str(ROOT),
        encoding="utf-8",
        timeout=TIMEOUT,
        dimensions=(50, 200),
    )
    child.expect_exact(">>> ")
    return child


def _turn(child, message: str) -> tuple[str, tuple[int, int, int, int]]:
    """Send a message; the reply's text and its verbose statistics (prompt, reused, reply tokens, messages)."""
    child.sendline(message)
    child.expect(STATS)
    stats = tuple(int(g) for g in child.match.groups())
    reply = child.before.split(message, 1)[-1].strip()
    child.expect_exact(">>> ")
    return reply, stats  # type: ignore[return-value]


def _command(child, line: str, answer: str) -> None:
    child.sendline(line)
    child.expect_exact(answer)
    child.expect_exact(">>> ")


def test_chat_in_a_terminal(chat):
    child = _spawn(chat, "--temperature", "0", "--max-tokens", "8", "--verbose")
    first, (p1, reused1, n1, m1) = _turn(child, "count up from 3 :")
    assert first and n1 == 8 and m1 == 2 and reused1 == 0
    # the second turn's prompt holds the first exchange, read back from the KV the first turn left
    _, (p2, reused2, _, m2) = _turn(child, "count up from 5 :")
    assert p2 > p1 + n1 and reused2 >= p1 and m2 == 4

    _command(child, "/set temperature 0.7", "Set parameter 'temperature' to '0.7'")
    _command(child, "/show", "temperature     0.7")
    _command(child, "/set parameter temperature 0", "Set parameter 'temperature' to '0'")
    _command(child, "/set temperature hot", "temperature must be a number")
    _command(child, "/nope", "Unknown command '/nope'")

    _command(child, "/clear", "Cleared session context")
    again, (p3, _, _, m3) = _turn(child, "count up from 3 :")
    assert (again, p3, m3) == (first, p1, 2)  # a fresh conversation, greedy: the same reply

    # a """ block and a backslash continuation make the same two-line message
    _command(child, "/clear", "Cleared session context")
    child.sendline('"""count up')
    child.expect_exact("... ")
    block, (p4, _, _, _) = _turn(child, 'from 3 :"""')
    _command(child, "/clear", "Cleared session context")
    child.sendline("count up\\")
    child.expect_exact("... ")
    continued, (p5, _, _, m5) = _turn(child, "from 3 :")
    assert (block, p4) == (continued, p5) and m5 == 2

    # Ctrl-C stops an unbounded reply; the program keeps working and the stopped exchange is dropped
    _command(child, "/clear", "Cleared session context")
    _command(child, "/set num_predict -1", "Set parameter 'num_predict' to '-1'")
    child.sendline("count down from 9 :")
    child.expect(r"count down from 9 :\r?\n.")  # the reply has started
    child.sendintr()
    child.expect_exact("(stopped")
    child.expect_exact(">>> ")
    _command(child, "/set num_predict 8", "Set parameter 'num_predict' to '8'")
    _, (_, _, n6, m6) = _turn(child, "count up from 3 :")
    assert n6 == 8 and m6 == 2

    child.sendline("/bye")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_ctrl_c_at_the_prompt_exits_cleanly(chat):
    child = _spawn(chat)
    child.sendintr()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_one_shot_answers_and_exits(chat):
    def run(*args: str, stdin: str | None = None) -> str:
        proc = subprocess.run(
            [sys.executable, "-m", "flows.cli", "run", chat["gguf"], *args, "--temperature", "0", "--max-tokens", "6"],
            env=chat["env"],
            cwd=ROOT,
            input=stdin if stdin is not None else "",
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    answer = run("count up from 3 :")
    assert answer.strip() and answer.endswith("\n")
    assert run(stdin="count up from 3 :\n") == answer  # a script's stdin is the prompt


def test_read_message_forms():
    def reader(*lines: str):
        it = iter(lines)

        def read(prompt: str) -> str:
            line = next(it, None)
            if line is None:
                raise EOFError
            return line

        return read

    assert read_message(reader("hello")) == ("hello", False)
    assert read_message(reader("/set temperature 1 ")) == ("/set temperature 1", True)
    assert read_message(reader('"""/not a command"""')) == ("/not a command", False)
    assert read_message(reader('"""a', "b", 'c"""')) == ("a\nb\nc", False)
    assert read_message(reader("a\\", "b\\", "c")) == ("a\nb\nc", False)
    assert read_message(reader('"""a', "b")) == ("a\nb", False)  # Ctrl-D ends an open block as typed
    with pytest.raises(EOFError):
        read_message(reader())


def test_session_trims_old_turns_and_drops_a_stopped_reply(chat, native_library, tmp_path):
    """In process: a conversation past the context leaves its oldest exchange out; a reply closed early (Ctrl-C) is
    aborted in the engine and leaves the conversation as it was."""
    from engine.errors import InvalidRequestError
    from engine.serving.client import LocalEngineClient, load_model
    from engine.serving.session import ChatOptions, ChatSession, set_option
    from engine.settings import Settings

    settings = Settings(home=tmp_path, max_context=64, max_seqs=1, threads=1)
    client = LocalEngineClient(load_model(chat["gguf"], settings, library=native_library), settings)
    try:
        session = ChatSession(client, ChatOptions(temperature=0, num_predict=8))
        for _ in range(3):
            assert "".join(session.reply("count up from 3 :"))
            assert session.last.finish_reason == "length" and session.last.completion_tokens == 8
        assert session.last.dropped_messages == 2 and len(session.messages) == 4
        with pytest.raises(InvalidRequestError, match="over the context of 64"):
            list(session.reply("count up from 3 : " * 20))

        kept = list(session.messages)
        session.options = set_option(session.options, "num_predict", ["-1"])
        pieces = session.reply("count down from 9 :")
        next(pieces)
        pieces.close()  # what Ctrl-C does
        assert session.messages == kept and session.last.finish_reason is None
        assert client.core.in_flight == 0
        with pytest.raises(InvalidRequestError, match="temperature must be"):
            set_option(session.options, "temperature", ["3"])
    finally:
        client.close()
