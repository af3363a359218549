"""Streaming text out of token ids: incremental detokenization that never splits a UTF-8 character, and
stop-string matching that never emits a stop string or the part of one seen so far."""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer

_REPLACEMENT = "\ufffd"  # what decode() shows for an incomplete UTF-8 sequence
_PREFIX_TOKENS = 5  # prompt tokens kept as decode context, as vLLM's INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET


class IncrementalDetokenizer:
    """Text of a growing id sequence, O(1) per token (the prefix/read-offset technique of TGI and vLLM).

    Each push decodes only a short window, ids[prefix_offset:], and emits what it adds beyond the text of
    ids[prefix_offset:read_offset]; decoding from a few tokens back keeps context-dependent decoders
    (SentencePiece's leading-space rule) right. While the window's text ends in U+FFFD the last token
    ended inside a multi-byte character (byte-level BPE splits them), so nothing is emitted until a later
    token completes it.

    Guarantee: "".join(push outputs) + flush() == tokenizer.decode(prefix_ids + pushed ids) minus the
    text of prefix_ids; with no prefix_ids that is exactly tokenizer.decode(pushed ids). Pass the last
    prompt ids as `prefix_ids` so the first generated token decodes in context.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True, prefix_ids: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = list(prefix_ids[-_PREFIX_TOKENS:]) if len(prefix_ids) else []
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self._prefix_text = self._decode(self.prefix_offset, self.read_offset)

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (possibly "")."""
        self.ids.append(int(token_id))
        text = self._decode(self.prefix_offset, len(self.ids))
        if len(text) <= len(self._prefix_text) or text.endswith(_REPLACEMENT):
            return ""  # nothing new yet, or the last character is still incomplete
        new_text = text[len(self._prefix_text) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self._prefix_text = self._decode(self.prefix_offset, self.read_offset)
        self._trim()
        return new_text

    def flush(self) -> str:
        """At the end of generation: whatever is still held back (an incomplete character decodes as U+FFFD,
        exactly as tokenizer.decode shows it)."""
        text = self._decode(self.prefix_offset, len(self.ids))
        new_text = text[len(self._prefix_text) :] if len(text) > len(self._prefix_text) else ""
        self.prefix_offset = self.read_offset = len(self.ids)
        self._prefix_text = ""
        self._trim()
        return new_text

    def _decode(self, start: int, end: int) -> str:
        if start >= end:
            return ""
        return self.tokenizer.decode(self.ids[start:end], skip_special_tokens=self.skip_special_tokens)

    def _trim(self) -> None:
        """Forget ids before the window so memory stays O(1) too."""
        if self.prefix_offset > 64:
            del self.ids[: self.prefix_offset]
            self.read_offset -= self.prefix_offset
            self.prefix_offset = 0


class StopMatcher:
    """Cuts streamed text at the first stop string (OpenAI semantics: the stop string is not emitted).

    Text that could be the start of a stop string is held back until it is ruled out. With several stop
    strings the one that completes first wins (the earliest end; on equal ends the longer one), so the
    result never depends on how the text was split into pushes.

    Linear in the text and the stop strings: each stop string runs a Knuth-Morris-Pratt automaton over the
    text once (its state: the longest prefix of the stop string that the text seen so far ends with), so a
    long stop string costs its length in memory and setup, not its length squared (a 60 kB stop string
    once took 1.8 GB and 3 s here).
    """

    def __init__(self, stops: Sequence[str]):
        if isinstance(stops, str):
            stops = [stops]
        self.stops = [s for s in dict.fromkeys(stops) if s]  # drop duplicates and "" (it would match everywhere)
        self._fail = [_failure(s) for s in self.stops]
        self._state = [0] * len(self.stops)  # per stop: how many of its first characters the text ends with
        self._held = ""  # the text's last max(_state) characters, not emitted yet
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the text

    def push(self, text: str) -> tuple[str, bool]:
        """Add text; return (text safe to emit now, stopped)."""
        if self.stopped:
            return "", True
        buffer = self._held + text
        for end, char in enumerate(text, len(self._held) + 1):  # end: buffer[:end] has been read
            best: str | None = None
            for k, stop in enumerate(self.stops):
                state, fail = self._state[k], self._fail[k]
                while state and stop[state] != char:
                    state = fail[state - 1]
                if stop[state] == char:
                    state += 1
                if state == len(stop):
                    if best is None or len(stop) > len(best):
                        best = stop
                    state = fail[state - 1]
                self._state[k] = state
            if best is not None:
                self.stopped, self.matched, self._held = True, best, ""
                return buffer[: end - len(best)], True
        hold = max(self._state, default=0)
        self._held = buffer[len(buffer) - hold :] if hold else ""
        return buffer[: len(buffer) - hold], False

    def flush(self) -> str:
        """At the end of generation without a stop: the held-back text."""
        held, self._held = self._held, ""
        return "" if self.stopped else held


def _failure(pattern: str) -> list[int]:
    """KMP failure function: fail[i] = the length of the longest proper prefix of pattern[: i + 1] that is also
    its suffix."""
    fail = [0] * len(pattern)
    k = 0
    for i in range(1, len(pattern)):
        while k and pattern[i] != pattern[k]:
            k = fail[k - 1]
        if pattern[i] == pattern[k]:
            k += 1
        fail[i] = k
    return fail
