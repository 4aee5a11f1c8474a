"""Expected attention from count tables, and alignment metrics against actual attention.

Axis vocabulary: B sequences, L layers, H heads, T query positions, S key positions.

The metric kernel is written for one head and one sequence (:func:`query_metrics`) and
vmapped over any leading axes by :func:`alignment_metrics`.
"""

# ruff: noqa: F722  (jaxtyping shape strings such as "R V" are not Python expressions)
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn.counts import CountMatrix
from jaxattn.errors import JaxattnError
from jaxattn.typing import Array, ArrayLike, Bool, Float, Int, Integer, PRNGKey, Real, Shaped

#: Epsilon inside the logs of the KL divergence, as in the seed.
KL_EPS = 1e-10
#: Relative tolerance for "equals the row's maximum" in the tie-aware argmax match.
TIE_RTOL = 1e-6

METRIC_NAMES = ("kl", "cosine", "argmax_match", "argmax_match_tied", "entropy")


def sample_sequences(
    tokens: Integer[ArrayLike, " N"],
    doc_ids: Integer[ArrayLike, " N"] | None,
    seq_len: int,
    num_seqs: int,
    key: PRNGKey,
) -> Int[np.ndarray, "B T"]:
    """Draws ``num_seqs`` windows of ``seq_len`` tokens, each inside one document.

    Args:
        tokens: int [N].
        doc_ids: int [N] or None (one document).
        seq_len: T.
        num_seqs: B.
        key: PRNG key for the start positions.

    Returns:
        int32 [B, T].

    Raises:
        JaxattnError: bad ``seq_len``/``num_seqs``, or no document of ``seq_len`` tokens.
    """
    if int(num_seqs) < 1:
        raise JaxattnError(f"num_seqs={num_seqs} must be >= 1")
    if int(seq_len) < 1:
        raise JaxattnError(f"seq_len={seq_len} must be >= 1")
    tokens = np.asarray(tokens)
    n_tok = tokens.shape[0]
    m = n_tok - seq_len + 1
    if doc_ids is None:
        seg = np.zeros(n_tok, np.int64)
    else:
        d = np.asarray(doc_ids)
        seg = np.concatenate([[0], np.cumsum(d[1:] != d[:-1])]) if n_tok else np.zeros(0, np.int64)
    if m <= 0:
        starts = np.zeros(0, np.int64)
    else:
        starts = np.flatnonzero(seg[:m] == seg[seq_len - 1 : seq_len - 1 + m])
    if starts.size == 0:
        longest = int(np.bincount(seg).max()) if n_tok else 0
        raise JaxattnError(f"seq_len={seq_len} is longer than every document (the longest has {longest} tokens)")
    pick = np.asarray(jax.random.randint(key, (int(num_seqs),), 0, starts.size))
    idx = starts[pick][:, None] + np.arange(seq_len)[None, :]
    return tokens[idx].astype(np.int32)


def context_ids(cm: CountMatrix, tokens: Integer[ArrayLike, "*B T"]) -> Int[np.ndarray, "*B T"]:
    """Row of ``cm`` for each query's n-gram ``g_i = tokens[i-n+1 .. i]``.

    Args:
        cm: the table whose contexts are looked up.
        tokens: int [..., T].

    Returns:
        int32 [..., T]; -1 for ``i < n-1`` or an n-gram never observed.
    """
    tokens = np.asarray(tokens)
    n = cm.n
    T = tokens.shape[-1]
    out = np.full(tokens.shape, -1, np.int32)
    if T >= n:
        windows = np.stack([tokens[..., k : T - n + 1 + k] for k in range(n)], axis=-1)
        out[..., n - 1 :] = cm.context_index(windows)
    return out


def expected_attention(
    cm: CountMatrix, tokens: Integer[ArrayLike, "*B T"]
) -> tuple[Float[np.ndarray, "*B T T"], Bool[np.ndarray, "*B T T"]]:
    """The attention the counts predict: ``expected[i, j] ∝ P^{n,s}[g_i, tokens[j]]`` for ``j <= i``.

    Query rows whose n-gram is unobserved, or whose expected mass is zero, are masked out.

    Args:
        cm: the table ``C^{n,s}``.
        tokens: int [..., T].

    Returns:
        expected float32 [..., T, T] (rows normalised over valid keys, zero elsewhere),
        mask bool [..., T, T] (valid query-key pairs).
    """
    tokens = np.asarray(tokens)
    T = tokens.shape[-1]
    g = context_ids(cm, tokens)
    counts = cm.lookup(g[..., :, None], tokens[..., None, :]).astype(np.float64)
    causal = np.tril(np.ones((T, T), dtype=bool))
    counts = np.where(causal, counts, 0.0)
    mass = counts.sum(-1, keepdims=True)
    valid_q = mass > 0
    expected = np.where(valid_q, counts / np.where(valid_q, mass, 1.0), 0.0).astype(np.float32)
    mask = causal & valid_q
    return expected, mask


def query_metrics(
    expected: Real[ArrayLike, "T S"], actual: Real[ArrayLike, "T S"], mask: Bool[ArrayLike, "T S"]
) -> dict[str, Array]:
    """Per-query metrics for one head on one sequence.

    Both rows are renormalised over the valid keys of the query.

    Args:
        expected: [T, S].
        actual: [T, S].
        mask: bool [T, S], valid query-key pairs.

    Returns:
        dict of float32 [T] arrays (``kl``, ``cosine``, ``argmax_match``,
        ``argmax_match_tied``, ``entropy``) and bool [T] ``valid``.
    """
    e = jnp.where(mask, expected.astype(jnp.float32), 0.0)
    a = jnp.where(mask, actual.astype(jnp.float32), 0.0)
    e_sum = e.sum(-1, keepdims=True)
    a_sum = a.sum(-1, keepdims=True)
    valid = (e_sum[:, 0] > 0) & mask.any(-1)
    e = e / jnp.where(e_sum > 0, e_sum, 1.0)
    a = a / jnp.where(a_sum > 0, a_sum, 1.0)
    kl = jnp.sum(jnp.where(mask, e * (jnp.log(e + KL_EPS) - jnp.log(a + KL_EPS)), 0.0), -1)
    kl = jnp.maximum(kl, 0.0)  # ε can push an exact match a hair below zero
    denom = jnp.linalg.norm(e, axis=-1) * jnp.linalg.norm(a, axis=-1)
    cosine = jnp.clip(jnp.sum(e * a, -1) / jnp.where(denom > 0, denom, 1.0), 0.0, 1.0)
    e_arg = jnp.argmax(jnp.where(mask, e, -1.0), -1)
    a_arg = jnp.argmax(jnp.where(mask, a, -1.0), -1)
    match = (e_arg == a_arg).astype(jnp.float32)
    e_max = jnp.max(jnp.where(mask, e, -1.0), -1)
    e_at_a = jnp.take_along_axis(e, a_arg[:, None], -1)[:, 0]
    tied = (e_at_a >= e_max * (1.0 - TIE_RTOL)).astype(jnp.float32)
    n_keys = mask.sum(-1)
    ent = -jnp.sum(jnp.where(mask & (a > 0), a * jnp.log(jnp.where(a > 0, a, 1.0)), 0.0), -1)
    log_n = jnp.log(jnp.maximum(n_keys, 1).astype(jnp.float32))
    entropy = jnp.where(n_keys > 1, ent / jnp.where(n_keys > 1, log_n, 1.0), 1.0)
    out = {"kl": kl, "cosine": cosine, "argmax_match": match, "argmax_match_tied": tied, "entropy": entropy}
    return {k: jnp.where(valid, v, 0.0) for k, v in out.items()} | {"valid": valid}


def _sequence_metrics(expected: jax.Array, actual: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
    q = query_metrics(expected, actual, mask)
    nq = q["valid"].sum()
    out = {k: q[k].sum() / jnp.maximum(nq, 1) for k in METRIC_NAMES}
    out["num_queries"] = nq.astype(jnp.int32)
    return out


@jax.jit
def alignment_metrics(
    expected: Real[ArrayLike, "*#B #T #S"], actual: Real[ArrayLike, "*#B #T #S"], mask: Shaped[ArrayLike, "*#B #T #S"]
) -> dict[str, Array]:
    """Alignment between expected and actual attention, batched over any leading axes.

    Args:
        expected: [..., T, S] expected attention (rows need not be normalised).
        actual: [..., T, S] actual attention probabilities.
        mask: bool [..., T, S], the valid (query, key) pairs.

    Returns:
        dict with ``kl`` (KL(expected || actual), ε=1e-10 inside the logs), ``cosine``,
        ``argmax_match`` (strict, first index on ties), ``argmax_match_tied`` (the actual
        argmax lands on a key holding the row's expected maximum), ``entropy`` (actual
        entropy / log(#keys); 1.0 is uniform), each float32 [...] — the mean over valid
        queries (0.0 where there are none, never NaN) — and ``num_queries`` int32 [...].
    """
    expected, actual, mask = jnp.broadcast_arrays(
        jnp.asarray(expected, jnp.float32), jnp.asarray(actual, jnp.float32), jnp.asarray(mask, bool)
    )
    if expected.ndim < 2:
        raise JaxattnError(f"alignment_metrics needs [..., T, S] arrays, got shape {expected.shape}")
    lead = expected.shape[:-2]
    T, S = expected.shape[-2:]
    flat = [x.reshape((-1, T, S)) for x in (expected, actual, mask)]
    out = jax.vmap(_sequence_metrics)(*flat)
    return {k: v.reshape(lead) for k, v in out.items()}


def pool(metrics: dict[str, Any], axis: int) -> dict[str, np.ndarray]:
    """Pools per-sequence means over ``axis``, weighting by the number of valid queries.

    Also returns the spread across sequences: ``{name}_std`` (unweighted std of the
    per-sequence means that had queries), ``{name}_min`` and ``{name}_max``.

    Args:
        metrics: output of :func:`alignment_metrics` (arrays with the pooled axis).
        axis: the axis to pool.

    Returns:
        dict of numpy arrays without ``axis``.
    """
    nq = np.asarray(metrics["num_queries"]).astype(np.float64)
    tot = nq.sum(axis=axis)
    has = nq > 0
    out: dict[str, np.ndarray] = {"num_queries": tot.astype(np.int64)}
    for k in METRIC_NAMES:
        v = np.asarray(metrics[k], np.float64)
        out[k] = (v * nq).sum(axis=axis) / np.maximum(tot, 1)
        cnt = np.maximum(has.sum(axis=axis), 1)
        mean = np.where(has, v, 0).sum(axis=axis) / cnt
        dev = np.where(has, v - np.expand_dims(mean, axis), 0.0)
        out[f"{k}_std"] = np.sqrt((dev**2).sum(axis=axis) / cnt)
        out[f"{k}_min"] = np.where(has, v, np.inf).min(axis=axis)
        out[f"{k}_max"] = np.where(has, v, -np.inf).max(axis=axis)
        out[f"{k}_min"] = np.where(np.isfinite(out[f"{k}_min"]), out[f"{k}_min"], 0.0)
        out[f"{k}_max"] = np.where(np.isfinite(out[f"{k}_max"]), out[f"{k}_max"], 0.0)
    return out


def expected_for_layout(
    tables: dict[tuple[int, int], CountMatrix], tokens: Integer[ArrayLike, "B T"], pairs: list[tuple[int, int]]
) -> tuple[Float[np.ndarray, "P B T T"], Bool[np.ndarray, "P B T T"]]:
    """Expected attention for each distinct (n, s).

    Args:
        tables: ``{(n, s): CountMatrix}``.
        tokens: int [B, T].
        pairs: the (n, s) pairs, in order.

    Returns:
        expected float32 [P, B, T, T] and mask bool [P, B, T, T], P = len(pairs).
    """
    ex, mk = zip(*(expected_attention(tables[p], tokens) for p in pairs))
    return np.stack(ex), np.stack(mk)


@jax.jit
def layer_head_metrics(
    expected: Float[Array, "P B T T"],
    mask: Bool[Array, "P B T T"],
    pair_index: Integer[Array, "L H"],
    attn: Float[Array, "B L H T T"],
) -> dict[str, Array]:
    """Metrics for every layer, head and sequence in one vmapped call.

    Args:
        expected: [P, B, T, T] expected attention per distinct (n, s).
        mask: bool [P, B, T, T].
        pair_index: int32 [L, H], which (n, s) each head uses.
        attn: [B, L, H, T, T] actual attention.

    Returns:
        dict of [L, H, B] arrays (see :func:`alignment_metrics`).
    """

    def one_head(p: jax.Array, a: jax.Array) -> dict[str, jax.Array]:  # a: [B, T, T]
        return jax.vmap(_sequence_metrics)(expected[p], a, mask[p])

    per_layer = jax.vmap(one_head, in_axes=(0, 0))  # over heads
    return jax.vmap(per_layer, in_axes=(0, 0))(pair_index, jnp.moveaxis(attn, 0, 2))
