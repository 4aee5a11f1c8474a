"""The exact path of :func:`jaxattn.svd.truncated_svd`, and the sign convention both paths share.

``method="exact"`` is the dense thin SVD (``jnp.linalg.svd(full_matrices=False)``),
truncated by the caller. It is compiled once per shape, whatever the rank.

Sign convention: every pair ``(U[:, k], Vt[k])`` is flipped so that the entry of
``U[:, k]`` with the largest absolute value is positive (the first such entry on ties).

Axis vocabulary: R rows and V columns of ``M``, k the number of singular triplets.
"""

# ruff: noqa: F722  (jaxtyping shape strings such as "R V" are not Python expressions)
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxattn.typing import Array, Float

__all__ = ["exact_svd", "sign_fix"]


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
