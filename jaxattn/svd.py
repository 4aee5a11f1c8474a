"""TEMPORARY placeholder (exact dense SVD only) until the randomized SVD lands.

The engineer who owns this file replaces it wholesale; the signature is the contract.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def truncated_svd(M: Any, rank: int, *, key: jax.Array | None = None, **kw: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Rank-``rank`` SVD (placeholder: dense exact). Returns U [R, r], S [r], Vt [r, V]."""
    if hasattr(M, "rows") and not isinstance(M, np.ndarray):
        D = np.zeros(M.shape, np.float32)
        D[M.rows, M.cols] = M.values
        M = D
    U, S, Vt = jnp.linalg.svd(jnp.asarray(M, jnp.float32), full_matrices=False)
    U, S, Vt = U[:, :rank], S[:rank], Vt[:rank]
    i = jnp.argmax(jnp.abs(U), axis=0)
    sg = jnp.sign(U[i, jnp.arange(rank)])
    sg = jnp.where(sg == 0, 1, sg)
    return U * sg, S, Vt * sg[:, None]
