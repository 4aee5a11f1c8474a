"""The randomized path of :func:`jaxattn.svd.truncated_svd`: a thick-restarted block Krylov SVD.

A randomized block Krylov method (Musco & Musco 2015, "Randomized block Krylov methods
for stronger and faster approximate singular value decomposition"): block Lanczos with
full reorthogonalisation on the Gram matrix ``A^T A`` of the *smaller* side (``A = M``
when ``V <= R``, else ``M^T``), from a random start block, with a Rayleigh-Ritz step at
the end. Unlike the Halko-Martinsson-Tropp range finder with a few power iterations, it
reaches a requested accuracy on the flat spectra of word-level manifold matrices: on a
3e5 x 32k manifold whose 64th singular value is within 0.1% of its neighbours, 7 power
iterations leave a 5% error, while ~15 Krylov blocks reach 1e-6.

Per Krylov block (width ``b`` = rank rounded up to a multiple of 16), the device does one
product with ``M`` and one with ``M^T`` (``2 nnz b`` multiply-adds), a block
Gram-Schmidt against the earlier blocks and a CholeskyQR2 (the kernels are in
:mod:`jaxattn.svd.krylov`); the host computes the Ritz values of the small projection
``T`` for the stopping test while the device already runs the next block. Memory stays
at a few blocks however many the tolerance needs: after a cycle of new blocks, a thick
restart keeps the top Ritz vectors (``KEEP_BLOCKS`` blocks) and continues from the
residual block, so ``T`` is block tridiagonal bordered by the kept Ritz pairs. Singular
values are taken as ``||A x||`` for the final Ritz vectors ``x``, not as square roots of
Gram eigenvalues, so they keep float32 accuracy.

Axis vocabulary: R, V the shape of M; A is (m, n) with n <= m; b the block width.
"""

# ruff: noqa: F722  (jaxtyping shape strings such as "R V" are not Python expressions)
from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

from jaxattn.svd.exact import one_blas_thread
from jaxattn.svd.krylov import complete, krylov_finish, krylov_restart, krylov_start, krylov_step, repair_block
from jaxattn.svd.operators import HostSparse, SparseOp, pad_sparse, sparse_op
from jaxattn.typing import Array, Float, PRNGKey

__all__ = ["CYCLE_BLOCKS", "KEEP_BLOCKS", "MAX_BLOCKS", "randomized_svd"]

# The Krylov block width is rounded up to a multiple of this (SIMD width).
_BLOCK_MULTIPLE = 16
#: Upper bound on the number of Krylov blocks (Gram products) when ``n_iter`` is None.
#: Read at every call (tests lower it to see the warning).
MAX_BLOCKS = 80
#: Thick restarts: T holds ``KEEP_BLOCKS`` blocks of kept Ritz vectors plus
#: ``CYCLE_BLOCKS`` new Lanczos blocks; the basis buffer one block more.
KEEP_BLOCKS = 2
CYCLE_BLOCKS = 4
# Singular values below this fraction of the largest count as zero (their
# big-side vectors are then completed by QR).
_TINY_SIGMA = 1e-3
# A block whose coupling ``r`` is below this many float eps times ||A^T A||
# means the Krylov space is invariant: stop.
_BREAKDOWN = 32


class _Projection:
    """The projection ``T = Q^T G Q`` of one restart cycle, on the host.

    In the first cycle T is block tridiagonal: diagonal blocks ``A_i``
    (:func:`~jaxattn.svd.krylov.krylov_step`'s ``a``) and sub-diagonal blocks ``R_i`` (its
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
        if self.theta is not None and c:
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
        with one_blas_thread():
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

    def eigvecs(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`eig` with eigenvectors: the top ``count`` eigenpairs, values descending."""
        lam, vec = self.eig(count, vectors=True)
        assert vec is not None  # eig returns vectors when asked
        return lam, vec


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


def _plan(n: int, rank: int, oversample: int) -> tuple[int, int, bool]:
    """Krylov block width, blocks in the basis buffer, and whether cycles restart."""
    block = min(-(-(rank + oversample) // _BLOCK_MULTIPLE) * _BLOCK_MULTIPLE, n)
    per_cycle = KEEP_BLOCKS + CYCLE_BLOCKS  # blocks in T at the end of a cycle
    if n // block > per_cycle:
        return block, per_cycle + 1, True
    # Small side: one cycle spans all of it (T then has n // block blocks).
    return block, n // block + 1, False


def _key_seed(key: Any) -> list[int]:
    """The integers of a jax PRNG key (raw uint32 or typed), to seed numpy."""
    if jnp.issubdtype(jnp.asarray(key).dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return [int(v) for v in np.asarray(key).ravel()]


def _start_block(mat: jax.Array | HostSparse, key: Any, n: int, block: int, transpose: bool) -> np.ndarray:
    """The orthonormal start block (n, block), float64 on the host, from numpy's generator seeded by ``key``."""
    # The start block comes from numpy's generator seeded by the key:
    # deterministic, and nothing random to compile.
    start = np.random.default_rng(_key_seed(key)).standard_normal((n, block))
    if isinstance(mat, HostSparse):
        # Zero the start block on empty columns of A: the Krylov vectors, hence
        # the singular vectors, are then exactly zero there.
        empty = np.diff(mat.csr.indptr) == 0 if transpose else np.bincount(mat.csr.indices, minlength=n) == 0
        if n - int(empty.sum()) >= block:
            start[empty] = 0.0
    with one_blas_thread():
        if n >= 4 * block:  # a tall Gaussian block is well conditioned: Cholesky QR suffices
            q0 = start @ np.linalg.inv(np.linalg.cholesky(start.T @ start)).T
        else:
            q0, _ = np.linalg.qr(start)
    return q0


Step = tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]
"""What :func:`~jaxattn.svd.krylov.krylov_step` returns: (basis, a, r, z, ok)."""


@dataclasses.dataclass
class _Run:
    """The settings and the host-side state of one thick-restarted block Lanczos run."""

    op: jax.Array | SparseOp
    transpose: bool
    m: int
    n: int
    dtype: np.dtype
    rank: int
    block: int
    nbuf: int
    restarts: bool
    max_products: int
    tol: float
    n_iter: int | None
    proj: _Projection = dataclasses.field(default_factory=_Projection)
    history: list[np.ndarray] = dataclasses.field(default_factory=list)
    converged: bool = False
    exhausted: bool = False
    products: int = 0
    repairs: int = 0
    cycles: int = 0
    g_norm: float = 0.0  # running estimate of ||A^T A|| (largest |entry| of the diagonal blocks)

    def launch(self, basis: jax.Array, j: int) -> Step:
        """Dispatches Lanczos step ``j`` (asynchronous: the device runs while the host goes on)."""
        return krylov_step(self.op, basis, jnp.int32(j), transpose=self.transpose, m=self.m, n=self.n)

    def add_block(self, a: jax.Array, r: jax.Array) -> bool:
        """Adds step j's blocks to T; True when ``r`` says the Krylov space is invariant."""
        a_h, r_h = np.asarray(a), np.asarray(r)
        self.proj.add(a_h, r_h)
        self.products += 1
        self.g_norm = max(self.g_norm, float(np.abs(a_h).max()))
        # The Krylov space is invariant (e.g. a low-rank matrix): T holds every
        # non-zero singular value the start block reaches, and the next block
        # would be rounding noise.
        return bool(np.abs(r_h).max() <= _BREAKDOWN * np.finfo(self.dtype).eps * self.g_norm)

    def restart(self, basis: jax.Array, j: int, r: jax.Array, z: jax.Array, ok: jax.Array) -> jax.Array:
        """Thick restart after step ``j``: keep the top Ritz vectors, continue from the residual block."""
        keep = KEEP_BLOCKS * self.block
        lam, vec = self.proj.eigvecs(keep)
        used = self.proj.size // self.block
        w = np.zeros((self.nbuf, self.block, keep), self.dtype)
        w[:used] = vec.reshape(used, self.block, keep)
        if not bool(ok):
            self.repairs += 1
            basis, r = repair_block(basis, z, jnp.int32(j))
        basis = krylov_restart(basis, jnp.asarray(w), jnp.int32(used), jnp.int32(j + 1), keep_blocks=KEEP_BLOCKS)
        self.proj = _Projection(lam.astype(self.dtype), (np.asarray(r) @ vec[-self.block :]).astype(self.dtype))
        self.cycles += 1
        return basis


def _iterate(run: _Run, basis: jax.Array) -> jax.Array:
    """The Lanczos loop: runs until the Ritz values settle, the block limit or an invariant space.

    Pipelined: step j+1 is launched before the host reads step j, so the
    device works while the host computes Ritz values; when the test on
    step j says stop, the (already computed) step j+1 is kept as a free
    extra block.

    Returns:
        The final basis; ``run.proj`` then holds its projection T.
    """
    j = 0
    basis, a, r, z, ok = run.launch(basis, j)
    while True:
        more = j + 2 < run.nbuf and run.products + 1 < run.max_products  # room for step j+1 in this cycle
        nxt = run.launch(basis, j + 1) if more else None
        if nxt is not None:
            basis = nxt[0]
            if not bool(ok):
                # Redo block j+1 (the speculative step j+1 used the bad one).
                run.repairs += 1
                basis, r = repair_block(basis, z, jnp.int32(j))
                nxt = run.launch(basis, j + 1)
                basis = nxt[0]
        if run.add_block(a, r):
            run.exhausted = True
            break
        lam, _ = run.proj.eig(run.rank, vectors=False)
        run.history.append(np.sqrt(np.maximum(lam.astype(np.float64), 0.0)))
        if run.n_iter is None:
            if _converged(run.history, run.tol):
                run.converged = True
                if nxt is not None and bool(nxt[4]):  # keep the extra block when sound
                    run.proj.add(np.asarray(nxt[1]), np.asarray(nxt[2]))
                    run.products += 1
                break
        if nxt is not None:
            _, a, r, z, ok = nxt
            j += 1
            continue
        if run.products >= run.max_products or not run.restarts:
            run.exhausted = not run.restarts
            break
        basis = run.restart(basis, j, r, z, ok)
        j = KEEP_BLOCKS
        basis, a, r, z, ok = run.launch(basis, j)
    return basis


def _ritz_triplets(run: _Run, basis: jax.Array, shape: tuple[int, int]) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The signed (U, S, Vt) of M [R, V] (``shape``) from the top ``rank`` Ritz vectors of the final T.

    A padded operator's vectors are zero on the padded coordinates, which are cut off here.
    """
    _, vec = run.proj.eigvecs(run.rank)
    w = np.zeros((run.nbuf * run.block, run.rank), run.dtype)
    w[: run.proj.size] = vec
    used = run.proj.size // run.block
    w_blocks = jnp.asarray(w.reshape(run.nbuf, run.block, run.rank))
    u, s, vt = krylov_finish(run.op, basis, w_blocks, jnp.int32(used), transpose=run.transpose, m=run.m, n=run.n)
    R, V = shape
    if u.shape[0] != R or vt.shape[1] != V:  # cut on the host: an eager slice compiles per shape
        u, vt = jax.device_put(np.asarray(u)[:R]), jax.device_put(np.asarray(vt)[:, :V])
    s_host = np.asarray(s)
    if s_host[-1] <= _TINY_SIGMA * s_host[0]:
        u, s, vt = complete(u, s, vt, left=not run.transpose)
    return u, s, vt


def _tiny_tail(s: jax.Array) -> bool:
    """Whether the smallest of the singular values is numerically zero (a rank-deficient M)."""
    s_host = np.asarray(s)
    return bool(s_host[-1] <= _TINY_SIGMA * s_host[0])


def randomized_svd(
    mat: Float[Array, "R V"] | HostSparse,
    shape: tuple[int, int],
    rank: int,
    key: PRNGKey,
    tol: float,
    oversample: int,
    n_iter: int | None,
    *,
    pad: bool = True,
) -> tuple[Float[Array, "R rank"], Float[Array, " rank"], Float[Array, "rank V"], dict[str, Any]]:
    """Thick-restarted block Lanczos; returns the signed (U (R, rank), S (rank,), Vt (rank, V)).

    A sparse M is zero-padded to bucketed sizes (:func:`~jaxattn.svd.operators.pad_sparse`), so that
    tables of similar shape reuse the compiled kernels; the start block is zero on the padding, so
    the Krylov spaces, hence the results, are those of M itself up to float rounding. A
    rank-deficient M is redone unpadded (``pad=False``).

    Args:
        mat: the output of :func:`~jaxattn.svd.operators.as_matrix`: dense float [R, V] or
            the host CSR.
        shape: (R, V).
        rank: singular triplets, already checked to be in ``[1, min(R, V)]``.
        key: PRNG key of the start block.
        tol: the stopping rule's relative tolerance (ignored with ``n_iter``).
        oversample: extra block columns beyond ``rank``.
        n_iter: a fixed number of Krylov blocks, or None for the ``tol`` rule.
        pad: pad a sparse M to bucketed shapes.

    Returns:
        U [R, rank], S [rank] descending, Vt [rank, V] with the sign convention, and the
        run's diagnostics (``jaxattn.svd.LAST_INFO``): block width, products, restarts,
        repairs, whether it converged, the small side and the Ritz value history.
    """
    padded = isinstance(mat, HostSparse) and pad
    u, s, vt, info = _lanczos_svd(mat, shape, rank, key, tol, oversample, n_iter, padded)
    if padded and _tiny_tail(s):
        # A rank-deficient M: its null-space vectors may have reached the padding; redo it unpadded.
        u, s, vt, info = _lanczos_svd(mat, shape, rank, key, tol, oversample, n_iter, False)
    return u, s, vt, info


def _lanczos_svd(
    mat: Float[Array, "R V"] | HostSparse,
    shape: tuple[int, int],
    rank: int,
    key: PRNGKey,
    tol: float,
    oversample: int,
    n_iter: int | None,
    padded: bool,
) -> tuple[Float[Array, "R rank"], Float[Array, " rank"], Float[Array, "rank V"], dict[str, Any]]:
    """:func:`randomized_svd` of one operator: M itself, or (``padded``) its padded sparse form."""
    R, V = shape
    transpose = V > R  # A = M (V <= R) or M.T, so that A is (m, n) with n <= m
    m, n = (V, R) if transpose else (R, V)
    dtype = np.dtype(mat.csr.dtype if isinstance(mat, HostSparse) else mat.dtype)
    block, nbuf, restarts = _plan(n, rank, oversample)
    max_products = MAX_BLOCKS if n_iter is None else int(n_iter)
    q0 = _start_block(mat, key, n, block, transpose)
    if isinstance(mat, HostSparse):
        op_mat = pad_sparse(mat, transpose) if padded else mat
        m, n = (op_mat.csr.shape[1], op_mat.csr.shape[0]) if transpose else op_mat.csr.shape
        q0 = np.pad(q0, ((0, n - q0.shape[0]), (0, 0)))  # zero on the padding: the run never leaves M's space
        op: jax.Array | SparseOp = sparse_op(op_mat, transpose)
    else:
        op = mat
    basis = krylov_start(jnp.asarray(q0, dtype), num_blocks=nbuf)
    run = _Run(op, transpose, m, n, dtype, rank, block, nbuf, restarts, max_products, tol, n_iter)
    basis = _iterate(run, basis)
    if n_iter is None and not run.converged and not run.exhausted:
        warnings.warn(
            f"truncated_svd: the singular values did not settle to tol={tol:g} within "
            f"{max_products} Krylov blocks of {block} (min(R, V) = {n}); the result may be less "
            "accurate. method='exact' is exact for matrices that fit in memory.",
            RuntimeWarning,
            stacklevel=3,
        )
    u, s, vt = _ritz_triplets(run, basis, (R, V))
    info = dict(
        method="randomized",
        block=block,
        products=run.products,
        restarts=run.cycles,
        repairs=run.repairs,
        converged=run.converged,
        small_side="rows" if transpose else "cols",
        ritz_history=np.array(run.history),
    )
    return u, s, vt, info
