"""Token and n-gram embeddings (the seed's E and E^n) against their formulas."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import jaxattn
from jaxattn.embeddings import context_probabilities
from tests.helpers import markov_corpus


@pytest.fixture(scope="module")
def tables():
    tokens, docs, _ = markov_corpus(0, 12, 4000, num_docs=3)
    return {(n, s): jaxattn.count_matrix(tokens, n, s, 12, doc_ids=docs) for n in (1, 2) for s in (0, 2)}


def test_ngram_embeddings_follow_seed_formula(tables):
    cm2, cm1 = tables[(2, 0)], tables[(1, 0)]
    E = np.asarray(jaxattn.base_embeddings(jax.random.PRNGKey(5), 12, 16))
    En = np.asarray(jaxattn.ngram_embeddings(E, cm2.contexts, cm1))
    P1 = np.asarray(jaxattn.probability_matrix(cm1))
    row_of = {int(c[0]): i for i, c in enumerate(cm1.contexts)}
    for r, (a, b) in enumerate(cm2.contexts):
        np.testing.assert_allclose(En[r], P1[row_of[int(a)], b] * E[b], rtol=1e-5, atol=1e-7)
    # Rank <= V: every bigram ending in t shares E[t]'s direction.
    assert np.linalg.matrix_rank(En, tol=1e-6) <= 12
    np.testing.assert_allclose(context_probabilities(cm2.contexts, cm1) > 0, True)


def test_base_embeddings_unit_norm_and_deterministic():
    a = jaxattn.base_embeddings(jax.random.PRNGKey(0), 30, 64)
    b = jaxattn.base_embeddings(jax.random.PRNGKey(0), 30, 64)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_allclose(np.linalg.norm(np.asarray(a), axis=1), 1.0, rtol=1e-5)
