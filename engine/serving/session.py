"""A chat conversation in this process, for `ryz run`: the messages so far, the options of the next reply, and each
reply streamed as text through the engine core, the path the server takes (the model's chat template through
`LocalEngineClient.render_chat`, the core's sampling, stops, EOS and max_tokens).

Options are Ollama's `/set parameter` names where they map to SamplingParams (`num_predict` is max_tokens,
`repeat_penalty` the repetition penalty).
"""

from __future__ import annotations

import dataclasses
import queue
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from engine.errors import EngineError, InvalidRequestError
from engine.serving.chat import validate_messages
from engine.serving.core import Delta, GenerationRequest
from engine.serving.sampling import SamplingParams

ABORT_WAIT_SECONDS = 10.0  # an aborted reply ends at the end of the engine's current step


@dataclass
class ChatOptions:
    """What the next reply samples with (SamplingParams' neutral defaults; `ryz run` starts from its own)."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repeat_penalty: float = 1.0
    seed: int | None = None
    num_predict: int | None = None  # None: until an end of turn or the context is full (Ollama's -1)
    stop: list[str] = field(default_factory=list)

    def sampling(self) -> SamplingParams:
        params = SamplingParams(
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            min_p=self.min_p,
            repetition_penalty=self.repeat_penalty,
            seed=self.seed,
        )
        params.validate()
        return params

    def shown(self) -> dict[str, object]:
        return {name: value for name, value in dataclasses.asdict(self).items() if value not in (None, [])}


# `/set NAME VALUE` (or Ollama's `/set parameter NAME VALUE`): option name -> its parser
_ALIASES = {"max_tokens": "num_predict", "repetition_penalty": "repeat_penalty"}
_PARSERS = {
    "temperature": float,
    "top_k": int,
    "top_p": float,
    "min_p": float,
    "repeat_penalty": float,
    "seed": int,
    "num_predict": int,
}
OPTION_NAMES = (*_PARSERS, "stop")


def set_option(options: ChatOptions, name: str, values: list[str]) -> ChatOptions:
    """`options` with NAME set from its text values; InvalidRequestError naming the option and its range."""
    name = _ALIASES.get(name, name)
    if name == "stop":
        return dataclasses.replace(options, stop=list(values))
    if name not in _PARSERS:
        raise InvalidRequestError(f"unknown parameter {name!r}; choose one of {', '.join(OPTION_NAMES)}")
    if len(values) != 1:
        raise InvalidRequestError(f"/set {name} takes one value, e.g. /set {name} {_EXAMPLES[name]}")
    try:
        value = _PARSERS[name](values[0])
    except ValueError:
        raise InvalidRequestError(
            f"{name} must be {'an integer' if _PARSERS[name] is int else 'a number'}, got {values[0]!r}"
        ) from None
    if name == "num_predict":  # Ollama: -1 generates until the context is full
        if value == 0 or value < -1:
            raise InvalidRequestError(f"num_predict must be at least 1 (or -1: until the context is full), got {value}")
        changed = dataclasses.replace(options, num_predict=None if value == -1 else value)
    else:
        changed = dataclasses.replace(options, **{name: value})
    changed.sampling()  # the engine's own range checks, before the next reply
    return changed


_EXAMPLES = {
    "temperature": "0.7",
    "top_k": "40",
    "top_p": "0.9",
    "min_p": "0.05",
    "repeat_penalty": "1.1",
    "seed": "42",
    "num_predict": "128",
}


@dataclass
class ReplyStats:
    prompt_tokens: int = 0
    reused_tokens: int = 0  # of the prompt, read from the KV the previous turns left (prefix cache)
    completion_tokens: int = 0
    first_token_seconds: float | None = None
    seconds: float = 0.0
    finish_reason: str | None = None
    dropped_messages: int = 0  # oldest messages left out so the conversation fits the context


class ChatSession:
    """One conversation on a LocalEngineClient (engine/serving/client.py). `reply` streams the answer to one user
    message; the exchange joins the conversation only when the reply finishes (stop or length): an interrupted
    reply is dropped together with the message it answered, as `ollama run` drops it."""

    def __init__(self, client, options: ChatOptions | None = None, system: str | None = None):
        self.client, self.core = client, client.core
        self.options = options or ChatOptions()
        self.system = system
        self.messages: list[dict] = []  # user and assistant turns, oldest first (the system message apart)
        self.last = ReplyStats()

    @property
    def context(self) -> int:
        return self.core.config.max_context

    def clear(self) -> None:
        self.messages = []

    def reply(self, text: str) -> Iterator[str]:
        """Stream the reply to `text` as text pieces. Closing the iterator early (Ctrl-C in `ryz run`) aborts the
        request in the engine and waits for it to end there, so the next reply starts on a free slot."""
        self.last = stats = ReplyStats()
        history = [*self.messages, {"role": "user", "content": text}]
        prompt_ids, stats.dropped_messages = self._prompt(history)
        history = history[stats.dropped_messages :]
        max_tokens = self.context - len(prompt_ids)
        if self.options.num_predict is not None:
            max_tokens = min(max_tokens, self.options.num_predict)
        request = GenerationRequest(
            prompt_ids, self.options.sampling(), max_tokens=max_tokens, stop=list(self.options.stop)
        )
        deltas: queue.Queue[Delta] = queue.Queue()
        reused_before = self.core.stats()["prefix_tokens_reused"]
        started = time.perf_counter()
        self.core.submit(request, deltas.put)
        pieces: list[str] = []
        last: Delta | None = None
        try:
            while last is None:
                delta = _next(deltas)
                if delta.done:
                    last = delta
                if delta.error:
                    raise EngineError(f"the engine failed this reply: {delta.error}")
                if stats.first_token_seconds is None and delta.token_ids:
                    stats.first_token_seconds = time.perf_counter() - started
                if delta.text:
                    pieces.append(delta.text)
                    yield delta.text
        finally:
            if last is None:  # interrupted, or the consumer stopped reading
                self.core.abort(request.request_id)
                _wait_for_end(deltas)
        stats.seconds = time.perf_counter() - started
        stats.prompt_tokens, stats.completion_tokens = last.prompt_tokens, last.completion_tokens
        stats.finish_reason = last.finish_reason
        stats.reused_tokens = self.core.stats()["prefix_tokens_reused"] - reused_before
        if last.finish_reason in ("stop", "length"):
            self.messages = [*history, {"role": "assistant", "content": "".join(pieces)}]

    def _prompt(self, history: list[dict]) -> tuple[list[int], int]:
        """The rendered prompt's ids, leaving out the oldest exchanges until at least one token of reply fits the
        context; and how many messages were left out."""
        dropped = 0
        while True:
            messages = history[dropped:]
            if self.system:
                messages = [{"role": "system", "content": self.system}, *messages]
            ids = self.client.render_chat(validate_messages(messages))
            if len(ids) < self.context:
                return ids, dropped
            if len(history) - dropped <= 1:
                raise InvalidRequestError(
                    f"this message makes a prompt of {len(ids)} tokens, over the context of {self.context} "
                    "(RYZ_MAX_CONTEXT); send a shorter message or raise RYZ_MAX_CONTEXT"
                )
            dropped += 2  # a user message and the reply to it


def _next(deltas: queue.Queue[Delta]) -> Delta:
    """The next delta; waits in short slices so Ctrl-C reaches the main thread promptly."""
    while True:
        try:
            return deltas.get(timeout=0.1)
        except queue.Empty:
            continue


def _wait_for_end(deltas: queue.Queue[Delta]) -> None:
    deadline = time.monotonic() + ABORT_WAIT_SECONDS
    while time.monotonic() < deadline:
        try:
            if deltas.get(timeout=0.1).done:
                return
        except queue.Empty:
            continue
