"""Continuous batching: which tokens of which sequences go into the next forward step.

Pure bookkeeping, no tensors and no model: `schedule()` returns plain data (per running request, the
tokens to feed and whether a token is sampled after them), the engine core runs the forward and
reports back with `append_token()` / `finish()`. Requests join at any step (a free slot and the token
budget permitting) and leave at token boundaries.

Per step: every decoding sequence feeds its one new token first, then prompts are prefilled in
arrival order, at most `prefill_chunk` prompt tokens per step in total, so a long prompt is spread
over several steps and never stalls the decoding streams for longer than one chunk.

Slots are the native context's sequence ids; each holds one sequence's KV cache. A finished request
leaves its tokens in its slot, so the KV doubles as a prefix cache: a new request takes the free slot
whose cached tokens share the longest prefix with its prompt (llama.cpp server's slot reuse), or copies
the prefix from a running slot (a common system prompt of concurrent chats), and prefills only the
rest. Idle slots beyond `prefix_cache_slots` are released so memory returns to the baseline.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass
class SchedulerConfig:
    slots: int
    max_context: int
    prefill_chunk: int = 128
    prefix_cache_slots: int = 2
    max_queue: int = 64
    min_prefix_reuse: int = 1  # shortest shared prefix worth a KV copy
    # The request at the head of the queue waits while a running request is still computing a prefix the
    # two share, if that prefix has at least this many tokens and is at least half of what the waiting one
    # could reuse; then it copies the prefix instead of computing it again. For batch scoring (lm-eval's
    # choices of one question, few-shot prompts); arrival order is kept, so the queue waits with it. 0 = never.
    wait_for_shared_prefix: int = 0


@dataclass
class Chunk:
    """Tokens of one request fed in this step, at positions start .. start+len(tokens)-1 of its slot."""

    request_id: str
    slot: int
    tokens: list[int]
    start: int
    logits_from: int | None  # prompt scoring: logits after every position >= this one, not only the last
    samples: bool  # the chunk ends the known tokens: a new token is sampled from its last logits
    # speculative decoding: guessed tokens that end `tokens`; the step verifies them (logits after each of the last
    # 1 + len(drafts) tokens) and `accept_drafts` keeps those accepted, the caller cuts the KV back to the rest
    drafts: list[int] = field(default_factory=list)


@dataclass
class SchedulerOutput:
    chunks: list[Chunk] = field(default_factory=list)
    copies: list[tuple[int, int, int]] = field(default_factory=list)  # (src slot, dst slot, length), before the forward
    truncations: list[tuple[int, int]] = field(default_factory=list)  # (slot, length)
    releases: list[int] = field(default_factory=list)  # slots whose KV memory is freed

    @property
    def num_tokens(self) -> int:
        return sum(len(c.tokens) for c in self.chunks)


@dataclass
class _Request:
    request_id: str
    tokens: list[int]  # prompt, then generated tokens as they are appended
    prompt_len: int
    logits_from: int | None  # first position whose logits the request scores; None: only sampling's
    slot: int | None = None
    computed: int = 0  # tokens of `tokens` already in the slot's KV

    @property
    def held_slot(self) -> int:
        """The slot of a running request (set when it is admitted)."""
        assert self.slot is not None, f"request {self.request_id} holds no slot"
        return self.slot


@dataclass
class _Slot:
    tokens: list[int] = field(default_factory=list)  # what the slot's KV holds, position by position
    owner: str | None = None
    allocated: bool = False
    last_used: int = 0


class QueueFullError(Exception):
    pass


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class Scheduler:
    def __init__(self, config: SchedulerConfig):
        self.config = config
        self.slots = [_Slot() for _ in range(config.slots)]
        self.waiting: deque[_Request] = deque()
        self.running: dict[str, _Request] = {}
        self._clock = 0
        self.prefix_hits = 0
        self.prefix_tokens_reused = 0

    # -- requests -------------------------------------------------------------------------------
    def add(self, request_id: str, prompt_ids: list[int], logits_from: int | None = None) -> None:
        """Queue a request; QueueFullError when the waiting queue is at its bound. `logits_from`: the prompt
        is scored from that position on (the logits of every later position are returned)."""
        if not prompt_ids:
            raise ValueError("a request needs at least one prompt token")
        if len(prompt_ids) >= self.config.max_context:
            raise ValueError(
                f"prompt of {len(prompt_ids)} tokens does not fit the context of {self.config.max_context}"
            )
        if len(self.waiting) >= self.config.max_queue and not self._free_slots():
            raise QueueFullError(f"{len(self.waiting)} requests already waiting")
        if logits_from is not None and not 0 <= logits_from < len(prompt_ids):
            raise ValueError(f"logits_from={logits_from} is outside the prompt of {len(prompt_ids)} tokens")
        self.waiting.append(_Request(request_id, list(prompt_ids), len(prompt_ids), logits_from))

    def append_token(self, request_id: str, token: int) -> None:
        self.running[request_id].tokens.append(token)

    def accept_drafts(self, request_id: str, tokens: list[int]) -> int:
        """The first drafts of the request's last chunk were accepted: they become its tokens, already computed.
        Returns the length its slot's KV must be cut back to (the rejected drafts after them go)."""
        request = self.running[request_id]
        request.tokens += tokens
        request.computed += len(tokens)
        self.slots[request.held_slot].tokens = request.tokens[: request.computed]
        return request.computed

    def finish(self, request_id: str) -> list[int]:
        """Remove a waiting or running request; returns slots whose KV the caller must release."""
        request = self.running.pop(request_id, None)
        if request is None:
            self.waiting = deque(r for r in self.waiting if r.request_id != request_id)
            return []
        slot = self.slots[request.held_slot]
        slot.owner = None
        slot.tokens = request.tokens[: request.computed]
        slot.last_used = self._tick()
        return self._trim_idle()

    def length(self, request_id: str) -> int:
        """Tokens in the request's sequence (prompt + generated)."""
        return len(self.running[request_id].tokens)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    # -- one step -------------------------------------------------------------------------------
    def schedule(self, drafts: dict[str, list[int]] | None = None) -> SchedulerOutput:
        """`drafts`: per decoding request, tokens guessed to follow its last one (speculative decoding); they are
        fed after it and stay out of the request's tokens until `accept_drafts`."""
        out = SchedulerOutput()
        self._admit(out)
        decoding = [r for r in self.running.values() if r.computed >= r.prompt_len]
        prefilling = [r for r in self.running.values() if r.computed < r.prompt_len]
        drafts = drafts or {}
        for r in decoding:
            pending = r.tokens[r.computed :]  # the token sampled last step
            if pending:
                guess = list(drafts.get(r.request_id, ()))
                out.chunks.append(Chunk(r.request_id, r.held_slot, pending + guess, r.computed, None, True, guess))
        budget = self.config.prefill_chunk
        for r in prefilling:
            if budget <= 0:
                break
            take = min(budget, r.prompt_len - r.computed)
            tokens = r.tokens[r.computed : r.computed + take]
            done = r.computed + take == r.prompt_len
            out.chunks.append(Chunk(r.request_id, r.held_slot, tokens, r.computed, r.logits_from, done))
            budget -= take
        for chunk in out.chunks:
            request = self.running[chunk.request_id]
            request.computed += len(chunk.tokens) - len(chunk.drafts)
            slot = self.slots[chunk.slot]
            slot.tokens = request.tokens[: request.computed]
            slot.last_used = self._tick()
        return out

    def unwind(self, plan: SchedulerOutput) -> None:
        """The forward of `plan` failed: its chunks' tokens are not in the KV cache after all, so neither their
        requests nor their slots may claim them (an idle slot's tokens are a prefix later requests reuse)."""
        for chunk in plan.chunks:
            request = self.running.get(chunk.request_id)
            if request is not None:
                request.computed = min(request.computed, chunk.start)
            slot = self.slots[chunk.slot]
            slot.tokens = slot.tokens[: chunk.start]

    def _admit(self, out: SchedulerOutput) -> None:
        while self.waiting and (free := self._free_slots()):
            request = self.waiting[0]
            # positions before the first whose logits are needed may come from a cache
            reuse_limit = request.prompt_len - 1 if request.logits_from is None else request.logits_from
            if self._shared_prefix_pending(request, reuse_limit):
                break
            self.waiting.popleft()
            best_free = max(
                free,
                key=lambda i: (
                    _common_prefix(self.slots[i].tokens, request.tokens),
                    self.slots[i].allocated,
                    -self.slots[i].last_used,
                ),
            )
            reuse = min(_common_prefix(self.slots[best_free].tokens, request.tokens), reuse_limit)
            source = None
            for i, slot in enumerate(self.slots):  # a running sequence may hold a longer shared prefix
                if slot.owner is not None:
                    shared = min(_common_prefix(slot.tokens, request.tokens), reuse_limit)
                    if shared > reuse and shared >= self.config.min_prefix_reuse:
                        reuse, source = shared, i
            slot = self.slots[best_free]
            if source is not None:
                out.copies.append((source, best_free, reuse))
            elif slot.tokens and len(slot.tokens) != reuse:
                out.truncations.append((best_free, reuse))
            if reuse:
                self.prefix_hits += 1
                self.prefix_tokens_reused += reuse
            slot.owner, slot.allocated, slot.tokens = request.request_id, True, request.tokens[:reuse]
            slot.last_used = self._tick()
            request.slot, request.computed = best_free, reuse
            self.running[request.request_id] = request
            if best_free in out.releases:
                out.releases.remove(best_free)

    def _shared_prefix_pending(self, request: _Request, reuse_limit: int) -> bool:
        """A running request is still computing a prefix this one shares (config.wait_for_shared_prefix)."""
        need = self.config.wait_for_shared_prefix
        if not need:
            return False
        for other in self.running.values():
            shared = min(_common_prefix(other.tokens[: other.prompt_len], request.tokens), reuse_limit)
            if shared >= need and 2 * shared >= reuse_limit and other.computed < shared:
                return True
        return False

    def _free_slots(self) -> list[int]:
        return [i for i, s in enumerate(self.slots) if s.owner is None]

    def _trim_idle(self) -> list[int]:
        idle = sorted(
            (i for i, s in enumerate(self.slots) if s.owner is None and s.allocated),
            key=lambda i: self.slots[i].last_used,
            reverse=True,
        )
        released = idle[self.config.prefix_cache_slots :]
        for i in released:
            self.slots[i] = _Slot()
        return released

    def _tick(self) -> int:
        self._clock += 1
        return self._clock
