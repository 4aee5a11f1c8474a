"""``jaxattn count``: tables on disk that ``analyze --load`` and ``compare --load`` take as their own."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from jaxattn import cli
from jaxattn.corpus import load_corpus, load_corpus_split
from jaxattn.counts import count_tables
from jaxattn.output import load_tables

FIELDS = ("contexts", "rows", "cols", "values")
TINY = ["--layers", "2", "--heads", "2", "--d-model", "16", "--d-head", "4", "--seq-len", "8", "--num-seqs", "2"]
TINY += ["--no-progress"]


def same_tables(a: dict, b: dict) -> bool:
    return sorted(a) == sorted(b) and all(
        getattr(a[k], f).dtype == getattr(b[k], f).dtype and np.array_equal(getattr(a[k], f), getattr(b[k], f))
        for k in a
        for f in FIELDS
    )


def run(capsys, *argv: str) -> tuple[int, str]:
    code = cli.main(list(argv))
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def plays(shakespeare_dir, tmp_path_factory) -> Path:
    """Three short slices of plays, as files of a directory (read in place, written only to a temp dir)."""
    d = tmp_path_factory.mktemp("plays")
    for name in ("lear_gut.txt", "pericles_gut.txt", "twelfth_night_gut.txt"):
        text = (shakespeare_dir / name).read_text(encoding="utf-8")
        (d / name).write_text(text[20_000:32_000], encoding="utf-8")
    return d


def test_count_then_analyze_load_is_analyze(plays, tmp_path, capsys) -> None:
    code, err = run(capsys, "count", "--corpus", str(plays), "--out", str(tmp_path / "t"), "--heldout", "auto")
    assert code == 0
    assert err.count("\n") == 1 and err.startswith("jaxattn count: ") and "M tokens/s" in err and "MB read" in err
    train, _ = load_corpus_split(str(plays), progress=False)
    counted = load_tables(tmp_path / "t", corpus=train)  # same vocabulary and sha256: no error, no warning
    assert same_tables(counted, count_tables(train.tokens, train.vocab_size, 2, 3, doc_ids=train.doc_ids))
    doc = json.loads((tmp_path / "t" / "tables.json").read_text())
    assert doc["corpus"]["sha256"] == train.sha256 and doc["corpus"]["files"] == list(train.doc_names)
    seed = ["--corpus", str(plays), "--preset", "seed", *TINY]
    assert run(capsys, "analyze", *seed, "--load", str(tmp_path / "t"), "--out", str(tmp_path / "a1"))[0] == 0
    assert "warning" not in capsys.readouterr().err


@pytest.mark.slow
def test_analyze_and_compare_with_counted_tables_match_counting_in_memory(plays, tmp_path, capsys) -> None:
    assert run(capsys, "count", "--corpus", str(plays), "--out", str(tmp_path / "t"), "--heldout", "auto")[0] == 0
    seed = ["--corpus", str(plays), "--preset", "seed", *TINY]
    assert run(capsys, "analyze", *seed, "--load", str(tmp_path / "t"), "--out", str(tmp_path / "a1"))[0] == 0
    assert run(capsys, "analyze", *seed, "--out", str(tmp_path / "a2"))[0] == 0
    got, want = (json.loads((tmp_path / a / "metrics.json").read_text())["results"] for a in ("a1", "a2"))
    assert got == want
    compare = ["compare", *seed, "--options", "baseline,1", "--load", str(tmp_path / "t"), "--out", str(tmp_path / "c")]
    code, err = run(capsys, *compare)
    assert code == 0, err


def test_count_whole_corpus_equals_load_corpus_word_level(plays, tmp_path, capsys) -> None:
    out = tmp_path / "w"
    code, err = run(
        capsys, "count", "--corpus", str(plays), "--out", str(out), "--tokenizer", "word", "--chunk-tokens", "333"
    )
    assert code == 0, err
    corpus = load_corpus(str(plays), tokenizer="word", progress=False)
    got = load_tables(out, corpus=corpus)
    assert same_tables(got, count_tables(corpus.tokens, corpus.vocab_size, 2, 3, doc_ids=corpus.doc_ids))
    # --vocab reuses the vocabulary of a tables directory: the same tables again.
    code, err = run(capsys, "count", "--corpus", str(plays), "--out", str(tmp_path / "w2"), "--vocab", str(out))
    assert code == 0, err
    assert same_tables(load_tables(tmp_path / "w2", corpus=corpus), got)


def test_count_jsonl_equals_in_memory(tmp_path, capsys) -> None:
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps({"text": t}) for t in ["abracadabra", "banana band", "cabana"]) + "\n")
    code, err = run(capsys, "count", "--corpus", str(p), "--out", str(tmp_path / "t"), "--max-s", "1")
    assert code == 0, err
    corpus = load_corpus(str(p), progress=False)
    got = load_tables(tmp_path / "t", corpus=corpus)
    assert same_tables(got, count_tables(corpus.tokens, corpus.vocab_size, 2, 1, doc_ids=corpus.doc_ids))


def test_count_token_file(tmp_path, capsys) -> None:
    rng = np.random.default_rng(3)
    tok = rng.integers(0, 300, 5000).astype(np.uint16)
    starts = np.array([0, 7, 2000, 2003, 4321])
    (tmp_path / "t.u16").write_bytes(tok.tobytes())
    np.save(tmp_path / "t.u16.offsets.npy", starts)
    code, err = run(
        capsys, "count", "--corpus", str(tmp_path / "t.u16"), "--out", str(tmp_path / "o"), "--chunk-tokens", "999"
    )
    assert code == 0, err
    docs = np.searchsorted(starts, np.arange(tok.size), "right")
    V = int(tok.max()) + 1
    got = load_tables(tmp_path / "o", vocab_size=V)
    assert same_tables(got, count_tables(tok, V, 2, 3, doc_ids=docs))
    assert json.loads((tmp_path / "o" / "tables.json").read_text())["tokenizer"]["kind"] == "ids"


@pytest.mark.parametrize(
    ("setup", "extra", "line"),
    [
        ("empty.jsonl", [], "corpus is empty"),
        ("bad.jsonl", [], "bad.jsonl:2: not a JSON line"),
        ("t.u8", ["--vocab-size", "10"], "token id 200 is outside [0, vocab_size=10) (at token 3)"),
        ("o.u8", [], "offsets must be strictly increasing, got 2 then 1 (entry 2)"),
        ("missing", [], "no such file or directory"),
        ("t.u8", ["--heldout", "auto"], "--heldout and --eval-corpus need a text corpus, not a token file"),
        ("t.u8", ["--tokenizer", "word"], "is already tokenised (use --vocab)"),
        ("short.txt", [], "corpus too short for n=1, s=0: a window needs n+s+1=2 tokens in one document"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, setup, extra, line) -> None:
    (tmp_path / "empty.jsonl").write_text("\n\n")
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{oops\n')
    (tmp_path / "t.u8").write_bytes(bytes([1, 2, 3, 200, 4]))
    (tmp_path / "o.u8").write_bytes(bytes(range(5)))
    np.save(tmp_path / "o.u8.offsets.npy", np.array([0, 2, 1]))
    (tmp_path / "short.txt").write_text("x")
    code, err = run(capsys, "count", "--corpus", str(tmp_path / setup), "--out", str(tmp_path / "out"), *extra)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("jaxattn: error: ") and line in err, err
    assert not (tmp_path / "out" / "tables.json").exists()
