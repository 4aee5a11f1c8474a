"""Option 1: PPMI + SVD embeddings against float64 numpy references, then the seed derivation on top."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import jaxattn
from jaxattn import options
from jaxattn.errors import JaxattnError
from tests.helpers import markov_corpus


def np_svd_signed(M, r):
    U, S, Vt = np.linalg.svd(np.asarray(M, np.float64), full_matrices=False)
    U, S = U[:, :r], S[:r]
    for k in range(r):
        if U[np.argmax(np.abs(U[:, k])), k] < 0:
            U[:, k] *= -1
    return U, S


def test_ppmi_embeddings_match_numpy_reference():
    V, window = 9, 3
    tokens, docs, _ = markov_corpus(3, V, 900, num_docs=3)  # skewed, structured co-occurrence
    tables = {(1, s): jaxattn.count_matrix(tokens, 1, s, V, doc_ids=docs) for s in range(2)}  # s=2 counted on demand
    cooc = options.cooccurrence_matrix(tables, V, window, tokens=tokens, doc_ids=docs)
    ref = np.zeros((V, V))
    for i in range(len(tokens)):
        for d in range(1, window + 1):
            if i + d < len(tokens) and docs[i] == docs[i + d]:
                ref[tokens[i], tokens[i + d]] += 1
                ref[tokens[i + d], tokens[i]] += 1
    np.testing.assert_array_equal(cooc, ref)
    alpha, shift = 0.75, 0.1
    p_ab = ref / ref.sum()
    p_a = ref.sum(1) / ref.sum()
    p_b = ref.sum(0) ** alpha / (ref.sum(0) ** alpha).sum()
    with np.errstate(divide="ignore"):
        pmi = np.log(p_ab / np.outer(p_a, p_b))
    ppmi_ref = np.where(ref > 0, np.maximum(pmi - shift, 0), 0)
    ppmi = options.ppmi_matrix(cooc, alpha, shift)
    np.testing.assert_allclose(ppmi, ppmi_ref, rtol=1e-12, atol=1e-12)
    for normalize in (False, True):
        cfg = options.PPMIConfig(window=window, alpha=alpha, shift=shift, power=0.5, dim=5, normalize=normalize)
        got = options.ppmi_vectors(ppmi, cfg, key=jax.random.PRNGKey(0))
        U, S = np_svd_signed(ppmi_ref, 5)
        want = U * np.sqrt(S)
        if normalize:
            want = want / np.linalg.norm(want, axis=1, keepdims=True)
        np.testing.assert_allclose(got, want, atol=2e-5)


def test_cooccurrence_without_the_tables_needs_the_tokens():
    tokens, docs, _ = markov_corpus(3, 9, 300, num_docs=3)
    tables = {(1, 0): jaxattn.count_matrix(tokens, 1, 0, 9, doc_ids=docs)}
    with pytest.raises(JaxattnError, match=r"needs table C\^\(1,1\)"):
        options.cooccurrence_matrix(tables, 9, 2)


def test_placed_embeddings_keep_inner_products_and_are_deterministic():
    w = np.random.default_rng(1).normal(size=(10, 6)).astype(np.float32)
    E1 = np.asarray(options.place_embeddings(w, 32, jax.random.PRNGKey(3)))
    E2 = np.asarray(options.place_embeddings(w, 32, jax.random.PRNGKey(3)))
    np.testing.assert_array_equal(E1, E2)
    np.testing.assert_allclose(E1 @ E1.T, w @ w.T, atol=1e-5)
    with pytest.raises(JaxattnError, match="dim=6 > d_model=4"):
        options.place_embeddings(w, 4, jax.random.PRNGKey(3))


def test_option1_uses_ppmi_embeddings_under_the_seed_derivation(markov):
    prep, _ = markov
    res = options.run_option(prep, "1", progress=False)
    E, _ = options.ppmi_embeddings(
        prep.tables, prep.config, key=prep.key("option1"), tokens=prep.corpus.tokens, doc_ids=prep.corpus.doc_ids
    )
    np.testing.assert_array_equal(np.asarray(res.params["embed"]), np.asarray(E))
    np.testing.assert_allclose(np.linalg.norm(np.asarray(E), axis=1), 1.0, rtol=1e-5)
    assert res.option == "option1" and len(res.records) == prep.config.num_layers * prep.config.num_heads
    for name in ("wq", "wk"):  # the seed's std-0.01 rescaling is kept
        assert abs(float(np.asarray(res.params[name][0]).std()) - 0.01) < 1e-5
    err = res.extra["layer0_circuit_error"]
    assert set(err["ppmi"]) == set(err["random"]) == {"1,0", "1,1", "1,2", "1,3"}
    assert all(0 <= v < 1 for v in err["random"].values())
    assert err["random"] == options.layer0_circuit_error(prep.tables, prep.config, markov_baseline_params(prep))


def markov_baseline_params(prep):
    return jaxattn.derive_params(prep.tables, prep.config, key=prep.key("derive"))


def test_bad_ppmi_configs_are_refused():
    with pytest.raises(JaxattnError, match="alpha=1.5"):
        options.PPMIConfig(alpha=1.5)
    for kw, word in (({"window": 0}, "window=0"), ({"shift": -1.0}, "shift=-1.0"), ({"dim": 0}, "dim=0")):
        with pytest.raises(JaxattnError, match=word):
            options.PPMIConfig(**kw)
