"""engine.serving.textstream: incremental detokenization over our byte-level BPE, and stop-string matching."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.model.vocab import SPECIALS, build_byte_tokenizer
from engine.serving.textstream import IncrementalDetokenizer, StopMatcher

VOCAB = 300
TOKENIZER = build_byte_tokenizer(VOCAB)
EOT = TOKENIZER.token_to_id("<|eot_id|>")


def stream(ids, skip_special_tokens=True, prefix_ids=()) -> list[str]:
    detok = IncrementalDetokenizer(TOKENIZER, skip_special_tokens=skip_special_tokens, prefix_ids=prefix_ids)
    return [detok.push(i) for i in ids] + [detok.flush()]


def byte_ids(text: str) -> list[int]:
    """One token per UTF-8 byte (ids 0-255 are the bytes), so every multi-byte character is split."""
    return list(text.encode("utf-8"))


# --- IncrementalDetokenizer -------------------------------------------------------------------------


def test_emoji_split_across_four_tokens_is_emitted_whole():
    ids = byte_ids("a😀b")
    assert len(ids) == 6
    assert stream(ids) == ["a", "", "", "", "😀", "b", ""]


def test_cjk_characters_split_across_tokens():
    ids = byte_ids("中文 ok")
    out = stream(ids)
    assert out == ["", "", "中", "", "", "文", " ", "o", "k", ""]
    assert all("\ufffd" not in piece for piece in out)


def test_encoded_text_round_trips():
    text = "héllo wörld — 日本語 👩‍👩‍👧 the end"
    ids = TOKENIZER.encode(text).ids
    assert "".join(stream(ids)) == TOKENIZER.decode(ids) == text


def test_incomplete_character_at_the_end_is_flushed_as_decode_shows_it():
    ids = byte_ids("ok") + list("中".encode())[:2]
    out = stream(ids)
    assert out[:-1] == ["o", "k", "", ""]
    assert out[-1] == "\ufffd" and "".join(out) == TOKENIZER.decode(ids)


def test_invalid_bytes_in_the_middle_match_decode():
    ids = [0x41, 0xE4, 0xE4, 0xB8, 0xAD, 0x80, 0x42]
    assert "".join(stream(ids)) == TOKENIZER.decode(ids)


def test_special_tokens_skipped_or_kept():
    ids = byte_ids("hi") + [EOT] + byte_ids("!")
    assert "".join(stream(ids)) == "hi!"
    assert "".join(stream(ids, skip_special_tokens=False)) == "hi<|eot_id|>!"


def test_prefix_ids_give_context_and_are_not_emitted():
    prompt = TOKENIZER.encode("Once upon a time").ids
    generated = TOKENIZER.encode(" there was").ids
    assert "".join(stream(generated, prefix_ids=prompt)) == " there was"


def test_window_stays_small():
    detok = IncrementalDetokenizer(TOKENIZER)
    text = "abc 中文 😀 " * 200
    out = [detok.push(i) for i in byte_ids(text)]
    assert "".join(out) + detok.flush() == text
    assert len(detok.ids) < 80


ANY_ID = st.integers(min_value=0, max_value=VOCAB - 1)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60))
def test_streamed_text_equals_decode_of_encoded_text(text):
    ids = TOKENIZER.encode(text).ids
    assert "".join(stream(ids)) == TOKENIZER.decode(ids)
    assert "".join(stream(byte_ids(text))) == text


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.one_of(st.integers(0, 255), ANY_ID, st.sampled_from([0xE4, 0xF0, 0x9F, 0x80, 0xB8])), max_size=40),
    st.booleans(),
)
def test_streamed_text_equals_decode_of_any_ids(ids, skip_special_tokens):
    """Arbitrary ids, including invalid UTF-8, specials, merges and padding tokens."""
    out = stream(ids, skip_special_tokens=skip_special_tokens)
    assert "".join(out) == TOKENIZER.decode(ids, skip_special_tokens=skip_special_tokens)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=30), st.text(max_size=30))
def test_streamed_text_with_prefix_equals_decode_difference(prompt, completion):
    prefix = TOKENIZER.encode(prompt).ids
    ids = TOKENIZER.encode(completion).ids
    expected = TOKENIZER.decode(prefix[-5:] + ids)[len(TOKENIZER.decode(prefix[-5:])) :]
    assert "".join(stream(ids, prefix_ids=prefix)) == expected == TOKENIZER.decode(ids)


# --- StopMatcher ------------------------------------------------------------------------------------


def run_stops(stops, chunks):
    matcher = StopMatcher(stops)
    emitted, stopped = [], False
    for chunk in chunks:
        text, stopped = matcher.push(chunk)
        emitted.append(text)
        if stopped:
            break
    return emitted, stopped, matcher.flush()


def test_no_stop_passes_text_through():
    assert run_stops([], ["ab", "c"]) == (["ab", "c"], False, "")
    assert run_stops(["xyz"], ["ab", "c"]) == (["ab", "c"], False, "")


def test_stop_spanning_pushes():
    assert run_stops(["###"], ["ab#", "#", "#cd"]) == (["ab", "", ""], True, "")


def test_held_text_released_when_ruled_out():
    assert run_stops(["###"], ["ab#", "#", "x"]) == (["ab", "", "##x"], False, "")
    assert run_stops(["###"], ["ab#", "#"]) == (["ab", ""], False, "##")  # end without a stop: flush


def test_stop_at_very_start():
    assert run_stops(["STOP"], ["STOP and more"]) == ([""], True, "")
    assert run_stops(["STOP"], ["S", "T", "O", "P"]) == (["", "", "", ""], True, "")


def test_multiple_stops_first_completed_wins():
    assert run_stops(["foo", "bar"], ["xbarfoo"]) == (["x"], True, "")
    assert run_stops(["foo", "bar"], ["xfo", "obar"]) == (["x", ""], True, "")
    matcher = StopMatcher(["foo", "bar"])
    assert matcher.push("1 bar 2") == ("1 ", True)
    assert matcher.matched == "bar"


def test_overlapping_stop_prefixes():
    # "ab" completes before "abc" could: stop at once, emitting nothing of either
    assert run_stops(["abc", "ab"], ["a", "b", "c"]) == (["", ""], True, "")
    # equal ends: the longer stop string wins
    assert run_stops(["bc", "abc"], ["xab", "c"]) == (["x", ""], True, "")
    # "bc" completes before "abcd" could
    assert run_stops(["abcd", "bc"], ["a", "bcd"]) == (["", "a"], True, "")
    # a held prefix of one stop that becomes another stop's start
    assert run_stops(["aab"], ["a", "a", "a", "b"]) == (["", "", "a", ""], True, "")


def test_after_stop_nothing_more():
    matcher = StopMatcher(["\n\n"])
    assert matcher.push("one\n") == ("one", False)
    assert matcher.push("\ntwo") == ("", True)
    assert matcher.push("three") == ("", True)
    assert matcher.flush() == ""


def test_empty_and_duplicate_stops_ignored():
    matcher = StopMatcher(["", "x", "x"])
    assert matcher.stops == ["x"]
    assert matcher.push("abc") == ("abc", False)
    assert StopMatcher("end").stops == ["end"]  # a bare string is one stop, not four


def reference_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    for end in range(1, len(text) + 1):
        hits = [s for s in stops if s and text[:end].endswith(s)]
        if hits:
            return text[: end - len(max(hits, key=len))], True
    return text, False


@settings(max_examples=500, deadline=None)
@given(
    st.text(alphabet="ab#\n", max_size=30),
    st.lists(st.text(alphabet="ab#\n", min_size=1, max_size=4), max_size=3),
    st.lists(st.integers(0, 30), max_size=8),
)
def test_stop_result_does_not_depend_on_chunking(text, stops, cuts):
    cuts = sorted({min(c, len(text)) for c in cuts})
    chunks = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)])]
    emitted, stopped, rest = run_stops(stops, chunks)
    assert ("".join(emitted) + rest, stopped) == reference_stop(text, stops)


def test_detokenizer_and_stop_matcher_together():
    """A stop string split across byte tokens, with a multi-byte character just before it."""
    text = "Answer: 42 — done<END>ignored"
    detok, matcher = IncrementalDetokenizer(TOKENIZER), StopMatcher(["<END>"])
    out = []
    for token in byte_ids(text):
        piece, stopped = matcher.push(detok.push(token))
        out.append(piece)
        if stopped:
            break
    assert "".join(out) == "Answer: 42 — done"
    assert all("\ufffd" not in piece for piece in out)


@pytest.mark.parametrize("special", SPECIALS)
def test_special_token_text_is_not_split(special):
    ids = [TOKENIZER.token_to_id(special)]
    assert stream(ids, skip_special_tokens=False) == [special, ""]
