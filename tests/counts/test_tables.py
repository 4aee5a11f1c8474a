"""Count tensors against a plain Python dict loop, and the derived P / M matrices."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

import jaxattn
from jaxattn.counts import key_dtype
from jaxattn.errors import JaxattnError, MemoryBudgetError
from tests.helpers import markov_corpus


def dict_counts(tokens, doc_ids, n, s):
    """The seed's obvious reference: a Python loop over windows inside each document."""
    c = Counter()
    for i in range(len(tokens) - n - s):
        if doc_ids is not None and doc_ids[i] != doc_ids[i + n + s]:
            continue
        c[(tuple(int(t) for t in tokens[i : i + n]), int(tokens[i + n + s]))] += 1
    return c


def as_dict(cm):
    return {(tuple(int(t) for t in cm.contexts[r]), int(c)): int(v) for r, c, v in zip(cm.rows, cm.cols, cm.values)}


@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("s", [0, 1, 2, 3])
def test_counts_equal_dict_loop_across_documents(n, s):
    tokens, docs, _ = markov_corpus(0, 7, 900, num_docs=4)
    cm = jaxattn.count_matrix(tokens, n, s, 7, doc_ids=docs)
    assert as_dict(cm) == dict(dict_counts(tokens, docs, n, s))
    assert cm.num_windows == sum(dict_counts(tokens, docs, n, s).values())


def test_counts_on_real_text_equal_dict_loop(shakespeare_text):
    text = shakespeare_text[:20000]
    vocab = sorted(set(text))
    ids = np.array([vocab.index(ch) for ch in text], np.int32)
    docs = np.repeat(np.arange(4), len(ids) // 4 + 1)[: len(ids)]
    for n, s in [(1, 0), (2, 3)]:
        cm = jaxattn.count_matrix(ids, n, s, len(vocab), doc_ids=docs)
        assert as_dict(cm) == dict(dict_counts(ids, docs, n, s))


def test_layout_is_sorted_and_dense_matches_sparse():
    tokens, docs, _ = markov_corpus(1, 5, 500)
    cm = jaxattn.count_matrix(tokens, 2, 1, 5, doc_ids=docs)
    keys = cm.contexts[:, 0] * 5 + cm.contexts[:, 1]
    assert np.all(np.diff(keys) > 0), "contexts sorted lexicographically, unique"
    order = cm.rows.astype(np.int64) * 5 + cm.cols
    assert np.all(np.diff(order) > 0), "COO sorted by row then column"
    dense = cm.counts
    assert dense.shape == (cm.num_contexts, 5)
    assert dense.sum() == cm.num_windows
    np.testing.assert_array_equal(dense[cm.rows, cm.cols], cm.values)


def test_jax_array_input_and_no_doc_ids():
    import jax.numpy as jnp

    tokens, _, _ = markov_corpus(2, 4, 300, num_docs=1)
    a = jaxattn.count_matrix(jnp.asarray(tokens), 1, 0, 4)
    b = jaxattn.count_matrix(tokens, 1, 0, 4)
    assert as_dict(a) == as_dict(b) == dict(dict_counts(tokens, None, 1, 0))


def test_probability_and_manifold_exact_and_nan_free():
    tokens, docs, _ = markov_corpus(3, 6, 600)
    cm = jaxattn.count_matrix(tokens, 1, 2, 6, doc_ids=docs)
    C = cm.counts.astype(np.float64)
    P = np.asarray(jaxattn.probability_matrix(cm))
    np.testing.assert_allclose(P, C / C.sum(1, keepdims=True), rtol=1e-6)
    np.testing.assert_allclose(P.sum(1), 1.0, rtol=1e-6)
    M = np.asarray(jaxattn.manifold_matrix(cm))
    dr, dc = C.sum(1), C.sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ref = np.where(np.outer(dr, dc) > 0, C / np.sqrt(np.outer(dr, dc)), 0.0)
    np.testing.assert_allclose(M, ref, rtol=1e-6, atol=1e-7)
    assert np.isfinite(M).all() and np.isfinite(P).all()
    # A token never seen as a target gives a zero column sum: still no NaN.
    assert (C.sum(0) >= 0).all()


def test_planted_markov_chain_recovered():
    tokens, docs, trans = markov_corpus(4, 5, 30000, num_docs=2)
    P = np.asarray(jaxattn.probability_matrix(jaxattn.count_matrix(tokens, 1, 0, 5, doc_ids=docs)))
    np.testing.assert_allclose(P, trans, atol=0.03)


def test_bad_inputs_name_the_value():
    with pytest.raises(JaxattnError, match="empty"):
        jaxattn.count_matrix(np.zeros(0, np.int32), 1, 0, 3)
    with pytest.raises(JaxattnError, match=r"n\+s\+1=5"):
        jaxattn.count_matrix(np.array([0, 1, 2, 0], np.int32), 2, 2, 3)
    with pytest.raises(JaxattnError, match="token id 7"):
        jaxattn.count_matrix(np.array([0, 7, 1, 2], np.int32), 1, 0, 3)
    with pytest.raises(JaxattnError, match="n=0"):
        jaxattn.count_matrix(np.array([0, 1], np.int32), 0, 0, 3)


def test_short_documents_give_no_windows():
    # Each document has 2 tokens: no window of n+s+1 = 3 fits inside one.
    tokens = np.array([0, 1, 1, 0, 2, 2], np.int32)
    docs = np.array([0, 0, 1, 1, 2, 2])
    with pytest.raises(JaxattnError, match="longest document has 2"):
        jaxattn.count_matrix(tokens, 1, 1, 3, doc_ids=docs)


def test_dense_over_budget_refused_with_size_and_budget():
    tokens, _, _ = markov_corpus(5, 6, 400, num_docs=1)
    cm = jaxattn.count_matrix(tokens, 2, 0, 6, max_dense_bytes=64)
    with pytest.raises(MemoryBudgetError, match=r"shape \(\d+, 6\).*budget of 64 B"):
        _ = cm.counts
    assert cm.nnz > 0  # the sparse form is always available


def test_key_scheme_switches_to_int64_and_refuses_overflow():
    assert key_dtype(1000, 2) == np.int32  # 1e9 fits
    assert key_dtype(50_000, 2) == np.int64  # 1.25e14
    with pytest.raises(JaxattnError, match="overflows int64"):
        key_dtype(3_000_000, 2)
    tokens = np.array([0, 49_999, 1, 49_999, 0, 49_999], np.int32)
    cm = jaxattn.count_matrix(tokens, 2, 0, 50_000)
    assert as_dict(cm) == dict(dict_counts(tokens, None, 2, 0))


def test_context_index_and_lookup():
    tokens, docs, _ = markov_corpus(6, 4, 400)
    cm = jaxattn.count_matrix(tokens, 2, 0, 4, doc_ids=docs)
    idx = cm.context_index(cm.contexts)
    np.testing.assert_array_equal(idx, np.arange(cm.num_contexts))
    dense = cm.counts
    r = np.arange(cm.num_contexts)[:, None]
    c = np.arange(4)[None, :]
    np.testing.assert_array_equal(cm.lookup(r, c), dense)
    assert cm.lookup(np.array([-1]), np.array([0]))[0] == 0
