"""Speculative decoding: drafters that guess the next tokens cheaply, and the rule that decides which guesses the
target model's own distribution accepts.

A speculating request feeds, in one engine step, its last token plus k drafted tokens to the batched forward (with
everybody else's tokens) and gets the target's logits after each of them. `accept_drafts` then walks the drafts:
draft i is kept with probability min(1, p_i(x) / q_i(x)) (Leviathan et al. 2023, Chen et al. 2023); at the first
rejection a token is drawn from normalize(max(0, p_i - q_i)) instead, and after k acceptances a bonus token from
p_k. The tokens emitted are distributed exactly as without speculation. p_i is the request's own sampling
distribution (engine/serving/sampling.py `Sampler.distribution`: penalties, temperature, top-k/p, min-p) with the
drafts before i counted as generated; greedy makes it a point mass, so greedy output is the same token for token.

Every drafter here is deterministic (q = a point mass on its draft): a draft x is kept with probability p(x), and
on rejection the token comes from p with x removed. Drafters:

* `PromptLookupDrafter` (method "ngram"): the longest n-gram (n from max to min) ending the sequence that occurred
  before in the prompt or the output; proposes the tokens that followed its latest occurrence (prompt lookup, as in
  transformers' `prompt_lookup_num_tokens` and vLLM's ngram proposer). Free, and strong when the answer repeats
  the prompt (code edits, rewrites, extraction).
* `DraftModelDrafter` (method "draft"): a smaller model with the same tokenizer, run greedily for k tokens on its
  own native context; its KV is cut back to what the target kept at the next proposal.
* `ReplayDrafter` (method "replay", benchmarks and tests): proposes a recorded continuation.

`DraftLength` adapts each request's draft length to its own acceptance (`SpecAdapt`, RYZ_SPEC_ADAPT*): a
verification step of k tokens costs more than a 1-token step, so a request whose drafts keep being rejected
drafts less, then pauses and only probes now and then. It changes which drafts are proposed, never the rule.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np

from engine.errors import InvalidRequestError
from engine.serving.sampling import _draw

METHODS = ("off", "ngram", "draft")  # what requests and settings may ask for; "replay" is the benchmarks' own
MAX_SPEC_TOKENS = 16
PROBE_TOKENS = 1  # draft length of the probe a paused request makes every `probe_every` plain steps


@dataclass(frozen=True)
class SpecAdapt:
    """The adaptive draft-length policy (`DraftLength`); the defaults are the RYZ_SPEC_ADAPT* settings' defaults.
    `low` / `high` come from the measured cost of a k-token verification step (1.08x a 1-token step at k=2,
    1.37x at k=4 on the 2B4T shape): at a per-token acceptance a, a step of k drafts emits (1 - a^(k+1)) / (1 - a)
    tokens on average, 1.43 at a = 0.3 and k = 4, about its cost, so k is halved below 0.3; at 0.6 a step of 4
    emits 2.3 tokens for 1.37x, so k is doubled back (up to the request's num_tokens) from there."""

    on: bool = True  # False: always draft num_tokens (the behaviour before adaptation)
    warmup: int = 4  # verification steps at full k before k is first lowered (and again after a resume)
    window: int = 16  # the acceptance rate is over the request's last `window` drafted tokens
    low: float = 0.3  # rate below it (after the warm-up): k halved; from 1 to 0 = drafting paused
    high: float = 0.6  # rate at or above it: k doubled, up to num_tokens
    probe_every: int = 16  # a paused request drafts PROBE_TOKENS after this many plain steps; accepted: resumed


@dataclass(frozen=True)
class SpecConfig:
    """How one request speculates. `replay`: the continuation a ReplayDrafter proposes (method "replay");
    `adapt`: how its draft length follows its acceptance (the server's, RYZ_SPEC_ADAPT*)."""

    method: str = "off"
    num_tokens: int = 4
    ngram_min: int = 1
    ngram_max: int = 3
    replay: tuple[int, ...] = ()
    adapt: SpecAdapt = SpecAdapt()

    @property
    def on(self) -> bool:
        return self.method != "off"

    def validate(self) -> None:
        if self.method not in (*METHODS, "replay"):
            raise InvalidRequestError(
                f"speculative.method must be one of {', '.join(METHODS)}, got {self.method!r}", param="speculative"
            )
        for name, value, low in (("num_tokens", self.num_tokens, 1), ("ngram_min", self.ngram_min, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= MAX_SPEC_TOKENS:
                raise InvalidRequestError(
                    f"speculative.{name} must be an integer in [{low}, {MAX_SPEC_TOKENS}], got {value!r}",
                    param="speculative",
                )
        if (
            not isinstance(self.ngram_max, int)
            or isinstance(self.ngram_max, bool)
            or not (self.ngram_min <= self.ngram_max <= MAX_SPEC_TOKENS)
        ):
            raise InvalidRequestError(
                f"speculative.ngram_max must be an integer in [ngram_min={self.ngram_min}, {MAX_SPEC_TOKENS}], "
                f"got {self.ngram_max!r}",
                param="speculative",
            )


def spec_from_settings(settings) -> SpecConfig:
    """The server's default (RYZ_SPECULATIVE, RYZ_SPEC_TOKENS, RYZ_SPEC_NGRAM_MIN / _MAX, RYZ_SPEC_ADAPT*)."""
    adapt = SpecAdapt(
        settings.spec_adapt,
        settings.spec_adapt_warmup,
        settings.spec_adapt_window,
        settings.spec_adapt_low,
        settings.spec_adapt_high,
        settings.spec_adapt_probe_every,
    )
    config = SpecConfig(
        settings.speculative, settings.spec_tokens, settings.spec_ngram_min, settings.spec_ngram_max, adapt=adapt
    )
    config.validate()
    return config


def parse_spec(value: Any, default: SpecConfig) -> SpecConfig:
    """A request's `speculative` field: null (the server's default), false / "off", true (the default's method,
    prompt lookup when the server's is off), a method name, or {"method", "num_tokens", "ngram_min", "ngram_max"}
    (missing keys from the default). InvalidRequestError names what is wrong."""
    if value is None:
        return default
    if value is False:
        return replace(default, method="off")
    if value is True:
        value = {"method": default.method if default.on else "ngram"}
    if isinstance(value, str):
        value = {"method": value}
    if not isinstance(value, dict):
        raise InvalidRequestError(
            f"speculative must be a boolean, a method name or an object, got {type(value).__name__}",
            param="speculative",
        )
    unknown = set(value) - {"method", "num_tokens", "ngram_min", "ngram_max"}
    if unknown:
        raise InvalidRequestError(
            f"speculative has unknown fields {sorted(unknown)}; it takes method, num_tokens, ngram_min, ngram_max",
            param="speculative",
        )
    method = value.get("method", default.method if default.on else "ngram")
    if method == "replay" or method not in METHODS:
        raise InvalidRequestError(
            f"speculative.method must be one of {', '.join(METHODS)}, got {method!r}", param="speculative"
        )
    config = replace(  # the server's adaptation policy (and replay) carried over
        default,
        method=method,
        num_tokens=value.get("num_tokens", default.num_tokens),
        ngram_min=value.get("ngram_min", default.ngram_min),
        ngram_max=value.get("ngram_max", max(default.ngram_max, value.get("ngram_min", default.ngram_min))),
    )
    config.validate()
    return config


# --- the acceptance rule -------------------------------------------------------------------------------------


def accept_drafts(
    p_of: Callable[[int], np.ndarray],
    drafts: Sequence[int],
    rng: np.random.Generator,
    q_of: Callable[[int], np.ndarray] | None = None,
) -> tuple[int, int]:
    """The standard speculative-sampling rule. p_of(i): the target's probabilities at draft position i (i = 0..k,
    asked for in order and only as far as needed, so position i may count drafts[:i] as generated); q_of(i): the
    drafter's, None for a deterministic drafter (a point mass on its draft). Returns (drafts accepted, the token that
    follows them: the replacement drawn at the first rejection, or the bonus token from p_of(k))."""
    for i, x in enumerate(drafts):
        p = p_of(i)
        q = None if q_of is None else q_of(i)
        qx = 1.0 if q is None else float(q[x])
        if qx > 0 and rng.random() * qx < p[x]:  # accept with probability min(1, p(x) / q(x))
            continue
        if q is None:
            residual = p.copy()
            residual[x] = 0.0
        else:
            residual = np.maximum(p - q, 0.0)
        if not residual.sum() > 0:  # p == q up to rounding: nothing left to correct
            residual = p
        return i, int(_draw(residual, rng.random()))
    return len(drafts), int(_draw(p_of(len(drafts)), rng.random()))


# --- the draft length ----------------------------------------------------------------------------------------


class DraftLength:
    """One request's draft length k, adapted to its running acceptance (`SpecAdapt`):

    * k starts at num_tokens. Each verification step adds its drafts to a window of the last `window` drafted
      tokens (accepted or not; drafts after the first rejection count as rejected, like accepted / drafted).
    * rate >= `high`: k doubles, up to num_tokens. After `warmup` verification steps, rate < `low`: k halves; from
      1 it goes to 0, drafting paused (the window cleared).
    * Paused, the request decodes plainly (`paused_steps` counts those steps); after `probe_every` plain steps it
      drafts PROBE_TOKENS. Accepted: drafting resumes at that k with a fresh window and warm-up, so a request whose
      text starts repeating gets speculation back (and k back up while the rate stays high). Rejected: the count
      of plain steps starts over.
    """

    def __init__(self, num_tokens: int, adapt: SpecAdapt = SpecAdapt()):
        self.k_max, self.adapt, self.k = num_tokens, adapt, num_tokens
        self.window: deque[bool] = deque(maxlen=max(1, adapt.window))
        self.steps = 0  # verification steps since the start or the last resume
        self.plain = 0  # plain steps since drafting was paused (or the last failed probe)
        self.paused_steps = 0

    @property
    def paused(self) -> bool:
        """Drafting paused and no probe due: this step decodes plainly."""
        return self.k == 0 and self.plain < self.adapt.probe_every

    def next_k(self) -> int:
        """How many tokens to draft this step: k, a probe, or 0 (paused)."""
        if self.k > 0:
            return self.k
        return 0 if self.paused else min(PROBE_TOKENS, self.k_max)

    def plain_step(self) -> None:
        """The request decoded a step without drafts while paused."""
        self.plain += 1
        self.paused_steps += 1

    def verified(self, drafted: int, accepted: int) -> None:
        """A verification step of `drafted` tokens kept `accepted` of them."""
        if not self.adapt.on or drafted <= 0:
            return
        if self.k == 0:  # a probe
            if accepted == drafted:
                self.k, self.steps = drafted, 0
                self.window.clear()
                self.window.extend([True] * accepted)
            else:
                self.plain = 0
            return
        self.window.extend([True] * accepted + [False] * (drafted - accepted))
        self.steps += 1
        rate = sum(self.window) / len(self.window)
        if rate >= self.adapt.high:
            self.k = min(self.k_max, 2 * self.k)
        elif rate < self.adapt.low and self.steps >= self.adapt.warmup:
            self.k //= 2
            if self.k == 0:
                self.plain = 0
                self.window.clear()


# --- drafters --------------------------------------------------------------------------------------------------


class Drafter(Protocol):
    def propose(self, tokens: Sequence[int], k: int) -> list[int]:
        """Up to k tokens guessed to follow `tokens` (the request's prompt and output so far); [] for no guess."""
        ...

    def close(self) -> None: ...


class PromptLookupDrafter:
    def __init__(self, ngram_min: int = 1, ngram_max: int = 3):
        self.ngram_min, self.ngram_max = ngram_min, ngram_max

    def propose(self, tokens: Sequence[int], k: int) -> list[int]:
        seq = np.asarray(tokens, dtype=np.int64)
        n_tokens = seq.shape[0]
        for n in range(min(self.ngram_max, n_tokens - 1), self.ngram_min - 1, -1):
            windows = np.lib.stride_tricks.sliding_window_view(seq[:-1], n)  # n-grams with a token after them
            hits = np.flatnonzero((windows == seq[-n:]).all(axis=1))
            if hits.size:
                start = int(hits[-1]) + n  # the latest occurrence: nearest context, as an edit goes on
                return seq[start : start + k].tolist()
        return []

    def close(self) -> None:
        pass


class ReplayDrafter:
    """Proposes `continuation` (e.g. the model's own recorded greedy output): every draft is accepted while the
    output follows it, the machinery's ceiling."""

    def __init__(self, prompt_len: int, continuation: Sequence[int]):
        self.prompt_len, self.continuation = prompt_len, list(continuation)

    def propose(self, tokens: Sequence[int], k: int) -> list[int]:
        done = len(tokens) - self.prompt_len
        return self.continuation[done : done + k]

    def close(self) -> None:
        pass


class DraftModel:
    """A smaller model sharing the target's tokenizer, with one sequence slot per speculating request.
    `model`: a NativeModel (forward_batch, truncate_seq, release_seq, max_seqs); `tokenizer`: its ModelTokenizer."""

    def __init__(self, model, tokenizer, target_vocab: int, target_tokenizer, name: str = "draft model"):
        check_same_vocab(tokenizer, target_tokenizer, model.hp.vocab, target_vocab, name)
        self.model, self.vocab, self.name = model, target_vocab, name
        self._free = list(range(model.max_seqs))

    def drafter(self) -> DraftModelDrafter:
        return DraftModelDrafter(self)

    def close(self) -> None:
        if hasattr(self.model, "close"):
            self.model.close()


def check_same_vocab(draft_tok, target_tok, draft_vocab: int, target_vocab: int, name: str) -> None:
    """A draft model must speak the target's token ids: same vocabulary size, same token strings, same stop ids."""
    if draft_vocab != target_vocab:
        raise ValueError(
            f"the {name} has a vocabulary of {draft_vocab} tokens, the served model {target_vocab}: a draft model "
            "must share the served model's tokenizer"
        )
    if draft_tok.tokenizer.get_vocab() != target_tok.tokenizer.get_vocab() or draft_tok.stop_ids != target_tok.stop_ids:
        raise ValueError(
            f"the {name}'s tokenizer differs from the served model's (token strings or stop ids): a draft model "
            "must share the served model's tokenizer"
        )


@dataclass
class DraftModelDrafter:
    """One request's view of a DraftModel: a slot taken at the first proposal and the tokens its KV holds."""

    owner: DraftModel
    slot: int | None = None
    cached: list[int] = field(default_factory=list)

    def propose(self, tokens: Sequence[int], k: int) -> list[int]:
        owner, model = self.owner, self.owner.model
        if self.slot is None:
            if not owner._free:
                return []  # more speculating requests than draft slots: this one decodes plainly this step
            self.slot = owner._free.pop()
            model.truncate_seq(self.slot, 0)
        tokens = list(tokens)
        keep = 0
        limit = min(len(self.cached), len(tokens) - 1)  # the last token is fed again: its logits are needed
        while keep < limit and self.cached[keep] == tokens[keep]:
            keep += 1
        room = model.max_positions - len(tokens)
        k = min(k, room)
        if k <= 0:
            return []
        model.truncate_seq(self.slot, keep)  # the rejected drafts (and anything past the shared prefix) go
        feed = tokens[keep:]
        drafts: list[int] = []
        while True:
            logits = model.forward_batch(np.asarray(feed, np.int32), np.full(len(feed), self.slot, np.int32))
            drafts.append(int(np.argmax(logits[-1][: owner.vocab])))
            if len(drafts) == k:
                break
            feed = drafts[-1:]
        self.cached = tokens + drafts[:-1]
        return drafts

    def close(self) -> None:
        if self.slot is not None:
            try:
                self.owner.model.release_seq(self.slot)
            finally:
                self.owner._free.append(self.slot)
                self.slot, self.cached = None, []


def make_drafter(config: SpecConfig, prompt_len: int, draft_model: DraftModel | None) -> Drafter | None:
    if config.method == "ngram":
        return PromptLookupDrafter(config.ngram_min, config.ngram_max)
    if config.method == "replay":
        return ReplayDrafter(prompt_len, config.replay)
    if config.method == "draft":
        if draft_model is None:
            raise InvalidRequestError(
                "speculative method 'draft' needs a draft model: start the server with RYZ_SPEC_DRAFT_MODEL "
                "(ryz generate: --draft-model)",
                param="speculative",
            )
        return draft_model.drafter()
    return None
