"""The seed derivation against numpy float64 references."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import jaxattn
from jaxattn.embeddings import orthonormal_embeddings
from jaxattn.errors import JaxattnError
from tests.helpers import markov_corpus


def np_svd_signed(M, r):
    U, S, Vt = np.linalg.svd(np.asarray(M, np.float64), full_matrices=False)
    U, S, Vt = U[:, :r], S[:r], Vt[:r]
    for k in range(r):
        i = np.argmax(np.abs(U[:, k]))
        if U[i, k] < 0:
            U[:, k] *= -1
            Vt[k] *= -1
    return U, S, Vt


@pytest.fixture(scope="module")
def tables():
    tokens, docs, _ = markov_corpus(0, 12, 4000, num_docs=3)
    return {(n, s): jaxattn.count_matrix(tokens, n, s, 12, doc_ids=docs) for n in (1, 2) for s in (0, 2)}


@pytest.mark.parametrize("n", [1, 2])
def test_qk_circuit_reconstructs_manifold_with_orthonormal_embeddings(tables, n):
    """With E^n and E^1 orthonormal, E^n W_Q W_K^T E^1^T is the rank-r SVD reconstruction of M."""
    cm = tables[(n, 2)]
    M = np.asarray(jaxattn.manifold_matrix(cm), np.float64)
    R, V = M.shape
    r = 6
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    E1 = orthonormal_embeddings(k1, V, 96)
    En = orthonormal_embeddings(k2, R, max(R, 96)) if n == 2 else E1[cm.contexts[:, 0]]
    if n == 2:
        En = En[:, :96] if En.shape[1] > 96 else En
        if R > 96:  # need independent rows: widen the model
            E1 = orthonormal_embeddings(k1, V, R + V)
            En = orthonormal_embeddings(k2, R, R + V)
    WQ, WK = jaxattn.derive_qk(M.astype(np.float32), En, E1, r)
    circuit = (
        np.asarray(En, np.float64)
        @ np.asarray(WQ, np.float64)
        @ np.asarray(WK, np.float64).T
        @ np.asarray(E1, np.float64).T
    )
    U, S, Vt = np_svd_signed(M, r)
    ref = (U * S) @ Vt
    np.testing.assert_allclose(circuit, ref, atol=2e-5 * np.abs(ref).max() + 1e-6)


def test_wq_wk_match_numpy_formulas(tables):
    cm = tables[(1, 0)]
    M = np.asarray(jaxattn.manifold_matrix(cm), np.float64)
    E = np.asarray(jaxattn.base_embeddings(jax.random.PRNGKey(3), 12, 32), np.float64)
    En = E[cm.contexts[:, 0]]
    r = 5
    WQ, WK = jaxattn.derive_qk(M.astype(np.float32), En.astype(np.float32), E.astype(np.float32), r)
    U, S, Vt = np_svd_signed(M, r)
    np.testing.assert_allclose(np.asarray(WQ), En.T @ U * np.sqrt(S), atol=1e-5)
    np.testing.assert_allclose(np.asarray(WK), E.T @ Vt.T * np.sqrt(S), atol=1e-5)


def test_vo_match_numpy_formulas(tables):
    cm = tables[(2, 0)]
    P = np.asarray(jaxattn.probability_matrix(cm), np.float64)
    E = np.asarray(jaxattn.base_embeddings(jax.random.PRNGKey(4), 12, 48), np.float64)
    En = np.asarray(jaxattn.ngram_embeddings(E.astype(np.float32), cm.contexts, tables[(1, 0)]), np.float64)
    r = 7
    WV, WO = jaxattn.derive_vo(P.astype(np.float32), En.astype(np.float32), E.astype(np.float32), r)
    U, S, Vt = np_svd_signed(P, r)
    np.testing.assert_allclose(np.asarray(WV), (U * np.sqrt(S)).T @ En, atol=1e-5)
    np.testing.assert_allclose(np.asarray(WO), E.T @ Vt.T * np.sqrt(S), atol=1e-5)


def test_normalize_std():
    w = jax.random.normal(jax.random.PRNGKey(1), (3, 20, 8)) * 5
    out = np.asarray(jaxattn.normalize_std(w, 0.01))
    assert abs(out.std() - 0.01) < 1e-6


def test_d_head_larger_than_d_model_is_refused(tables):
    cm = tables[(1, 0)]
    M = jaxattn.manifold_matrix(cm)
    E = jaxattn.base_embeddings(jax.random.PRNGKey(0), 12, 8)
    with pytest.raises(JaxattnError, match="d_head=10 > d_model=8"):
        jaxattn.derive_qk(M, E[cm.contexts[:, 0]], E, 10)
    with pytest.raises(JaxattnError, match="d_head=80 > d_model=64"):
        jaxattn.preset("small", 12, d_model=64, d_head=80)


def test_rank_above_matrix_size_is_zero_padded(tables):
    cm = tables[(1, 0)]
    M = jaxattn.manifold_matrix(cm)
    E = jaxattn.base_embeddings(jax.random.PRNGKey(0), 12, 32)
    WQ, WK = jaxattn.derive_qk(M, E[cm.contexts[:, 0]], E, 20)  # R, V <= 12 < 20
    assert WQ.shape == (32, 20) and WK.shape == (32, 20)
    assert np.all(np.asarray(WQ)[:, 12:] == 0)


def test_derive_params_shapes_and_std(tables):
    cfg = jaxattn.ModelConfig(vocab_size=12, d_model=32, d_head=8, num_layers=2, num_heads=3, max_n=2, max_s=2)
    full = dict(tables)
    tokens, docs, _ = markov_corpus(0, 12, 4000, num_docs=3)
    full[(1, 1)] = jaxattn.count_matrix(tokens, 1, 1, 12, doc_ids=docs)
    full[(2, 1)] = jaxattn.count_matrix(tokens, 2, 1, 12, doc_ids=docs)
    params = jaxattn.derive_params(full, cfg, key=jax.random.PRNGKey(0))
    assert params["wq"].shape == (2, 3, 32, 8)
    assert params["wo"].shape == (2, 3, 8, 32)
    for name in ("wq", "wk", "wv", "wo"):
        for layer in range(2):
            assert abs(float(np.asarray(params[name][layer]).std()) - 0.01) < 1e-5


def _count_compiles(fn):
    """Runs ``fn()`` and returns how many XLA compilations it triggered."""
    import logging

    messages = []

    class Handler(logging.Handler):
        def emit(self, record):
            if "Finished XLA compilation" in record.getMessage():
                messages.append(record.getMessage())

    handler, logger = Handler(), logging.getLogger("jax")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        with jax.log_compiles(True):
            fn()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    return messages


def test_table_derivation_compiles_nothing_per_new_shape():
    """The derivation of a table runs on the host: a table of a new shape compiles no XLA kernel.

    (Before, each new (R, V) shape compiled the SVD, the gathers and every product: about 15
    compilations per table, 6 s of the default run's 7 s derive stage.)
    """
    from jaxattn.derive import assemble_params, derive_table_weights

    tokens, docs, _ = markov_corpus(3, 10, 3000, num_docs=2)
    embed = jaxattn.base_embeddings(jax.random.PRNGKey(1), 10, 24)
    key = jax.random.PRNGKey(2)
    warm = {(1, 0): jaxattn.count_matrix(tokens, 1, 0, 10, doc_ids=docs)}
    derive_table_weights(warm[(1, 0)], None, embed, 6, key=key)  # the key split compiles once
    fresh = {s: jaxattn.count_matrix(tokens, 2, s, 10, doc_ids=docs) for s in (0, 1)}  # new row counts
    assert len({cm.shape for cm in fresh.values()} | {warm[(1, 0)].shape}) >= 2
    weights = {}
    compiled = _count_compiles(
        lambda: weights.update(
            {(2, s): derive_table_weights(cm, warm[(1, 0)], embed, 6, key=key) for s, cm in fresh.items()}
        )
    )
    assert compiled == []
    # Same numbers as the formulas on the device (W_Q = E_n^T U sqrt(S) with the sign convention).
    cm = fresh[0]
    e_n = np.asarray(jaxattn.ngram_embeddings(embed, cm.contexts, warm[(1, 0)]))
    U, S, _ = np_svd_signed(np.asarray(jaxattn.counts.manifold_matrix(cm), np.float64), 6)
    np.testing.assert_allclose(np.asarray(weights[(2, 0)].wq), e_n.T @ (U * np.sqrt(S)), rtol=2e-4, atol=2e-5)
    cfg = jaxattn.ModelConfig(vocab_size=10, d_model=24, d_head=6, num_layers=1, num_heads=2, max_n=2, max_s=1)
    params = assemble_params({(1, s): weights[(2, s)] for s in (0, 1)}, embed, cfg, key=key)
    assert all(isinstance(params[k], jax.Array) and params[k].dtype == np.float32 for k in ("wq", "wk", "wv", "wo"))
