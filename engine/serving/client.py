"""The engine client: everything the HTTP layer may ask of an engine, and the local implementation.

The routes see an `EngineClient` only, as vLLM's v1 OpenAI server sees its `EngineClient`: input processing
(tokenize, render a chat, compile a grammar, the text of a token) and the request lifecycle (submit, which
returns the request's stream of `Delta`s; abort; score, the synchronous batch API; stats; close). What a
model is, how it is batched and where its tokenizer lives stays behind it, so server tests can run the
routes against a fake client and a remote engine could stand in for the local one.

`LocalEngineClient` runs an `EngineCore` (engine/serving/core.py) in this process.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import math
import re
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from engine.artifacts.refs import resolve_model
from engine.artifacts.store import open_store
from engine.errors import InvalidRequestError
from engine.model.loader import open_model
from engine.model.tokenizer import ModelTokenizer
from engine.serving.chat import render_chat
from engine.serving.core import Delta, EngineCore, GenerationRequest
from engine.serving.scheduler import SchedulerConfig
from engine.serving.speculative import DraftModel, spec_from_settings
from engine.serving.structured import Grammar, GrammarCompiler
from engine.settings import Settings


class EngineClient(Protocol):
    """What the HTTP layer may call. Input errors raise InvalidRequestError (the routes answer 400); a full
    queue raises QueueFullError at submit (429), before any response starts."""

    model_id: str
    vocab: int

    def tokenize(self, text: str, add_special: bool = True) -> list[int]: ...

    def detokenize(self, ids: Sequence[int]) -> str: ...

    def token_text(self, token_id: int) -> str: ...

    def token_bytes(self, token_id: int) -> bytes: ...

    def model_info(self) -> dict: ...

    def render_chat(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]: ...

    def grammar(
        self, response_format: dict | None = None, tools: list[dict] | None = None, tool_choice: Any = None
    ) -> Grammar | None: ...

    def submit(self, request: GenerationRequest) -> AsyncIterator[Delta]: ...

    def abort(self, request_id: str) -> None: ...

    def score(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[tuple[float, bool]]: ...

    def stats(self) -> dict: ...

    @property
    def in_flight(self) -> int: ...

    def use_metrics(self, metrics: Any) -> None: ...

    def close(self) -> None: ...


@dataclass
class LoadedModel:
    """What a loader returns: a model with the native forward_batch interface and its tokenizer."""

    model: Any
    tokenizer: ModelTokenizer
    model_id: str


def load_model(ref: str, settings: Settings, library=None) -> LoadedModel:
    """Resolve a model reference once and open it for serving (engine.model.loader.open_model: threads, tuned
    tile, KV slots within RYZ_KV_BUDGET_MB)."""
    path = resolve_model(ref, open_store(settings.store_url, settings=settings))
    model = open_model(path, "serve", settings=settings, library=library)
    return LoadedModel(model, ModelTokenizer(model.file, settings.parse_special), model_id(ref, model))


def load_draft_model(ref: str, settings: Settings, target: LoadedModel) -> DraftModel:
    """RYZ_SPEC_DRAFT_MODEL beside a served model: resolved like the served one, a slot per target slot, and
    refused (ValueError) unless it shares the target's tokenizer."""
    path = resolve_model(ref, open_store(settings.store_url, settings=settings))
    target_model = target.model
    model = open_model(
        path,
        "serve",
        settings=settings,
        library=getattr(target_model, "library", None),
        max_seqs=target_model.max_seqs,
        max_positions=target_model.max_positions,
    )
    try:
        tokenizer = ModelTokenizer(model.file, settings.parse_special)
        return DraftModel(model, tokenizer, target_model.hp.vocab, target.tokenizer, f"draft model {ref!r}")
    except BaseException:
        model.close()
        raise


def model_id(ref: str, model) -> str:
    """The id a variant answers to: a file's stem, else the model's name at the artifact id's first 19 chars."""
    name = model.file.metadata.get("general.name")
    if ref.endswith(".gguf"):
        return Path(ref).stem
    return f"{name}@{ref[:19]}" if name else ref[:19]


class _Mailbox:
    """Deltas from the engine thread to one event loop, with one wake-up for all that arrive before the loop runs.
    The engine sends a step's deltas back to back (EngineCore._flush); call_soon_threadsafe per delta wrote the
    loop's self-pipe each time, and each write let the woken loop thread take the GIL before the next delta."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = weakref.ref(loop)  # the client's table of mailboxes must not keep a loop alive
        self._lock = threading.Lock()
        self._pending: list[tuple[asyncio.Queue[Delta], Delta]] = []

    def put(self, queue: asyncio.Queue[Delta], delta: Delta) -> None:
        with self._lock:
            self._pending.append((queue, delta))
            if len(self._pending) > 1:  # a wake-up is already on its way: it takes this one too
                return
        try:
            loop = self._loop()
            if loop is None:
                raise RuntimeError("the request's event loop is gone")
            loop.call_soon_threadsafe(self._drain)
        except BaseException:  # a closed loop: the sink raises, as call_soon_threadsafe did, and nothing stays queued
            with self._lock:
                self._pending.clear()
            raise

    def _drain(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for queue, delta in pending:
            queue.put_nowait(delta)


class LocalEngineClient:
    """An EngineCore in this process behind the EngineClient protocol."""

    def __init__(
        self,
        loaded: LoadedModel,
        settings: Settings,
        metrics: Any = None,
        compute_lock: threading.Lock | None = None,
    ):
        config = SchedulerConfig(
            slots=loaded.model.max_seqs,
            max_context=settings.max_context,
            prefill_chunk=settings.prefill_chunk,
            prefix_cache_slots=settings.prefix_cache_slots,
            max_queue=settings.max_queue,
        )
        speculative = spec_from_settings(settings)
        draft = load_draft_model(settings.spec_draft_model, settings, loaded) if settings.spec_draft_model else None
        if speculative.method == "draft" and draft is None:
            raise ValueError("RYZ_SPECULATIVE=draft needs a draft model: set RYZ_SPEC_DRAFT_MODEL")
        self.core = EngineCore(
            loaded.model,
            loaded.tokenizer,
            config,
            loaded.model_id,
            metrics,
            compute_lock=compute_lock,
            speculative=speculative,
            draft_model=draft,
            profile_steps=settings.profile_steps,
        )
        self.model_id, self.vocab = loaded.model_id, loaded.model.hp.vocab
        self._tok = loaded.tokenizer
        self._grammars: GrammarCompiler | None = None  # built on the first structured request
        self._info: dict | None = None  # model_info(), computed once
        self._mailboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Mailbox] = weakref.WeakKeyDictionary()
        self._mailboxes_lock = threading.Lock()

    # -- input processing ------------------------------------------------------------------------------
    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        """`add_special=False`: without the bos the model's tokenizer puts first (llama-server's /tokenize)."""
        ids = self._tok.encode(text)
        if not add_special and ids and ids[0] == self._tok.bos_id:
            ids = ids[1:]
        return ids

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids))

    def token_text(self, token_id: int) -> str:
        return self._tok.tokenizer.decode([token_id], skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for, a part of a UTF-8 character included (token_text shows that as U+FFFD)."""
        return token_bytes(self._tok.tokenizer, token_id)

    def model_info(self) -> dict:
        """What the model is (for /api/show, /api/tags, /props, /ps): the file, its size and digest, architecture,
        parameters, tensor types, context, chat template. The digest of a file outside the store is hashed on the
        first call (the caller runs this on a worker thread)."""
        if self._info is None:
            self._info = describe_model(self.core.model, self._tok)
        return self._info

    def render_chat(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        tok = self._tok
        if not tok.chat_template:
            raise InvalidRequestError("this model has no chat template; use /v1/completions")
        bos = tok.tokenizer.id_to_token(tok.bos_id) if tok.bos_id is not None else ""
        eos = tok.tokenizer.id_to_token(tok.eos_id) if tok.eos_id is not None else ""
        text = render_chat(
            tok.chat_template,
            messages,
            add_generation_prompt=True,
            bos_token=bos or "",
            eos_token=eos or "",
            tools=tools,
        )
        return tok.encode_chat(text)

    def grammar(
        self, response_format: dict | None = None, tools: list[dict] | None = None, tool_choice: Any = None
    ) -> Grammar | None:
        """The grammar a request's output must follow: its response_format's, or its forced tool calls'."""
        if not tools and (not response_format or response_format.get("type", "text") == "text"):
            return None
        if self._grammars is None:
            self._grammars = GrammarCompiler(self._tok.tokenizer, self.vocab, set(self._tok.stop_ids))
        if tools:
            return self._grammars.compile_tools(tools, tool_choice)
        return self._grammars.compile_response_format(response_format)

    # -- requests --------------------------------------------------------------------------------------
    def submit(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        """Submit now (so capacity errors raise here, before any response starts); iterate the deltas."""
        mailbox = self._mailbox(asyncio.get_running_loop())
        queue: asyncio.Queue[Delta] = asyncio.Queue()

        def sink(delta: Delta) -> None:
            mailbox.put(queue, delta)

        self.core.submit(request, sink)
        return self._deltas(request.request_id, queue)

    def _mailbox(self, loop: asyncio.AbstractEventLoop) -> _Mailbox:
        with self._mailboxes_lock:
            mailbox = self._mailboxes.get(loop)
            if mailbox is None:
                mailbox = self._mailboxes[loop] = _Mailbox(loop)
            return mailbox

    async def _deltas(self, request_id: str, queue: asyncio.Queue[Delta]) -> AsyncIterator[Delta]:
        done = False
        try:
            while not done:
                delta = await queue.get()
                done = delta.done
                yield delta
        finally:
            if not done:  # the consumer went away (client disconnect): free the slot now
                self.core.abort(request_id)

    def abort(self, request_id: str) -> None:
        self.core.abort(request_id)

    def score(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[tuple[float, bool]]:
        return self.core.score(pairs)

    def stats(self) -> dict:
        return self.core.stats()

    @property
    def in_flight(self) -> int:
        return self.core.in_flight

    def use_metrics(self, metrics: Any) -> None:
        """Count from now on under another variant's labels (a promoted canary)."""
        self.core.metrics = metrics

    def close(self) -> None:
        self.core.close()


_HEX64 = re.compile(r"[0-9a-f]{64}")
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # sentencepiece byte fallback tokens


def describe_model(model: Any, tokenizer: ModelTokenizer) -> dict:
    """model_info() of an opened model (engine.model.native.NativeModel or anything with its `file`)."""
    file = model.file
    path = Path(file.path)
    # A store blob is named by its hash (engine/artifacts/store.py); any other file is hashed here, once.
    hex_ = path.name if _HEX64.fullmatch(path.name) else sha256_file(path)
    types: dict[str, int] = {}
    parameters = 0
    for info in file.tensors.values():
        count = math.prod(info.shape)
        parameters += count
        types[info.tensor_type.name] = types.get(info.tensor_type.name, 0) + count
    linear = file.tensor_type("blk.0.attn_q.weight").upper() if "blk.0.attn_q.weight" in file.tensors else None
    template = file.chat_template
    hp = file.hparams
    return {
        "path": str(path),
        "size_bytes": path.stat().st_size,
        "digest": hex_,
        "artifact_id": f"sha256:{hex_}",
        "name": file.metadata.get("general.name"),
        "architecture": file.arch,
        "parameters": parameters,
        "tensor_types": types,
        "weights_type": linear,
        "context_length": hp.context,
        "served_context": getattr(model, "max_positions", hp.context),
        "embedding_length": hp.hidden,
        "block_count": hp.layers,
        "head_count": hp.heads,
        "head_count_kv": hp.kv_heads,
        "feed_forward_length": hp.ffn,
        "ffn_activation": hp.ffn_act,
        "vocab_size": hp.vocab,
        "chat_template": template if isinstance(template, str) else None,
        "bos_token": _token(tokenizer, tokenizer.bos_id),
        "eos_token": _token(tokenizer, tokenizer.eos_id),
    }


def _token(tokenizer: ModelTokenizer, token_id: int | None) -> str:
    return (tokenizer.tokenizer.id_to_token(token_id) or "") if token_id is not None else ""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@functools.lru_cache(maxsize=1)
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet inverted: the character each byte is written as -> the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def token_bytes(tokenizer: Any, token_id: int) -> bytes:
    """A token's bytes from its vocabulary entry: byte-level BPE pieces through GPT-2's alphabet, sentencepiece's
    byte-fallback `<0xAB>` pieces as that byte; anything else as its decoded text."""
    piece = tokenizer.id_to_token(token_id)
    if piece is None:
        return b""
    if (match := _BYTE_PIECE.fullmatch(piece)) is not None:
        return bytes([int(match.group(1), 16)])
    alphabet = _byte_level_alphabet()
    if type(tokenizer.decoder).__name__ == "ByteLevel" and all(c in alphabet for c in piece):
        return bytes(alphabet[c] for c in piece)
    return tokenizer.decode([token_id], skip_special_tokens=False).encode("utf-8", "surrogateescape")


ClientFactory = Callable[[str, Settings, Any, threading.Lock], EngineClient]


def local_clients(loader: Callable[[str, Settings], LoadedModel] = load_model) -> ClientFactory:
    """A factory of local clients over `loader` (ServingState's default: models from the artifact store)."""

    def connect(ref: str, settings: Settings, metrics: Any, compute_lock: threading.Lock) -> EngineClient:
        client = LocalEngineClient(loader(ref, settings), settings, metrics, compute_lock)
        try:
            client.model_info()  # now, while loading: a file outside the store is hashed before it serves
        except BaseException:
            client.close()
            raise
        return client

    return connect
