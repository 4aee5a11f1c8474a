"""Property-based tests (hypothesis) of the invariants every number jaxattn prints rests on.

Random corpora, random shapes, random count tables and random attention, each compared with a
slow, obvious float64 numpy reference. ``max_examples`` is bounded and the search derandomized,
so the default test command stays fast and reproducible.
"""

# ruff: noqa: F722
from __future__ import annotations

import os
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jaxattn
from jaxattn import derive
from jaxattn.alignment import KL_EPS, TIE_RTOL
from jaxattn.counts import CountMatrix
from jaxattn.errors import JaxattnError

REPO = Path(__file__).resolve().parents[1]
FAST = settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------- #
# Strategies
# --------------------------------------------------------------------------- #


@st.composite
def corpora(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray | None, int, int, int]:
    """(tokens [N], doc_ids [N] or None, V, n, s): tiny corpora, any document layout."""
    V = draw(st.integers(1, 6))
    N = draw(st.integers(1, 60))
    tokens = np.array(draw(st.lists(st.integers(0, V - 1), min_size=N, max_size=N)), np.int32)
    doc_ids = None
    if draw(st.booleans()):  # ids need not be sorted: a document is a run of equal ids
        doc_ids = np.array(draw(st.lists(st.integers(0, 3), min_size=N, max_size=N)), np.int64)
    return tokens, doc_ids, V, draw(st.integers(1, 3)), draw(st.integers(0, 3))


@st.composite
def hand_made_tables(draw: st.DrawFn) -> CountMatrix:
    """A hand-made CountMatrix with empty rows and columns allowed (P and M must not NaN on them)."""
    R, V = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    dense = np.array(draw(st.lists(st.integers(0, 5), min_size=R * V, max_size=R * V)), np.int32).reshape(R, V)
    dense[dense < 3] = 0  # mostly sparse
    rows, cols = np.nonzero(dense)
    return CountMatrix(
        n=1,
        s=0,
        vocab_size=V,
        contexts=np.arange(R, dtype=np.int32)[:, None] % max(V, 1),
        rows=rows.astype(np.int32),
        cols=cols.astype(np.int32),
        values=dense[rows, cols],
        num_windows=int(dense.sum()),
    )


@st.composite
def attention(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(expected, actual, mask) [B, T, T]: values in tenths (zeros and ties likely), causal-or-random masks."""
    B, T = draw(st.integers(1, 2)), draw(st.integers(1, 5))  # few shapes: each one compiles once
    size = B * T * T
    tenths = st.lists(st.integers(0, 10), min_size=size, max_size=size)
    e = np.array(draw(tenths), np.float32).reshape(B, T, T) / 10
    a = np.array(draw(tenths), np.float32).reshape(B, T, T) / 10
    if draw(st.booleans()):
        mask = np.broadcast_to(np.tril(np.ones((T, T), bool)), (B, T, T)).copy()
    else:
        mask = np.array(draw(st.lists(st.booleans(), min_size=size, max_size=size))).reshape(B, T, T)
    return e, a, mask


# --------------------------------------------------------------------------- #
# Counts, P and M
# --------------------------------------------------------------------------- #


def reference_counts(tokens, doc_ids, n, s):
    """The obvious loop: window i counts when its first and last token lie in the same run of doc ids."""
    N = len(tokens)
    run = np.zeros(N, np.int64) if doc_ids is None else np.concatenate([[0], np.cumsum(doc_ids[1:] != doc_ids[:-1])])
    out: dict[tuple[tuple[int, ...], int], int] = {}
    for i in range(N - n - s):
        if run[i] == run[i + n + s]:
            key = (tuple(int(t) for t in tokens[i : i + n]), int(tokens[i + n + s]))
            out[key] = out.get(key, 0) + 1
    return out


@FAST
@given(corpora(), st.booleans())
def test_counts_sum_to_the_number_of_valid_windows(corpus, as_jax):
    tokens, doc_ids, V, n, s = corpus
    ref = reference_counts(tokens, doc_ids, n, s)
    inp = jax.numpy.asarray(tokens) if as_jax else tokens
    if not ref:
        with pytest.raises(JaxattnError, match="corpus too short"):
            jaxattn.count_matrix(inp, n, s, V, doc_ids=doc_ids)
        return
    cm = jaxattn.count_matrix(inp, n, s, V, doc_ids=doc_ids)
    assert int(cm.values.sum()) == cm.num_windows == sum(ref.values())
    got = {
        (tuple(int(t) for t in cm.contexts[r]), int(c)): int(v)
        for r, c, v in zip(cm.rows, cm.cols, cm.values, strict=True)
    }
    assert got == ref
    assert cm.counts.sum(axis=1).min() > 0  # every listed context was observed


@FAST
@given(hand_made_tables())
def test_each_probability_row_sums_to_one_or_is_empty(cm):
    C = cm.sparse().todense().astype(np.float64)
    for P in (np.asarray(jaxattn.probability_matrix(cm)), jaxattn.probability_matrix(cm, sparse=True).todense()):
        assert np.isfinite(P).all()
        sums = P.astype(np.float64).sum(axis=1)
        empty = C.sum(axis=1) == 0
        np.testing.assert_allclose(sums[~empty], 1.0, rtol=1e-6)
        assert (P[empty] == 0).all()
        rs = np.where(empty, 1.0, C.sum(axis=1))[:, None]
        np.testing.assert_allclose(P, C / rs, rtol=1e-6, atol=1e-7)


@FAST
@given(hand_made_tables())
def test_manifold_is_symmetrically_normalised(cm):
    C = cm.sparse().todense().astype(np.float64)
    d_row, d_col = C.sum(axis=1), C.sum(axis=0)
    inv_r = np.where(d_row > 0, 1 / np.sqrt(np.where(d_row > 0, d_row, 1)), 0.0)
    inv_c = np.where(d_col > 0, 1 / np.sqrt(np.where(d_col > 0, d_col, 1)), 0.0)
    ref = np.diag(inv_r) @ C @ np.diag(inv_c)  # D_row^{-1/2} C D_col^{-1/2}
    for M in (np.asarray(jaxattn.manifold_matrix(cm)), jaxattn.manifold_matrix(cm, sparse=True).todense()):
        assert np.isfinite(M).all()
        np.testing.assert_allclose(M, ref, rtol=1e-6, atol=1e-7)
        assert M.max(initial=0) <= 1 + 1e-6  # each entry is a normalised count, at most 1


# --------------------------------------------------------------------------- #
# Alignment metrics
# --------------------------------------------------------------------------- #


def reference_metrics(e, a, mask):
    """Per-sequence means over valid queries, one query at a time in float64 (the seed's definitions)."""
    out = {k: [] for k in ("kl", "cosine", "argmax_match", "argmax_match_tied", "entropy", "num_queries")}
    for eb, ab, mb in zip(e.astype(np.float64), a.astype(np.float64), mask, strict=True):
        acc = {k: 0.0 for k in out}
        for i in range(eb.shape[0]):
            keys = np.flatnonzero(mb[i])
            if keys.size == 0 or eb[i, keys].sum() == 0:
                continue
            p = eb[i, keys] / eb[i, keys].sum()
            q = ab[i, keys] / ab[i, keys].sum() if ab[i, keys].sum() > 0 else np.zeros(keys.size)
            acc["kl"] += max(float(np.sum(p * (np.log(p + KL_EPS) - np.log(q + KL_EPS)))), 0.0)
            den = np.linalg.norm(p) * np.linalg.norm(q)
            acc["cosine"] += float(np.clip(p @ q / den, 0, 1)) if den > 0 else 0.0
            acc["argmax_match"] += float(np.argmax(p) == np.argmax(q))
            acc["argmax_match_tied"] += float(p[np.argmax(q)] >= p.max() * (1 - TIE_RTOL))
            nz = q > 0
            acc["entropy"] += float(-(q[nz] * np.log(q[nz])).sum() / np.log(keys.size)) if keys.size > 1 else 1.0
            acc["num_queries"] += 1
        nq = max(acc["num_queries"], 1)
        for k in out:
            out[k].append(acc[k] if k == "num_queries" else acc[k] / nq)
    return {k: np.array(v) for k, v in out.items()}


@FAST
@given(attention())
def test_metrics_stay_in_bounds_and_match_the_per_query_reference(data):
    e, a, mask = data
    m = {k: np.asarray(v) for k, v in jaxattn.alignment_metrics(e, a, mask).items()}
    for k in ("kl", "cosine", "argmax_match", "argmax_match_tied", "entropy"):
        assert np.isfinite(m[k]).all(), k
    assert (m["kl"] >= 0).all()
    for k in ("cosine", "argmax_match", "argmax_match_tied", "entropy"):
        assert ((m[k] >= 0) & (m[k] <= 1)).all(), (k, m[k])
    ref = reference_metrics(e, a, mask)
    np.testing.assert_array_equal(m["num_queries"], ref["num_queries"])
    for k in ("kl", "cosine", "entropy"):
        np.testing.assert_allclose(m[k], ref[k], rtol=1e-4, atol=1e-5, err_msg=k)
    for k in ("argmax_match", "argmax_match_tied"):  # tenths: ties are exact in float32 and float64 alike
        np.testing.assert_allclose(m[k], ref[k], atol=1e-6, err_msg=k)


@FAST
@given(attention())
def test_identical_distributions_are_perfect(data):
    e, _, mask = data
    m = {k: np.asarray(v) for k, v in jaxattn.alignment_metrics(e, e, mask).items()}
    has = m["num_queries"] > 0
    np.testing.assert_allclose(m["kl"][has], 0.0, atol=1e-6)
    np.testing.assert_allclose(m["cosine"][has], 1.0, atol=1e-6)
    np.testing.assert_array_equal(m["argmax_match"][has], 1.0)
    np.testing.assert_array_equal(m["argmax_match_tied"][has], 1.0)


# --------------------------------------------------------------------------- #
# Derivation: invariant to the sign freedom of the SVD
# --------------------------------------------------------------------------- #


@st.composite
def derivation_inputs(draw: st.DrawFn):
    R, V = draw(st.integers(2, 5)), draw(st.integers(2, 5))  # few shapes: each compiles the jnp ops once
    rank = draw(st.integers(1, min(R, V)))
    D = draw(st.sampled_from([rank, 6]))
    seed = draw(st.integers(0, 2**16))
    flips = np.array(draw(st.lists(st.sampled_from([-1.0, 1.0]), min_size=rank, max_size=rank)), np.float32)
    rng = np.random.default_rng(seed)
    M = rng.random((R, V)).astype(np.float32)
    return (
        M,
        rng.standard_normal((R, D)).astype(np.float32),
        rng.standard_normal((V, D)).astype(np.float32),
        rank,
        flips,
    )


def numpy_svd(flips):
    """A truncated_svd stand-in: numpy's SVD, with the signs of the (U_k, V_k) pairs flipped by ``flips``."""

    def svd(M, rank, *, key=None, **kw):
        U, S, Vt = np.linalg.svd(np.asarray(M, np.float64), full_matrices=False)
        U, S, Vt = U[:, :rank], S[:rank], Vt[:rank]
        return tuple(jax.numpy.asarray(x, np.float32) for x in (U * flips, S, Vt * flips[:, None]))

    return svd


@settings(FAST, max_examples=15)
@given(derivation_inputs())
def test_derivation_is_invariant_to_svd_sign_flips(inputs):
    M, E_n, E_1, rank, flips = inputs
    out = {}
    for name, f in (("plain", np.ones_like(flips)), ("flipped", flips)):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(derive, "truncated_svd", numpy_svd(f))
            wq, wk = jaxattn.derive_qk(M, E_n, E_1, rank)
            wv, wo = jaxattn.derive_vo(M, E_n, E_1, rank)
        out[name] = (np.asarray(wq @ wk.T), np.asarray(wo @ wv))
    # Flipping a sign is exact in floating point, so the products agree bit for bit.
    np.testing.assert_array_equal(out["plain"][0], out["flipped"][0])  # W_Q W_K^T
    np.testing.assert_array_equal(out["plain"][1], out["flipped"][1])  # W_O W_V


def test_derived_model_attention_is_invariant_to_svd_sign_flips(monkeypatch):
    """End to end (weight_std=None): the attention of the whole derived model does not see the SVD's signs."""
    tokens = np.array([0, 1, 2, 3, 1, 2, 0, 3, 3, 1, 0, 2, 1, 1, 2, 3, 0, 0, 2, 1] * 5, np.int32)
    tables = jaxattn.count_tables(tokens, 4, 2, 1)
    cfg = jaxattn.ModelConfig(vocab_size=4, d_model=8, d_head=3, num_layers=2, num_heads=1, weight_std=None, max_s=1)
    attn = []
    for flips in (np.ones(3, np.float32), np.array([-1, 1, -1], np.float32)):
        monkeypatch.setattr(derive, "truncated_svd", lambda M, r, *, key=None, f=flips, **kw: numpy_svd(f[:r])(M, r))
        params = jaxattn.derive_params(tables, cfg, key=jax.random.PRNGKey(0))
        attn.append(np.asarray(jaxattn.forward_batch(params, tokens[None, :12], cfg).attn))
    np.testing.assert_array_equal(attn[0], attn[1])  # exact: only signs of paired factors changed


# --------------------------------------------------------------------------- #
# Sharded (8 simulated devices) == single device
# --------------------------------------------------------------------------- #

SHARDED_PROPERTY = textwrap.dedent(
    """
    import jax, numpy as np
    from hypothesis import Phase, given, settings, strategies as st
    NO_SHRINK = [Phase.explicit, Phase.generate]  # report the failing example, do not spend minutes shrinking
    import jaxattn
    from jaxattn.alignment import sharded_layer_head_metrics
    from jaxattn.counts import make_mesh
    from jaxattn.alignment import layer_head_metrics
    from jaxattn.errors import JaxattnError
    assert jax.device_count() == 8
    mesh = make_mesh(8)

    @settings(max_examples=6, deadline=None, derandomize=True, database=None, phases=NO_SHRINK)
    @given(st.integers(1, 90), st.sampled_from([3, 7, 300]), st.integers(1, 2), st.integers(0, 3),
           st.integers(0, 4), st.integers(0, 2**16))
    def counts(N, V, n, s, docs, seed):
        # N below, at and off multiples of 8; V=300 with n=2 takes the sorted (word-level) path.
        rng = np.random.default_rng(seed)
        tok = rng.integers(0, V, N).astype(np.int32)
        doc = np.sort(rng.integers(0, docs + 1, N)) if docs else None
        try:
            one = jaxattn.count_matrix(tok, n, s, V, doc_ids=doc)
        except JaxattnError as e:
            try:
                jaxattn.count_matrix(tok, n, s, V, doc_ids=doc, mesh=mesh)
            except JaxattnError as e8:
                assert str(e8) == str(e)
                return
            raise AssertionError("sharded path counted what the single-device path refused")
        eight = jaxattn.count_matrix(tok, n, s, V, doc_ids=doc, mesh=mesh)
        for f in ("contexts", "rows", "cols", "values"):
            a, b = getattr(one, f), getattr(eight, f)
            assert a.dtype == b.dtype and np.array_equal(a, b), f
        assert one.num_windows == eight.num_windows

    @settings(max_examples=2, deadline=None, derandomize=True, database=None, phases=NO_SHRINK)
    @given(st.sampled_from([3, 11]), st.integers(0, 2**16))  # B below and off multiples of 8
    def metrics(B, seed):
        rng = np.random.default_rng(seed)
        P, L, H, T = 2, 2, 3, 5
        e = rng.random((P, B, T, T)).astype(np.float32)
        mask = (rng.random((P, B, T, T)) < 0.7) & np.tril(np.ones((T, T), bool))
        a = rng.random((B, L, H, T, T)).astype(np.float32)
        pi = rng.integers(0, P, (L, H)).astype(np.int32)
        one = layer_head_metrics(jax.numpy.asarray(e), jax.numpy.asarray(mask), jax.numpy.asarray(pi),
                                 jax.numpy.asarray(a))
        eight = sharded_layer_head_metrics(e, mask, pi, a, mesh)
        for k in one:
            assert np.array_equal(np.asarray(one[k]), np.asarray(eight[k])), k

    counts()
    metrics()
    print('RESULT {"sharded properties": "ok"}')
    """
)


def test_sharded_path_equals_single_device_on_random_inputs(eight_device_results):
    """Runs in the suite's one 8-device subprocess (tests/conftest.py)."""
    assert eight_device_results.get("sharded properties") == "ok", eight_device_results.get("properties: error")


# --------------------------------------------------------------------------- #
# Shape annotations: checked in tests, and numpy and jax arrays both accepted
# --------------------------------------------------------------------------- #


@pytest.mark.skipif(os.environ.get("JAXATTN_TYPECHECK") == "0", reason="type checking switched off")
def test_shape_annotations_are_checked_at_run_time_in_tests():
    import jaxtyping

    tokens = np.array([0, 1, 2, 0, 1], np.int32)
    with pytest.raises(jaxtyping.TypeCheckError, match="tokens"):
        jaxattn.count_matrix(tokens[None, :], 1, 0, 3)  # [1, N], not [N]
    E = np.ones((3, 4), np.float32)
    cm = jaxattn.count_matrix(tokens, 1, 0, 3)
    with pytest.raises(jaxtyping.TypeCheckError, match="E_n"):  # R=3 contexts but 2 embedding rows
        jaxattn.derive_qk(np.ones((3, 3), np.float32), E[:2], E, 2)
    with pytest.raises(jaxtyping.TypeCheckError):  # float tokens
        jaxattn.expected_attention(cm, tokens.astype(np.float32))


@pytest.mark.parametrize("xp", [np, jax.numpy], ids=["numpy", "jax"])
def test_public_functions_accept_numpy_and_jax_arrays(xp):
    tokens = np.array([0, 1, 2, 0, 1, 2, 2, 1, 0, 0, 1, 2], np.int32)
    docs = np.array([0] * 6 + [1] * 6)
    cm = jaxattn.count_matrix(xp.asarray(tokens), 1, 0, 3, doc_ids=xp.asarray(docs))
    seqs = jaxattn.sample_sequences(xp.asarray(tokens), xp.asarray(docs), 4, 2, jax.random.PRNGKey(0))
    expected, mask = jaxattn.expected_attention(cm, xp.asarray(seqs))
    m = jaxattn.alignment_metrics(xp.asarray(expected), xp.asarray(expected), xp.asarray(mask))
    assert np.all(np.asarray(m["cosine"])[np.asarray(m["num_queries"]) > 0] > 0.999)
    M = xp.asarray(np.asarray(jaxattn.manifold_matrix(cm)))
    E = xp.asarray(np.eye(3, 4, dtype=np.float32))
    wq, wk = jaxattn.derive_qk(M, E, E, 2)
    assert wq.shape == wk.shape == (4, 2)
    assert np.asarray(jaxattn.ngram_embeddings(E, xp.asarray(cm.contexts))).shape == (3, 4)
    assert np.asarray(jaxattn.normalize_std(xp.asarray(np.arange(6.0, dtype=np.float32)), 0.5)).std() == pytest.approx(
        0.5
    )
