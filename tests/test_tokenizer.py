"""The bundled r50k tokenizer: exact encodings, display strings, streaming decode, bad files."""

import os
import shutil

import pytest
from hypothesis import given, settings, strategies as st

from refcomplete.tokenizer import (EOT_ID, R50K_SHA256, StreamDecoder, Tokenizer, TokenizerFileError,
                                   display, get_tokenizer, load_ranks)
from refcomplete._paths import weights_dir

RANKS = weights_dir() / "r50k_base.tiktoken"


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer()


def test_known_encodings(tok):
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode(" the") == [262]
    assert tok.encode("<|endoftext|>") == [EOT_ID]
    assert tok.encode("a<|endoftext|>b") == [64, 50256, 65]
    assert tok.n_vocab == 50257


def test_ranks_match_tiktoken_loader(monkeypatch):
    import tiktoken.load

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # no cache: read the local file only
    assert tiktoken.load.load_tiktoken_bpe(str(RANKS), expected_hash=R50K_SHA256) == load_ranks(RANKS)


def test_token_bytes_are_tiktokens(tok):
    # our id -> bytes table is the ranks inverted: every id as tiktoken decodes it
    assert [tok.token_bytes(i) for i in range(tok.n_vocab)] == \
        [tok.encoding.decode_single_token_bytes(i) for i in range(tok.n_vocab)]


def test_display_strings(tok):
    ids = tok.encode("\u2019")                      # right single quote: one char, two tokens
    assert ids == [447, 247]
    assert [tok.display(i) for i in ids] == ["bytes:\\xe2\\x80", "bytes:\\x99"]
    assert tok.display(EOT_ID) == "<|endoftext|>"
    assert tok.display(15496) == "Hello"
    assert display(b"a\xff ") == "bytes:a\\xff "


def test_decode_invalid_bytes_as_replacement(tok):
    assert tok.decode([447]) == "\ufffd"
    assert tok.decode([447, 247]) == "\u2019"


def test_stream_decoder_holds_split_characters(tok):
    dec = tok.stream_decoder()
    assert dec.feed(447) == ""
    assert dec.feed(247) == "\u2019"
    dec = StreamDecoder(tok)
    assert dec.feed(447) == "" and dec.flush() == "\ufffd"


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=40))
def test_roundtrip_and_stream_equals_decode(text):
    tok = get_tokenizer()
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    dec = tok.stream_decoder()
    assert "".join(dec.feed(i) for i in ids) + dec.flush() == text


def test_missing_and_corrupted_files_name_the_file(tmp_path):
    with pytest.raises(TokenizerFileError, match="missing.tiktoken"):
        Tokenizer(tmp_path / "missing.tiktoken")
    bad = tmp_path / "bad.tiktoken"
    shutil.copy(RANKS, bad)
    with open(bad, "r+b") as f:
        f.seek(100)
        f.write(b"X")
    with pytest.raises(TokenizerFileError, match="bad.tiktoken.*corrupted"):
        Tokenizer(bad)


def test_no_network_or_cache_use(tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "cache"))
    Tokenizer(RANKS)
    assert not (tmp_path / "cache").exists()


def test_carried_counts_replacement_of_broken_characters(tok):
    dec = tok.stream_decoder()
    assert dec.carried(447) == 0 and dec.feed(447) == ""           # first half of '\u2019'
    assert dec.carried(247) == 0                                   # completes it: starts before
    dec = tok.stream_decoder()
    dec.feed(447)
    victim = tok.encode(" victim")[0]
    assert dec.carried(victim) == 1                                # breaks it: one U+FFFD is earlier
    assert dec.feed(victim) == "\ufffd victim"
