"""The device kernels of the block Krylov SVD: one jitted function per step of the iteration.

Block Lanczos with full reorthogonalisation runs on the Gram matrix ``G = A^T A`` of
the *smaller* side (``A = M`` when ``V <= R``, else ``M^T``; A is (m, n) with n <= m).
The orthonormal blocks live in one buffer ``basis`` [num_blocks, b, n], each block
stored transposed. Per block (:func:`krylov_step`) the device does one product with
``A`` and one with ``A^T`` (``2 nnz b`` multiply-adds), a block Gram-Schmidt against
the earlier blocks and a CholeskyQR2; :func:`repair_block` redoes a block CholeskyQR2
could not be trusted with, :func:`krylov_restart` packs the kept Ritz vectors for a
thick restart, and :func:`krylov_finish` turns the final Ritz vectors into the signed
``(U, S, Vt)`` of M. The host side (the projection ``T``, the stopping rule, when to
restart) is :mod:`jaxattn.svd.randomized`.

Every index (``j``, ``used``, ``resid``) is a traced int32 scalar: one compilation per
shape, whatever the number of blocks.

Axis vocabulary: R, V the shape of M; m, n that of A; nb blocks in the buffer, b the
block width, k the number of Ritz vectors, c the kept Ritz vectors of a restart.
"""

# ruff: noqa: F722  (jaxtyping shape strings such as "R V" are not Python expressions)
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxattn.svd.exact import sign_fix
from jaxattn.svd.operators import SparseOp, apply_a, gram
from jaxattn.typing import Array, Bool, Float, Int

__all__ = ["complete", "krylov_finish", "krylov_restart", "krylov_start", "krylov_step", "repair_block"]

# Second reorthogonalisation pass when a column keeps less than this of its norm.
_REORTH_RATIO = 2e-3


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

    def body(i: jax.Array, z: jax.Array) -> jax.Array:
        qi = basis[i]
        return z - qi.T @ (qi @ z)

    return jax.lax.fori_loop(0, j + 1, body, z)


@functools.partial(jax.jit, donate_argnames=("basis",))
def repair_block(
    basis: Float[Array, "nb b n"], z: Float[Array, "n b"], j: Int[Array, ""]
) -> tuple[Float[Array, "nb b n"], Float[Array, "b b"]]:
    """Block j+1 and r for a (nearly) rank-deficient residual z (n, b).

    Used when CholeskyQR2 cannot be trusted: the Krylov space is nearly
    invariant, or the matrix has low rank. The tiny directions of z are then
    rounding noise with components along the basis, so a Householder QR
    first makes every column unit length, those are orthogonalised against
    the basis (twice) and orthonormalised again, and ``r = q^T z`` is
    re-triangularised (z lies in the span of q). Compiled only when needed.

    Args:
        basis: [nb, b, n] (donated).
        z: [n, b] the residual of step j.
        j: the current block (int32 scalar).

    Returns:
        The basis with block j+1 replaced, and r (b, b) upper triangular.
    """
    q1, _ = jnp.linalg.qr(z)
    q1 = _orthogonalize_against(_orthogonalize_against(q1, basis, j), basis, j)
    q2, _ = jnp.linalg.qr(q1)
    o, u = jnp.linalg.qr(q2.T @ z)  # z = q2 (q2^T z) = (q2 o) u
    return basis.at[j + 1].set((q2 @ o).T), u


@functools.partial(jax.jit, static_argnames=("num_blocks",))
def krylov_start(q0: Float[Array, "n b"], *, num_blocks: int) -> Float[Array, "nb b n"]:
    """Basis buffer (num_blocks, b, n) holding the orthonormal start block q0 (n, b), transposed.

    Args:
        q0: [n, b] orthonormal columns.
        num_blocks: nb, blocks in the buffer.

    Returns:
        [nb, b, n], zero past block 0.
    """
    n, b = q0.shape
    return jnp.zeros((num_blocks, b, n), q0.dtype).at[0].set(q0.T)


@functools.partial(jax.jit, static_argnames=("transpose", "m", "n"), donate_argnames=("basis",))
def krylov_step(
    op: Float[Array, "R V"] | SparseOp,
    basis: Float[Array, "nb b n"],
    j: Int[Array, ""],
    *,
    transpose: bool,
    m: int,
    n: int,
) -> tuple[Float[Array, "nb b n"], Float[Array, "b b"], Float[Array, "b b"], Float[Array, "n b"], Bool[Array, ""]]:
    """One block Lanczos step on ``G = A^T A`` with full reorthogonalisation.

    Args:
        op: the matrix: a dense (R, V) array or a :class:`~jaxattn.svd.operators.SparseOp`.
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
        (then :func:`repair_block` must redo block j+1 and r).
    """
    qt = basis[j]
    q = qt.T
    z0 = gram(op, q, transpose)
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
def krylov_finish(
    op: Float[Array, "R V"] | SparseOp,
    basis: Float[Array, "nb b n"],
    w: Float[Array, "nb b k"],
    used: Int[Array, ""],
    *,
    transpose: bool,
    m: int,
    n: int,
) -> tuple[Float[Array, "R k"], Float[Array, " k"], Float[Array, "k V"]]:
    """Ritz vectors and singular values, as the signed (U, S, Vt) of M.

    Args:
        op, transpose, m, n: as for :func:`krylov_step`.
        basis: (num_blocks, b, n).
        w: (num_blocks, b, k) the top eigenvectors of ``T``, by block.
        used: number of blocks in ``T``.

    Returns:
        U (R, k), S (k,) descending, Vt (k, V), with the sign convention.
    """

    def body(i: jax.Array, x: jax.Array) -> jax.Array:
        return x + basis[i].T @ w[i]

    x = jax.lax.fori_loop(0, used, body, jnp.zeros((n, w.shape[2]), basis.dtype))
    y = apply_a(op, x, transpose)
    # ||A x|| is sigma without the squaring of the Gram matrix's eigenvalue.
    s = jnp.linalg.norm(y, axis=0)
    order = jnp.argsort(-s)
    s, x, y = s[order], x[:, order], y[:, order]
    y = y / jnp.where(s > 0, s, 1)[None, :]
    if transpose:  # M = A^T = x s y^T
        return sign_fix(x, s, y.T)
    return sign_fix(y, s, x.T)


@functools.partial(jax.jit, static_argnames=("left",))
def complete(
    u: Float[Array, "R k"], s: Float[Array, " k"], vt: Float[Array, "k V"], *, left: bool
) -> tuple[Float[Array, "R k"], Float[Array, " k"], Float[Array, "k V"]]:
    """Orthonormal completion of the big-side vectors of zero singular values.

    Numerically zero singular values leave big-side vectors (``A x / s``)
    that are rounding noise: a QR replaces them by an orthonormal completion
    and keeps the other, already orthonormal, columns up to rounding and
    sign. ``left`` says whether the big side is U (else Vt). Compiled only
    when needed.

    Args:
        u: [R, k].
        s: [k].
        vt: [k, V].
        left: whether the big side is U.

    Returns:
        The signed ``(U, S, Vt)`` with the big side completed.
    """
    y = u if left else vt.T
    qy, ry = jnp.linalg.qr(y)
    y = qy * jnp.where(jnp.diagonal(ry) < 0, -1, 1).astype(y.dtype)[None, :]
    return sign_fix(y, s, vt) if left else sign_fix(u, s, y.T)


@functools.partial(jax.jit, static_argnames=("keep_blocks",), donate_argnames=("basis",))
def krylov_restart(
    basis: Float[Array, "nb b n"],
    w: Float[Array, "nb b c"],
    used: Int[Array, ""],
    resid: Int[Array, ""],
    *,
    keep_blocks: int,
) -> Float[Array, "nb b n"]:
    """Thick restart: blocks ``0..keep_blocks-1`` := the kept Ritz vectors, next block := the residual block.

    Args:
        basis: (num_blocks, b, n) transposed blocks.
        w: (num_blocks, b, keep_blocks * b) top eigenvectors of T, by block (zero past ``used``).
        used: blocks in T.
        resid: index of the residual block.
        keep_blocks: blocks of kept Ritz vectors (``c = keep_blocks * b``).

    Returns:
        The restarted basis [nb, b, n].
    """
    nb, b, n = basis.shape

    def body(i: jax.Array, yt: jax.Array) -> jax.Array:
        return yt + w[i].T @ basis[i]

    yt = jax.lax.fori_loop(0, used, body, jnp.zeros((keep_blocks * b, n), basis.dtype))
    q = basis[resid]
    basis = basis.at[:keep_blocks].set(yt.reshape(keep_blocks, b, n))
    return basis.at[keep_blocks].set(q)
