"""Root-cause measurements on a small synthetic run, against float64 numpy references and known facts."""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxattn import diagnostics
from jaxattn.alignment import context_ids
from jaxattn.counts import manifold_matrix
from jaxattn.derive import derive_params, normalize_std
from jaxattn.embeddings import base_embeddings, ngram_embeddings, orthonormal_embeddings
from jaxattn.errors import JaxattnError
from jaxattn.model import forward_batch, layer_norm
from jaxattn.output import write_json
from jaxattn.output.tables import format_diagnostics
from jaxattn.progress import Timer

V = 12


def _factors(prep):
    """The SVD factors diagnose uses (the run's "diagnostics-svd" key)."""
    return diagnostics.manifold_factors(prep.tables, prep.pairs, prep.config.d_head, key=prep.key("diagnostics-svd"))


# --------------------------------------------------------------------------- #
# 1 + 4: Gram statistics and the rank of E^n
# --------------------------------------------------------------------------- #


def test_random_unit_vectors_in_256_dims_have_cosines_near_0_05():
    """Known fact: E|cos| of random unit vectors in d=256 is sqrt(2/(pi d)) ~ 0.0499."""
    assert diagnostics.random_unit_abs_cosine(256) == pytest.approx(math.sqrt(2 / (math.pi * 256)), rel=0.01)
    E = np.asarray(base_embeddings(jax.random.PRNGKey(1), 400, 256), np.float64)
    st = diagnostics.gram_statistics(E, max_rows=1000)
    # float64 reference
    sim = E @ E.T / np.outer(np.linalg.norm(E, axis=1), np.linalg.norm(E, axis=1))
    off = sim[~np.eye(400, dtype=bool)]
    assert st["offdiag_abs_mean"] == pytest.approx(np.abs(off).mean(), rel=1e-9)
    assert st["offdiag_abs_max"] == pytest.approx(np.abs(off).max(), rel=1e-9)
    assert st["offdiag_mean"] == pytest.approx(off.mean(), abs=1e-12)
    assert st["orthonormal_deviation"] == pytest.approx(np.linalg.norm(sim - np.eye(400)) / 20.0, rel=1e-9)
    assert 0.045 < st["offdiag_abs_mean"] < 0.055
    assert st["abs_mean_vs_random"] == pytest.approx(1.0, abs=0.05)
    # collectively far from orthonormal: about sqrt((N - 1) / d)
    assert st["orthonormal_deviation"] == pytest.approx(math.sqrt(399 / 256), rel=0.05)
    assert st["offdiag_abs_max"] < 1.5 * st["random_abs_max"]


def test_gram_of_orthonormal_rows_and_zero_rows():
    E = np.asarray(orthonormal_embeddings(jax.random.PRNGKey(0), 20, 32), np.float64)
    E = np.concatenate([E, np.zeros((3, 32))])
    st = diagnostics.gram_statistics(E)
    assert st["num_zero_rows"] == 3 and st["rows_used"] == 20
    assert st["offdiag_abs_max"] < 1e-5 and st["orthonormal_deviation"] < 1e-5
    with pytest.raises(JaxattnError, match="shape"):
        diagnostics.gram_statistics(np.zeros(5))


def test_ngram_embeddings_rank_is_at_most_the_number_of_last_tokens(run):
    prep, base, diag = run
    cm = prep.tables[(2, 0)]
    e2 = np.asarray(ngram_embeddings(base.params["embed"], cm.contexts, prep.tables[(1, 0)]))  # float32
    rk = diagnostics.ngram_rank(e2, cm.contexts)
    assert rk["num_ngrams"] == cm.num_contexts > V
    assert rk["numerical_rank"] == np.linalg.matrix_rank(e2) <= rk["distinct_last_tokens"] <= V
    # brute force: share of n-gram pairs that end in the same token
    last = cm.contexts[:, -1]
    same = (last[:, None] == last[None, :]).sum() - len(last)
    assert rk["same_direction_pair_fraction"] == pytest.approx(same / (len(last) * (len(last) - 1)))
    ng = diag["embeddings"]["ngram"][0]
    assert ng["rank"] == rk and ng["gram"]["parallel_fraction"] > 0


# --------------------------------------------------------------------------- #
# 3: QK-circuit fidelity
# --------------------------------------------------------------------------- #


def test_qk_fidelity_is_exact_for_orthonormal_embeddings_without_normalisation(make_prep):
    """Known fact: with orthonormal E and no rescaling, E W_Q W_K^T E^T = M_r for n = 1."""
    prep = make_prep(d_model=64, d_head=8, layers=2, heads=4, weight_std=None)
    embed = orthonormal_embeddings(jax.random.PRNGKey(5), V, 64)
    params = derive_params(prep.tables, prep.config, key=prep.key("derive"), embed=embed)
    factors = _factors(prep)
    fidelity = diagnostics.qk_fidelity(
        prep.tables, prep.pairs, params, prep.config, factors, key=prep.key("diagnostics-fidelity")
    )
    fid = {(f["n"], f["s"]): f for f in fidelity}
    for (n, _), f in fid.items():
        if n == 1:
            assert f["num_contexts"] == V
            assert f["raw_error"] < 1e-4 and f["scaled_error"] < 1e-4
            assert f["scale"] == pytest.approx(1.0, abs=1e-3)
        else:
            # E^2 rows ending in one token are parallel: the circuit can't beat the last-token floor.
            assert f["scaled_error"] >= f["last_token_floor"] - 1e-6
            assert f["last_token_floor"] > 0.05
    # The truncation error against an exact numpy SVD.
    cm = prep.tables[(2, 1)]
    M = np.asarray(jaxattn_manifold(cm), np.float64)
    S = np.linalg.svd(M, compute_uv=False)
    assert fid[(2, 1)]["truncation_error"] == pytest.approx(np.sqrt((S[8:] ** 2).sum() / (S**2).sum()), rel=1e-4)


def jaxattn_manifold(cm):
    return manifold_matrix(cm)


def test_exact_svd_matches_numpy_and_pads():
    rng = np.random.default_rng(0)
    m = rng.random((7, 5))
    U, S, Vt = diagnostics.exact_svd(m, 8)
    assert U.shape == (7, 8) and S.shape == (8,) and Vt.shape == (8, 5)
    assert np.all(S[5:] == 0)
    np.testing.assert_allclose((U * S) @ Vt, m, atol=1e-5)
    idx = np.argmax(np.abs(U[:, :5]), axis=0)
    assert np.all(U[idx, np.arange(5)] > 0)


# --------------------------------------------------------------------------- #
# 2 + 5: score statistics
# --------------------------------------------------------------------------- #


def test_score_statistics_match_a_float64_loop(run):
    prep, base, diag = run
    params = base.params
    q_in, attn = diagnostics.query_inputs(params, prep.tokens, prep.config, batch_size=prep.run.batch_size)
    np.testing.assert_allclose(attn, base.attn, atol=1e-6)
    targets = diagnostics.manifold_targets(prep.tables, prep.pairs, prep.tokens, _factors(prep))
    stats = diagnostics.score_statistics(
        params, q_in, prep.mask, prep.pair_index, prep.config, targets=targets, attn=attn
    )
    B, T = prep.tokens.shape
    K = prep.config.d_head
    for l in (0, prep.config.num_layers - 1):
        ranges, stds, all_s, sxy, sxx, syy = [], [], [], 0.0, 0.0, 0.0
        r2s = []
        for h in range(prep.config.num_heads):
            p = prep.pair_index[l, h]
            sxy = sxx = syy = 0.0
            for b in range(B):
                x = q_in[b, l].astype(np.float64)
                s = (x @ np.asarray(params["wq"][l, h], np.float64)) @ (
                    x @ np.asarray(params["wk"][l, h], np.float64)
                ).T
                s /= np.sqrt(K)
                for i in range(T):
                    row = s[i, : i + 1]
                    all_s.extend(row)
                    if i >= 1:
                        ranges.append(row.max() - row.min())
                        stds.append(row.std())
                    m = prep.mask[p, b, i]
                    if m.any():
                        sc = s[i, m] - s[i, m].mean()
                        tc = targets[p, b, i, m].astype(np.float64) - targets[p, b, i, m].mean()
                        sxy += (sc * tc).sum()
                        sxx += (tc * tc).sum()
                        syy += (sc * sc).sum()
            r2s.append(sxy**2 / (sxx * syy))
        got = stats[l]
        assert got["row_range"] == pytest.approx(np.mean(ranges), rel=1e-3)
        assert got["row_std"] == pytest.approx(np.mean(stds), rel=1e-3)
        assert got["pooled_std"] == pytest.approx(np.std(all_s), rel=1e-3)
        assert got["score_max"] == pytest.approx(np.max(all_s), rel=1e-4, abs=1e-5)
        assert got["target_r2"] == pytest.approx(np.mean(r2s), rel=1e-3, abs=1e-5)
        # entropy / uniform from the attention itself
        a = attn[:, l].astype(np.float64)
        ent = [
            -(a[b, h, i, : i + 1] * np.log(np.maximum(a[b, h, i, : i + 1], 1e-300))).sum() / np.log(i + 1)
            for b in range(B)
            for h in range(prep.config.num_heads)
            for i in range(1, T)
        ]
        assert got["entropy"] == pytest.approx(np.mean(ent), rel=1e-4)


def test_raw_params_are_the_unscaled_seed_derivation(run):
    prep, base, _ = run
    raw = diagnostics.raw_params(prep.tables, prep.config, base.params, key=prep.key("derive"))
    np.testing.assert_array_equal(np.asarray(raw["embed"]), np.asarray(base.params["embed"]))
    np.testing.assert_array_equal(np.asarray(raw["w1"]), np.asarray(base.params["w1"]))
    for l in range(prep.config.num_layers):
        np.testing.assert_allclose(
            np.asarray(normalize_std(raw["wq"][l], 0.01)), np.asarray(base.params["wq"][l]), rtol=1e-4, atol=1e-7
        )


def test_needed_logit_range_matches_expected(run):
    prep, _, diag = run
    got = diag["needed_logit_range"]
    p = 0
    e, m = prep.expected[p].astype(np.float64), prep.mask[p]
    rngs = []
    for b in range(e.shape[0]):
        for i in range(e.shape[1]):
            v = e[b, i][m[b, i] & (e[b, i] > 0)]
            if v.size >= 2:
                rngs.append(np.log(v.max()) - np.log(v.min()))
    assert got[p]["median_range"] == pytest.approx(np.median(rngs), rel=1e-5)


# --------------------------------------------------------------------------- #
# 6: query identity, residual stream, counterfactuals, ceilings
# --------------------------------------------------------------------------- #


def test_residual_trace_matches_forward_query_inputs(run):
    prep, base, _ = run
    tok = jnp.asarray(prep.tokens[:4])  # the batch size the fixture already compiled
    xs, _, _ = diagnostics.residual_trace(base.params, tok, prep.config)
    ref = forward_batch(base.params, tok, prep.config, return_inputs=True).query_inputs
    for l in range(prep.config.num_layers):
        ln = layer_norm(xs[:, l], base.params["ln1_scale"][l], base.params["ln1_bias"][l])
        np.testing.assert_allclose(np.asarray(ln), np.asarray(ref[:, l]), atol=2e-4)


def test_query_identity_layer0_is_the_token_and_decoding_ceilings(run):
    prep, base, diag = run
    qi = diag["query_identity"]
    assert qi["layers"][0]["token_cosine"] == pytest.approx(1.0, abs=1e-5)
    assert qi["layers"][0]["token_decode_accuracy"] == 1.0
    for row in qi["ngram_decoding"]:
        cm = prep.tables[(row["n"], row["s"])]
        g = context_ids(cm, prep.tokens)
        gi = g[g >= 0]
        # brute-force last-token ceiling: the most frequent n-gram ending in each token
        freq = cm.row_sums
        best = {}
        for r, (ctx, f) in enumerate(zip(cm.contexts, freq, strict=True)):
            t = int(ctx[-1])
            if t not in best or f > freq[best[t]]:
                best[t] = r
        want = np.mean([best[int(cm.contexts[x, -1])] == x for x in gi])
        assert row["last_token_ceiling"] == pytest.approx(want)
        assert row["ideal_query_accuracy"] >= row["seed_input_accuracy"]
        assert row["seed_input_accuracy"] <= row["last_token_ceiling"] + 1e-9
        assert row["layers"] and all(0.0 <= x["accuracy"] <= 1.0 for x in row["layers"])


def test_isolated_counterfactual_keeps_bare_embeddings(run):
    _, _, diag = run
    cf = diag["counterfactuals"]
    assert set(cf) == {"seed", "no_normalisation", "no_mlp", "no_value_output", "no_value_output_no_mlp"}
    np.testing.assert_allclose(cf["no_value_output_no_mlp"]["token_cosine"], 1.0, atol=1e-5)
    # The seed variant re-measures the model as run.
    assert cf["seed"]["layers"][0]["cosine"] == pytest.approx(
        np.mean([r["cosine"] for r in run[1].records if r["layer"] == 0]), rel=1e-5
    )
    rs = diag["residual_stream"]
    assert rs[0]["residual_norm"] == pytest.approx(1.0, abs=1e-5)  # unit-norm E
    assert rs[0]["token_share"] == pytest.approx(1.0, abs=1e-5)


def test_log_probability_scores_reproduce_expected_attention(run):
    """A type-level score log P[g_i, t_j] gives exactly the position-level expected attention."""
    _, _, diag = run
    for row in diag["target_ceiling"]:
        assert row["log_probability"]["cosine"] > 0.9999
        assert row["log_probability"]["argmax_match_tied"] == 1.0
        assert row["log_probability"]["kl"] < 1e-4
        assert row["log_probability"]["best_beta"] == pytest.approx(1.0, rel=1e-6)
        assert 0 < row["manifold"]["cosine"] <= row["log_probability"]["cosine"]
        assert len(row["manifold"]["curve"]["beta"]) == len(diagnostics.BETA_GRID)


# --------------------------------------------------------------------------- #
# diagnose / summary_rows
# --------------------------------------------------------------------------- #


def test_diagnose_is_json_and_summary_rows_cover_every_layer(run, tmp_path):
    _, _, diag = run
    write_json(tmp_path / "d.json", diag)
    back = json.loads((tmp_path / "d.json").read_text())
    assert set(back) >= {
        "embeddings",
        "scores",
        "qk_fidelity",
        "target_ceiling",
        "query_identity",
        "residual_stream",
        "counterfactuals",
    }
    assert list(diag) == [
        "config",
        *(
            "embeddings scores needed_logit_range qk_fidelity target_ceiling query_identity residual_stream "
            "counterfactuals"
        ).split(),
        "timings_s",
    ]
    assert list(diag["timings_s"]) == list(diagnostics.STEPS)
    rows = diagnostics.summary_rows(diag)
    assert len(rows) == len(diag["scores"])
    assert format_diagnostics(rows).count("\n") >= len(rows)


def test_diagnose_recomputes_the_attention_and_times_its_stage(run):
    """Without ``attn`` the diagnosis measures the model itself; a timer gets one "diagnostics" stage."""
    prep, base, diag = run
    timer = Timer()
    again = diagnostics.diagnose(prep, base.params, progress=False, timer=timer)
    assert list(timer.seconds) == ["diagnostics"]
    # Everything that does not read the attention is the same; the recomputed attention is close.
    for key in ("embeddings", "needed_logit_range", "qk_fidelity", "target_ceiling", "query_identity"):
        assert again[key] == diag[key]
    for got, want in zip(again["scores"], diag["scores"], strict=True):
        assert got["row_range"] == want["row_range"]
        assert got["entropy"] == pytest.approx(want["entropy"], abs=1e-5)


def test_manifold_factors_skip_tables_over_the_memory_budget(run):
    prep, _, _ = run
    tables = dict(prep.tables)
    big = next(p for p in prep.pairs if p[0] >= 2)
    tables[big] = dataclasses.replace(tables[big], max_dense_bytes=64)
    factors = diagnostics.manifold_factors(tables, prep.pairs, prep.config.d_head, key=prep.key("diagnostics-svd"))
    assert big not in factors and set(factors) == set(prep.pairs) - {big}
    U, S, Vt = factors[prep.pairs[0]]
    cm = prep.tables[prep.pairs[0]]
    assert U.shape == (cm.num_contexts, prep.config.d_head) and S.shape == (prep.config.d_head,)
    assert Vt.shape == (prep.config.d_head, cm.vocab_size)
    targets = diagnostics.manifold_targets(tables, prep.pairs, prep.tokens, factors)
    assert not targets[prep.pairs.index(big)].any()
