"""`ryz run REF [PROMPT]`: chat with a model in the terminal, as `ollama run` does (no Prefect import).

The conversation, its options and the streaming live in engine/serving/session.py; this module reads the terminal:
messages (one line, a \"\"\"-block, or lines continued by a trailing backslash), the slash commands, Ctrl-C and
Ctrl-D. Also `add_sampling_arguments`, the sampling options `ryz run` and `ryz generate` share.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable
from contextlib import closing
from typing import TextIO

from engine.serving.sampling import OLLAMA_TEMPERATURE, OLLAMA_TOP_K, OLLAMA_TOP_P
from flows.cli_common import MODEL_REF_HELP, positive_int

HELP = (
    "chat with a model in the terminal (streaming, the model's chat template, /? for commands) on the native "
    "engine; with a PROMPT, or a non-terminal stdin, answer once and exit"
)
PROMPT, CONTINUATION = ">>> ", "... "
BLOCK = '"""'

COMMANDS_HELP = """Available commands:
  /set NAME VALUE       set a parameter for the next replies (also: /set parameter NAME VALUE)
  /set system TEXT      set the system message (clears the conversation)
  /set verbose | quiet  show (or not) token counts and speed after each reply
  /show                 show the parameters and the system message
  /clear                forget the conversation
  /bye                  exit
  /?, /help             this help

Parameters (Ollama's names):
  temperature 0.7       0 = greedy
  top_p 0.9             1 = off
  top_k 40              0 = off
  min_p 0.05            0 = off
  repeat_penalty 1.1    1 = off
  seed 42               fixes the sampling's random numbers
  num_predict 128       reply length limit (alias max_tokens; -1 = until the context is full)
  stop STR [STR ...]    stop strings

Multi-line messages: start with \"\"\" and end with \"\"\", or end lines with a backslash.
Ctrl-C stops a reply (the reply and your message are dropped from the conversation); Ctrl-C or Ctrl-D at the
prompt exits."""


def add_sampling_arguments(p: argparse.ArgumentParser, max_tokens: int | None) -> None:
    """--temperature, --top-p, --top-k, --min-p, --repeat-penalty, --seed, --stop, --max-tokens (`max_tokens`: the
    default, None: until the context is full)."""
    p.add_argument(
        "--temperature",
        type=float,
        default=OLLAMA_TEMPERATURE,
        help=f"sampling temperature, 0 = greedy (default {OLLAMA_TEMPERATURE}, as ollama and llama-cli)",
    )
    p.add_argument(
        "--top-p", type=float, default=OLLAMA_TOP_P, help=f"nucleus sampling, 1 = off (default {OLLAMA_TOP_P})"
    )
    p.add_argument("--top-k", type=int, default=OLLAMA_TOP_K, help=f"top-k sampling, 0 = off (default {OLLAMA_TOP_K})")
    p.add_argument("--min-p", type=float, default=0.0, help="min-p sampling, 0 = off (default 0)")
    p.add_argument("--repeat-penalty", type=float, default=1.0, help="repetition penalty, 1 = off (default 1)")
    p.add_argument("--seed", type=int, help="random seed: the same seed gives the same output (default: random)")
    p.add_argument(
        "--stop", action="append", default=[], metavar="TEXT", help="stop at this text (repeat for more stop strings)"
    )
    p.add_argument(
        "--max-tokens",
        type=positive_int,
        default=max_tokens,
        help="tokens generated at most "
        + (f"(default {max_tokens})" if max_tokens else "(default: until the end of the turn or the context)"),
    )


def sampling_options(args):
    """The ChatOptions of parsed `add_sampling_arguments` arguments, range-checked (InvalidRequestError)."""
    from engine.serving.session import ChatOptions

    options = ChatOptions(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repeat_penalty=args.repeat_penalty,
        seed=args.seed,
        num_predict=args.max_tokens,
        stop=list(args.stop),
    )
    options.sampling()
    return options


def add_run_command(sub, command) -> None:
    """Add `ryz run` (`command(name, handler, help, json_flag)` makes a subparser)."""
    p = command("run", cmd_run, HELP, json_flag=False)
    p.add_argument("model", metavar="MODEL_REF", help=MODEL_REF_HELP)
    p.add_argument(
        "prompt", nargs="*", metavar="PROMPT", help="answer this message once and exit (words are joined with spaces)"
    )
    add_sampling_arguments(p, max_tokens=None)
    p.add_argument("--system", help="a system message starting the conversation")
    p.add_argument(
        "--threads", type=positive_int, help="compute threads (default RYZ_THREADS, else all physical cores)"
    )
    p.add_argument("--verbose", action="store_true", help="after each reply print token counts and speed on stderr")


def cmd_run(args) -> int:
    from engine.errors import ChatTemplateError
    from engine.model.loader import default_threads
    from engine.serving.client import LocalEngineClient, load_model
    from engine.serving.session import ChatSession
    from engine.settings import get_settings

    options = sampling_options(args)
    base = get_settings()
    # one conversation: one sequence slot, whose KV the next turn reuses as its prefix
    settings = base.model_copy(update={"max_seqs": 1, "threads": args.threads or default_threads(base)})
    interactive = not args.prompt and sys.stdin.isatty()
    message = None
    if not interactive:  # stdin is read only without a PROMPT: a script's open stdin must not hang `ryz run REF "hi"`
        message = " ".join(args.prompt) if args.prompt else sys.stdin.read().strip()
        if not message:
            raise ValueError("nothing to answer: pass a PROMPT, pipe one on stdin, or run in a terminal to chat")
    loaded = load_model(args.model, settings)
    if not loaded.tokenizer.chat_template:
        loaded.model.close()
        raise ChatTemplateError(
            f"{args.model} has no chat template, so `ryz run` cannot build a chat prompt; use "
            f"`ryz generate {args.model} PROMPT` to complete plain text"
        )
    client = LocalEngineClient(loaded, settings)
    try:
        session = ChatSession(client, options, args.system)
        if message is not None:
            _answer(session, message, sys.stdout, args.verbose)
            return 0
        print(
            f"{args.model} on the native engine, {settings.threads} threads, context {session.context} tokens. "
            "/? for help, /bye or Ctrl-D to exit.",
            file=sys.stderr,
        )
        return chat_loop(session, _terminal_input(settings.home), sys.stdout, args.verbose)
    finally:
        client.close()


def chat_loop(session, read: Callable[[str], str], out: TextIO, verbose: bool = False) -> int:
    """Read messages and commands with `read(prompt)` until /bye, Ctrl-D or Ctrl-C at the prompt; stream replies."""
    while True:
        try:
            text, command = read_message(read)
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return 0
        if command:
            words = text.split()
            if words[0] == "/bye":
                return 0
            verbose = _command(session, text, out, verbose)
            continue
        if text.strip():
            _answer(session, text, out, verbose, interactive=True)


def read_message(read: Callable[[str], str]) -> tuple[str, bool]:
    """One message and whether it is a slash command: a line; a block from a line starting with \"\"\" to a line
    ending with \"\"\" (Ollama's convention, never a command); or lines joined while they end with a backslash.
    Ctrl-C inside a block or continuation drops what was typed and reads afresh; EOFError and KeyboardInterrupt at
    the first line propagate (the caller exits)."""
    line = read(PROMPT)
    if line.startswith(BLOCK):
        line = line[len(BLOCK) :]
        if line.endswith(BLOCK):
            return line[: -len(BLOCK)], False
        lines = [line]
        while True:
            try:
                more = _read_more(read)
            except EOFError:  # Ctrl-D ends the block as typed
                return "\n".join(lines), False
            if more is None:
                return read_message(read)
            if more.endswith(BLOCK):
                lines.append(more[: -len(BLOCK)])
                return "\n".join(lines), False
            lines.append(more)
    if line.startswith("/"):
        return line.strip(), True
    lines = []
    while line.endswith("\\"):
        lines.append(line[:-1])
        try:
            more = _read_more(read)
        except EOFError:  # Ctrl-D ends the message as typed
            more = ""
        if more is None:
            return read_message(read)
        line = more
    lines.append(line)
    return "\n".join(lines), False


def _read_more(read: Callable[[str], str]) -> str | None:
    """A continuation line; None after Ctrl-C (what was typed is dropped); EOFError after Ctrl-D."""
    try:
        return read(CONTINUATION)
    except KeyboardInterrupt:
        sys.stdout.write("\n")
        return None


def _answer(session, text: str, out: TextIO, verbose: bool, interactive: bool = False) -> None:
    """Stream the reply to `text`; in a chat, Ctrl-C stops it and returns to the prompt (outside one it ends `ryz`)."""
    from engine.errors import RyzError

    try:
        with closing(session.reply(text)) as pieces:
            for piece in pieces:
                out.write(piece)
                out.flush()
    except KeyboardInterrupt:
        if not interactive:
            raise
        out.write("\n")
        print("(stopped: this reply and your message are left out of the conversation)", file=sys.stderr)
        return
    except RyzError as exc:  # a message too long for the context, a failed step: the chat goes on
        if not interactive:
            raise
        out.write("\n")
        print(f"error: {exc}", file=sys.stderr)
        return
    out.write("\n\n" if interactive else "\n")
    out.flush()
    stats = session.last
    if stats.dropped_messages:
        print(
            f"(the oldest {stats.dropped_messages} messages were left out: the conversation no longer fits the "
            f"context of {session.context} tokens)",
            file=sys.stderr,
        )
    if verbose:
        rate = stats.completion_tokens / stats.seconds if stats.seconds else 0.0
        first = f", first token after {stats.first_token_seconds * 1000:.0f} ms" if stats.first_token_seconds else ""
        print(
            f"prompt: {stats.prompt_tokens} tokens ({stats.reused_tokens} reused from the cache){first}\n"
            f"reply:  {stats.completion_tokens} tokens in {stats.seconds:.2f} s, {rate:.1f} tok/s "
            f"(finish: {stats.finish_reason}); conversation: {len(session.messages)} messages",
            file=sys.stderr,
        )


def _command(session, line: str, out: TextIO, verbose: bool) -> bool:
    """Run one slash command (not /bye); returns the new verbose flag."""
    from engine.errors import InvalidRequestError
    from engine.serving.session import set_option

    try:
        words = shlex.split(line)
    except ValueError as exc:
        out.write(f"error: {exc}\n")
        return verbose
    name, rest = words[0], words[1:]
    if name in ("/?", "/help"):
        out.write(COMMANDS_HELP + "\n")
    elif name == "/clear":
        session.clear()
        out.write("Cleared session context\n")
    elif name == "/show":
        for key, value in session.options.shown().items():
            out.write(f"{key:<16}{value}\n")
        if session.system:
            out.write(f"{'system':<16}{session.system}\n")
    elif name == "/set" and rest and rest[0] in ("verbose", "quiet"):
        verbose = rest[0] == "verbose"
        out.write(f"Set '{rest[0]}' mode.\n")
    elif name == "/set" and rest and rest[0] == "system":
        session.system = line.split("system", 1)[1].strip() or None
        session.clear()
        out.write("Set system message (the conversation starts over).\n")
    elif name == "/set" and rest:
        if rest[0] == "parameter":
            rest = rest[1:]
        try:
            if not rest:
                raise InvalidRequestError("usage: /set NAME VALUE, e.g. /set temperature 0.7")
            session.options = set_option(session.options, rest[0], rest[1:])
        except InvalidRequestError as exc:
            out.write(f"error: {exc}\n")
        else:
            out.write(f"Set parameter '{rest[0]}' to '{' '.join(rest[1:])}'\n")
    elif name == "/set":
        out.write("usage: /set NAME VALUE (see /?)\n")
    else:
        out.write(f"Unknown command '{name}'. Type /? for help\n")
    return verbose


def _terminal_input(home) -> Callable[[str], str]:
    """input() with readline's line editing and a history kept in RYZ_HOME (stdin is a terminal)."""
    try:
        import readline
    except ImportError:  # Python built without readline: plain input()
        return input
    import atexit

    path = home / "run_history"
    try:
        readline.read_history_file(path)
    except OSError:
        pass
    readline.set_history_length(1000)

    def save() -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(path)
        except OSError:
            pass

    atexit.register(save)
    return input
