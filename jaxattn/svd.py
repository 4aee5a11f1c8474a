"""Truncated singular value decomposition of dense and sparse matrices.

The public entry point is :func:`truncated_svd`. It returns the top ``rank``
singular triplets of a matrix ``M`` of shape ``(R, V)`` with one of two
algorithms:

* ``"exact"``: the dense thin SVD (``jnp.linalg.svd(full_matrices=False)``),
  truncated. For small matrices.
* ``"randomized"``: a randomized block Krylov method (Musco & Musco 2015,
  "Randomized block Krylov methods for stronger and faster approximate
  singular value decomposition"): block Lanczos with full
  reorthogonalisation on the Gram matrix ``A^T A`` of the *smaller* side
  (``A = M`` when ``V <= R``, else ``M^T``), from a random start block, with
  a Rayleigh-Ritz step at the end. Unlike the Halko-Martinsson-Tropp range
  finder with a few power iterations, it reaches a requested accuracy on the
  flat spectra of word-level manifold matrices: on a 3e5 x 32k manifold
  whose 64th singular value is within 0.1% of its neighbours, 7 power
  iterations leave a 5% error, while ~15 Krylov blocks reach 1e-6.

Per Krylov block (width ``b`` = rank rounded up to a multiple of 16), the
device does one product with ``M`` and one with ``M^T`` (``2 nnz b``
multiply-adds), a block Gram-Schmidt against the earlier blocks and a
CholeskyQR2; the host computes the Ritz values of the small projection ``T``
for the stopping test while the device already runs the next block. Memory
stays at a few blocks however many the tolerance needs: after a cycle of new
blocks, a thick restart keeps the top Ritz vectors (``_KEEP_BLOCKS`` blocks)
and continues from the residual block, so ``T`` is block tridiagonal bordered
by the kept Ritz pairs. Singular values are taken as ``||A x||`` for the final Ritz vectors
``x``, not as square roots of Gram eigenvalues, so they keep float32 accuracy.

Sparse inputs are never densified on the randomized path. They are converted
once, on the host, to two jax ``BCSR`` matrices (``M`` and ``M^T``; scipy's
CSC of ``M`` is the CSR of ``M^T``), and the products are jax's own jitted
``BCSR @ dense``: a sparse-dense kernel on CPU and cuSPARSE on GPU. That is
matrix-free (``2 nnz b`` multiply-adds per block, no ``(nnz, b)``
intermediate) and about 3x faster on CPU than ``segment_sum(values[:, None]
* X[cols], rows)`` over the COO triplets.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
import scipy.sparse
from jax.experimental import sparse as jsparse

from jaxattn.errors import JaxattnError

try:  # optional: keeps the small host eigenproblems on one BLAS thread
    from threadpoolctl import ThreadpoolController
except ImportError:  # pragma: no cover
    ThreadpoolController = None

__all__ = [
    "AUTO_EXACT_MAX_ELEMENTS",
    "AUTO_EXACT_MAX_MIN_DIM",
    "DEFAULT_OVERSAMPLE",
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
# The Krylov block width is rounded up to a multiple of this (SIMD width).
_BLOCK_MULTIPLE = 16
# Upper bound on the number of Krylov blocks (Gram products) when ``n_iter`` is None.
_MAX_BLOCKS = 80
# Thick restarts: T holds _KEEP_BLOCKS blocks of kept Ritz vectors plus
# _CYCLE_BLOCKS new Lanczos blocks; the basis buffer one block more.
_KEEP_BLOCKS = 2
_CYCLE_BLOCKS = 4
# Second reorthogonalisation pass when a column keeps less than this of its norm.
_REORTH_RATIO = 2e-3
# Singular values below this fraction of the largest count as zero (their
# big-side vectors are then completed by QR).
_TINY_SIGMA = 1e-3
# A block whose coupling ``r`` is below this many float eps times ||A^T A||
# means the Krylov space is invariant: stop.
_BREAKDOWN = 32
# Diagnostics of the last call (for benchmarks and tests; not part of the API).
_LAST_INFO: dict[str, Any] = {}


# ---------------------------------------------------------------------------
# Input handling
# ---------------------------------------------------------------------------


class _Sparse(NamedTuple):
    """Host-side COO triplets with duplicates summed (scipy CSR form)."""

    csr: scipy.sparse.csr_array


def _compute_dtype(dtype: Any) -> np.dtype:
    """float64 only when jax x64 is on and the input is float64."""
    if np.dtype(dtype) == np.float64 and jax.config.jax_enable_x64:
        return np.dtype(np.float64)
    return np.dtype(np.float32)


def _check_shape(shape: Any) -> tuple[int, int]:
    try:
        shape = tuple(int(d) for d in shape)
    except TypeError as exc:
        raise JaxattnError(f"truncated_svd: M.shape={shape!r} is not a shape") from exc
    if len(shape) != 2:
        raise JaxattnError(f"truncated_svd: M must be 2-D (R, V); got shape {shape} with ndim={len(shape)}")
    if min(shape) < 1:
        raise JaxattnError(f"truncated_svd: M has an empty dimension, shape {shape}")
    return shape


def _coo_to_csr(rows, cols, values, shape) -> scipy.sparse.csr_array:
    rows = np.asarray(rows).ravel()
    cols = np.asarray(cols).ravel()
    values = np.asarray(values).ravel()
    if not (rows.shape == cols.shape == values.shape):
        raise JaxattnError(
            "truncated_svd: rows, cols and values must have the same length; got "
            f"{rows.shape[0]}, {cols.shape[0]}, {values.shape[0]}"
        )
    if rows.size:
        if rows.min() < 0 or rows.max() >= shape[0]:
            raise JaxattnError(
                f"truncated_svd: a row index is outside [0, {shape[0]}): min {rows.min()}, max {rows.max()}"
            )
        if cols.min() < 0 or cols.max() >= shape[1]:
            raise JaxattnError(
                f"truncated_svd: a column index is outside [0, {shape[1]}): min {cols.min()}, max {cols.max()}"
            )
    dtype = _compute_dtype(values.dtype)
    csr = scipy.sparse.csr_array((values.astype(dtype, copy=False), (rows, cols)), shape=shape)
    csr.sum_duplicates()
    return csr


def _as_matrix(M: Any) -> tuple[jax.Array | _Sparse, tuple[int, int]]:
    """Normalises ``M`` to a dense jax array or a :class:`_Sparse`."""
    if scipy.sparse.issparse(M):
        shape = _check_shape(M.shape)
        csr = scipy.sparse.csr_array(M)
        csr = csr.astype(_compute_dtype(csr.dtype), copy=False)
        if not csr.has_canonical_format:  # never reorder the caller's arrays in place
            csr = csr.copy()
            csr.sum_duplicates()
        return _Sparse(csr), shape
    if isinstance(M, jsparse.BCOO):
        shape = _check_shape(M.shape)
        if M.n_batch or M.n_dense:
            raise JaxattnError(
                "truncated_svd: BCOO input must have no batch or dense dimensions; got "
                f"n_batch={M.n_batch}, n_dense={M.n_dense}"
            )
        idx = np.asarray(M.indices)
        data = np.asarray(M.data)
        # BCOO pads with out-of-range indices; drop them.
        keep = (idx[:, 0] < shape[0]) & (idx[:, 1] < shape[1])
        return _Sparse(_coo_to_csr(idx[keep, 0], idx[keep, 1], data[keep], shape)), shape
    if all(hasattr(M, a) for a in ("rows", "cols", "values", "shape")):
        shape = _check_shape(M.shape)
        return _Sparse(_coo_to_csr(M.rows, M.cols, M.values, shape)), shape
    arr = M if isinstance(M, jax.Array) else np.asarray(M)
    if arr.ndim != 2:
        raise JaxattnError(f"truncated_svd: M must be 2-D (R, V); got shape {tuple(arr.shape)} with ndim={arr.ndim}")
    shape = _check_shape(arr.shape)
    if not (jnp.issubdtype(arr.dtype, jnp.number) or arr.dtype == bool):
        raise JaxattnError(f"truncated_svd: M has non-numeric dtype {arr.dtype}")
    if jnp.issubdtype(arr.dtype, jnp.complexfloating):
        raise JaxattnError(f"truncated_svd: complex M (dtype {arr.dtype}) is not supported")
    if isinstance(arr, np.ndarray):
        if not np.isfinite(arr).all():
            raise JaxattnError("truncated_svd: M contains NaN or inf")
    elif not bool(_all_finite(arr)):
        raise JaxattnError("truncated_svd: M contains NaN or inf")
    return jnp.asarray(arr, dtype=_compute_dtype(arr.dtype)), shape


def _check_finite(mat: jax.Array | _Sparse) -> None:
    """Sparse values must be finite (dense inputs are checked in :func:`_as_matrix`)."""
    if isinstance(mat, _Sparse):
        data = mat.csr.data
        if not np.isfinite(data).all():
            bad = data[~np.isfinite(data)][0]
            raise JaxattnError(f"truncated_svd: M contains a non-finite value ({bad})")


@jax.jit
def _all_finite(a: jax.Array) -> jax.Array:
    return jnp.isfinite(a).all()


# ---------------------------------------------------------------------------
# Sparse products
# ---------------------------------------------------------------------------


def _bcsr(compressed: scipy.sparse.csr_array | scipy.sparse.csc_array, shape: tuple[int, int]) -> jsparse.BCSR:
    """A jax BCSR matrix of ``shape`` from a canonical scipy CSR (or a CSC, read as the CSR of the transpose)."""
    return jsparse.BCSR(
        (
            jnp.asarray(compressed.data),
            jnp.asarray(compressed.indices.astype(np.int32, copy=False)),
            jnp.asarray(compressed.indptr.astype(np.int32, copy=False)),
        ),
        shape=shape,
        indices_sorted=True,
        unique_indices=True,
    )


class _SparseOp(NamedTuple):
    """``A`` (m, n), n <= m, as two CSR matrices, for ``A @ X`` and ``A^T @ Y``.

    ``BCSR @ dense`` is jax's own sparse-dense product: a dedicated kernel on
    CPU (``cpu_csr_sparse_dense``) and cuSPARSE on GPU, matrix-free and about
    3x faster on CPU than a gather plus ``segment_sum`` over the COO triplets.
    """

    fwd: jsparse.BCSR  # A, (m, n)
    adj: jsparse.BCSR  # A^T, (n, m)


def _sparse_op(sparse: _Sparse, transpose: bool) -> _SparseOp:
    csr = sparse.csr
    csc = csr.tocsc()  # its indptr / indices are the CSR of M^T (sorted, no duplicates)
    R, V = csr.shape
    m_rows = _bcsr(csr, (R, V))  # M
    m_cols = _bcsr(csc, (V, R))  # M^T
    return _SparseOp(m_cols, m_rows) if transpose else _SparseOp(m_rows, m_cols)


def _apply(op: jax.Array | _SparseOp, x: jax.Array, transpose: bool) -> jax.Array:
    """``A @ x`` for x (n, b) -> (m, b); A is ``op`` or, dense with ``transpose``, ``op.T``."""
    if isinstance(op, _SparseOp):
        return op.fwd @ x
    return op.T @ x if transpose else op @ x


def _gram(op: jax.Array | _SparseOp, x: jax.Array, transpose: bool) -> jax.Array:
    """``A^T (A @ x)`` for x (n, b) -> (n, b)."""
    if isinstance(op, _SparseOp):
        return op.adj @ (op.fwd @ x)
    return op @ (op.T @ x) if transpose else op.T @ (op @ x)


# ---------------------------------------------------------------------------
# Exact path
# ---------------------------------------------------------------------------


@jax.jit
def _sign_fix(u: jax.Array, s: jax.Array, vt: jax.Array):
    """Flips (u[:, k], vt[k]) so that u[:, k]'s largest-|.| entry is positive."""
    i = jnp.argmax(jnp.abs(u), axis=0)
    sign = jnp.sign(jnp.take_along_axis(u, i[None, :], axis=0)[0])
    sign = jnp.where(sign == 0, 1, sign).astype(u.dtype)
    return u * sign[None, :], s, vt * sign[:, None]


@jax.jit
def _exact_svd(a: jax.Array):
    """Full thin SVD with the sign convention (one compilation per shape, any rank)."""
    u, s, vt = jnp.linalg.svd(a, full_matrices=False)
    return _sign_fix(u, s, vt)


# ---------------------------------------------------------------------------
# Randomized path: block Lanczos on A.T @ A in the small dimension
# ---------------------------------------------------------------------------


def _inv_upper(r: jax.Array) -> jax.Array:
    eye = jnp.eye(r.shape[0], dtype=r.dtype)
    return jax.scipy.linalg.solve_triangular(r, eye, lower=False)


def _cholqr2(z: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """CholeskyQR2: z (n, b) = q @ r; also returns whether it can be trusted."""
    r1 = jnp.linalg.cholesky(z.T @ z).T
    q = z @ _inv_upper(r1)
    r2 = jnp.linalg.cholesky(q.T @ q).T
    q = q @ _inv_upper(r2)
    d = jnp.abs(jnp.diagonal(r1))
    # Trust it while cond(z) is well below 1/sqrt(eps) (where CholQR2 is stable).
    ok = (
        jnp.all(jnp.isfinite(q))
        & jnp.all(jnp.isfinite(r2))
        & (jnp.min(d) > 16 * jnp.sqrt(jnp.finfo(z.dtype).eps) * jnp.max(d))
    )
    return q, r2 @ r1, ok


def _orthogonalize_against(z: jax.Array, basis: jax.Array, j: jax.Array) -> jax.Array:
    """Removes from z (n, b) its components along blocks 0..j of basis (block Gram-Schmidt).

    ``basis`` is (num_blocks, b, n): each block is stored transposed, which
    makes these (b, n) @ (n, b) products markedly faster on CPU.
    """

    def body(i, z):
        qi = basis[i]
        return z - qi.T @ (qi @ z)

    return jax.lax.fori_loop(0, j + 1, body, z)


@functools.partial(jax.jit, donate_argnames=("basis",))
def _repair_block(basis: jax.Array, z: jax.Array, j: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Block j+1 and r for a (nearly) rank-deficient residual z (n, b).

    Used when CholeskyQR2 cannot be trusted: the Krylov space is nearly
    invariant, or the matrix has low rank. The tiny directions of z are then
    rounding noise with components along the basis, so a Householder QR
    first makes every column unit length, those are orthogonalised against
    the basis (twice) and orthonormalised again, and ``r = q^T z`` is
    re-triangularised (z lies in the span of q). Compiled only when needed.

    Returns:
        The basis with block j+1 replaced, and r (b, b) upper triangular.
    """
    q1, _ = jnp.linalg.qr(z)
    q1 = _orthogonalize_against(_orthogonalize_against(q1, basis, j), basis, j)
    q2, _ = jnp.linalg.qr(q1)
    o, u = jnp.linalg.qr(q2.T @ z)  # z = q2 (q2^T z) = (q2 o) u
    return basis.at[j + 1].set((q2 @ o).T), u


@functools.partial(jax.jit, static_argnames=("num_blocks",))
def _krylov_start(q0: jax.Array, *, num_blocks: int) -> jax.Array:
    """Basis buffer (num_blocks, b, n) holding the orthonormal start block q0 (n, b), transposed."""
    n, b = q0.shape
    return jnp.zeros((num_blocks, b, n), q0.dtype).at[0].set(q0.T)


@functools.partial(jax.jit, static_argnames=("transpose", "m", "n"), donate_argnames=("basis",))
def _krylov_step(op, basis: jax.Array, j: jax.Array, *, transpose: bool, m: int, n: int):
    """One block Lanczos step on ``G = A^T A`` with full reorthogonalisation.

    Args:
        op: the matrix: a dense (R, V) array or a :class:`_SparseOp`.
        basis: (num_blocks, b, n) orthonormal blocks, transposed; blocks
            0..j are filled.
        j: the current block (int32 scalar, traced: one compilation for all j).
        transpose: dense only: ``A = op.T`` instead of ``op``.
        m: rows of A (the large side).
        n: columns of A (the small side).

    Returns:
        The basis with block j+1 filled; ``a`` (b, b), the diagonal block j of
        the block-tridiagonal projection ``T = Q^T G Q``; ``r`` (b, b), upper
        triangular, its block (j+1, j); the residual ``z`` (n, b) = block j+1
        @ r; and ``ok``, False when z was too ill-conditioned for CholeskyQR2
        (then :func:`_repair_block` must redo block j+1 and r).
    """
    qt = basis[j]
    q = qt.T
    z0 = _gram(op, q, transpose)
    a = qt @ z0
    a = 0.5 * (a + a.T)
    z = _orthogonalize_against(z0 - q @ a, basis, j)
    # "Twice is enough": when a column lost most of its norm, one pass leaves
    # rounding-level components along the basis that are large relative to
    # what remains; a second pass removes them.
    shrunk = jnp.any(jnp.linalg.norm(z, axis=0) <= _REORTH_RATIO * jnp.linalg.norm(z0, axis=0))
    z = jax.lax.cond(shrunk, lambda z: _orthogonalize_against(z, basis, j), lambda z: z, z)
    qn, r, ok = _cholqr2(z)
    return basis.at[j + 1].set(qn.T), a, r, z, ok


@functools.partial(jax.jit, static_argnames=("transpose", "m", "n"))
def _krylov_finish(op, basis: jax.Array, w: jax.Array, used: jax.Array, *, transpose: bool, m: int, n: int):
    """Ritz vectors and singular values, as the signed (U, S, Vt) of M.

    Args:
        op, transpose, m, n: as for :func:`_krylov_step`.
        basis: (num_blocks, b, n).
        w: (num_blocks, b, k) the top eigenvectors of ``T``, by block.
        used: number of blocks in ``T``.

    Returns:
        U (R, k), S (k,) descending, Vt (k, V), with the sign convention.
    """

    def body(i, x):
        return x + basis[i].T @ w[i]

    x = jax.lax.fori_loop(0, used, body, jnp.zeros((n, w.shape[2]), basis.dtype))
    y = _apply(op, x, transpose)
    # ||A x|| is sigma without the squaring of the Gram matrix's eigenvalue.
    s = jnp.linalg.norm(y, axis=0)
    order = jnp.argsort(-s)
    s, x, y = s[order], x[:, order], y[:, order]
    y = y / jnp.where(s > 0, s, 1)[None, :]
    if transpose:  # M = A^T = x s y^T
        return _sign_fix(x, s, y.T)
    return _sign_fix(y, s, x.T)


@functools.partial(jax.jit, static_argnames=("left",))
def _complete(u: jax.Array, s: jax.Array, vt: jax.Array, *, left: bool):
    """Orthonormal completion of the big-side vectors of zero singular values.

    Numerically zero singular values leave big-side vectors (``A x / s``)
    that are rounding noise: a QR replaces them by an orthonormal completion
    and keeps the other, already orthonormal, columns up to rounding and
    sign. ``left`` says whether the big side is U (else Vt). Compiled only
    when needed.
    """
    y = u if left else vt.T
    qy, ry = jnp.linalg.qr(y)
    y = qy * jnp.where(jnp.diagonal(ry) < 0, -1, 1).astype(y.dtype)[None, :]
    return _sign_fix(y, s, vt) if left else _sign_fix(u, s, y.T)


_THREADPOOLS: list[Any] = []


def _one_blas_thread() -> Any:
    """Context limiting BLAS to one thread, when threadpoolctl is installed.

    The host eigenproblems on T are small (a few hundred): one thread is as
    fast, runs beside the device's work instead of competing with it, and
    avoids OpenBLAS's busy-wait stalls on a loaded machine (seconds instead of
    milliseconds).
    """
    if ThreadpoolController is None:
        return contextlib.nullcontext()
    if not _THREADPOOLS:
        _THREADPOOLS.append(ThreadpoolController())
    return _THREADPOOLS[0].limit(limits=1, user_api="blas")


class _Projection:
    """The projection ``T = Q^T G Q`` of one restart cycle, on the host.

    In the first cycle T is block tridiagonal: diagonal blocks ``A_i``
    (:func:`_krylov_step`'s ``a``) and sub-diagonal blocks ``R_i`` (its
    ``r``). After a thick restart it is bordered by the kept Ritz pairs:
    ``[[diag(theta), S^T, 0], [S, A_0, R_1^T], [0, R_1, A_1, ...]]`` where
    ``S = R_last @ W[last block, :keep]`` couples the kept Ritz vectors to the
    first new block (``G Y = Y diag(theta) + Q_0 S``).
    """

    def __init__(self, theta: np.ndarray | None = None, coupling: np.ndarray | None = None):
        self.theta = theta
        self.coupling = coupling
        self.diag: list[np.ndarray] = []
        self.sub: list[np.ndarray] = []

    def add(self, a: np.ndarray, r: np.ndarray) -> None:
        self.diag.append(a)
        self.sub.append(r)

    @property
    def size(self) -> int:
        """Order of T: kept Ritz vectors plus the new blocks' columns."""
        c = 0 if self.theta is None else self.theta.shape[0]
        return c + sum(a.shape[0] for a in self.diag)

    def dense(self) -> np.ndarray:
        b = self.diag[0].shape[0]
        c = 0 if self.theta is None else self.theta.shape[0]
        k = c + b * len(self.diag)
        t = np.zeros((k, k), self.diag[0].dtype)
        if c:
            t[:c, :c] = np.diag(self.theta)
            t[c : c + b, :c] = self.coupling
        for i, a in enumerate(self.diag):
            o = c + i * b
            t[o : o + b, o : o + b] = np.tril(a)
            if i + 1 < len(self.diag):
                t[o + b : o + 2 * b, o : o + b] = self.sub[i]
        return t  # lower triangle

    def eig(self, count: int, vectors: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """Top ``count`` eigenvalues (descending) and, optionally, eigenvectors (k, count)."""
        t = self.dense()
        k = t.shape[0]
        count = min(count, k)
        with _one_blas_thread():
            out = scipy.linalg.eigh(
                t,
                lower=True,
                eigvals_only=not vectors,
                subset_by_index=(k - count, k - 1),
                driver="evr",
                check_finite=False,
            )
        if vectors:
            lam, vec = out
            return lam[::-1], vec[:, ::-1]
        return out[::-1], None


def _converged(history: list[np.ndarray], tol: float) -> bool:
    """Stopping rule on the Ritz singular values of successive Krylov blocks.

    Ritz values grow monotonically towards the singular values (thick restarts
    keep the top ones). Stop when none of the top ``rank`` moved by more than
    ``tol`` (relative) in each of the last two blocks.
    """
    if len(history) < 3:
        return False
    cur, prev, prev2 = history[-1], history[-2], history[-3]
    # Values below _TINY_SIGMA * sigma_1 are rounding noise in the Gram matrix:
    # they only need to settle in absolute terms.
    scale = np.maximum(cur, _TINY_SIGMA * cur[0] + np.finfo(np.float64).tiny)
    return bool(np.max((cur - prev) / scale) <= tol and np.max((prev - prev2) / scale) <= tol)


@functools.partial(jax.jit, static_argnames=("keep_blocks",), donate_argnames=("basis",))
def _krylov_restart(basis: jax.Array, w: jax.Array, used: jax.Array, resid: jax.Array, *, keep_blocks: int):
    """Thick restart: blocks ``0..keep_blocks-1`` := the kept Ritz vectors, next block := the residual block.

    Args:
        basis: (num_blocks, b, n) transposed blocks.
        w: (num_blocks, b, keep_blocks * b) top eigenvectors of T, by block (zero past ``used``).
        used: blocks in T.
        resid: index of the residual block.
    """
    nb, b, n = basis.shape

    def body(i, yt):
        return yt + w[i].T @ basis[i]

    yt = jax.lax.fori_loop(0, used, body, jnp.zeros((keep_blocks * b, n), basis.dtype))
    q = basis[resid]
    basis = basis.at[:keep_blocks].set(yt.reshape(keep_blocks, b, n))
    return basis.at[keep_blocks].set(q)


def _plan(n: int, rank: int, oversample: int) -> tuple[int, int, bool]:
    """Krylov block width, blocks in the basis buffer, and whether cycles restart."""
    block = min(-(-(rank + oversample) // _BLOCK_MULTIPLE) * _BLOCK_MULTIPLE, n)
    per_cycle = _KEEP_BLOCKS + _CYCLE_BLOCKS  # blocks in T at the end of a cycle
    if n // block > per_cycle:
        return block, per_cycle + 1, True
    # Small side: one cycle spans all of it (T then has n // block blocks).
    return block, n // block + 1, False


def _randomized_svd(mat, shape, rank, key, tol, oversample, n_iter):
    """Thick-restarted block Lanczos; returns the signed (U (R, rank), S (rank,), Vt (rank, V))."""
    R, V = shape
    transpose = V > R  # A = M (V <= R) or M.T, so that A is (m, n) with n <= m
    m, n = (V, R) if transpose else (R, V)
    dtype = np.dtype(mat.csr.dtype if isinstance(mat, _Sparse) else mat.dtype)
    block, nbuf, restarts = _plan(n, rank, oversample)
    max_products = _MAX_BLOCKS if n_iter is None else int(n_iter)
    op = _sparse_op(mat, transpose) if isinstance(mat, _Sparse) else mat
    # The start block comes from numpy's generator seeded by the key:
    # deterministic, and nothing random to compile.
    start = np.random.default_rng(_key_seed(key)).standard_normal((n, block))
    if isinstance(mat, _Sparse):
        # Zero the start block on empty columns of A: the Krylov vectors, hence
        # the singular vectors, are then exactly zero there.
        empty = np.diff(mat.csr.indptr) == 0 if transpose else np.bincount(mat.csr.indices, minlength=n) == 0
        if n - int(empty.sum()) >= block:
            start[empty] = 0.0
    with _one_blas_thread():
        if n >= 4 * block:  # a tall Gaussian block is well conditioned: Cholesky QR suffices
            q0 = start @ np.linalg.inv(np.linalg.cholesky(start.T @ start)).T
        else:
            q0, _ = np.linalg.qr(start)
    basis = _krylov_start(jnp.asarray(q0, dtype), num_blocks=nbuf)
    kw = dict(transpose=transpose, m=m, n=n)
    keep = _KEEP_BLOCKS * block

    def launch(basis, j):
        return _krylov_step(op, basis, jnp.int32(j), **kw)

    proj = _Projection()
    history: list[np.ndarray] = []
    converged = exhausted = False
    products = repairs = cycles = 0
    g_norm = 0.0  # running estimate of ||A^T A|| (largest |entry| of the diagonal blocks)
    # Pipelined: step j+1 is launched before the host reads step j, so the
    # device works while the host computes Ritz values; when the test on
    # step j says stop, the (already computed) step j+1 is kept as a free
    # extra block.
    j = 0
    basis, a, r, z, ok = launch(basis, j)
    while True:
        more = j + 2 < nbuf and products + 1 < max_products  # room for step j+1 in this cycle
        nxt = launch(basis, j + 1) if more else None
        if nxt is not None:
            basis = nxt[0]
            if not bool(ok):
                # Redo block j+1 (the speculative step j+1 used the bad one).
                repairs += 1
                basis, r = _repair_block(basis, z, jnp.int32(j))
                nxt = launch(basis, j + 1)
                basis = nxt[0]
        a_h, r_h = np.asarray(a), np.asarray(r)
        proj.add(a_h, r_h)
        products += 1
        g_norm = max(g_norm, float(np.abs(a_h).max()))
        if np.abs(r_h).max() <= _BREAKDOWN * np.finfo(dtype).eps * g_norm:
            # The Krylov space is invariant (e.g. a low-rank matrix): T holds
            # every non-zero singular value the start block reaches, and the
            # next block would be rounding noise.
            exhausted = True
            break
        lam, _ = proj.eig(rank, vectors=False)
        history.append(np.sqrt(np.maximum(lam.astype(np.float64), 0.0)))
        if n_iter is None:
            if _converged(history, tol):
                converged = True
                if nxt is not None and bool(nxt[4]):  # keep the extra block when sound
                    proj.add(np.asarray(nxt[1]), np.asarray(nxt[2]))
                    products += 1
                break
        if nxt is not None:
            _, a, r, z, ok = nxt
            j += 1
            continue
        if products >= max_products or not restarts:
            exhausted = not restarts
            break
        # Thick restart: keep the top ``keep`` Ritz vectors, continue from the residual block.
        lam, vec = proj.eig(keep, vectors=True)
        used = proj.size // block
        w = np.zeros((nbuf, block, keep), dtype)
        w[:used] = vec.reshape(used, block, keep)
        if not bool(ok):
            repairs += 1
            basis, r = _repair_block(basis, z, jnp.int32(j))
        basis = _krylov_restart(basis, jnp.asarray(w), jnp.int32(used), jnp.int32(j + 1), keep_blocks=_KEEP_BLOCKS)
        proj = _Projection(lam.astype(dtype), (np.asarray(r) @ vec[-block:]).astype(dtype))
        cycles += 1
        j = _KEEP_BLOCKS
        basis, a, r, z, ok = launch(basis, j)
    if n_iter is None and not converged and not exhausted:
        warnings.warn(
            f"truncated_svd: the singular values did not settle to tol={tol:g} within "
            f"{max_products} Krylov blocks of {block} (min(R, V) = {n}); the result may be less "
            "accurate. method='exact' is exact for matrices that fit in memory.",
            RuntimeWarning,
            stacklevel=3,
        )
    _, vec = proj.eig(rank, vectors=True)
    w = np.zeros((nbuf * block, rank), dtype)
    w[: proj.size] = vec
    used = proj.size // block
    u, s, vt = _krylov_finish(op, basis, jnp.asarray(w.reshape(nbuf, block, rank)), jnp.int32(used), **kw)
    s_host = np.asarray(s)
    if s_host[-1] <= _TINY_SIGMA * s_host[0]:
        u, s, vt = _complete(u, s, vt, left=not transpose)
    _LAST_INFO.clear()
    _LAST_INFO.update(
        method="randomized",
        block=block,
        products=products,
        restarts=cycles,
        repairs=repairs,
        converged=converged,
        small_side="rows" if transpose else "cols",
        ritz_history=np.array(history),
    )
    return u, s, vt


def _key_seed(key: Any) -> list[int]:
    """The integers of a jax PRNG key (raw uint32 or typed), to seed numpy."""
    if jnp.issubdtype(jnp.asarray(key).dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return [int(v) for v in np.asarray(key).ravel()]


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------


def _auto_method(R: int, V: int, rank: int) -> str:
    """``"exact"`` for small matrices, ``"randomized"`` otherwise (see :func:`truncated_svd`)."""
    n = min(R, V)
    if R * V <= AUTO_EXACT_MAX_ELEMENTS and (n <= AUTO_EXACT_MAX_MIN_DIM or 10 * rank >= n):
        return "exact"
    return "randomized"


def truncated_svd(
    M: Any,
    rank: int,
    *,
    key: jax.Array | None = None,
    method: str = "auto",
    tol: float = 1e-4,
    oversample: int = DEFAULT_OVERSAMPLE,
    n_iter: int | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
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
    mat, shape = _as_matrix(M)
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
    _check_finite(mat)
    if method == "auto":
        method = _auto_method(R, V, rank)
    if method == "exact":
        if isinstance(mat, _Sparse):
            mat = jnp.asarray(mat.csr.toarray())
        _LAST_INFO.clear()
        _LAST_INFO.update(method="exact")
        u, s, vt = _exact_svd(mat)
        return u[:, :rank], s[:rank], vt[:rank]
    if key is None:
        key = jax.random.PRNGKey(0)
    return _randomized_svd(mat, shape, rank, key, float(tol), int(oversample), n_iter)
