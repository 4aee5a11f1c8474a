"""Truncated singular value decomposition of dense and sparse matrices.

The public entry point is :func:`truncated_svd`. It returns the top ``rank``
singular triplets of a matrix ``M`` of shape ``(R, V)`` with one of two
algorithms:

* ``"exact"``: the dense thin SVD, truncated. For small matrices. A matrix given
  on the host (numpy, scipy.sparse, COO triplets) is decomposed there by numpy's
  LAPACK (no compilation per shape); a jax array by ``jnp.linalg.svd``.
* ``"randomized"``: a randomized block Krylov method (Musco & Musco 2015,
  "Randomized block Krylov methods for stronger and faster approximate
  singular value decomposition"): block Lanczos with full
  reorthogonalisation on the Gram matrix ``A^T A`` of the *smaller* side
  (``A = M`` when ``V <= R``, else ``M^T``), from a random start block, with
  a Rayleigh-Ritz step at the end, and thick restarts that keep the memory at
  a few blocks. Sparse inputs are never densified on this path.

The package, in the order a call goes through it:

* :mod:`~jaxattn.svd.operators`: the input forms (dense, ``scipy.sparse``, BCOO, COO
  triplets) normalised to a dense jax array or a host CSR, the shape and finiteness
  checks, and the products with ``A`` and ``A^T A`` (jax ``BCSR @ dense`` when sparse);
* :mod:`~jaxattn.svd.exact`: the exact path and the sign convention;
* :mod:`~jaxattn.svd.randomized`: the host side of the block Krylov method (start
  block, projection ``T``, stopping rule, thick restarts);
* :mod:`~jaxattn.svd.krylov`: its jitted device kernels (one Lanczos step, repair,
  restart, the final Ritz triplets).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from jaxattn.errors import JaxattnError
from jaxattn.svd.exact import exact_svd, exact_svd_host, one_blas_thread
from jaxattn.svd.operators import HostSparse, as_matrix, check_finite
from jaxattn.svd.randomized import randomized_svd
from jaxattn.typing import Array, Float, PRNGKey

__all__ = [
    "AUTO_EXACT_MAX_ELEMENTS",
    "AUTO_EXACT_MAX_MIN_DIM",
    "DEFAULT_OVERSAMPLE",
    "LAST_INFO",
    "auto_method",
    "one_blas_thread",
    "truncated_svd",
]

#: ``method="auto"`` uses the exact dense SVD when ``R * V`` is at most this
#: many elements (64 MiB in float32) ...
AUTO_EXACT_MAX_ELEMENTS = 1 << 24
#: ... and ``min(R, V)`` is at most this, or ``10 * rank >= min(R, V)`` (then
#: the Krylov space would span most of the small side anyway).
AUTO_EXACT_MAX_MIN_DIM = 1024
#: Extra columns in the Krylov block beyond ``rank`` (before rounding the
#: block up to a multiple of 16). Block Krylov needs no oversampling to be
#: accurate; on flat spectra 8 more columns save about one block in 15 but
#: make every block ~20% dearer, so the default is none.
DEFAULT_OVERSAMPLE = 0
#: Diagnostics of the last :func:`truncated_svd` call, for benchmarks and tests (not a
#: stable API): ``method``, and for the randomized path ``block``, ``products``,
#: ``restarts``, ``repairs``, ``converged``, ``small_side`` and ``ritz_history``. The same
#: dict object is cleared and refilled by every call.
LAST_INFO: dict[str, Any] = {}


def auto_method(R: int, V: int, rank: int) -> str:
    """The algorithm ``method="auto"`` picks (see :func:`truncated_svd`).

    Args:
        R: rows of M.
        V: columns of M.
        rank: the requested rank.

    Returns:
        ``"exact"`` for small matrices, ``"randomized"`` otherwise.
    """
    n = min(R, V)
    if R * V <= AUTO_EXACT_MAX_ELEMENTS and (n <= AUTO_EXACT_MAX_MIN_DIM or 10 * rank >= n):
        return "exact"
    return "randomized"


def _check_options(rank: Any, shape: tuple[int, int], tol: float, oversample: int, n_iter: int | None) -> int:
    """Validates the scalar arguments of :func:`truncated_svd`; returns ``rank`` as an int."""
    R, V = shape
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)):
        raise JaxattnError(f"truncated_svd: rank={rank!r} must be an int")
    rank = int(rank)
    if rank < 1 or rank > min(R, V):
        raise JaxattnError(
            f"truncated_svd: rank={rank} must be in [1, min(R, V)] = [1, {min(R, V)}] for M of shape {shape}"
        )
    if not (isinstance(oversample, (int, np.integer)) and oversample >= 0):
        raise JaxattnError(f"truncated_svd: oversample={oversample!r} must be an int >= 0")
    if n_iter is not None and not (isinstance(n_iter, (int, np.integer)) and n_iter >= 1):
        raise JaxattnError(f"truncated_svd: n_iter={n_iter!r} must be an int >= 1 or None")
    if not (tol > 0):
        raise JaxattnError(f"truncated_svd: tol={tol!r} must be > 0")
    return rank


def _exact(mat: Any, rank: int, *, on_host: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The exact path: numpy's LAPACK for a matrix given on the host (no compilation per shape), else jitted."""
    LAST_INFO.clear()
    if on_host:
        LAST_INFO.update(method="exact", where="host")
        host = mat.csr.toarray() if isinstance(mat, HostSparse) else np.asarray(mat)
        hu, hs, hvt = exact_svd_host(host)
        return jax.device_put(hu[:, :rank]), jax.device_put(hs[:rank]), jax.device_put(hvt[:rank])
    LAST_INFO.update(method="exact", where="device")
    u, s, vt = exact_svd(mat)
    return u[:, :rank], s[:rank], vt[:rank]


def truncated_svd(
    M: Any,
    rank: Any,  # an int; anything else raises JaxattnError (not a type-check error)
    *,
    key: PRNGKey | None = None,
    method: str = "auto",
    tol: float = 1e-4,
    oversample: int = DEFAULT_OVERSAMPLE,
    n_iter: int | None = None,
) -> tuple[Float[Array, "R rank"], Float[Array, " rank"], Float[Array, "rank V"]]:
    """Top-``rank`` singular value decomposition ``M ~= U @ diag(S) @ Vt``.

    Args:
        M: (R, V) matrix: a dense numpy or jax array; a ``scipy.sparse``
            matrix or array; a ``jax.experimental.sparse.BCOO``; or any object
            with attributes ``rows``, ``cols``, ``values`` (1-D COO triplets,
            duplicates summed) and ``shape`` (a 2-tuple), such as
            ``jaxattn.counts.SparseMatrix``. Integer and boolean inputs are
            converted to float.
        rank: number of singular triplets, ``1 <= rank <= min(R, V)``.
        key: ``jax.random.PRNGKey`` (or typed key) for the random start block
            of the randomized method; ``None`` means ``PRNGKey(0)``. The same
            inputs and key give the same numbers, bit for bit.
        method: ``"exact"``, ``"randomized"`` or ``"auto"``. ``"auto"`` uses
            ``"exact"`` when ``R * V <= AUTO_EXACT_MAX_ELEMENTS`` (2**24) and
            either ``min(R, V) <= AUTO_EXACT_MAX_MIN_DIM`` (1024) or
            ``10 * rank >= min(R, V)``; ``"randomized"`` otherwise.
            ``"exact"`` densifies a sparse input.
        tol: randomized only: relative accuracy target for the singular
            values. The Krylov iteration stops once none of the top ``rank``
            Ritz singular values moved by more than ``tol`` (relative) in each
            of the last two blocks, and keeps one more block (already computed
            by then). Ritz values increase monotonically towards the singular
            values, and on the flat spectra this was tuned on the final error
            is one to three orders of magnitude below ``tol``. A
            ``RuntimeWarning`` says when the block limit stopped the iteration
            first. Ignored when ``n_iter`` is given.
        oversample: randomized only: the Krylov block has ``rank +
            oversample`` columns, rounded up to a multiple of 16 and capped at
            ``min(R, V)``.
        n_iter: randomized only: a fixed number of Krylov blocks (Gram
            products, counted across thick restarts) instead of the ``tol``
            rule; at most ``min(R, V) // block`` when the small side is too
            short to restart.

    Returns:
        ``U`` (R, rank) with orthonormal columns, ``S`` (rank,) descending and
        non-negative, ``Vt`` (rank, V) with orthonormal rows: jax arrays of
        float32, or float64 when jax x64 is enabled and the input is float64.

        Sign convention: for every k, the pair ``(U[:, k], Vt[k])`` is flipped
        so that the entry of ``U[:, k]`` with the largest absolute value is
        positive (the first such entry on ties).

    Raises:
        JaxattnError: ``M`` is not 2-D or holds NaN or inf; ``rank`` is not an
            int in ``[1, min(R, V)]``; ``method``, ``tol``, ``oversample`` or
            ``n_iter`` is invalid; a sparse index is out of range.
    """
    if method not in ("auto", "exact", "randomized"):
        raise JaxattnError(f"truncated_svd: method={method!r}; expected 'auto', 'exact' or 'randomized'")
    mat, shape = as_matrix(M)
    R, V = shape
    rank = _check_options(rank, shape, tol, oversample, n_iter)
    check_finite(mat)
    if method == "auto":
        method = auto_method(R, V, rank)
    if method == "exact":
        return _exact(mat, rank, on_host=not isinstance(M, jax.Array))
    if key is None:
        key = jax.random.PRNGKey(0)
    u, s, vt, info = randomized_svd(mat, shape, rank, key, float(tol), int(oversample), n_iter)
    LAST_INFO.clear()
    LAST_INFO.update(info)
    return u, s, vt
