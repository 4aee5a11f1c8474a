"""Tests for :func:`jaxattn.svd.truncated_svd` (exact and block-Krylov paths, dense and sparse inputs)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse
from jax.experimental import sparse as jsparse

import jaxattn.svd as svd_mod
from jaxattn.errors import JaxattnError
from jaxattn.svd import exact, krylov, randomized, truncated_svd


class Triplets(NamedTuple):
    """Duck-typed COO input, like ``jaxattn.counts.SparseMatrix``."""

    rows: np.ndarray
    cols: np.ndarray
    values: np.ndarray
    shape: tuple[int, int]


def with_spectrum(m: int, n: int, s: np.ndarray, seed: int) -> np.ndarray:
    """float32 (m, n) matrix with singular values ``s`` and random singular vectors."""
    rng = np.random.default_rng(seed)
    k = len(s)
    u, _ = np.linalg.qr(rng.standard_normal((m, k)))
    v, _ = np.linalg.qr(rng.standard_normal((n, k)))
    return ((u * s) @ v.T).astype(np.float32)


def sign_normalise(u: np.ndarray, vt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The documented convention: the largest-|.| entry of each U column is positive."""
    i = np.argmax(np.abs(u), axis=0)
    sign = np.sign(u[i, np.arange(u.shape[1])])
    sign[sign == 0] = 1
    return u * sign, vt * sign[:, None]


def numpy_svd(M: np.ndarray, rank: int):
    u, s, vt = np.linalg.svd(np.asarray(M, np.float64), full_matrices=False)
    u, vt = sign_normalise(u[:, :rank], vt[:rank])
    return u, s[:rank], vt


def max_angle(a: np.ndarray, b: np.ndarray) -> float:
    """Largest principal angle (radians) between the column spans of a and b."""
    qa, _ = np.linalg.qr(np.asarray(a, np.float64))
    qb, _ = np.linalg.qr(np.asarray(b, np.float64))
    cos = np.linalg.svd(qa.T @ qb, compute_uv=False)
    return float(np.arccos(np.clip(cos.min(), -1.0, 1.0)))


def as_np(*xs):
    return tuple(np.asarray(x) for x in xs)


# Few distinct shapes, so that the tests share compilations: (300, 200) at
# rank 12 for the dense and sparse randomized paths, (600, 300) at rank 16
# for the flat spectra, (120, 70) for the exact path.
RNG = np.random.default_rng(1234)
DENSE = RNG.standard_normal((120, 70)).astype(np.float32)
DECAY = with_spectrum(300, 200, 0.85 ** np.arange(200), seed=1)
SPARSE = scipy.sparse.random(300, 200, density=0.04, random_state=3, dtype=np.float32, format="csr")
SPARSE.data += 0.5  # away from zero, so the values matter
FLAT = dict(rank=16)


# ----------------------------------------------------------------------------- accuracy


def test_exact_matches_numpy():
    U, S, Vt = as_np(*truncated_svd(DENSE, 10, method="exact"))
    u, s, vt = numpy_svd(DENSE, 10)
    assert U.shape == (120, 10) and S.shape == (10,) and Vt.shape == (10, 70)
    assert U.dtype == S.dtype == Vt.dtype == np.float32
    np.testing.assert_allclose(S, s, rtol=1e-5)
    np.testing.assert_allclose(U, u, atol=2e-4)
    np.testing.assert_allclose(Vt, vt, atol=2e-4)


@pytest.mark.parametrize("M", [DECAY, DECAY.T], ids=["tall", "wide"])
def test_randomized_matches_numpy_decaying_spectrum(M):
    U, S, Vt = as_np(*truncated_svd(M, 12, method="randomized"))
    u, s, vt = numpy_svd(M, 12)
    assert U.shape == (M.shape[0], 12) and Vt.shape == (12, M.shape[1])
    np.testing.assert_allclose(S, s, rtol=1e-4)
    np.testing.assert_allclose(U, u, atol=1e-3)
    np.testing.assert_allclose(Vt, vt, atol=1e-3)
    np.testing.assert_allclose(U.T @ U, np.eye(12), atol=1e-5)
    np.testing.assert_allclose(Vt @ Vt.T, np.eye(12), atol=1e-5)


def test_randomized_flat_spectrum_values_and_subspace():
    # 16 nearly equal values, a gap, then a flat bulk: the case where a few
    # power iterations are not enough.
    s_true = np.concatenate([np.linspace(1.0, 0.99, 16), np.linspace(0.93, 0.90, 284)])
    M = with_spectrum(600, 300, s_true, seed=2)
    U, S, Vt = as_np(*truncated_svd(M, method="randomized", **FLAT))
    np.testing.assert_allclose(S, s_true[:16], rtol=1e-4)
    u, _, vt = numpy_svd(M, 16)
    assert max_angle(U, u) < 1e-2
    assert max_angle(Vt.T, vt.T) < 1e-2


def test_randomized_no_gap_flat_spectrum_values():
    # A Gaussian matrix: a flat bulk with no gap after the top values.
    M = (np.random.default_rng(5).standard_normal((600, 300)) / np.sqrt(600)).astype(np.float32)
    _, s, _ = numpy_svd(M, 16)
    _, S, _ = as_np(*truncated_svd(M, method="randomized", **FLAT))
    np.testing.assert_allclose(S, s, rtol=1e-4)
    assert np.all(np.diff(S) <= 0)


def test_randomized_warns_when_the_block_limit_stops_it(monkeypatch):
    monkeypatch.setattr(randomized, "MAX_BLOCKS", 2)
    with pytest.warns(RuntimeWarning, match="did not settle"):
        truncated_svd(DECAY, 12, method="randomized")


def test_randomized_low_rank_matrix():
    M = with_spectrum(300, 200, np.arange(1.0, 6.0)[::-1], seed=6)
    U, S, Vt = as_np(*truncated_svd(M, 12, method="randomized"))
    assert svd_mod.LAST_INFO["repairs"] > 0  # the Krylov space is invariant after one block
    np.testing.assert_allclose(S[:5], [5, 4, 3, 2, 1], rtol=1e-5)
    assert np.all(S[5:] < 1e-4)
    np.testing.assert_allclose(U.T @ U, np.eye(12), atol=1e-4)
    np.testing.assert_allclose(Vt @ Vt.T, np.eye(12), atol=1e-4)
    np.testing.assert_allclose((U * S) @ Vt, M, atol=1e-5)


def test_randomized_full_rank_request():
    U, S, Vt = as_np(*truncated_svd(DENSE[:40, :30], 30, method="randomized"))
    _, s, _ = numpy_svd(DENSE[:40, :30], 30)
    np.testing.assert_allclose(S, s, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose((U * S) @ Vt, DENSE[:40, :30], atol=1e-4)


def test_n_iter_fixed_number_of_blocks():
    truncated_svd(DECAY, 12, method="randomized")
    cache = krylov.krylov_step._cache_size()
    U, S, Vt = as_np(*truncated_svd(DECAY, 12, method="randomized", n_iter=3))
    assert svd_mod.LAST_INFO["products"] == 3
    assert krylov.krylov_step._cache_size() == cache
    _, s, _ = numpy_svd(DECAY, 12)
    np.testing.assert_allclose(S, s, rtol=1e-2)


# ----------------------------------------------------------------------------- sparse inputs


def sparse_forms(csr: scipy.sparse.csr_matrix):
    coo = csr.tocoo()
    # Duplicates must be summed: split every value in two entries.
    dup = scipy.sparse.coo_matrix(
        (np.r_[coo.data * 0.25, coo.data * 0.75], (np.r_[coo.row, coo.row], np.r_[coo.col, coo.col])),
        shape=csr.shape,
    )
    bcoo = jsparse.BCOO.fromdense(jnp.asarray(csr.toarray()))
    trip = Triplets(coo.row.astype(np.int32), coo.col.astype(np.int32), coo.data, csr.shape)
    return {"csr": csr, "coo_duplicates": dup, "csr_array": scipy.sparse.csr_array(csr), "bcoo": bcoo, "triplets": trip}


@pytest.mark.parametrize("method", ["exact", "randomized"])
def test_sparse_inputs_match_dense(method):
    dense = SPARSE.toarray()
    U0, S0, Vt0 = as_np(*truncated_svd(dense, 12, method=method))
    _, s, _ = numpy_svd(dense, 12)
    np.testing.assert_allclose(S0, s, rtol=1e-4)
    for name, M in sparse_forms(SPARSE).items():
        U, S, Vt = as_np(*truncated_svd(M, 12, method=method))
        np.testing.assert_allclose(S, S0, rtol=1e-5, err_msg=name)
        np.testing.assert_allclose(U, U0, atol=1e-4, err_msg=name)
        np.testing.assert_allclose(Vt, Vt0, atol=1e-4, err_msg=name)


def test_sparse_wide_and_empty_rows_and_columns():
    M = SPARSE.T.toarray()
    M[:, 10:20] = 0.0  # empty columns
    M[5:9] = 0.0  # empty rows
    U, S, Vt = as_np(*truncated_svd(scipy.sparse.csr_matrix(M), 12, method="randomized"))
    _, s, _ = numpy_svd(M, 12)
    np.testing.assert_allclose(S, s, rtol=1e-4)
    np.testing.assert_allclose(Vt[:, 10:20], 0.0, atol=1e-5)
    np.testing.assert_allclose(U[5:9], 0.0, atol=1e-5)


def test_integer_counts_become_float32():
    counts = (SPARSE.toarray() > 0.9).astype(np.int32) * 3
    U, S, Vt = truncated_svd(counts, 4, method="exact")
    assert U.dtype == S.dtype == Vt.dtype == jnp.float32
    trip = scipy.sparse.coo_matrix(counts)
    _, S2, _ = truncated_svd(Triplets(trip.row, trip.col, trip.data, trip.shape), 4, method="exact")
    np.testing.assert_allclose(np.asarray(S2), np.asarray(S), rtol=1e-6)


# ----------------------------------------------------------------------------- conventions


@pytest.mark.parametrize("method", ["exact", "randomized"])
def test_sign_convention(method):
    U, _, Vt = as_np(*truncated_svd(DECAY, 12, method=method))
    i = np.argmax(np.abs(U), axis=0)
    assert np.all(U[i, np.arange(12)] > 0)
    # flipping the pair keeps the product
    u, s, vt = numpy_svd(DECAY, 12)
    np.testing.assert_allclose((U * s) @ Vt, (u * s) @ vt, atol=1e-3)


def test_sign_convention_ties_use_first_index():
    # U columns with two entries of equal |.| and opposite sign.
    M = np.zeros((4, 3), np.float32)
    M[0, 0], M[1, 0] = -1.0, 1.0  # u = (-1, 1, 0, 0)/sqrt2 up to sign
    M[2, 1] = 0.5
    U, S, Vt = as_np(*truncated_svd(M, 2, method="exact"))
    assert U[0, 0] > 0 and U[1, 0] < 0
    np.testing.assert_allclose((U * S) @ Vt, M, atol=1e-6)


@pytest.mark.parametrize("form", ["dense", "sparse"])
def test_deterministic(form):
    M = DECAY if form == "dense" else SPARSE
    a = as_np(*truncated_svd(M, 12, method="randomized"))
    b = as_np(*truncated_svd(M, 12, method="randomized", key=jax.random.PRNGKey(0)))
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x, y)
    c = as_np(*truncated_svd(M, 12, method="randomized", key=jax.random.PRNGKey(7)))
    assert not np.array_equal(c[0], a[0])  # another start block
    np.testing.assert_allclose(c[1], a[1], rtol=1e-4)
    typed = as_np(*truncated_svd(M, 12, method="randomized", key=jax.random.key(7)))
    np.testing.assert_allclose(typed[1], a[1], rtol=1e-4)


def test_no_retrace_on_repeated_calls():
    truncated_svd(SPARSE, 12, method="randomized")
    truncated_svd(DENSE, 10, method="exact")
    fns = (krylov.krylov_step, krylov.krylov_finish, exact.exact_svd)
    sizes = [f._cache_size() for f in fns]
    other = SPARSE.copy()
    other.data = other.data * 2.0  # same structure, new values
    truncated_svd(other, 12, method="randomized", key=jax.random.PRNGKey(3))
    truncated_svd(DENSE * 3.0, 4, method="exact")  # the rank is not a compile-time constant
    assert sizes == [f._cache_size() for f in fns]


def test_auto_rule():
    truncated_svd(DENSE, 5)
    assert svd_mod.LAST_INFO["method"] == "exact"
    assert svd_mod.auto_method(120, 70, 5) == "exact"
    assert svd_mod.auto_method(svd_mod.AUTO_EXACT_MAX_MIN_DIM, 2000, 64) == "exact"
    assert svd_mod.auto_method(svd_mod.AUTO_EXACT_MAX_MIN_DIM + 1, 2000, 64) == "randomized"
    assert svd_mod.auto_method(svd_mod.AUTO_EXACT_MAX_MIN_DIM + 1, 2000, 110) == "exact"
    assert svd_mod.auto_method(300_000, 32_000, 64) == "randomized"
    assert svd_mod.auto_method(1_000_000, 20, 5) == "randomized"  # too many elements


def test_float64_with_x64():
    with jax.enable_x64(True):
        M = DECAY.astype(np.float64)
        _, s, _ = numpy_svd(M, 12)
        for method in ("exact", "randomized"):
            U, S, Vt = truncated_svd(M, 12, method=method, tol=1e-10)
            assert U.dtype == S.dtype == Vt.dtype == jnp.float64
            np.testing.assert_allclose(np.asarray(S), s, rtol=1e-9)
    _, S, _ = truncated_svd(DENSE.astype(np.float64), 8, method="exact")
    assert S.dtype == jnp.float32


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("rank", [0, -1, 71, 2.5, True, None])
def test_bad_rank(rank):
    with pytest.raises(JaxattnError, match=f"rank={rank!r}"):
        truncated_svd(DENSE, rank)


def test_bad_rank_sparse():
    with pytest.raises(JaxattnError, match="rank=201"):
        truncated_svd(SPARSE, 201)


@pytest.mark.parametrize(
    "M",
    [np.ones(5, np.float32), np.ones((2, 3, 4), np.float32), Triplets(np.zeros(1), np.zeros(1), np.ones(1), (2, 2, 2))],
    ids=["1d", "3d", "triplets-3d"],
)
def test_not_2d(M):
    with pytest.raises(JaxattnError, match="2-D"):
        truncated_svd(M, 1)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite(bad):
    dense = DENSE.copy()
    dense[3, 4] = bad
    with pytest.raises(JaxattnError, match="NaN or inf"):
        truncated_svd(dense, 2)
    sp = SPARSE.copy()
    sp.data[7] = bad
    with pytest.raises(JaxattnError, match="non-finite"):
        truncated_svd(sp, 2)


def test_bad_options():
    with pytest.raises(JaxattnError, match="method='fast'"):
        truncated_svd(DENSE, 2, method="fast")
    with pytest.raises(JaxattnError, match="tol=0"):
        truncated_svd(DENSE, 2, tol=0)
    with pytest.raises(JaxattnError, match="oversample=-1"):
        truncated_svd(DENSE, 2, oversample=-1)
    with pytest.raises(JaxattnError, match="n_iter=0"):
        truncated_svd(DENSE, 2, n_iter=0)
    with pytest.raises(JaxattnError, match="row index"):
        truncated_svd(Triplets(np.array([5]), np.array([0]), np.array([1.0]), (3, 3)), 1)


# ----------------------------------------------------------------------------- slow


@pytest.mark.slow
def test_large_sparse_zipf_matches_arpack():
    import scipy.sparse.linalg

    rng = np.random.default_rng(0)
    R, V, k = 40_000, 6_000, 32
    p = np.arange(1, V + 1, dtype=np.float64) ** -1.1
    p /= p.sum()
    rows = np.repeat(np.arange(R), 6)
    cols = rng.choice(V, size=rows.size, p=p)
    C = scipy.sparse.csr_matrix((np.ones(rows.size, np.float32), (rows, cols)), shape=(R, V))
    rs, cs = np.asarray(C.sum(1)).ravel(), np.asarray(C.sum(0)).ravel()
    M = scipy.sparse.diags(1 / np.sqrt(rs)) @ C @ scipy.sparse.diags(1 / np.sqrt(np.maximum(cs, 1)))
    M = scipy.sparse.csr_matrix(M, dtype=np.float32)
    s_ref = np.sort(scipy.sparse.linalg.svds(M.astype(np.float64), k=k, tol=1e-10, return_singular_vectors=False))[::-1]
    _, S, _ = truncated_svd(M, k)
    assert svd_mod.LAST_INFO["method"] == "randomized"
    np.testing.assert_allclose(np.asarray(S), s_ref, rtol=1e-4)
