"""Tests for jaxattn.corpus.tokenizer: char, word and ids tokenizers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxattn.corpus import (
    UNK,
    Document,
    Tokenizer,
    build_tokenizer,
    corpus_from_documents,
    load_corpus,
    read_documents,
)
from jaxattn.corpus import corpus as C
from jaxattn.errors import JaxattnError
from tests.corpus.helpers import docs_of, unchecked, write

# --------------------------------------------------------------------------- #
# Char level
# --------------------------------------------------------------------------- #


def test_char_tokenizer_vocab_and_round_trip() -> None:
    text = "Hello, wörld! ☃ 𝄞\ttab\n"
    tok = build_tokenizer(docs_of(text), "char")
    assert tok.kind == "char" and tok.unk_id is None
    assert tok.vocab == tuple(sorted(set(text)))
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and ids.shape == (len(text),)
    assert tok.decode(ids) == text
    assert tok.decode(list(ids)) == text


@settings(max_examples=50, deadline=None)
@given(st.text(min_size=1, max_size=200))
def test_char_round_trip_any_text(text: str) -> None:
    tok = build_tokenizer([Document("x", text)], "char")
    assert tok.decode(tok.encode(text)) == text


def test_char_tokenizer_max_vocab_adds_unk() -> None:
    tok = build_tokenizer(docs_of("aaaabbbcc d"), "char", max_vocab=2)
    assert tok.vocab == ("a", "b", UNK) and tok.unk_id == 2
    np.testing.assert_array_equal(tok.encode("abcz"), [0, 1, 2, 2])
    tie = build_tokenizer(docs_of("ba"), "char", max_vocab=1)  # tie broken by the character
    assert tie.vocab == ("a", UNK)


def test_char_unseen_characters() -> None:
    tok = build_tokenizer(docs_of("abc"), "char")
    with pytest.raises(JaxattnError, match="not in the char tokenizer's vocabulary.*'z'"):
        tok.encode("abz")
    ext = tok.with_unk()
    assert ext.vocab == ("a", "b", "c", UNK) and ext.unk_id == 3
    assert ext.with_unk() is ext
    np.testing.assert_array_equal(ext.encode("abz"), [0, 1, 3])
    # A held-out corpus with unseen characters does not crash: <unk> is added.
    with pytest.warns(UserWarning, match="mapped to <unk>"):
        held = corpus_from_documents([Document("h", "cxa")], tok, source="held")
    assert held.tokenizer == ext
    np.testing.assert_array_equal(held.tokens, [2, 3, 0])


# --------------------------------------------------------------------------- #
# Word level
# --------------------------------------------------------------------------- #


def test_word_tokenizer_topk_and_unk() -> None:
    text = "the cat sat. The cat ran! the dog"
    tok = build_tokenizer(docs_of(text), "word", max_vocab=3)
    # counts: the 2, cat 2, . 1, The 1, sat 1, ran 1, ! 1, dog 1 -> ties by token string
    assert tok.vocab == ("cat", "the", "!", UNK)
    assert tok.unk_id == 3 and tok.vocab_size == 4
    np.testing.assert_array_equal(tok.encode("the cat flew !"), [1, 0, 3, 2])
    assert tok.decode(tok.encode("the cat!")) == "the cat !"


def test_word_tokenizer_defaults_and_lowercase() -> None:
    docs = docs_of("Hello, World. hello world")
    tok = build_tokenizer(docs, "word")
    assert set(tok.vocab) == {"Hello", "hello", "World", "world", ",", ".", UNK}
    assert tok.vocab[-1] == UNK and not tok.lowercase
    low = build_tokenizer(docs, "word", lowercase=True)
    assert low.vocab == ("hello", "world", ",", ".", UNK)
    np.testing.assert_array_equal(low.encode("HELLO there"), [0, 4])
    c = corpus_from_documents(docs, low, source="s")
    assert c.num_tokens == 6 and c.vocab_size == 5


def test_word_load_corpus_max_vocab(tmp_path: Path) -> None:
    write(tmp_path / "a.txt", "a a a b b c d e")
    c = load_corpus(str(tmp_path), tokenizer="word", max_vocab=2, progress=False)
    assert c.tokenizer.vocab == ("a", "b", UNK)
    np.testing.assert_array_equal(c.tokens, [0, 0, 0, 1, 1, 2, 2, 2])


# --------------------------------------------------------------------------- #
# Errors, serialisation, ids level
# --------------------------------------------------------------------------- #


def test_tokenizer_errors() -> None:
    docs = docs_of("abc")
    with pytest.raises(JaxattnError, match="unknown tokenizer 'bpe'"):
        build_tokenizer(docs, "bpe")
    with pytest.raises(JaxattnError, match="unknown tokenizer 'bpe'"):
        C._resolve_tokenizer(docs, "bpe", None, False)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(JaxattnError, match="max_vocab"):
            unchecked(build_tokenizer)(docs, "word", max_vocab=bad)
    with pytest.raises(JaxattnError, match="no text"):
        build_tokenizer([], "char")
    with pytest.raises(JaxattnError, match="no word"):
        build_tokenizer(docs_of("   "), "word")
    tok = build_tokenizer(docs, "char")
    with pytest.raises(JaxattnError, match="token id 3 out of range"):
        tok.decode([0, 3])
    with pytest.raises(JaxattnError, match="token id -1"):
        tok.decode(np.array([-1]))
    with pytest.raises(JaxattnError, match="integers"):
        tok.decode(np.array([0.5]))
    with pytest.raises(JaxattnError, match="unk_id"):
        Tokenizer(kind="char", vocab=("a", "b"), unk_id=1)
    with pytest.raises(JaxattnError, match="single characters"):
        Tokenizer(kind="char", vocab=("ab",))
    with pytest.raises(JaxattnError, match="duplicate"):
        Tokenizer(kind="word", vocab=("a", "a"))


def test_tokenizer_dict_round_trip() -> None:
    tok = build_tokenizer(docs_of("Some words, some more."), "word", lowercase=True)
    again = Tokenizer.from_dict(json.loads(json.dumps(tok.to_dict())))
    assert again == tok
    np.testing.assert_array_equal(again.encode("some words"), tok.encode("some words"))


def test_ids_tokenizer_from_text(tmp_path: Path) -> None:
    write(tmp_path / "ids.txt", "0 1 2\n2 1 5\n")
    c = load_corpus(
        str(tmp_path / "ids.txt"),
        tokenizer=build_tokenizer(read_documents(str(tmp_path), progress=False), "ids"),
        progress=False,
    )
    assert c.tokenizer.kind == "ids" and c.vocab_size == 6
    np.testing.assert_array_equal(c.tokens, [0, 1, 2, 2, 1, 5])
    with pytest.raises(JaxattnError, match="whitespace-separated integers"):
        build_tokenizer(docs_of("1 x 2"), "ids")
