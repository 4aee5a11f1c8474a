"""Alignment metrics: vmapped kernel against a per-head Python loop, and known values."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
from jaxattn.alignment import expected_attention, layer_head_metrics, pool, sample_sequences
from jaxattn.errors import JaxattnError
from tests.helpers import markov_corpus


def ref_row_metrics(e, a, m):
    """Obvious float64 reference for one query row."""
    e = np.where(m, e, 0.0).astype(np.float64)
    a = np.where(m, a, 0.0).astype(np.float64)
    if e.sum() <= 0 or not m.any():
        return None
    e = e / e.sum()
    a = a / a.sum() if a.sum() > 0 else a
    kl = max(sum(e[j] * (np.log(e[j] + 1e-10) - np.log(a[j] + 1e-10)) for j in range(len(e)) if m[j]), 0.0)
    cos = float(e @ a / (np.linalg.norm(e) * np.linalg.norm(a))) if np.linalg.norm(a) > 0 else 0.0
    idx = [j for j in range(len(e)) if m[j]]
    ea = max(idx, key=lambda j: (e[j], -j))
    aa = max(idx, key=lambda j: (a[j], -j))
    tied = e[aa] >= max(e[j] for j in idx) * (1 - 1e-6)
    k = len(idx)
    ent = -sum(a[j] * np.log(a[j]) for j in idx if a[j] > 0)
    ent = ent / np.log(k) if k > 1 else 1.0
    return kl, cos, float(ea == aa), float(tied), ent


def ref_sequence(e, a, m):
    rows = [ref_row_metrics(e[i], a[i], m[i]) for i in range(e.shape[0])]
    rows = [r for r in rows if r is not None]
    if not rows:
        return dict(kl=0, cosine=0, argmax_match=0, argmax_match_tied=0, entropy=0, num_queries=0)
    arr = np.array(rows)
    return dict(
        zip(["kl", "cosine", "argmax_match", "argmax_match_tied", "entropy"], arr.mean(0)), num_queries=len(rows)
    )


def random_case(key, lead, T):
    k1, k2, k3 = jax.random.split(key, 3)
    causal = np.tril(np.ones((T, T), bool))
    e = np.asarray(jax.random.uniform(k1, lead + (T, T))) * causal
    e = np.where(np.asarray(jax.random.uniform(k3, lead + (T, T))) < 0.3, 0.0, e)  # sparse, with ties at zero
    a = np.asarray(jax.nn.softmax(jnp.where(causal, 3 * jax.random.normal(k2, lead + (T, T)), -1e9), -1))
    m = np.broadcast_to(causal, e.shape).copy()
    m[..., :2, :] = False  # first queries invalid, as for n = 3
    return e, a, m


def test_vmapped_metrics_equal_per_head_python_loop():
    e, a, m = random_case(jax.random.PRNGKey(0), (2, 3, 2), 9)
    got = jaxattn.alignment_metrics(e, a, m)
    for idx in np.ndindex(2, 3, 2):
        ref = ref_sequence(e[idx], a[idx], m[idx])
        for k, v in ref.items():
            np.testing.assert_allclose(float(got[k][idx]), v, rtol=1e-4, atol=1e-5, err_msg=f"{k} at {idx}")


@pytest.mark.parametrize("kind", ["prefix", "causal", "general"])
def test_layer_head_metrics_fast_paths_equal_float64_reference(kind):
    # T = 64 runs the row-block paths (4 blocks). "prefix" is the mask expected_attention builds;
    # a masked key below the diagonal needs the causal kernel (which reads the mask), and a key
    # after its query the full kernel. Each must equal the float64 per-row reference.
    from jaxattn.alignment.metrics import _CAUSAL, _GENERAL, _PREFIX, _mask_kind

    H, B, T = 2, 2, 64  # one layer
    e, a, m = random_case(jax.random.PRNGKey(3), (2, B), T)
    attn = np.stack([a[0], a[1]], axis=1)[:, None].copy()  # [B, L=1, H=2, T, T]
    attn[:, 0, 0, 30, :31] = 0.0  # an all-zero actual row: its first argmax is key 0
    if kind == "causal":
        m[:, :, 20, 5] = False  # a hole below the diagonal, on a valid row
        attn[:, 0, :, 20, 5] = 0.3  # only visible if the hole were ignored
    if kind == "general":
        m[:, :, 10, 40] = True
        e[:, :, 10, 40] = 0.5
        attn[:, 0, 1, 10, 40] = 0.2  # only visible through the non-causal mask
    assert int(_mask_kind(jnp.asarray(m))) == {"prefix": _PREFIX, "causal": _CAUSAL, "general": _GENERAL}[kind]
    pair_index = np.array([[1, 0]], np.int32)
    got = layer_head_metrics(jnp.asarray(e), jnp.asarray(m), jnp.asarray(pair_index), jnp.asarray(attn))
    for h in range(H):
        p = pair_index[0, h]
        for b in range(B):
            ref = ref_sequence(e[p, b], attn[b, 0, h], m[p, b])
            for k, v in ref.items():
                np.testing.assert_allclose(float(got[k][0, h, b]), v, rtol=1e-5, atol=1e-6, err_msg=f"{k} h={h} b={b}")


def test_mask_kind_odd_key_count():
    # S not a multiple of 4 takes the plain boolean checks.
    from jaxattn.alignment.metrics import _CAUSAL, _GENERAL, _PREFIX, _mask_kind

    tri = np.tri(7, dtype=bool)
    m = np.stack([tri, tri & (np.arange(7) >= 2)[:, None]])
    assert int(_mask_kind(jnp.asarray(m))) == _PREFIX
    m[1, 4, 1] = False
    assert int(_mask_kind(jnp.asarray(m))) == _CAUSAL
    m[0, 1, 3] = True
    assert int(_mask_kind(jnp.asarray(m))) == _GENERAL


def test_layer_head_metrics_equal_loop_over_layers_and_heads():
    L, H, B, T = 3, 4, 2, 8
    e, a, m = random_case(jax.random.PRNGKey(1), (2, B), T)  # P = 2 distinct tables
    pair_index = np.array([[0, 1, 1, 1]] * L, np.int32)
    attn = np.asarray(jax.nn.softmax(jax.random.normal(jax.random.PRNGKey(2), (B, L, H, T, T)), -1))
    attn = attn * np.tril(np.ones((T, T)))
    got = layer_head_metrics(jnp.asarray(e), jnp.asarray(m), jnp.asarray(pair_index), jnp.asarray(attn))
    for l in range(L):
        for h in range(H):
            ref = jaxattn.alignment_metrics(e[pair_index[l, h]], attn[:, l, h], m[pair_index[l, h]])
            for k in ref:
                np.testing.assert_allclose(np.asarray(got[k][l, h]), np.asarray(ref[k]), rtol=1e-6, atol=1e-7)


def test_identical_distributions_are_perfect():
    e, _, m = random_case(jax.random.PRNGKey(3), (4,), 10)
    e = e + 1e-3 * m  # no all-zero rows, unique maxima unlikely to tie
    norm = np.where(m, e, 0) / np.maximum(np.where(m, e, 0).sum(-1, keepdims=True), 1e-12)
    got = jaxattn.alignment_metrics(norm, norm, m)
    np.testing.assert_allclose(np.asarray(got["kl"]), 0.0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got["cosine"]), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got["argmax_match"]), 1.0)
    np.testing.assert_allclose(np.asarray(got["argmax_match_tied"]), 1.0)


def test_uniform_attention_entropy_one_and_tie_aware_form():
    T = 6
    causal = np.tril(np.ones((T, T), bool))
    uniform = causal / causal.sum(-1, keepdims=True)
    # Expected mass split over positions 0 and 2 (same token twice); actual puts all on 2.
    e = np.zeros((T, T))
    e[5, [0, 2]] = 0.5
    a = np.zeros((T, T))
    a[5, 2] = 1.0
    m = np.zeros((T, T), bool)
    m[5, :6] = True
    got = jaxattn.alignment_metrics(e, a, m)
    assert float(got["argmax_match"]) == 0.0  # strict: first index 0 != 2
    assert float(got["argmax_match_tied"]) == 1.0  # tie-aware: 2 holds the max too
    assert float(got["entropy"]) == 0.0  # one-hot actual row: exactly 0, never a hair below
    got_u = jaxattn.alignment_metrics(uniform, uniform, causal)
    np.testing.assert_allclose(float(got_u["entropy"]), 1.0, atol=1e-6)


def test_no_valid_queries_gives_zero_not_nan():
    z = np.zeros((4, 4))
    got = jaxattn.alignment_metrics(z, z, np.zeros((4, 4), bool))
    for k, v in got.items():
        assert np.isfinite(np.asarray(v)).all(), k
    assert int(got["num_queries"]) == 0


def test_expected_attention_matches_definition():
    tokens, docs, _ = markov_corpus(7, 5, 3000)
    cm = jaxattn.count_matrix(tokens, 2, 1, 5, doc_ids=docs)
    P = np.asarray(jaxattn.probability_matrix(cm))
    seq = tokens[100:116]
    ex, mask = expected_attention(cm, seq)
    row_of = {tuple(int(x) for x in c): i for i, c in enumerate(cm.contexts)}
    for i in range(16):
        if i < 1 or (int(seq[i - 1]), int(seq[i])) not in row_of:
            assert not mask[i].any()
            continue
        raw = np.array([P[row_of[(int(seq[i - 1]), int(seq[i]))], seq[j]] if j <= i else 0 for j in range(16)])
        if raw.sum() == 0:
            assert not mask[i].any()
            continue
        np.testing.assert_allclose(ex[i], raw / raw.sum(), rtol=1e-5)
        assert mask[i, : i + 1].all() and not mask[i, i + 1 :].any()


def test_pool_weights_by_queries_and_reports_spread():
    m = {k: np.array([[0.2, 0.4]]) for k in ("kl", "cosine", "argmax_match", "argmax_match_tied", "entropy")}
    m["num_queries"] = np.array([[1, 3]])
    p = pool(m, axis=1)
    np.testing.assert_allclose(p["cosine"], [0.35])
    np.testing.assert_allclose(p["cosine_std"], [0.1])
    assert p["num_queries"][0] == 4


def test_sample_sequences_stay_in_documents_and_errors():
    tokens = np.arange(30, dtype=np.int32)
    docs = np.repeat([0, 1, 2], 10)
    seqs = sample_sequences(tokens, docs, 8, 50, jax.random.PRNGKey(0))
    assert seqs.shape == (50, 8)
    assert np.all(seqs[:, 0] // 10 == seqs[:, -1] // 10)
    np.testing.assert_array_equal(seqs, sample_sequences(tokens, docs, 8, 50, jax.random.PRNGKey(0)))
    with pytest.raises(JaxattnError, match="seq_len=11 is longer than every document"):
        sample_sequences(tokens, docs, 11, 2, jax.random.PRNGKey(0))
    with pytest.raises(JaxattnError, match="num_seqs=0"):
        sample_sequences(tokens, docs, 4, 0, jax.random.PRNGKey(0))


@pytest.mark.parametrize("metric", ["kl", "cosine", "argmax_match", "argmax_match_tied", "entropy"])
def test_grad_of_every_metric_is_finite_with_empty_query_rows(metric):
    # Empty query rows (the first two, and one row whose expected mass is zero) are where sqrt'(0) = inf
    # used to turn into NaN; the gradient w.r.t. both sides must stay finite and the values unchanged.
    e, a, m = random_case(jax.random.PRNGKey(3), (2,), 9)
    e[:, 4] = 0.0  # a valid-mask row with zero expected mass
    a = a.copy()
    a[:, 5] = 0.0  # an actual row with zero mass on its valid keys
    m[:, 6] = False
    e, a, m = jnp.asarray(e), jnp.asarray(a), jnp.asarray(m)

    def f_actual(x):
        return jaxattn.alignment_metrics(e, x, m)[metric].sum()

    def f_expected(x):
        return jaxattn.alignment_metrics(x, a, m)[metric].sum()

    for f, x in ((f_actual, a), (f_expected, e)):
        g = np.asarray(jax.grad(f)(x))
        assert np.isfinite(g).all(), f"{metric}: {np.sum(~np.isfinite(g))} non-finite gradient entries"
    if metric in ("kl", "cosine"):  # differentiable metrics: the gradient reaches the valid rows
        assert np.abs(np.asarray(jax.grad(f_actual)(a))[:, 7:]).sum() > 0
    got = jaxattn.alignment_metrics(e, a, m)
    for b in range(2):
        ref = ref_sequence(np.asarray(e[b]), np.asarray(a[b]), np.asarray(m[b]))
        np.testing.assert_allclose(float(got[metric][b]), ref[metric], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bad", [-1, 7])
def test_expected_attention_refuses_out_of_range_token_ids(bad):
    tokens, docs, _ = markov_corpus(2, 7, 600)
    cm = jaxattn.count_matrix(tokens, 1, 0, 7, doc_ids=docs)
    with pytest.raises(JaxattnError, match=rf"token id {bad} is outside \[0, vocab_size=7\)"):
        expected_attention(cm, np.array([bad, 1, 2]))
    with pytest.raises(JaxattnError, match=rf"token id {bad}"):
        jaxattn.alignment.context_ids(cm, np.array([[1, bad, 2]]))
