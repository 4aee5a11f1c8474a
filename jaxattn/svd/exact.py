"""The exact path of :func:`jaxattn.svd.truncated_svd`, and the sign convention both paths share.

``method="exact"`` is the dense thin SVD, truncated by the caller: on the host with numpy's
LAPACK (:func:`exact_svd_host`) for a matrix given on the host (numpy, scipy, COO triplets),
which costs milliseconds for the count tables' 100 x 100 .. 5000 x 100 shapes where a jitted
call costs a compilation per shape; else ``jnp.linalg.svd(full_matrices=False)``
(:func:`exact_svd`, compiled once per shape, whatever the rank).

Sign convention: every pair ``(U[:, k], Vt[k])`` is flipped so that the entry of
``U[:, k]`` with the largest absolute value is positive (the first such entry on ties).

Axis vocabulary: R rows and V columns of ``M``, k the number of singular triplets.
"""

# ruff: noqa: F722  (jaxtyping shape strings such as "R V" are not Python expressions)
from __future__ import annotations

import contextlib
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn.typing import Array, Float

__all__ = ["exact_svd", "exact_svd_host", "one_blas_thread", "sign_fix"]


@jax.jit
def sign_fix(
    u: Float[Array, "R k"], s: Float[Array, " k"], vt: Float[Array, "k V"]
) -> tuple[Float[Array, "R k"], Float[Array, " k"], Float[Array, "k V"]]:
    """Flips (u[:, k], vt[k]) so that u[:, k]'s largest-|.| entry is positive.

    Args:
        u: [R, k] left singular vectors.
        s: [k] singular values (returned unchanged).
        vt: [k, V] right singular vectors.

    Returns:
        The signed ``(u, s, vt)``.
    """
    i = jnp.argmax(jnp.abs(u), axis=0)
    sign = jnp.sign(jnp.take_along_axis(u, i[None, :], axis=0)[0])
    sign = jnp.where(sign == 0, 1, sign).astype(u.dtype)
    return u * sign[None, :], s, vt * sign[:, None]


@jax.jit
def exact_svd(a: Float[Array, "R V"]) -> tuple[Float[Array, "R k"], Float[Array, " k"], Float[Array, "k V"]]:
    """Full thin SVD with the sign convention (one compilation per shape, any rank).

    Args:
        a: dense float [R, V].

    Returns:
        U [R, k], S [k] descending, Vt [k, V] with k = min(R, V), signed by :func:`sign_fix`.
    """
    u, s, vt = jnp.linalg.svd(a, full_matrices=False)
    return sign_fix(u, s, vt)


_THREADPOOLS: list[Any] = []


def one_blas_thread() -> contextlib.AbstractContextManager[object]:
    """Context limiting BLAS to one thread for host linear algebra (with ``threadpoolctl``; else a no-op).

    Beside JAX's CPU thread pool, OpenBLAS's threads contend for the cores and busy-wait on a
    loaded machine: a 4445 x 105 ``sgesdd`` took 2 s instead of 0.03 s single-threaded, and the
    derivation's [32, 92k] x [92k, 384] products seconds instead of tens of milliseconds
    (measured on 2 cores). The small host problems are as fast on one thread.
    """
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # optional: only the speed depends on it
        return contextlib.nullcontext()
    if not _THREADPOOLS:
        _THREADPOOLS.append(ThreadpoolController())
    return cast(contextlib.AbstractContextManager[object], _THREADPOOLS[0].limit(limits=1, user_api="blas"))


def exact_svd_host(
    a: Float[np.ndarray, "R V"],
) -> tuple[Float[np.ndarray, "R k"], Float[np.ndarray, " k"], Float[np.ndarray, "k V"]]:
    """:func:`exact_svd` on the host: numpy's LAPACK thin SVD, with the same sign convention.

    Args:
        a: dense float [R, V] numpy array (its dtype is kept).

    Returns:
        U [R, k], S [k] descending, Vt [k, V] with k = min(R, V), numpy arrays.
    """
    with one_blas_thread():
        u, s, vt = np.linalg.svd(a, full_matrices=False)
    i = np.argmax(np.abs(u), axis=0)
    sign = np.sign(u[i, np.arange(u.shape[1])])
    sign = np.where(sign == 0, 1, sign).astype(u.dtype)
    return u * sign[None, :], s, vt * sign[:, None]
