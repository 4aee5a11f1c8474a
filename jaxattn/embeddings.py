"""Token and n-gram embeddings.

Axis vocabulary: V vocabulary, R observed contexts, d (D) model width.
"""

# ruff: noqa: F722  (jaxtyping shape strings such as "R V" are not Python expressions)
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn.counts import CountMatrix
from jaxattn.errors import JaxattnError
from jaxattn.typing import Array, ArrayLike, Float, Integer, PRNGKey


def base_embeddings(key: PRNGKey, vocab_size: int, d_model: int, dtype: Any = jnp.float32) -> Float[Array, "V D"]:
    """Random Gaussian rows, each normalised to unit length (the seed's ``E``).

    Args:
        key: PRNG key.
        vocab_size: V.
        d_model: d.
        dtype: dtype of the result (drawn and normalised in float32 first).

    Returns:
        float [V, d] with unit-norm rows.
    """
    if vocab_size < 1 or d_model < 1:
        raise JaxattnError(f"embedding shape ({vocab_size}, {d_model}) must be positive")
    e = jax.random.normal(key, (vocab_size, d_model), dtype=jnp.float32)
    e = e / jnp.linalg.norm(e, axis=-1, keepdims=True)
    return e.astype(dtype)


def orthonormal_embeddings(key: PRNGKey, vocab_size: int, d_model: int) -> Float[Array, "V D"]:
    """Embeddings with exactly orthonormal rows (needs ``vocab_size <= d_model``).

    Args:
        key: PRNG key.
        vocab_size: V.
        d_model: d, at least V.

    Returns:
        float32 [V, d] with ``E @ E.T == I``.
    """
    if vocab_size > d_model:
        raise JaxattnError(f"orthonormal rows need vocab_size={vocab_size} <= d_model={d_model}")
    g = jax.random.normal(key, (d_model, vocab_size), dtype=jnp.float32)
    q, r = jnp.linalg.qr(g)
    q = q * jnp.sign(jnp.diagonal(r))[None, :]
    return q.T


def context_probabilities(contexts: Integer[ArrayLike, "R n"], prev: CountMatrix) -> Float[np.ndarray, " R"]:
    """``P^{n-1,0}(t_n | t_1..t_{n-1})`` for each n-gram row of ``contexts``.

    Args:
        contexts: int [R, n] n-grams, n >= 2.
        prev: the table ``C^{n-1,0}``.

    Returns:
        float32 [R]; 0 where the prefix was never observed.
    """
    contexts = np.asarray(contexts)
    n = contexts.shape[1]
    if prev.n != n - 1 or prev.s != 0:
        raise JaxattnError(f"E^{n} needs the table C^({n - 1},0), got C^({prev.n},{prev.s})")
    rows = prev.context_index(contexts[:, :-1])
    num = prev.lookup(rows, contexts[:, -1]).astype(np.float64)
    den = np.where(rows >= 0, prev.row_sums[np.maximum(rows, 0)], 0).astype(np.float64)
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0).astype(np.float32)


def ngram_embeddings(
    base: Float[ArrayLike, "V D"], contexts: Integer[ArrayLike, "R n"], prev: CountMatrix | None = None
) -> Float[ArrayLike, "R D"]:
    """The seed's n-gram embeddings ``E^n[(t_1..t_n)] = P^{n-1,0}(t_n | t_1..t_{n-1}) E[t_n]``.

    ``E^1`` is ``E`` gathered at the observed unigrams.

    Args:
        base: float [V, d], the base embeddings E.
        contexts: int [R, n], observed n-grams.
        prev: ``C^{n-1,0}``; required for n >= 2.

    Returns:
        float [R, d].
    """
    contexts = np.asarray(contexts)
    n = contexts.shape[1]
    if n >= 2 and prev is None:
        raise JaxattnError(f"E^{n} needs the table C^({n - 1},0) (prev=None)")
    if not isinstance(base, jax.core.Tracer):
        # On the host: a gather and a scale cost microseconds there, an eager jax op a compilation per shape.
        hbase = np.asarray(base)
        rows = hbase[contexts[:, -1]]
        if n >= 2 and prev is not None:
            rows = context_probabilities(contexts, prev).astype(hbase.dtype)[:, None] * rows
        return jax.device_put(rows)
    last = jnp.asarray(contexts[:, -1])
    if n == 1 or prev is None:
        return base[last]
    p = jnp.asarray(context_probabilities(contexts, prev), dtype=base.dtype)
    return p[:, None] * base[last]
