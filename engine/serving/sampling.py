"""Next-token sampling: penalties, temperature, top-k / top-p / min-p, constrained-decoding masks and
raw logprobs, for one request at a time (each request owns a seeded Sampler, so its samples never depend
on what else is in the batch).

Order (vLLM / llama.cpp): repetition penalty (prompt + generated), frequency/presence penalties
(generated only), allowed mask, temperature, top-k, top-p, min-p. Reported logprobs are raw: the
log_softmax of the model's unmodified logits, as OpenAI and vLLM report them.

Cost per Sampler.sample call at vocab 128256 (`python -m engine.serving.sampling`: median of 300 calls on a
shared 2-core x86 box, numpy 2.4; LLM-like logits, an N(0, 2) bulk plus 20 tokens lifted 8-14 above it;
every case but plain greedy includes the raw logprob of the chosen token):
    greedy 0.02 ms (no logprob asked, so no exp pass; 0.10-0.13 ms with it); temperature 0.8 0.20 ms;
    top_k=40 0.20 ms; top_p=0.9 0.16 ms;
    top_k=40 + top_p=0.95 + min_p=0.05 0.21 ms; top_p + repetition/frequency penalties (1000-token
    prompt, 200 generated) 0.23 ms; greedy + logprobs=5 0.20 ms; top_p + a 70%-dense allowed mask 0.32 ms.
Only the worst case, top_p alone over a nearly flat 128k distribution, sorts the whole vocabulary (~3.4 ms).
How: no full sort (top-k is an in-place partition of a scratch copy; top-p sorts only the tokens above an
adaptive probability floor that already holds top_p of the mass), no 128k cumsum (inverse CDF over
1024-token block sums), one exp pass shared by the logprob and the sample when nothing modifies the
logits, and per-thread scratch buffers: a fresh 0.5-1 MB temporary costs ~0.7 ms in page faults alone.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from engine.errors import InvalidRequestError, SamplingError

# Ollama's sampling defaults (its api.DefaultOptions; llama-cli's temperature and top-k too): what the interfaces
# that mimic Ollama (`ryz run`, the /api routes) use for a field the user leaves out.
OLLAMA_TEMPERATURE, OLLAMA_TOP_K, OLLAMA_TOP_P = 0.8, 40, 0.9
_GREEDY_EPS = 1e-5  # temperatures below this are greedy (vLLM's _SAMPLING_EPS)
_BLOCK = 1024  # inverse-CDF block size for sampling from large candidate sets
_FLOORS = (1e-3, 1e-5, 1e-7)  # top-p candidate floors, relative to the best token's probability


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 => greedy (argmax, lowest id on ties)
    top_k: int = 0  # 0 => off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # HF/llama.cpp: over prompt + generated; divide positive logits, multiply negative
    frequency_penalty: float = 0.0  # OpenAI, over generated only: logit -= count*freq + (count>0)*presence
    presence_penalty: float = 0.0
    seed: int | None = None
    logprobs: int | None = None  # None: no logprobs; k >= 0: the chosen token's logprob plus the top k alternatives

    def validate(self) -> None:
        """Raise InvalidRequestError naming the first out-of-range field (OpenAI's ranges)."""
        _check_range("temperature", self.temperature, 0.0, 2.0, note=" (0 means greedy)")
        _check_range("top_p", self.top_p, 0.0, 1.0, low_open=True, note=" (1 disables it)")
        _check_range("min_p", self.min_p, 0.0, 1.0, note=" (0 disables it)")
        _check_range("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        _check_range("presence_penalty", self.presence_penalty, -2.0, 2.0)
        if (
            not _is_number(self.repetition_penalty)
            or not self.repetition_penalty > 0
            or math.isinf(self.repetition_penalty)
        ):
            raise InvalidRequestError(
                f"repetition_penalty must be a number greater than 0 (1 disables it), got {self.repetition_penalty!r}",
                param="repetition_penalty",
            )
        if not _is_int(self.top_k) or self.top_k < 0:
            raise InvalidRequestError(
                f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}", param="top_k"
            )
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= 20):
            raise InvalidRequestError(
                f"logprobs must be an integer between 0 and 20 (or null for none), got {self.logprobs!r}",
                param="logprobs",
            )
        if self.seed is not None and not _is_int(self.seed):
            raise InvalidRequestError(f"seed must be an integer or null, got {self.seed!r}", param="seed")

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS


@dataclass
class Sample:
    token: int
    logprob: float  # log-probability of `token` under the raw distribution (log_softmax of the unmodified
    # logits); NaN when the params ask for no logprobs (logprobs=None) and the pick is greedy or at a temperature
    # other than 1, which skip that exp pass
    top: list[
        tuple[int, float]
    ]  # top `logprobs` alternatives (id, raw logprob), best first; [] when logprobs is None/0


class Sampler:
    """Samples one request's tokens. `vocab_size` is the number of real tokens: logits may be wider (padded
    embedding rows), and ids >= vocab_size are never sampled nor counted in logprobs (as vLLM slices
    logits to the vocabulary). A Sampler belongs to one request: it caches the penalty counts of
    `prompt_ids` + `generated_ids` and updates them incrementally as `generated_ids` grows."""

    def __init__(self, params: SamplingParams, vocab_size: int):
        params.validate()
        if vocab_size <= 0:
            raise ValueError(f"vocab_size must be positive, got {vocab_size}")
        self.params = params
        self.vocab_size = vocab_size
        self.rng = np.random.default_rng(params.seed)
        self._history = _History(vocab_size) if _needs_history(params) else None

    def sample(
        self,
        logits: np.ndarray,
        prompt_ids: Sequence[int],
        generated_ids: Sequence[int],
        allowed: np.ndarray | None = None,
    ) -> Sample:
        p = self.params
        raw, raw_max, buf = self._raw(logits)
        # One exp pass into buf.e (~0.1-0.15 ms a token at vocab 128256). Without logprobs it is made only where the
        # draw can reuse it as its weights (temperature 1): a greedy pick needs none, and another temperature
        # scales the logits first, so its pass would be a second one (an 8-sequence step of 2B4T: ~0.8 ms).
        wanted = p.logprobs is not None or (not _picks_argmax(p) and p.temperature == 1.0)
        raw_lse = _raw_lse(raw, raw_max, buf) if wanted else None

        x = raw
        if self._history is not None:
            x = self._history.apply(raw, p, prompt_ids, generated_ids, out=buf.x)
        if allowed is not None:
            x = np.add(self._mask(allowed, buf), x, out=buf.x)

        raw_exp = buf.e if x is raw and raw_lse is not None else None
        token = self._choose(x, buf, raw_exp, raw_max if x is raw else float(x.max()))
        return self._report(raw, raw_lse, token, buf)

    def report(self, logits: np.ndarray, token: int) -> Sample:
        """The Sample of a token chosen elsewhere (speculative verification): its raw logprob and the top
        alternatives, as `sample` reports them."""
        raw, raw_max, buf = self._raw(logits)
        return self._report(raw, _raw_lse(raw, raw_max, buf), token, buf)

    def distribution(
        self,
        logits: np.ndarray,
        prompt_ids: Sequence[int],
        generated_ids: Sequence[int],
        allowed: np.ndarray | None = None,
    ) -> np.ndarray:
        """The float64 probabilities over the vocabulary that `sample` draws from with these arguments (after
        penalties, mask, temperature, top-k / top-p / min-p; greedy: all mass on the argmax). Speculative
        decoding's acceptance rule compares drafts against it."""
        raw, raw_max, buf = self._raw(logits)
        x = raw
        if self._history is not None:
            x = self._history.apply(raw, self.params, prompt_ids, generated_ids, out=buf.x)
        if allowed is not None:
            x = np.add(self._mask(allowed, buf), x, out=buf.x)
        out = np.zeros(self.vocab_size, dtype=np.float64)
        ids, weights = self._weights(x, buf, None, float(x.max()))
        if ids is None:  # greedy: weights is the argmax
            out[weights] = 1.0
            return out
        out[ids] = weights
        return out / out.sum()

    def _raw(self, logits: np.ndarray) -> tuple[np.ndarray, float, _Buffers]:
        """The real-vocabulary float32 logits, their max (checked finite) and this thread's scratch buffers."""
        n_vocab = self.vocab_size
        logits = np.asarray(logits)
        if logits.ndim != 1 or logits.shape[0] < n_vocab:
            raise ValueError(f"logits must have shape ({n_vocab},) or wider, got {logits.shape}")
        raw = logits[:n_vocab]
        if raw.dtype != np.float32:
            raw = raw.astype(np.float32)
        raw_max = float(raw.max())
        if not math.isfinite(raw_max):
            raise SamplingError(
                f"the model produced non-finite logits (max {raw_max}); the weights or activations "
                "overflowed — check the model file, or compare with the scalar kernels (RYZ_ISA=scalar)"
            )
        return raw, raw_max, _scratch(n_vocab)

    def _mask(self, allowed: np.ndarray, buf: _Buffers) -> np.ndarray:
        """Checks the allowed-token mask and writes its additive bias (0 allowed, -inf not) to buf.w."""
        n_vocab = self.vocab_size
        allowed = np.asarray(allowed)
        if allowed.dtype != np.bool_ or allowed.ndim != 1 or allowed.shape[0] < n_vocab:
            raise ValueError(f"allowed must be a bool mask of shape ({n_vocab},), got {allowed.dtype} {allowed.shape}")
        allowed = allowed[:n_vocab]
        if not allowed.any():
            raise SamplingError(
                f"the allowed-token mask allows none of the {n_vocab} tokens; the grammar cannot be "
                "continued from here — check the grammar / JSON schema accepts the text generated so far"
            )
        np.take(_MASK_BIAS, allowed.view(np.uint8), out=buf.w)  # 0 where allowed, -inf elsewhere: branch-free
        return buf.w

    def _report(self, raw: np.ndarray, raw_lse: float | None, token: int, buf: _Buffers) -> Sample:
        if raw_lse is None:  # greedy without logprobs: nothing asked for them
            return Sample(token=token, logprob=math.nan, top=[])
        k = self.params.logprobs
        top = _top_logprobs(raw, raw_lse, k, buf) if k else []
        return Sample(token=token, logprob=float(raw[token]) - raw_lse, top=top)

    def _choose(self, x: np.ndarray, buf: _Buffers, raw_exp: np.ndarray | None, m: float) -> int:
        """Pick a token id from the (penalized, masked) logits x, whose max is m."""
        ids, weights = self._weights(x, buf, raw_exp, m)
        if ids is None:
            return int(weights)  # greedy
        assert isinstance(weights, np.ndarray)  # not greedy: weights over the candidate ids
        pos = _draw(weights, self.rng.random())
        return int(ids[pos]) if not isinstance(ids, slice) else pos

    def _weights(
        self, x: np.ndarray, buf: _Buffers, raw_exp: np.ndarray | None, m: float
    ) -> tuple[np.ndarray | slice | None, np.ndarray | int]:
        """The candidates sampling draws from: (ids, unnormalized weights), ids a slice(None) when they are all
        of x in order; greedy: (None, the argmax id). One place for `sample` and `distribution`."""
        p = self.params
        if m == -math.inf:
            raise SamplingError(
                "every allowed token has logit -inf, so nothing can be sampled: the constrained-decoding "
                "mask only allows tokens the model rules out"
            )
        if _picks_argmax(p):
            return None, int(np.argmax(x))  # first maximum: the lowest id on ties

        ids = None  # candidate ids after top-k; None means all (position == id)
        if 0 < p.top_k < x.shape[0]:
            ids = _top_ids(x, p.top_k, buf)
            x = x[ids]
        # Weights relative to the best token, e = p_i / p_max, so min_p compares e directly.
        if ids is None and raw_exp is not None and p.temperature == 1.0:
            e = raw_exp  # x is the raw logits: exp(raw - max) is already computed
        elif ids is not None:
            e = np.exp((x - np.float32(m)) / np.float32(p.temperature))
        else:
            e = np.subtract(x, np.float32(m), out=buf.w)
            if p.temperature != 1.0:
                np.divide(e, np.float32(p.temperature), out=e)
            np.exp(e, out=e)

        keep = None  # positions of e kept by top-p / min-p; None means all
        if p.top_p < 1.0:
            keep = _nucleus(e, p.top_p, p.min_p, buf.b)
        elif p.min_p > 0.0:
            keep = np.flatnonzero(np.greater_equal(e, np.float32(p.min_p), out=buf.b[: e.shape[0]]))
        if keep is None:
            return (ids if ids is not None else slice(None)), e
        return (ids[keep] if ids is not None else keep), e[keep]


def apply_penalties(
    logits: np.ndarray, params: SamplingParams, prompt_ids: Sequence[int], generated_ids: Sequence[int]
) -> np.ndarray:
    """A float32 copy of `logits` after `params`' repetition penalty (prompt + generated ids: positive
    logits divided, negative multiplied) and frequency/presence penalties (generated ids only:
    logit -= count * frequency_penalty + presence_penalty), exactly as Sampler applies them."""
    logits = np.asarray(logits, dtype=np.float32)
    return _History(logits.shape[0]).apply(logits, params, prompt_ids, generated_ids, out=np.empty_like(logits))


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Float64 log_softmax over the last axis, stable for large logits; (vocab,) or (n, vocab)."""
    x = np.asarray(logits, dtype=np.float64)
    m = np.max(x, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    shifted = x - m
    return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))


def token_logprobs(
    logits: np.ndarray, next_ids: Sequence[int], top: int
) -> list[tuple[float, list[tuple[int, float]]]]:
    """For echo / prompt scoring: row i's raw logprob of next_ids[i] and its `top` best alternatives
    (id, logprob), best first. Rows are processed one at a time, so a long prompt never needs an
    (n, vocab) float64 copy."""
    logits = np.asarray(logits)
    if logits.ndim == 1:
        logits = logits[None, :]
    if logits.ndim != 2 or logits.shape[0] != len(next_ids):
        raise ValueError(
            f"token_logprobs needs one logits row per next id: got logits {logits.shape} and {len(next_ids)} ids"
        )
    if top < 0:
        raise ValueError(f"top must be >= 0, got {top}")
    out = []
    for row, next_id in zip(logits, next_ids):
        row64 = row.astype(np.float64)
        m = float(row64.max())
        lse = m + math.log(float(np.exp(row64 - m).sum()))
        out.append((float(row64[next_id]) - lse, _top_logprobs(row64, lse, top)))
    return out


# --- internals -------------------------------------------------------------------------------------


class _Buffers:
    """Per-thread scratch arrays for one vocabulary size. Large temporaries are the real cost at 128k:
    a fresh 0.5-1 MB numpy array is page-faulted in on every call (~0.7 ms), more than the math."""

    def __init__(self, n: int):
        self.e = np.empty(n, dtype=np.float32)  # exp(raw - max)
        self.x = np.empty(n, dtype=np.float32)  # penalized / masked logits
        self.w = np.empty(n, dtype=np.float32)  # partition and exp scratch
        self.b = np.empty(n, dtype=bool)  # comparison results


_local = threading.local()
_MASK_BIAS = np.array([-np.inf, 0.0], dtype=np.float32)


def _scratch(n: int) -> _Buffers:
    cache = getattr(_local, "buffers", None)
    if cache is None:
        cache = _local.buffers = {}
    if n not in cache:
        if len(cache) >= 4:
            cache.clear()
        cache[n] = _Buffers(n)
    return cache[n]


def _picks_argmax(p: SamplingParams) -> bool:
    return p.greedy or p.top_k == 1


def _raw_lse(raw: np.ndarray, raw_max: float, buf: _Buffers) -> float:
    """log-sum-exp of the raw logits; leaves exp(raw - max) in buf.e."""
    np.subtract(raw, np.float32(raw_max), out=buf.e)
    np.exp(buf.e, out=buf.e)
    return raw_max + math.log(float(buf.e.sum(dtype=np.float64)))


def _top_ids(x: np.ndarray, k: int, buf: _Buffers | None = None) -> np.ndarray:
    """Ids of the k largest values of x, ascending; on ties at the boundary the lowest ids win.
    In-place partition of a scratch copy, then one comparison pass: no int64 argpartition of the vocab."""
    n = x.shape[0]
    if k >= n:
        return np.arange(n)
    if buf is not None:
        w = buf.w[:n]
        np.copyto(w, x)
    else:
        w = x.copy()
    w.partition(n - k)
    threshold = w[n - k]
    mask = buf.b[:n] if buf is not None else np.empty(n, dtype=bool)
    ids = np.flatnonzero(np.greater_equal(x, threshold, out=mask))
    if ids.shape[0] > k:  # ties at the threshold: keep everything above it, then the lowest tied ids
        above = ids[x[ids] > threshold]
        tied = ids[x[ids] == threshold][: k - above.shape[0]]
        ids = np.sort(np.concatenate([above, tied]))
    return ids


def _top_logprobs(raw: np.ndarray, lse: float, k: int | None, buf: _Buffers | None = None) -> list[tuple[int, float]]:
    """The k highest raw logprobs, best first, lowest id first on ties."""
    if not k:
        return []
    ids = _top_ids(raw, k, buf)
    order = np.lexsort((ids, -raw[ids].astype(np.float64)))
    return [(int(ids[i]), float(raw[ids[i]]) - lse) for i in order]


def _nucleus(e: np.ndarray, top_p: float, min_p: float, mask: np.ndarray) -> np.ndarray:
    """Positions of e (weights relative to the max, so max(e) == 1) kept by top-p then min-p: the
    smallest best-first prefix whose mass reaches top_p (a token is kept if the mass strictly above it
    is < top_p), cut further to e >= min_p. Sorts only the tokens above a floor that already holds
    top_p of the mass, lowering the floor (and at worst sorting everything) when it does not."""
    n = e.shape[0]
    total = float(e.sum(dtype=np.float64))
    need = top_p * total
    floors = [f for f in _FLOORS if f > min_p] + [min_p]
    for floor in floors:
        cand = np.flatnonzero(np.greater_equal(e, np.float32(floor), out=mask[:n])) if floor > 0 else np.arange(n)
        w = e[cand]
        if floor <= min_p or float(w.sum(dtype=np.float64)) >= need:
            break
    # cand is ascending, so a stable sort keeps the lowest id first on ties (the 128k worst case
    # uses the default sort: a stable argsort of the whole vocabulary costs ~13 ms).
    order = np.argsort(-w, kind="stable") if w.shape[0] <= 8192 else np.argsort(-w)
    return cand[order[: _count_to_mass(w[order], need)]]


def _count_to_mass(w: np.ndarray, need: float) -> int:
    """Length of the shortest prefix of w whose sum reaches `need` (all of w if none does), i.e. the
    tokens whose strictly-better mass is < need. Block sums first when w is long: a float64 cumsum
    of 128k values costs ~1.5 ms."""
    n = w.shape[0]
    if n <= 2 * _BLOCK:
        return min(int(np.searchsorted(np.cumsum(w, dtype=np.float64), need, side="left")) + 1, n)
    sums = np.cumsum(np.add.reduceat(w, np.arange(0, n, _BLOCK), dtype=np.float64))
    b = int(np.searchsorted(sums, need, side="left"))
    if b >= sums.shape[0]:
        return n
    start = b * _BLOCK
    inner = np.cumsum(w[start : start + _BLOCK], dtype=np.float64) + (sums[b - 1] if b else 0.0)
    return min(start + int(np.searchsorted(inner, need, side="left")) + 1, n)


def _draw(w: np.ndarray, r: float) -> int:
    """Index i with probability w[i] / sum(w), by inverse CDF at r in [0, 1); never a zero-weight index."""
    n = w.shape[0]
    if n <= 2 * _BLOCK:
        cum = np.cumsum(w, dtype=np.float64)
        i = int(np.searchsorted(cum, r * cum[-1], side="right"))
    else:  # two-level: block sums, then one block's cumsum (a 128k cumsum costs more than the rest together)
        sums = np.cumsum(np.add.reduceat(w, np.arange(0, n, _BLOCK), dtype=np.float64))
        target = r * sums[-1]
        b = min(int(np.searchsorted(sums, target, side="right")), sums.shape[0] - 1)
        start = b * _BLOCK
        inner = np.cumsum(w[start : start + _BLOCK], dtype=np.float64)
        i = start + int(np.searchsorted(inner, target - (sums[b - 1] if b else 0.0), side="right"))
    if i >= n or not w[i] > 0:  # float rounding at a block or array end: take the nearest positive weight
        positive = np.flatnonzero(w > 0)
        i = int(positive[min(np.searchsorted(positive, min(i, n - 1)), positive.shape[0] - 1)])
    return i


def _needs_history(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0


class _History:
    """Token statistics for penalties, updated incrementally: `seen` ids (prompt + generated) for the
    repetition penalty, per-id `counts` of generated tokens for frequency/presence penalties."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self._reset()

    def _reset(self) -> None:
        self.prompt_key: tuple | None = None
        self.n_generated = 0
        self.last_generated: int | None = None
        self.seen = np.zeros(self.vocab_size, dtype=bool)
        self.seen_ids = np.empty(0, dtype=np.int64)
        self.counts = np.zeros(self.vocab_size, dtype=np.int32)
        self.generated_ids = np.empty(0, dtype=np.int64)  # unique ids with counts > 0

    def update(self, prompt_ids: Sequence[int], generated_ids: Sequence[int]) -> None:
        key = (len(prompt_ids), prompt_ids[0] if len(prompt_ids) else None, prompt_ids[-1] if len(prompt_ids) else None)
        n = len(generated_ids)
        if (
            key != self.prompt_key
            or n < self.n_generated
            or (self.n_generated and generated_ids[self.n_generated - 1] != self.last_generated)
        ):
            self._reset()  # a different request or a rolled-back sequence: rebuild from scratch
            self.prompt_key = key
            prompt = self._checked(prompt_ids, "prompt_ids")
            self.seen_ids = np.unique(prompt)
            self.seen[self.seen_ids] = True
        if n == self.n_generated:
            return
        new = self._checked(generated_ids[self.n_generated :], "generated_ids")
        fresh = np.unique(new[self.counts[new] == 0])
        np.add.at(self.counts, new, 1)
        if fresh.size:
            self.generated_ids = np.concatenate([self.generated_ids, fresh])
            unseen = fresh[~self.seen[fresh]]
            self.seen[unseen] = True
            self.seen_ids = np.concatenate([self.seen_ids, unseen])
        self.n_generated = n
        self.last_generated = int(generated_ids[n - 1])

    def _checked(self, ids: Sequence[int], name: str) -> np.ndarray:
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            raise ValueError(f"{name} holds token ids outside [0, {self.vocab_size}): min {arr.min()}, max {arr.max()}")
        return arr

    def apply(
        self,
        raw: np.ndarray,
        p: SamplingParams,
        prompt_ids: Sequence[int],
        generated_ids: Sequence[int],
        out: np.ndarray,
    ) -> np.ndarray:
        self.update(prompt_ids, generated_ids)
        x = out
        np.copyto(x, raw)
        if p.repetition_penalty != 1.0 and self.seen_ids.size:
            v = x[self.seen_ids]
            x[self.seen_ids] = np.where(
                v > 0, v / np.float32(p.repetition_penalty), v * np.float32(p.repetition_penalty)
            )
        if (p.frequency_penalty or p.presence_penalty) and self.generated_ids.size:
            g = self.generated_ids
            x[g] -= (self.counts[g] * p.frequency_penalty + p.presence_penalty).astype(np.float32)
        return x


def _is_number(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _check_range(name: str, value, low: float, high: float, *, low_open: bool = False, note: str = "") -> None:
    ok = _is_number(value) and (low < value if low_open else low <= value) and value <= high  # NaN fails
    if not ok:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise InvalidRequestError(f"{name} must be a number in {interval}{note}, got {value!r}", param=name)


def _bench(n: int = 300) -> dict[str, float]:
    """Median milliseconds per Sampler.sample call at vocab 128256 on LLM-like logits."""
    import time

    vocab = 128256
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal(vocab) * 2).astype(np.float32)
    logits[rng.choice(vocab, 20, replace=False)] += np.linspace(14, 8, 20, dtype=np.float32)
    flat = (rng.standard_normal(vocab) * 0.5).astype(np.float32)
    prompt = rng.integers(0, vocab, 1000).tolist()
    generated = rng.integers(0, vocab, 200).tolist()
    mask = rng.random(vocab) < 0.7
    cases = {
        "greedy": (SamplingParams(temperature=0), logits),
        "temperature=0.8": (SamplingParams(temperature=0.8), logits),
        "top_k=40": (SamplingParams(top_k=40), logits),
        "top_p=0.9": (SamplingParams(top_p=0.9), logits),
        "top_k=40,top_p=0.95,min_p=0.05": (SamplingParams(top_k=40, top_p=0.95, min_p=0.05), logits),
        "top_p=0.9+penalties": (SamplingParams(top_p=0.9, repetition_penalty=1.1, frequency_penalty=0.5), logits),
        "greedy+logprobs=5": (SamplingParams(temperature=0, logprobs=5), logits),
        "top_p=0.9+allowed mask (70% allowed)": (SamplingParams(top_p=0.9), logits),
        "worst: top_p=0.9 on flat logits": (SamplingParams(top_p=0.9), flat),
    }
    out = {}
    for name, (params, row) in cases.items():
        sampler = Sampler(params, vocab)
        allowed = mask if "mask" in name else None
        sampler.sample(row, prompt, generated, allowed)
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            sampler.sample(row, prompt, generated, allowed)
            times.append(time.perf_counter() - t0)
        out[name] = 1e3 * float(np.median(times))
    return out


if __name__ == "__main__":
    for case, ms in _bench().items():
        print(f"{case:40s} {ms:.3f} ms")
