"""Answer text as tokens arrive: stop strings cut at the right token, and text that could still
change (half a character, a possible stop string) is held back."""

from __future__ import annotations

from actors.text import TextTracker

PIECES = {0: "Hel", 1: "lo", 2: " wo", 3: "rld", 4: "!", 5: "\xe9"}


def decode(ids):
    text = "".join(PIECES[i] for i in ids)
    return text


def test_no_stops_text_is_the_decoded_tokens():
    t = TextTracker(decode)
    assert not t.update([0, 1]) and t.text == "Hello" and t.stable() == "Hello"


def test_a_stop_string_ends_the_answer_at_the_token_that_completes_it():
    t = TextTracker(decode, ("wor",))
    assert not t.update([0, 1, 2])
    assert t.update([0, 1, 2, 3, 4])
    assert t.tokens == [0, 1, 2, 3] and t.text == "Hello " and t.stopped


def test_text_that_may_become_a_stop_string_is_held_back():
    t = TextTracker(decode, ("lo!",))
    t.update([0, 1])
    assert t.text == "Hello" and t.stable() == "Hel"  # "lo" may be the start of "lo!"
    t.update([0, 1, 2])
    assert t.stable() == "Hello wo"


def test_half_a_character_is_held_back_and_a_rerun_may_start_over():
    split = {1: "caf\ufffd", 2: "caf\xe9"}
    t = TextTracker(lambda ids: split[len(ids)])
    t.update([7])
    assert t.stable() == "caf"
    t.update([7, 8])
    assert t.stable() == "caf\xe9"
    t.update([7])  # the loop restarted and regenerates from the first token
    assert t.tokens == [7] and t.stable() == "caf"
