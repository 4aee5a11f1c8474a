"""The oracle-inputs derivation (Option 3's ceiling) and Option 3, against planted statistics."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from jaxattn import options
from jaxattn.alignment import alignment_metrics
from jaxattn.corpus import corpus_from_ids
from jaxattn.errors import JaxattnError
from tests.options.common import layer_means


def test_seed_derivation_reproduces_the_baseline_exactly(markov, markov_results):
    prep, _ = markov
    der = options.derive_oracle(prep.tables, prep.config, options.SEED_DERIVATION, key=prep.key("derive"))
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


def test_option3_and_the_oracle_beat_the_baseline_on_every_layer(markov_results):
    check_option3_beats_baseline(markov_results)
    check_option3_beats_baseline({**markov_results, "3": markov_results["oracle"]})


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


def test_oracle_least_squares_are_exact_and_tau_is_near_one(markov_results):
    res = markov_results["oracle"]
    for name, t in res.extra["tables"].items():
        assert t["lstsq_residual_q"] < 1e-5 and t["lstsq_residual_k"] < 1e-5, name
    tau = np.array(res.extra["tau"])
    assert np.all((tau > 0.7) & (tau < 1.4)), tau


@pytest.mark.parametrize("name", ["3", "oracle"])
def test_option3_and_the_oracle_are_deterministic(markov, markov_results, name):
    prep, _ = markov
    if name == "3":
        again = options.run_option(prep, "3", progress=False)
    else:
        again = options.run_derivation(prep, options.ORACLE_INPUTS, label="oracle", progress=False)
    assert again.records == markov_results[name].records
    np.testing.assert_array_equal(again.attn, markov_results[name].attn)


def test_derivation_reads_only_the_count_corpus(markov):
    prep, _ = markov
    other = corpus_from_ids(np.arange(500, dtype=np.int32) % 12, None, 12)
    swapped = dataclasses.replace(prep, eval_corpus=other)
    params = []
    for p in (prep, swapped):
        der, tau = options.derive_calibrated(p, options.ORACLE_INPUTS)
        assert tau is not None and tau.shape == (p.config.num_layers, p.config.num_heads)
        params.append(der.params)
    for k in params[0]:
        np.testing.assert_array_equal(np.asarray(params[0][k]), np.asarray(params[1][k]), err_msg=k)


def test_calibration_folds_tau_into_wq_only(markov):
    prep, _ = markov
    der = options.derive_oracle(prep.tables, prep.config, options.ORACLE_INPUTS, key=prep.key("derive"))
    tok, expected, mask = options.calibration_set(
        prep.tables, prep.pairs, prep.corpus.tokens, prep.corpus.doc_ids, 32, 4, key=prep.key("calibration")
    )
    assert tok.shape == (4, 32) and expected.shape == mask.shape == (len(prep.pairs), 4, 32, 32)
    before = {k: np.asarray(v) for k, v in der.params.items()}
    params, tau = options.calibrate_temperature(
        der.params, der.qk_inputs, tok, expected, mask, prep.pair_index, prep.config, tau_bounds=(1e-4, 1e4)
    )
    for k, v in before.items():  # the input is not modified
        np.testing.assert_array_equal(np.asarray(der.params[k]), v, err_msg=k)
    for k in params:
        if k != "wq":
            np.testing.assert_array_equal(np.asarray(params[k]), before[k], err_msg=k)
    want = before["wq"] * tau.astype(np.float32)[:, :, None, None]
    np.testing.assert_allclose(np.asarray(params["wq"]), want, rtol=1e-6)


def test_ngram_query_lookup_backs_off_to_the_longest_observed_suffix(markov):
    prep, _ = markov
    der = options.derive_oracle(prep.tables, prep.config, options.ORACLE_INPUTS, key=prep.key("derive"))
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


def test_option3_is_every_ingredient_and_the_seed_none():
    assert options.INGREDIENTS == (
        "log_target",
        "temperature",
        "pinv",
        "embed_stream",
        "ngram_queries",
        "frequency_weighting",
    )
    assert all(getattr(options.ORACLE_INPUTS, f) for f in options.INGREDIENTS)
    assert not any(getattr(options.SEED_DERIVATION, f) for f in options.INGREDIENTS)
    assert options.SEED_DERIVATION == options.DerivationConfig()


def test_bad_derivation_configs_are_refused():
    with pytest.raises(JaxattnError, match="ngram_queries=True needs embed_stream=True"):
        options.DerivationConfig(ngram_queries=True)
    with pytest.raises(JaxattnError, match="smoothing=0"):
        options.DerivationConfig(smoothing=0)
    with pytest.raises(JaxattnError, match="calibration_seqs=0"):
        options.DerivationConfig(calibration_seqs=0)
    with pytest.raises(JaxattnError, match="tau_bounds"):
        options.DerivationConfig(tau_bounds=(2.0, 1.0))
