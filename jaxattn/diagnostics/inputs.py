"""The inputs the measurements share: SVD factors of every M, their targets, raw weights, query inputs.

:func:`jaxattn.diagnostics.diagnose` computes each of these once and hands it to the
measurements that need it.

Axis vocabulary: B sequences, L layers, H heads, T query positions, S key positions,
D d_model, K d_head, V vocabulary, R observed contexts (n-grams), P distinct (n, s) tables.
"""

# ruff: noqa: F722  (jaxtyping shape strings such as "R V" are not Python expressions)
from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn.alignment import context_ids
from jaxattn.counts import CountMatrix, check_dense_size, manifold_matrix
from jaxattn.derive import derive_params, padded_svd
from jaxattn.errors import MemoryBudgetError
from jaxattn.model import ModelConfig, Params, forward_batch, layer_norm
from jaxattn.typing import Array, ArrayLike, Float, Integer, PRNGKey

#: Largest min(R, V) for which the reference SVD is exact (numpy, float64).
EXACT_SVD_MAX = 4096

Factors = dict[tuple[int, int], tuple[np.ndarray, np.ndarray, np.ndarray]]
"""``{(n, s): (U [R, K], S [K], Vt [K, V])}``, float32 rank-K SVD factors of each manifold M."""


def ln_rows(x: Float[ArrayLike, "N D"], params: Params, layer: int, config: ModelConfig) -> Float[Array, "N D"]:
    """``LN1`` of layer ``layer`` applied to rows (what attention would see for a bare embedding).

    Args:
        x: float [N, D] rows (e.g. the token embeddings).
        params: model parameters (their ``ln1_scale`` / ``ln1_bias``).
        layer: which layer's LN1.
        config: the model config (no LN when ``config.layernorm`` is off).

    Returns:
        float32 [N, D].
    """
    if not config.layernorm:
        return jnp.asarray(x, jnp.float32)
    return layer_norm(jnp.asarray(x, jnp.float32), params["ln1_scale"][layer], params["ln1_bias"][layer])


def dense_manifold(cm: CountMatrix) -> Float[np.ndarray, "R V"] | None:
    """The dense manifold M of a table as float32 [R, V], or None when it exceeds the table's memory budget."""
    try:
        check_dense_size(cm.shape, 8, "manifold matrix (diagnostics)", cm.max_dense_bytes)
    except MemoryBudgetError:
        return None
    return np.asarray(manifold_matrix(cm), np.float32)


def exact_svd(
    m: Float[ArrayLike, "R V"], rank: int
) -> tuple[Float[np.ndarray, "R K"], Float[np.ndarray, " K"], Float[np.ndarray, "K V"]]:
    """Exact float64 rank-``rank`` SVD with the library's sign convention, zero-padded.

    The reference for ``M_r`` (the best rank-K approximation). Signs follow
    :func:`jaxattn.svd.truncated_svd`: the largest-|.| entry of each U column is positive.

    Args:
        m: [R, V].
        rank: K.

    Returns:
        float32 U [R, K], S [K], Vt [K, V].
    """
    U, S, Vt = np.linalg.svd(np.asarray(m, np.float64), full_matrices=False)
    r = min(rank, S.size)
    U, S, Vt = U[:, :r], S[:r], Vt[:r]
    sign = np.sign(U[np.argmax(np.abs(U), axis=0), np.arange(r)])
    sign = np.where(sign == 0, 1.0, sign)
    U, Vt = U * sign, Vt * sign[:, None]
    pad = rank - r
    if pad:
        U, S, Vt = np.pad(U, ((0, 0), (0, pad))), np.pad(S, (0, pad)), np.pad(Vt, ((0, pad), (0, 0)))
    return U.astype(np.float32), S.astype(np.float32), Vt.astype(np.float32)


def manifold_factors(
    tables: dict[tuple[int, int], CountMatrix], pairs: Sequence[tuple[int, int]], rank: int, *, key: PRNGKey
) -> Factors:
    """Rank-K SVD factors ``(U [R, K], S [K], Vt [K, V])`` of each manifold M the layout uses.

    Exact (:func:`exact_svd`) when min(R, V) <= :data:`EXACT_SVD_MAX`, else
    :func:`jaxattn.derive.padded_svd` with ``fold_in(key, i)`` for the i-th pair. Tables whose
    dense M would exceed their memory budget are left out (their diagnostics are reported as
    skipped).

    Args:
        tables: ``{(n, s): CountMatrix}``.
        pairs: the distinct (n, s) of the layout, in order.
        rank: K (``config.d_head``).
        key: PRNG key of the randomised SVDs (the run's "diagnostics-svd" key).

    Returns:
        :data:`Factors`.
    """
    out: Factors = {}
    for i, (n, s) in enumerate(pairs):
        m = dense_manifold(tables[(n, s)])
        if m is None:
            continue
        if min(m.shape) <= EXACT_SVD_MAX:
            out[(n, s)] = exact_svd(m, rank)
        else:
            U, S, Vt = padded_svd(m, rank, key=jax.random.fold_in(key, i))
            out[(n, s)] = (np.asarray(U), np.asarray(S), np.asarray(Vt))
    return out


def gather_table(
    table: Float[np.ndarray, "R V"], rows: Integer[np.ndarray, "B T"], tokens: Integer[np.ndarray, "B S"]
) -> Float[np.ndarray, "B T S"]:
    """``table[g_i, t_j]`` for every (query i, key j); 0 where the context is unobserved.

    Args:
        table: [R, V].
        rows: int [B, T] context row of each query (-1: unobserved).
        tokens: int [B, T].

    Returns:
        float32 [B, T, S].
    """
    vals = table[np.maximum(rows, 0)[:, :, None], tokens[:, None, :]]
    return np.where(rows[:, :, None] >= 0, vals, 0.0).astype(np.float32)


def manifold_targets(
    tables: dict[tuple[int, int], CountMatrix],
    pairs: Sequence[tuple[int, int]],
    tokens: Integer[np.ndarray, "B T"],
    factors: Factors,
) -> Float[np.ndarray, "P B T T"]:
    """``M_r[g_i, t_j]`` for every distinct (n, s): the score each head's derivation aims at.

    Args:
        tables: ``{(n, s): CountMatrix}``.
        pairs: the distinct (n, s) of the layout, in order (P of them).
        tokens: int [B, T] evaluation sequences.
        factors: :func:`manifold_factors`.

    Returns:
        float32 [P, B, T, T] (zeros for tables without factors).
    """
    B, T = tokens.shape
    out = np.zeros((len(pairs), B, T, T), np.float32)
    for p, pair in enumerate(pairs):
        if pair in factors:
            U, S, Vt = factors[pair]
            mr = (U * S) @ Vt
            out[p] = gather_table(mr, context_ids(tables[pair], tokens), tokens)
    return out


def raw_params(
    tables: dict[tuple[int, int], CountMatrix], config: ModelConfig, params: Params, *, key: PRNGKey
) -> Params:
    """The seed derivation without the std-0.01 rescaling, with the same E, SVD and MLP keys.

    Args:
        tables: ``{(n, s): CountMatrix}``.
        config: the model config of the seed derivation.
        params: the seed-derived parameters (their embedding is reused).
        key: the key the seed derivation used (the run's "derive" key).

    Returns:
        Parameters of ``dataclasses.replace(config, weight_std=None)``.
    """
    cfg = dataclasses.replace(config, weight_std=None)
    return derive_params(tables, cfg, key=key, embed=params["embed"])


def padded_batches(
    tokens: Integer[np.ndarray, "B T"], batch_size: int
) -> Iterator[tuple[Integer[np.ndarray, "b T"], int]]:
    """Chunks of ``batch_size`` sequences, the last one padded (so one shape compiles once).

    Args:
        tokens: int [B, T].
        batch_size: sequences per chunk (capped at B).

    Yields:
        (int [bs, T] tokens, number of real sequences in the chunk).
    """
    B = tokens.shape[0]
    bs = max(1, min(int(batch_size), B))
    for start in range(0, B, bs):
        chunk = tokens[start : start + bs]
        n = chunk.shape[0]
        if n < bs:
            chunk = np.concatenate([chunk, np.repeat(chunk[:1], bs - n, axis=0)])
        yield chunk, n


def query_inputs(
    params: Params, tokens: Integer[np.ndarray, "B T"], config: ModelConfig, *, batch_size: int
) -> tuple[Float[np.ndarray, "B L T D"], Float[np.ndarray, "B L H T T"]]:
    """Each layer's query input ``LN1(x)`` and the attention on the evaluation sequences.

    Args:
        params: model parameters.
        tokens: int [B, T] evaluation sequences.
        config: the model config to run.
        batch_size: sequences per forward call (the run's ``batch_size``).

    Returns:
        query inputs float32 [B, L, T, D], attention float32 [B, L, H, T, T].
    """
    qs, attn = [], []
    for tok, n in padded_batches(tokens, batch_size):
        out = forward_batch(params, jnp.asarray(tok), config, return_inputs=True)
        qs.append(np.asarray(out.query_inputs)[:n])
        attn.append(np.asarray(out.attn)[:n])
    return np.concatenate(qs), np.concatenate(attn)
