"""Bucketed padding of sparse operators: the same SVD, and one compiled kernel for similar shapes."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import scipy.sparse

from jaxattn.svd import operators
from jaxattn.svd.krylov import krylov_step
from jaxattn.svd.operators import HostSparse, pad_sparse, shape_bucket
from jaxattn.svd.randomized import randomized_svd


def _sparse(R: int, V: int, density: float, seed: int) -> HostSparse:
    m = scipy.sparse.random_array((R, V), density=density, random_state=seed, format="csr").astype(np.float32)
    m.sum_duplicates()
    return HostSparse(m)


@pytest.mark.parametrize("x", [1, 255, 256, 257, 1000, 12745, 92230, 2**20 + 1])
def test_shape_bucket_is_a_small_round_up(x: int) -> None:
    b = shape_bucket(x)
    assert b >= x and b >= 256
    assert b <= max(256, x * 1.25 + 1)
    assert shape_bucket(b) == b  # a bucket is its own bucket


@pytest.mark.parametrize(("R", "V"), [(900, 700), (700, 900), (1300, 257)])
def test_pad_sparse_keeps_the_matrix_and_the_small_side(R: int, V: int) -> None:
    m = _sparse(R, V, 0.02, 0)
    p = pad_sparse(m, V > R).csr
    R2, V2 = p.shape
    assert R2 >= R and V2 >= V and p.nnz >= m.csr.nnz
    assert p.nnz == shape_bucket(m.csr.nnz)
    dense = p.toarray()
    np.testing.assert_array_equal(dense[:R, :V], m.csr.toarray())
    assert not dense[R:].any() and not dense[:, V:].any()
    assert (V2 >= R2) if V > R else (R2 >= V2)
    # The transposed CSR the operator uses keeps the explicit zeros, so its nnz is the padded one.
    assert p.tocsc().nnz == p.nnz
    assert p.has_sorted_indices


@pytest.mark.parametrize(("R", "V"), [(1500, 1100), (1100, 1500)])
def test_padded_svd_equals_unpadded(R: int, V: int) -> None:
    m = _sparse(R, V, 0.01, 1)
    key = jax.random.PRNGKey(5)
    u1, s1, vt1, i1 = randomized_svd(m, (R, V), 16, key, 1e-4, 0, None, pad=True)
    u0, s0, vt0, i0 = randomized_svd(m, (R, V), 16, key, 1e-4, 0, None, pad=False)
    assert u1.shape == (R, 16) and vt1.shape == (16, V)
    assert i1["products"] == i0["products"]
    np.testing.assert_allclose(np.asarray(s1), np.asarray(s0), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(u1), np.asarray(u0), atol=2e-4)
    np.testing.assert_allclose(np.asarray(vt1), np.asarray(vt0), atol=2e-4)
    # And against numpy in float64.
    ref = np.linalg.svd(m.csr.toarray().astype(np.float64), compute_uv=False)[:16]
    np.testing.assert_allclose(np.asarray(s1), ref, rtol=1e-4)


def test_similar_tables_share_one_compiled_step() -> None:
    # Two tables whose shapes and nnz differ slightly fall in the same buckets.
    a, b = _sparse(1400, 1030, 0.010, 2), _sparse(1390, 1030, 0.0102, 3)
    assert a.csr.nnz != b.csr.nnz
    assert pad_sparse(a, False).csr.shape == pad_sparse(b, False).csr.shape
    assert pad_sparse(a, False).csr.nnz == pad_sparse(b, False).csr.nnz
    key = jax.random.PRNGKey(0)
    randomized_svd(a, a.csr.shape, 16, key, 1e-4, 0, None)
    before = krylov_step._cache_size()
    randomized_svd(b, b.csr.shape, 16, key, 1e-4, 0, None)
    assert krylov_step._cache_size() == before


def test_rank_deficient_matrix_is_redone_unpadded() -> None:
    # Rank 3 < requested rank 16: the padded run's null space may leave M's coordinates.
    rng = np.random.default_rng(0)
    low = (rng.random((600, 3)) @ rng.random((3, 500))).astype(np.float32)
    low[rng.random(low.shape) < 0.9] = 0.0
    m = HostSparse(scipy.sparse.csr_array(low))
    u, s, vt, _ = randomized_svd(m, low.shape, 16, jax.random.PRNGKey(1), 1e-4, 0, None)
    u, vt = np.asarray(u, np.float64), np.asarray(vt, np.float64)
    np.testing.assert_allclose(u.T @ u, np.eye(16), atol=1e-4)
    np.testing.assert_allclose(vt @ vt.T, np.eye(16), atol=1e-4)
    assert operators.shape_bucket(600) >= 600
