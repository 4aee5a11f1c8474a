"""The fast counting paths against the seed's Python dict loop (the slow, obvious reference).

Covers the fused multi-table pass (shared context keys, n-1 tables by marginalisation, document
heads), the jitted int32 scatter-add kernel (forced on small inputs, tiny chunks, split launches),
numpy's bincount path and the in-place sort path used for large vocabularies.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxattn
import jaxattn.counts.kernels as jc
from tests.helpers import markov_corpus


def dict_counts(tokens, doc_ids, n, s):
    """The seed's loop; documents are contiguous runs of equal ids."""
    seg = None if doc_ids is None else np.concatenate([[0], np.cumsum(np.asarray(doc_ids)[1:] != doc_ids[:-1])])
    c = Counter()
    for i in range(len(tokens) - n - s):
        if seg is not None and seg[i] != seg[i + n + s]:
            continue
        c[(tuple(int(t) for t in tokens[i : i + n]), int(tokens[i + n + s]))] += 1
    return dict(c)


def as_dict(cm):
    return {
        (tuple(int(t) for t in cm.contexts[r]), int(c)): int(v)
        for r, c, v in zip(cm.rows, cm.cols, cm.values, strict=True)
    }


def same_matrix(a, b):
    return (
        a.n == b.n
        and a.s == b.s
        and a.num_windows == b.num_windows
        and all(
            np.array_equal(getattr(a, f), getattr(b, f)) and getattr(a, f).dtype == getattr(b, f).dtype
            for f in ("contexts", "rows", "cols", "values")
        )
    )


@pytest.fixture
def force_kernel(monkeypatch):
    """Route every dense count through the jitted kernel, with tiny chunks (many loop steps, padding)."""
    monkeypatch.setattr(jc, "_JAX_MIN_WINDOWS", 0)
    monkeypatch.setattr(jc, "_CHUNK_CPU", 64)


def ragged_docs(length: int, seed: int) -> np.ndarray:
    """Documents of very different lengths, including 1- and 2-token ones."""
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.choice(np.arange(1, length), size=12, replace=False))
    cuts = np.concatenate([cuts, [5, 6, 8]])  # documents of length 1 and 2 near the start
    docs = np.zeros(length, np.int64)
    docs[np.unique(cuts)] = 1
    return np.cumsum(docs) * 7 + 3  # arbitrary (non-zero-based) ids


@pytest.mark.parametrize("path", ["numpy", "kernel"])
@pytest.mark.parametrize("max_n", [1, 2, 3])
def test_fused_tables_equal_dict_loop(path, max_n, request):
    if path == "kernel":
        request.getfixturevalue("force_kernel")
    tokens, _, _ = markov_corpus(11, 5, 1500, num_docs=1)
    docs = ragged_docs(tokens.size, 0)
    tables = jaxattn.count_tables(tokens, 5, max_n, 3, doc_ids=docs)
    assert sorted(tables) == [(n, s) for n in range(1, max_n + 1) for s in range(4)]
    for (n, s), cm in tables.items():
        ref = dict_counts(tokens, docs, n, s)
        assert as_dict(cm) == ref, (n, s)
        assert cm.num_windows == sum(ref.values())


def test_fused_tables_equal_per_table_count_matrix(force_kernel):
    tokens, docs, _ = markov_corpus(12, 7, 2000, num_docs=5)
    tables = jaxattn.count_tables(tokens, 7, 2, 3, doc_ids=docs)
    for (n, s), cm in tables.items():
        assert same_matrix(cm, jaxattn.count_matrix(tokens, n, s, 7, doc_ids=docs)), (n, s)


def test_kernel_split_launches_and_no_documents(monkeypatch, force_kernel):
    # Launches of 100 windows: int64 sums of int32 launches on the host, windows at launch edges.
    monkeypatch.setattr(jc, "MAX_WINDOWS_PER_LAUNCH", 100)
    tokens, _, _ = markov_corpus(13, 4, 1000, num_docs=1)
    for (n, s), cm in jaxattn.count_tables(tokens, 4, 2, 2).items():
        assert as_dict(cm) == dict_counts(tokens, None, n, s), (n, s)
    cm = jaxattn.count_matrix(tokens, 2, 1, 4)
    assert as_dict(cm) == dict_counts(tokens, None, 2, 1)


def test_kernel_and_numpy_dense_counts_agree():
    rng = np.random.default_rng(0)
    t = rng.integers(0, 9, 5000).astype(np.uint8)
    a = jc._dense_counts_numpy(t, 2, (0, 1, 3), 9)
    b = jc._dense_counts_jax(t, 2, (0, 1, 3), 9)
    np.testing.assert_array_equal(a, b)
    assert a.sum() == sum(5000 - 2 - s for s in (0, 1, 3))


def test_real_text_all_eight_tables(shakespeare_text, force_kernel):
    text = shakespeare_text[:12000]
    vocab = sorted(set(text))
    ids = np.array([vocab.index(ch) for ch in text], np.int32)
    docs = np.repeat(np.arange(3), len(ids) // 3 + 1)[: len(ids)]
    for (n, s), cm in jaxattn.count_tables(ids, len(vocab), 2, 3, doc_ids=docs).items():
        assert as_dict(cm) == dict_counts(ids, docs, n, s), (n, s)


@pytest.mark.parametrize("vocab", [300, 70_000])
def test_wide_vocabularies_sort_path(vocab):
    # V=300: uint16 storage, n=2 keys exceed the dense-bin limit; V=70000: int32 storage, int64 keys.
    rng = np.random.default_rng(vocab)
    tokens = (rng.zipf(1.3, 3000) % vocab).astype(np.int32)
    docs = np.repeat(np.arange(6), 500)
    for n, s in [(1, 0), (2, 2)]:
        cm = jaxattn.count_matrix(tokens, n, s, vocab, doc_ids=docs)
        assert as_dict(cm) == dict_counts(tokens, docs, n, s)
        assert cm.contexts.dtype == np.int32
    for (n, s), cm in jaxattn.count_tables(tokens, vocab, 2, 1, doc_ids=docs).items():
        assert as_dict(cm) == dict_counts(tokens, docs, n, s), (n, s)


def test_sorted_path_memory_is_not_dense():
    # V=32000, n=2: V**3 = 3.3e13 keys; the sort path never allocates anything that large.
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 32000, 2000).astype(np.int32)
    keys, vals = jc.count_keys(tokens, None, 2, 0, 32000)
    assert keys.dtype == np.int64 and np.all(np.diff(keys) > 0)
    assert vals.sum() == 1998


def test_count_tables_errors_match_count_matrix():
    tokens = np.array([0, 1, 1, 0, 2, 2], np.int32)
    docs = np.array([0, 0, 1, 1, 2, 2])
    # Documents of 2 tokens: (1, 0) fits, (1, 1) is the first table without a window.
    with pytest.raises(jaxattn.JaxattnError) as e1:
        jaxattn.count_tables(tokens, 3, 2, 1, doc_ids=docs)
    with pytest.raises(jaxattn.JaxattnError) as e2:
        jaxattn.count_matrix(tokens, 1, 1, 3, doc_ids=docs)
    assert str(e1.value) == str(e2.value)
    assert "n=1, s=1" in str(e1.value) and "longest document has 2" in str(e1.value)
    with pytest.raises(jaxattn.JaxattnError, match="token id 5"):
        jaxattn.count_tables(np.array([0, 5, 1]), 3, 1, 0)
    assert jaxattn.count_tables(tokens, 3, 0, 3) == {}


def test_jax_array_input():
    import jax.numpy as jnp

    tokens, docs, _ = markov_corpus(14, 4, 400)
    a = jaxattn.count_tables(jnp.asarray(tokens), 4, 2, 1, doc_ids=jnp.asarray(docs))
    b = jaxattn.count_tables(tokens, 4, 2, 1, doc_ids=docs)
    assert all(same_matrix(a[p], b[p]) for p in a)


@settings(max_examples=25, deadline=None)
@given(
    data=st.lists(st.integers(0, 3), min_size=1, max_size=60),
    cuts=st.lists(st.integers(1, 59), max_size=8),
    max_n=st.integers(1, 3),
    max_s=st.integers(0, 3),
)
def test_fused_matches_loop_on_arbitrary_small_corpora(data, cuts, max_n, max_s):
    tokens = np.array(data, np.int32)
    docs = np.zeros(tokens.size, np.int64)
    for c in cuts:
        if c < tokens.size:
            docs[c:] += 1
    try:
        tables = jaxattn.count_tables(tokens, 4, max_n, max_s, doc_ids=docs)
    except jaxattn.JaxattnError as e:
        assert "too short" in str(e)
        assert any(not dict_counts(tokens, docs, n, s) for n in range(1, max_n + 1) for s in range(max_s + 1))
        return
    for (n, s), cm in tables.items():
        assert as_dict(cm) == dict_counts(tokens, docs, n, s)
