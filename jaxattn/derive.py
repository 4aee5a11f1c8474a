"""Closed-form Q/K and V/O derivations from count tables (SPEC §2).

Axis vocabulary: R observed contexts, V vocabulary, d model width, r rank (= d_head).
"""

# ruff: noqa: F722  (jaxtyping shape strings such as "R V" are not Python expressions)
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn.counts import CountMatrix, SparseMatrix, check_dense_size, manifold_matrix, probability_matrix
from jaxattn.embeddings import base_embeddings, ngram_embeddings
from jaxattn.errors import JaxattnError, MemoryBudgetError
from jaxattn.model import ModelConfig, Params, init_mlp
from jaxattn.svd import one_blas_thread, truncated_svd
from jaxattn.typing import Array, ArrayLike, Float, Num, PRNGKey


def _on_host(*arrays: Any) -> list[np.ndarray] | None:
    """The arrays as numpy (a free view for CPU jax arrays), or None when any is a tracer.

    The derivation's products are small (at most [R, V] x [V, K]); on the host they cost
    microseconds, where each eager jax op costs a dispatch and a compilation per new shape.
    Results go back with ``jax.device_put`` (a transfer; ``jnp.asarray`` of a numpy array
    compiles a kernel per shape).
    """
    if any(isinstance(a, jax.core.Tracer) for a in arrays):
        return None
    return [np.asarray(a) for a in arrays]


def _shape(M: Any) -> tuple[int, int]:
    shape = tuple(M.shape)
    if len(shape) != 2:
        raise JaxattnError(f"expected a 2-D matrix, got shape {shape}")
    return int(shape[0]), int(shape[1])


def padded_svd(
    M: Num[ArrayLike, "R V"] | SparseMatrix, rank: int, *, key: PRNGKey | None = None
) -> tuple[Float[Array, "R K"], Float[Array, " K"], Float[Array, "K V"]]:
    """Rank-``rank`` truncated SVD, zero-padded when ``rank > min(R, V)``.

    Args:
        M: dense or sparse [R, V].
        rank: r.
        key: PRNG key for the randomized algorithm.

    Returns:
        U [R, r], S [r] (descending, zeros in the padding), Vt [r, V].
    """
    R, V = _shape(M)
    if rank < 1:
        raise JaxattnError(f"rank={rank} must be >= 1")
    r_eff = min(rank, R, V)
    U, S, Vt = truncated_svd(M, r_eff, key=key)
    if r_eff < rank and not isinstance(M, jax.Array):  # pad on the host: no compilation per shape
        pad = rank - r_eff
        hu, hs, hvt = (np.asarray(a) for a in (U, S, Vt))
        return (
            jax.device_put(np.pad(hu, ((0, 0), (0, pad)))),
            jax.device_put(np.pad(hs, (0, pad))),
            jax.device_put(np.pad(hvt, ((0, pad), (0, 0)))),
        )
    if r_eff < rank:
        pad = rank - r_eff
        U = jnp.pad(U, ((0, 0), (0, pad)))
        S = jnp.pad(S, (0, pad))
        Vt = jnp.pad(Vt, ((0, pad), (0, 0)))
    return U, S, Vt


def _check_embeddings(E_n: jax.Array, E_1: jax.Array, R: int, V: int, rank: int) -> None:
    if E_n.shape[0] != R:
        raise JaxattnError(f"E_n has {E_n.shape[0]} rows but the matrix has R={R} contexts")
    if E_1.shape[0] != V:
        raise JaxattnError(f"E_1 has {E_1.shape[0]} rows but the matrix has V={V} columns")
    if E_n.shape[1] != E_1.shape[1]:
        raise JaxattnError(f"E_n width {E_n.shape[1]} differs from E_1 width {E_1.shape[1]}")
    if rank > E_1.shape[1]:
        raise JaxattnError(f"d_head={rank} > d_model={E_1.shape[1]}")


def derive_qk(
    M: Num[ArrayLike, "R V"] | SparseMatrix,
    E_n: Float[ArrayLike, "R D"],
    E_1: Float[ArrayLike, "V D"],
    rank: int,
    *,
    key: PRNGKey | None = None,
) -> tuple[Float[Array, "D K"], Float[Array, "D K"]]:
    """The seed's ``W_Q = (E^n)^T U_r S_r^{1/2}`` and ``W_K = (E^1)^T V_r S_r^{1/2}``.

    Args:
        M: the manifold matrix, dense or sparse [R, V].
        E_n: float [R, d], embeddings of the observed contexts.
        E_1: float [V, d], token embeddings.
        rank: r = d_head.
        key: PRNG key for the randomized SVD.

    Returns:
        W_Q [d, r], W_K [d, r].
    """
    R, V = _shape(M)
    E_n, E_1 = jnp.asarray(E_n), jnp.asarray(E_1)
    _check_embeddings(E_n, E_1, R, V, rank)
    U, S, Vt = padded_svd(M, rank, key=key)
    host = _on_host(U, S, Vt, E_n, E_1)
    if host is not None:
        hu, hs, hvt, hn, h1 = host
        hroot = np.sqrt(hs)
        with one_blas_thread():
            return jax.device_put(hn.T @ (hu * hroot)), jax.device_put(h1.T @ (hvt.T * hroot))
    root = jnp.sqrt(S)
    return E_n.T @ (U * root), E_1.T @ (Vt.T * root)


def derive_vo(
    P: Num[ArrayLike, "R V"] | SparseMatrix,
    E_n: Float[ArrayLike, "R D"],
    E_1: Float[ArrayLike, "V D"],
    rank: int,
    *,
    key: PRNGKey | None = None,
) -> tuple[Float[Array, "K D"], Float[Array, "D K"]]:
    """The seed's ``W_V = S^{1/2} U_r^T E^n`` and ``W_O = (E^1)^T V_r S^{1/2}`` from the SVD of P.

    Args:
        P: the probability matrix, dense or sparse [R, V].
        E_n: float [R, d].
        E_1: float [V, d].
        rank: r = d_head.
        key: PRNG key for the randomized SVD.

    Returns:
        W_V [r, d], W_O [d, r].
    """
    R, V = _shape(P)
    E_n, E_1 = jnp.asarray(E_n), jnp.asarray(E_1)
    _check_embeddings(E_n, E_1, R, V, rank)
    U, S, Vt = padded_svd(P, rank, key=key)
    host = _on_host(U, S, Vt, E_n, E_1)
    if host is not None:
        hu, hs, hvt, hn, h1 = host
        hroot = np.sqrt(hs)
        with one_blas_thread():
            return jax.device_put((hu * hroot).T @ hn), jax.device_put(h1.T @ (hvt.T * hroot))
    root = jnp.sqrt(S)
    return (U * root).T @ E_n, E_1.T @ (Vt.T * root)


def normalize_std(W: Float[ArrayLike, "*shape"], std: float) -> Float[Array, "*shape"]:
    """Rescales ``W`` so its standard deviation over all entries is ``std`` (0 stays 0).

    Args:
        W: float [...], e.g. one layer's stacked W_Q [H, D, K].
        std: the target standard deviation.

    Returns:
        ``W * std / std(W)``, same shape; an all-constant ``W`` (std 0) is returned unchanged.
        Concrete inputs are rescaled on the host (the seed baseline and every derivation that
        reproduces it take this one path, so they agree bit for bit); traced ones in jax.
    """
    host = _on_host(W)
    if host is not None:
        return jax.device_put(_normalize_std_host(np.asarray(host[0], np.float32), std))
    cur = jnp.std(W)
    return jnp.where(cur > 0, W * (std / jnp.where(cur > 0, cur, 1.0)), W)


def _normalize_std_host(W: np.ndarray, std: float) -> np.ndarray:
    """:func:`normalize_std` in numpy."""
    cur = float(np.std(W))
    return (W * np.float32(std / cur)).astype(W.dtype, copy=False) if cur > 0 else W


class HeadWeights(NamedTuple):
    """Derived weights of one (n, s) table, in the seed's orientation.

    Attributes:
        wq: [D, K].
        wk: [D, K].
        wv: [K, D] (the seed's W_V).
        wo: [D, K] (the seed's W_O).
    """

    wq: Float[Array, "D K"]
    wk: Float[Array, "D K"]
    wv: Float[Array, "K D"]
    wo: Float[Array, "D K"]


#: A matrix of at most this many bytes dense is always made dense (when within the budget).
DENSE_ALWAYS_BYTES = 64 * 1024**2
#: Above :data:`DENSE_ALWAYS_BYTES`, a matrix is made dense only when at least this share of it is non-zero.
DENSE_MIN_DENSITY = 0.01


def dense_or_sparse(matrix_fn: Any, cm: CountMatrix) -> Any:
    """``matrix_fn(cm)`` dense when it fits the memory budget and is small or not sparse, else its sparse form.

    Dense when ``R * V * 4 <= DENSE_ALWAYS_BYTES`` or when at least :data:`DENSE_MIN_DENSITY` of the
    cells are non-zero: a word-level table (V ~ 10^4, 0.1% non-zero) stays sparse, so its SVD
    costs O(nnz) per product instead of O(R V), and no R x V array is allocated.

    Args:
        matrix_fn: :func:`~jaxattn.counts.probability_matrix` or :func:`~jaxattn.counts.manifold_matrix`.
        cm: the counts.

    Returns:
        float32 [R, V] numpy array, or a :class:`~jaxattn.counts.SparseMatrix`.
    """
    try:
        check_dense_size(cm.shape, 4, "matrix", cm.max_dense_bytes)
    except MemoryBudgetError:
        return matrix_fn(cm, sparse=True)
    R, V = cm.shape
    if 4 * R * V > DENSE_ALWAYS_BYTES and cm.nnz < DENSE_MIN_DENSITY * R * V:
        return matrix_fn(cm, sparse=True)
    return matrix_fn(cm)


def derive_table_weights(
    cm: CountMatrix,
    prev: CountMatrix | None,
    embed: Float[ArrayLike, "V D"],
    rank: int,
    *,
    key: PRNGKey | None = None,
) -> HeadWeights:
    """The seed derivation (Q/K from M, V/O from P) for one table ``C^{n,s}``.

    Args:
        cm: ``C^{n,s}``.
        prev: ``C^{n-1,0}`` (for the n-gram embeddings; None when n == 1).
        embed: float [V, D] base embeddings E.
        rank: K = d_head.
        key: PRNG key for randomized SVDs.

    Returns:
        :class:`HeadWeights`.
    """
    kq, kv = jax.random.split(key if key is not None else jax.random.PRNGKey(0))
    e_n = ngram_embeddings(embed, cm.contexts, prev)
    wq, wk = derive_qk(dense_or_sparse(manifold_matrix, cm), e_n, embed, rank, key=kq)
    wv, wo = derive_vo(dense_or_sparse(probability_matrix, cm), e_n, embed, rank, key=kv)
    return HeadWeights(wq, wk, wv, wo)


def assemble_params(
    table_weights: dict[tuple[int, int], HeadWeights],
    embed: Float[ArrayLike, "V D"],
    config: ModelConfig,
    *,
    key: PRNGKey,
) -> Params:
    """Stacks per-table weights into the model's ``[L, H, ...]`` layout and adds the MLP.

    Applies the per-layer std normalisation when ``config.weight_std`` is set.

    Args:
        table_weights: ``{(n, s): HeadWeights}`` covering ``config``'s layout.
        embed: float [V, D].
        config: the model config.
        key: PRNG key for the untrained MLP.

    Returns:
        The parameter pytree of :func:`jaxattn.model.forward`.
    """
    L, H = config.num_layers, config.num_heads
    # Stacked on the host when nothing is traced (no eager op, so no compilation per shape).
    on_host = _on_host(embed, *(a for w in table_weights.values() for a in w)) is not None
    xp: Any = np if on_host else jnp
    stacks: dict[str, list[Any]] = {"wq": [], "wk": [], "wv": [], "wo": []}
    for layer in range(L):
        hw = [table_weights[config.layout(layer, h)] for h in range(H)]
        layer_w = {
            "wq": xp.stack([xp.asarray(w.wq) for w in hw]),
            "wk": xp.stack([xp.asarray(w.wk) for w in hw]),
            "wv": xp.stack([xp.asarray(w.wv).T for w in hw]),  # stored [D, K]: x @ wv
            "wo": xp.stack([xp.asarray(w.wo).T for w in hw]),  # stored [K, D]: v @ wo
        }
        for name, w in layer_w.items():
            if config.weight_std is not None:
                w = _normalize_std_host(w, config.weight_std) if on_host else normalize_std(w, config.weight_std)
            stacks[name].append(w)
    params: Params = {name: jax.device_put(xp.stack(ws).astype(np.float32, copy=False)) for name, ws in stacks.items()}
    params["embed"] = jnp.asarray(embed, jnp.float32)
    params.update(init_mlp(key, config))
    return params


def derive_params(
    tables: dict[tuple[int, int], CountMatrix],
    config: ModelConfig,
    *,
    key: PRNGKey,
    embed: Float[ArrayLike, "V D"] | None = None,
) -> Params:
    """The full seed derivation: base embeddings, every table's weights, stacking, MLP.

    Args:
        tables: ``{(n, s): CountMatrix}`` for at least ``config.pairs``.
        config: the model config.
        key: PRNG key (split for the embeddings, the SVDs and the MLP).
        embed: optional float [V, D] embeddings to use instead of random ones.

    Returns:
        The parameter pytree.
    """
    missing = [p for p in config.pairs if p not in tables]
    if missing:
        raise JaxattnError(f"missing count tables {missing} for this config")
    k_embed, k_svd, k_mlp = jax.random.split(key, 3)
    if embed is None:
        embed = base_embeddings(k_embed, config.vocab_size, config.d_model)
    table_weights = {}
    for i, (n, s) in enumerate(
        sorted({config.layout(l, h) for l in range(config.num_layers) for h in range(config.num_heads)})
    ):
        table_weights[(n, s)] = derive_table_weights(
            tables[(n, s)], tables.get((n - 1, 0)), embed, config.d_head, key=jax.random.fold_in(k_svd, i)
        )
    return assemble_params(table_weights, embed, config, key=k_mlp)
