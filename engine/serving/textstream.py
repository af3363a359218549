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
    """

    def __init__(self, stops: Sequence[str]):
        if isinstance(stops, str):
            stops = [stops]
        self.stops = [s for s in dict.fromkeys(stops) if s]  # drop duplicates and "" (it would match everywhere)
        self._prefixes = {s[:i] for s in self.stops for i in range(1, len(s))}
        self._max_hold = max((len(s) - 1 for s in self.stops), default=0)
        self._held = ""
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the text

    def push(self, text: str) -> tuple[str, bool]:
        """Add text; return (text safe to emit now, stopped)."""
        if self.stopped:
            return "", True
        buffer = self._held + text
        best = None  # (end, -len, start, stop)
        for stop in self.stops:
            start = buffer.find(stop)
            if start >= 0:
                key = (start + len(stop), -len(stop), start, stop)
                best = key if best is None or key < best else best
        if best is not None:
            self.stopped, self.matched, self._held = True, best[3], ""
            return buffer[: best[2]], True
        hold = 0
        for k in range(min(self._max_hold, len(buffer)), 0, -1):
            if buffer[-k:] in self._prefixes:
                hold = k
                break
        self._held = buffer[len(buffer) - hold :] if hold else ""
        return buffer[: len(buffer) - hold], False

    def flush(self) -> str:
        """At the end of generation without a stop: the held-back text."""
        held, self._held = self._held, ""
        return "" if self.stopped else held
