"""Stop strings, holdback and UTF-8 completion as small pure functions (SEMANTICS 7)."""

from hypothesis import given, settings, strategies as st

from refcomplete.stop import RowText, cut, find_stop, holdback, releasable
from refcomplete.tokenizer import get_tokenizer

TOK = get_tokenizer()


def test_holdback_is_longest_stop_minus_one():
    assert holdback(()) == 0
    assert holdback(("a", "abcd", "xy")) == 3


def test_find_stop_earliest_match_of_any():
    assert find_stop("one two three", ("three", "two")) == 4
    assert find_stop("one two", ("zzz",)) is None
    assert find_stop("abab", ("ab",), start=1) == 2


def test_cut_finds_stops_spanning_the_boundary():
    assert cut("Hello wor", "ld!", ("world",)) == ("Hello ", True)
    assert cut("Hello", " there", ("xyz",)) == ("Hello there", False)
    # the earliest match wins, whichever stop it is
    assert cut("a", "bcYdX", ("X", "Y")) == ("abc", True)


def test_releasable_never_goes_back():
    assert releasable(10, 3, 4, finished=False) == 6
    assert releasable(5, 3, 4, finished=False) == 3
    assert releasable(5, 3, 4, finished=True) == 5


def _push_all(tokens, stops):
    row, shown, records, stopped = RowText(TOK, stops, base=0), "", [], False
    for i, t in enumerate(tokens):
        delta, ready, stopped = row.push(t, i, end=i == len(tokens) - 1)
        shown += delta
        records += ready
        if stopped:
            break
    return row, shown, records, stopped


def test_utf8_split_token_is_held_until_complete():
    quote = TOK.encode("\u2019")
    assert quote == [447, 247]
    row = RowText(TOK, (), base=0)
    assert row.push(447, "a")[:2] == ("", [(0, "a")])      # half a character: nothing shown
    assert row.push(247, "b", end=True)[:2] == ("\u2019", [(0, "b")])


def test_unfinished_utf8_at_the_end_becomes_replacement_char():
    row, shown, _, _ = _push_all([447], ())
    assert shown == "\ufffd" == TOK.decode([447])


def test_stop_token_offset_is_clamped_to_end_of_text():
    tokens = TOK.encode("Hi there. Bye")
    row, shown, records, stopped = _push_all(tokens, (". B",))
    assert stopped and shown == "Hi there"
    assert [TOK.display(t) for t in tokens] == ["Hi", " there", ".", " Bye"]
    assert records == [(0, 0), (2, 1), (8, 2), (8, 3)]   # " Bye" starts at 9: clamped to 8


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet="ab’ \n.x", min_size=1, max_size=30),
       st.lists(st.text(alphabet="ab’ .", min_size=1, max_size=4), min_size=1, max_size=4))
def test_stream_never_shows_what_the_final_text_lacks(text, stops):
    tokens = TOK.encode(text)
    row = RowText(TOK, tuple(stops), base=0)
    shown = ""
    for i, t in enumerate(tokens):
        delta, _, stopped = row.push(t, i, end=i == len(tokens) - 1)
        shown += delta
        assert row.text.startswith(shown)                   # nothing shown is ever cut
        assert not any(s in shown for s in stops)
        if stopped:
            break
    full = TOK.decode(tokens)
    assert shown == row.text and full.startswith(shown)
    if stopped:      # cut exactly at the start of a stop string
        assert any(full[len(shown):].startswith(s) for s in stops)
    else:
        assert shown == full and find_stop(full, tuple(stops)) is None
