"""The engine core: one model, one scheduler, one loop thread that steps them.

`EngineCore.step()` reads like the diagram: schedule -> execute the batch forward -> sample and
update. Callers on any thread `submit()` a `GenerationRequest` with a sink callable that receives
`Delta`s (new text, token ids, logprobs, and finally a finish reason or an error); the HTTP layer reaches it
through `engine.serving.client.LocalEngineClient`, which turns that into an async iterator per request.
`run` and `score` are the synchronous batch API (lm-eval, the demo scorer): the same scheduler batches them.
"""

from __future__ import annotations

import math
import statistics
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engine.errors import EngineError
from engine.serving.sampling import Sample, Sampler, SamplingParams, token_logprobs
from engine.serving.scheduler import Chunk, QueueFullError, Scheduler, SchedulerConfig
from engine.serving.speculative import Drafter, DraftLength, DraftModel, SpecConfig, accept_drafts, make_drafter
from engine.serving.textstream import IncrementalDetokenizer, StopMatcher

__all__ = ["Delta", "EngineCore", "GenerationRequest", "QueueFullError", "batch_engine"]


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int = 16
    stop: list[str] = field(default_factory=list)
    stop_token_ids: set[int] = field(default_factory=set)  # besides the model's own eos / end-of-turn ids
    ignore_eos: bool = False
    grammar: Any = None  # engine.serving.structured.Grammar: constrains every sampled token
    prompt_logprobs: int | None = None  # echo scoring: logprob of each prompt token and its top alternatives
    prompt_logprobs_from: int = 0  # ... from this prompt token on (batch scoring: where the continuation starts)
    speculative: SpecConfig | None = None  # None: the engine's default (engine/serving/speculative.py)
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    arrival: float = field(default_factory=time.perf_counter)  # TTFT counts from here (the server sets it on receipt)


@dataclass
class Delta:
    """What one engine step produced for one request."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[Sample] = field(default_factory=list)
    finish_reason: str | None = None  # "stop", "length", "abort"
    error: str | None = None
    prompt_logprobs: list[tuple[float, list[tuple[int, float]]] | None] | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    speculative: dict | None = None  # on the last delta of a request that asked for speculation: what it did

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.error is not None


class StepProfile:
    """Where the engine's steps spend their time (`RYZ_PROFILE_STEPS`, read by `ryz bench-serve`), summed per kind of
    step: `decode` steps keyed by their batch (N sequences, one token each) and `mixed`, any step with prompt or
    draft tokens. Parts: the native forward's own (`NativeModel.profile`: ternary linears, head, attention, other)
    and `python`, the rest of the step as the loop thread sees it (scheduling, the ctypes call, sampling,
    detokenizing, handing deltas to the HTTP side, and the gap since the previous step when the loop did not sleep).
    A model that cannot profile by part (the numpy reference, an ABI 4 library) has one part, `forward`."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.native = bool(getattr(model, "can_profile", False))
        if self.native:
            model.set_profiling(True)
            self._last = dict(model.profile()["seconds"])
        self.decode: dict[str, dict] = {}
        self.mixed: dict = self._entry()
        self._lock = threading.Lock()  # snapshot() runs on the HTTP side

    @staticmethod
    def _entry() -> dict:
        return {"steps": 0, "tokens": 0, "seconds": {}}

    def forward_parts(self, forward_seconds: float) -> dict[str, float]:
        """The parts of the forward call that just ended: the native profile's growth since the last call."""
        if not self.native:
            return {"forward": forward_seconds}
        now = dict(self.model.profile()["seconds"])
        parts = {p: max(0.0, now[p] - self._last.get(p, 0.0)) for p in now}
        self._last = now
        return parts

    def add(self, chunks: list[Chunk], tokens: int, step_seconds: float, parts: dict[str, float]) -> None:
        decode = all(len(c.tokens) == 1 and c.samples and not c.drafts for c in chunks)
        with self._lock:
            entry = self.decode.setdefault(str(tokens), self._entry()) if decode else self.mixed
            entry["steps"] += 1
            entry["tokens"] += tokens
            seconds = entry["seconds"]
            for part, value in parts.items():
                seconds[part] = seconds.get(part, 0.0) + value
            seconds["python"] = seconds.get("python", 0.0) + max(0.0, step_seconds - sum(parts.values()))

    def snapshot(self) -> dict:
        with self._lock:
            out: dict = {
                "decode": {n: {**e, "seconds": dict(e["seconds"])} for n, e in self.decode.items()},
                "mixed": {**self.mixed, "seconds": dict(self.mixed["seconds"])},
            }
        isa = getattr(getattr(self.model, "library", None), "isa", None)
        if isa:
            out["isa"] = str(isa)  # the kernels that ran (RYZ_ISA or the host's best)
        repacked = getattr(self.model, "repacked_bytes", None)
        if repacked:
            out["ternary_bytes"] = int(repacked)  # what the ternary linears read per step (their repacked layout)
        return out


@dataclass
class _Live:
    request: GenerationRequest
    sink: Callable[[Delta], None]
    sampler: Sampler
    detokenizer: IncrementalDetokenizer
    stopper: StopMatcher
    matcher: Any
    arrival: float
    generated: list[int] = field(default_factory=list)
    prompt_logprobs: list = field(default_factory=list)
    first_token_at: float | None = None
    last_token_at: float | None = None
    waited_at_last_token: float = 0.0  # the core's compute_wait when last_token_at was taken
    token_latencies: list[float] = field(default_factory=list)  # this request's, for its median at the end
    stop_string_hit: bool = False
    spec: SpecConfig = field(default_factory=SpecConfig)
    spec_skipped: str | None = None  # why a request that asked for speculation runs without it
    drafter: Drafter | None = None
    draft_length: DraftLength | None = None  # k per step, adapted to the acceptance (with the drafter)
    spec_counts: dict = field(
        default_factory=lambda: {"drafted": 0, "accepted": 0, "steps": 0, "emitted": 0, "paused": 0}
    )


class EngineCore:
    def __init__(
        self,
        model,
        tokenizer,
        config: SchedulerConfig,
        model_id: str = "model",
        metrics=None,
        compute_lock: threading.Lock | None = None,
        speculative: SpecConfig | None = None,
        draft_model: DraftModel | None = None,
        profile_steps: bool = False,
    ):
        """`compute_lock`: shared by every EngineCore of one server, so one variant's forward runs at a time
        on all the cores. Two variants computing at once oversubscribe them (each forward uses every core),
        and the one with less traffic, the canary, was preempted in nearly every step: its tokens read up to
        8x slower than production's on the same model. The time a step waits for the lock is kept out of
        the per-token latency (it is the other variant's work, not this model's speed) and counted apart.
        `speculative`: requests' default speculation (engine/serving/speculative.py); `draft_model` serves method
        "draft"; `profile_steps`: keep a StepProfile (in `stats()`)."""
        self.model, self.tokenizer, self.model_id, self.metrics = model, tokenizer, model_id, metrics
        self.speculative, self.draft_model = speculative or SpecConfig(), draft_model
        self.spec_totals = {"drafted": 0, "accepted": 0, "steps": 0, "emitted": 0, "paused": 0}
        self._compute_lock = compute_lock or threading.Lock()
        self.compute_wait = 0.0  # seconds this core's steps waited for another core's forward
        self.vocab = model.hp.vocab
        self.scheduler = Scheduler(config)
        self.config = config
        self._live: dict[str, _Live] = {}
        self._aborts: set[str] = set()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._stopping = False
        self.profile = StepProfile(model) if profile_steps else None
        self._step_start = 0.0  # when the loop decided to run the current step (StepProfile's python part)
        self._held: list[tuple[str, Callable[[Delta], None], Delta]] | None = None  # a step's deltas until _flush
        self._thread = threading.Thread(target=self._loop, name=f"ryz-engine-{model_id}", daemon=True)
        self._thread.start()

    # -- called from any thread ---------------------------------------------------------------------
    def submit(self, request: GenerationRequest, sink: Callable[[Delta], None]) -> None:
        """Queue a request. Raises QueueFullError at capacity, ValueError for a prompt that cannot fit."""
        request.params.validate()
        live = _Live(
            request,
            sink,
            Sampler(request.params, self.vocab),
            IncrementalDetokenizer(self.tokenizer.tokenizer, prefix_ids=request.prompt_ids[-4:]),
            StopMatcher(request.stop),
            request.grammar.matcher() if request.grammar is not None else None,
            request.arrival,
        )
        spec = request.speculative or self.speculative
        spec.validate()
        if spec.on and request.grammar is not None:
            # a grammar's matcher advances token by token; drafts would need its state rolled back: not done
            live.spec_skipped, spec = (
                "structured output (response_format / tools) runs without speculation",
                SpecConfig(),
            )
        if spec.on and request.max_tokens > 1:
            live.spec, live.drafter = spec, make_drafter(spec, len(request.prompt_ids), self.draft_model)
            live.draft_length = DraftLength(spec.num_tokens, spec.adapt)
        with self._lock:
            if self._stopping:
                raise RuntimeError("the engine is shutting down")
            self.scheduler.add(request.request_id, request.prompt_ids, _logits_from(request))
            self._live[request.request_id] = live
            self._wake.notify()

    def abort(self, request_id: str) -> None:
        with self._lock:
            if request_id in self._live:
                self._aborts.add(request_id)
                self._wake.notify()

    def stats(self) -> dict:
        with self._lock:
            return {
                "waiting": self.scheduler.num_waiting,
                "running": self.scheduler.num_running,
                "kv_bytes": self.model.kv_bytes(),
                "slots": self.config.slots,
                # KV positions the slots hold (running sequences and idle prefix-cache slots) of all they could
                "kv_positions": sum(len(slot.tokens) for slot in self.scheduler.slots),
                "kv_capacity": self.config.slots * self.config.max_context,
                "prefix_hits": self.scheduler.prefix_hits,
                "prefix_tokens_reused": self.scheduler.prefix_tokens_reused,
                "speculative": self.speculative.method,
                **{f"spec_{name}": count for name, count in self.spec_totals.items()},
                **({"step_profile": self.profile.snapshot()} if self.profile is not None else {}),
            }

    @property
    def in_flight(self) -> int:
        with self._lock:
            return len(self._live)

    def close(self) -> None:
        """Stop the loop; requests still in flight end with finish_reason "abort"."""
        with self._lock:
            self._stopping = True
            self._wake.notify()
        self._thread.join()
        for live in list(self._live.values()):
            live.sink(Delta(finish_reason="abort", completion_tokens=len(live.generated)))
        self._live.clear()
        if hasattr(self.model, "close"):
            self.model.close()
        if self.draft_model is not None:
            self.draft_model.close()

    # -- synchronous batches: lm-eval and the demo scorer call these, the scheduler batches them --------
    def run(self, requests: Iterable[GenerationRequest]) -> list[Delta]:
        """Run requests to the end and return, per request in order, one Delta holding all its text, token
        ids and logprobs and its final fields. Blocks; submits as fast as the queue takes them. Raises
        EngineError naming the first request that failed."""
        requests = list(requests)
        results: list[Delta | None] = [None] * len(requests)
        finished = threading.Condition()
        count = [0]

        def collector(i: int) -> Callable[[Delta], None]:
            total = Delta()

            def sink(delta: Delta) -> None:
                total.text += delta.text
                total.token_ids += delta.token_ids
                total.logprobs += delta.logprobs
                if delta.done:
                    total.finish_reason, total.error = delta.finish_reason, delta.error
                    total.prompt_logprobs = delta.prompt_logprobs
                    total.prompt_tokens, total.completion_tokens = delta.prompt_tokens, delta.completion_tokens
                    total.speculative = delta.speculative
                    with finished:
                        results[i] = total
                        count[0] += 1
                        finished.notify_all()

            return sink

        for i, request in enumerate(requests):
            while True:
                with finished:
                    seen = count[0]
                try:
                    self.submit(request, collector(i))
                    break
                except QueueFullError:  # wait for a request to finish, then try again
                    with finished:
                        finished.wait_for(lambda: count[0] > seen, timeout=1.0)
        with finished:
            finished.wait_for(lambda: count[0] == len(requests))
        done: list[Delta] = []
        for i, delta in enumerate(results):
            if delta is None or delta.error or delta.finish_reason == "abort":
                reason = "aborted" if delta is None or not delta.error else delta.error
                raise EngineError(f"request {i} of the batch failed: {reason}")
            done.append(delta)
        return done

    def score(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[tuple[float, bool]]:
        """Per (context, continuation): the continuation's summed log-probability after the context, and
        whether greedy decoding would produce it (lm-eval's loglikelihood). Requests sharing a context reuse
        its KV through the scheduler's prefix cache (SchedulerConfig.wait_for_shared_prefix)."""
        requests = []
        for context, continuation in pairs:
            if not context or not continuation:
                raise ValueError("scoring needs a non-empty context and continuation")
            requests.append(
                GenerationRequest(
                    [*context, *continuation],
                    SamplingParams(temperature=0.0),
                    max_tokens=0,
                    prompt_logprobs=1,
                    prompt_logprobs_from=len(context),
                )
            )
        out: list[tuple[float, bool]] = []
        for (_, continuation), result in zip(pairs, self.run(requests)):
            # None only stands for the first prompt token, which a non-empty context keeps out of the scored part
            entries = [entry for entry in result.prompt_logprobs or [] if entry is not None]
            if len(entries) != len(continuation):
                raise EngineError(f"scored {len(entries)} of {len(continuation)} continuation tokens")
            logprob = sum(entry[0] for entry in entries)
            greedy = all(entry[1][0][0] == token for entry, token in zip(entries, continuation))
            out.append((logprob, greedy))
        return out

    # -- the loop thread -------------------------------------------------------------------------------
    def _loop(self) -> None:
        ended = time.perf_counter()
        while True:
            with self._lock:
                while not self._stopping and not self._aborts and not self.scheduler.has_work():
                    self._wake.wait()
                    ended = time.perf_counter()  # idle time is no step's
                if self._stopping:
                    return
                for request_id in self._aborts:
                    self._end(request_id, Delta(finish_reason="abort"))
                self._aborts.clear()
            self._step_start = ended
            try:
                self.step()
            except Exception as exc:  # noqa: BLE001 - one failing batch must not take the server down
                with self._lock:
                    for request_id in list(self._live):
                        self._end(request_id, Delta(error=f"engine error: {exc}"))
            ended = time.perf_counter()

    def _unwind(self, plan) -> None:
        """A failed forward wrote an unknown part of its chunks' KV: the scheduler forgets those tokens and each
        sequence is cut back to where its chunk started, so no later request reuses what was never computed."""
        with self._lock:
            self.scheduler.unwind(plan)
        for chunk in plan.chunks:
            try:
                self.model.truncate_seq(chunk.slot, chunk.start)
            except Exception:  # noqa: BLE001 - nothing was written past the start: nothing to cut
                pass

    def step(self) -> None:
        """Schedule -> execute -> update. What one request does with its logits (prompt logprobs, sampling under its
        parameters and grammar, detokenizing, stop strings, its sink) fails that request alone (_fail); a failing
        forward fails every request in flight (_loop), since the batch's KV state is unknown after it."""
        begin, self._step_start = self._step_start or time.perf_counter(), 0.0
        drafts = self._draft()
        with self._lock:
            plan = self.scheduler.schedule(drafts)
        if not plan.chunks:
            return
        for src, dst, length in plan.copies:
            self.model.copy_seq(src, dst, length)
        for slot, length in plan.truncations:
            self.model.truncate_seq(slot, length)
        tokens = np.concatenate([np.asarray(c.tokens, np.int32) for c in plan.chunks])
        seq_ids = np.concatenate([np.full(len(c.tokens), c.slot, np.int32) for c in plan.chunks])
        want = np.zeros(len(tokens), np.uint8)
        rows_of = []  # logits rows the forward returns for each chunk, in order
        offset = 0
        for c in plan.chunks:
            if c.logits_from is not None:
                want[offset + max(0, c.logits_from - c.start) : offset + len(c.tokens)] = 1
            if c.samples:
                want[offset + len(c.tokens) - 1 - len(c.drafts) : offset + len(c.tokens)] = 1
            rows_of.append(int(want[offset : offset + len(c.tokens)].sum()))
            offset += len(c.tokens)
        started = time.perf_counter()
        with self._compute_lock:
            waited = time.perf_counter() - started
            try:
                logits = self.model.forward_batch(tokens, seq_ids, want)
            except Exception:
                self._unwind(plan)
                raise
            forward_seconds = time.perf_counter() - started - waited
        self.compute_wait += waited
        if self.metrics is not None:
            self.metrics.step(len(tokens), waited)
        row = 0
        self._held = []
        try:
            with self._lock:
                for chunk, rows in zip(plan.chunks, rows_of):
                    try:
                        self._update(chunk, logits[row : row + rows] if rows else None)
                    except Exception as exc:  # noqa: BLE001 - this request's own work failed: it ends alone
                        self._fail(chunk.request_id, exc)
                    row += rows
        finally:
            self._flush()
        if self.profile is not None:
            # the other variant's forward (compute_lock) is not this step's time
            step_seconds = time.perf_counter() - begin - waited
            self.profile.add(plan.chunks, len(tokens), step_seconds, self.profile.forward_parts(forward_seconds))

    def _update(self, chunk: Chunk, logits: np.ndarray | None) -> None:
        live = self._live.get(chunk.request_id)
        if live is None:
            return
        request = live.request
        if chunk.logits_from is not None and logits is not None:
            first = max(chunk.start, chunk.logits_from)  # the position of logits' first row
            next_ids = request.prompt_ids[first + 1 : chunk.start + 1 + len(chunk.tokens)]
            if first == 0 and request.prompt_logprobs_from == 0:
                live.prompt_logprobs.append(None)  # nothing predicts the first prompt token
            live.prompt_logprobs += token_logprobs(logits[: len(next_ids)], next_ids, request.prompt_logprobs or 0)
        if not chunk.samples:
            return
        if request.max_tokens == 0:
            self._end(request.request_id, Delta(finish_reason="length"))
            return
        assert logits is not None  # a sampling chunk always asks for its last row (step)
        if chunk.drafts:
            self._verify(live, chunk, logits[-1 - len(chunk.drafts) :])
            return
        if live.drafter is not None and live.draft_length is not None and live.draft_length.paused and live.generated:
            live.draft_length.plain_step()  # the policy paused drafting (_draft): a plain step
            self._count(live, paused=1)
            if self.metrics is not None and hasattr(self.metrics, "spec_paused"):
                self.metrics.spec_paused()
        allowed = live.matcher.allowed() if live.matcher is not None else None
        self._emit(live, live.sampler.sample(logits[-1], request.prompt_ids, live.generated, allowed))

    def _draft(self) -> dict[str, list[int]]:
        """Drafts of the speculating requests that are decoding, at most up to their max_tokens and context."""
        with self._lock:
            speculating = [
                (rid, live) for rid, live in self._live.items() if live.drafter is not None and live.generated
            ]
        drafts = {}
        for rid, live in speculating:
            request, done = live.request, len(live.request.prompt_ids) + len(live.generated)
            wanted = live.spec.num_tokens if live.draft_length is None else live.draft_length.next_k()
            k = min(wanted, request.max_tokens - len(live.generated) - 1, self.config.max_context - 1 - done)
            if k <= 0 or live.drafter is None:
                continue
            try:
                with self._compute_lock:  # a draft model's forward uses the cores like the target's
                    guess = live.drafter.propose([*request.prompt_ids, *live.generated], k)
            except Exception as exc:  # noqa: BLE001 - a failing drafter costs speed, not the request
                live.drafter, live.spec_skipped = None, f"drafter failed: {exc}"
                continue
            if guess:
                drafts[rid] = [int(t) for t in guess[:k]]
        return drafts

    def _verify(self, live: _Live, chunk: Chunk, logits: np.ndarray) -> None:
        """Speculative verification: keep the drafts the acceptance rule accepts (engine/serving/speculative.py),
        cut the KV back past them, then emit them and the token after them one by one like any sampled token."""
        request, drafts, base = live.request, chunk.drafts, list(live.generated)
        n, token = accept_drafts(
            lambda i: live.sampler.distribution(logits[i], request.prompt_ids, base + drafts[:i]),
            drafts,
            live.sampler.rng,
        )
        kept = self.scheduler.accept_drafts(request.request_id, drafts[:n])
        if n < len(drafts):
            self.model.truncate_seq(chunk.slot, kept)
        # counted before emitting: the token that finishes the request sends its totals
        self._count(live, drafted=len(drafts), accepted=n, steps=1)
        if live.draft_length is not None:
            live.draft_length.verified(len(drafts), n)  # the next step's k; never this step's acceptance
        emitted = 0
        for i, t in enumerate([*drafts[:n], token]):
            emitted += 1
            self._count(live, emitted=1)
            asked = request.params.logprobs is not None
            sample = live.sampler.report(logits[i], t) if asked else Sample(t, math.nan, [])
            if self._emit(live, sample, append=i == n):
                break
        if self.metrics is not None and hasattr(self.metrics, "spec_step"):
            self.metrics.spec_step(len(drafts), n, emitted)

    def _count(self, live: _Live, **counts: int) -> None:
        for name, value in counts.items():
            live.spec_counts[name] += value
            self.spec_totals[name] += value

    def _emit(self, live: _Live, sample: Sample, append: bool = True) -> bool:
        """One output token through the one path every token takes (stops, eos, max_tokens, streaming delta);
        True when it finished the request. `append`: add it to the scheduler's tokens (accepted drafts are there)."""
        request = live.request
        now = time.perf_counter()
        token = sample.token
        live.generated.append(token)
        if live.matcher is not None:
            live.matcher.accept(token)
        if self.metrics is not None:
            if live.first_token_at is None:
                self.metrics.ttft(now - live.arrival)
            else:
                assert live.last_token_at is not None  # set together with first_token_at
                latency = now - live.last_token_at - (self.compute_wait - live.waited_at_last_token)
                self.metrics.token_latency(latency)
                live.token_latencies.append(latency)
        live.first_token_at = live.first_token_at or now
        live.last_token_at = now
        live.waited_at_last_token = self.compute_wait
        finish = None
        text = ""
        stops = self.tokenizer.stop_ids | request.stop_token_ids
        if token in stops and not request.ignore_eos:
            finish = "stop"
        else:
            text, stopped = live.stopper.push(live.detokenizer.push(token))
            if stopped:
                finish, live.stop_string_hit = "stop", True
            elif live.matcher is not None and live.matcher.is_finished():
                finish = "stop"
        if finish is None and (
            len(live.generated) >= request.max_tokens
            or len(request.prompt_ids) + len(live.generated) >= self.config.max_context
        ):
            finish = "length"
        delta = Delta(text=text, token_ids=[token], logprobs=[sample] if request.params.logprobs is not None else [])
        if finish is None:
            if append:
                self.scheduler.append_token(request.request_id, token)
            self._send(live, delta)
            return False
        delta.finish_reason = finish
        self._end(request.request_id, delta)
        return True

    def _send(self, live: _Live, delta: Delta) -> None:
        """A delta to its request's sink: held during a step's updates (_flush sends them), at once otherwise."""
        if self._held is not None:
            self._held.append((live.request.request_id, live.sink, delta))
        else:
            live.sink(delta)

    def _flush(self) -> None:
        """Send a step's deltas, in order, once every request of the step is updated. A sink wakes the HTTP side's
        event loop, whose thread then takes the GIL from this one: woken after each token, it did so between the
        tokens of a step, and the loop thread waited for it (0.25 ms a token at 8 streams, about 2 ms of an
        8-sequence step). A sink that raises ends its request alone, as in step."""
        held, self._held = self._held or [], None
        for request_id, sink, delta in held:
            try:
                sink(delta)
            except Exception as exc:  # noqa: BLE001 - this request's client is gone: it ends alone
                with self._lock:
                    self._fail(request_id, exc)

    def _fail(self, request_id: str, exc: Exception) -> None:
        """End one request whose own work in a step raised (lock held): an error delta for it alone, its slot freed;
        the other requests of the batch carry on. A sink that raises again (its client is gone) is ignored: the
        request has already left the core."""
        try:
            self._end(request_id, Delta(error=f"request failed: {type(exc).__name__}: {exc}"))
        except Exception:  # noqa: BLE001 - _end pops the request first, so nothing of it is left to end
            pass

    def _end(self, request_id: str, delta: Delta) -> None:
        """Finish a request (lock held): flush held-back text, free its slot, send the last delta."""
        live = self._live.pop(request_id, None)
        if live is None:
            return
        if delta.finish_reason in ("length", "stop") and not live.stop_string_hit:
            delta.text += live.stopper.push(live.detokenizer.flush())[0] + live.stopper.flush()
        for slot in self.scheduler.finish(request_id):
            self.model.release_seq(slot)
        delta.prompt_tokens = len(live.request.prompt_ids)
        delta.completion_tokens = len(live.generated)
        if live.drafter is not None:
            live.drafter.close()
        if live.spec.on or live.spec_skipped:
            delta.speculative = {"method": live.spec.method, **live.spec_counts}
            if live.spec_skipped:
                delta.speculative["skipped"] = live.spec_skipped
            if self.metrics is not None and live.spec_skipped and hasattr(self.metrics, "spec_skipped"):
                self.metrics.spec_skipped()
        if live.request.prompt_logprobs is not None:
            delta.prompt_logprobs = live.prompt_logprobs
        if self.metrics is not None:
            self.metrics.finished(delta)
            if live.first_token_at is not None and delta.finish_reason in ("stop", "length"):
                # per-request figures for canary analysis: successful requests only, like its evidence
                tpot = statistics.median(live.token_latencies) if live.token_latencies else None
                self.metrics.request(live.first_token_at - live.arrival, tpot)
        self._send(live, delta)


def _logits_from(request: GenerationRequest) -> int | None:
    """The first prompt position whose logits a request scores: the one before its first scored token."""
    if request.prompt_logprobs is None:
        return None
    return max(0, request.prompt_logprobs_from - 1)


MAX_LOGIT_BYTES = 128 << 20  # logits one batch step may return (rows x vocab float32)


def batch_engine(model, tokenizer, max_batch_tokens: int = 4096, model_id: str = "batch", **core: Any) -> EngineCore:
    """An EngineCore for synchronous batches (EngineCore.run / score): every sequence slot of the model, a
    sequence may fill every position, prefill steps of up to `max_batch_tokens` tokens (fewer where their
    logits would pass MAX_LOGIT_BYTES: scoring wants a row per token), idle slots kept as prefix cache, and
    the queue waits for a shared prefix to be computed once (SchedulerConfig.wait_for_shared_prefix). `core`: more
    EngineCore arguments (speculative, draft_model)."""
    rows = MAX_LOGIT_BYTES // (4 * model.hp.vocab)
    config = SchedulerConfig(
        slots=model.max_seqs,
        max_context=model.max_positions + 1,
        prefill_chunk=max(16, min(max_batch_tokens, rows)),
        prefix_cache_slots=model.max_seqs,
        max_queue=4 * model.max_seqs,
        wait_for_shared_prefix=8,
    )
    return EngineCore(model, tokenizer, config, model_id, **core)  # speculative=, draft_model=
