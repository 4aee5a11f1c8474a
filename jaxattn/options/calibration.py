"""Option 3's temperature: a per-(layer, head) ``tau`` fitted on count-corpus sequences, folded into W_Q.

With ``DerivationConfig.temperature`` the derivation drops the seed's std-0.01 rescaling and sets
``q.k / sqrt(K) = tau A B^T``; :func:`calibrate_temperature` picks each head's ``tau`` as the
minimiser of the mean KL(expected || actual) (:func:`fit_tau`) on sequences of the COUNT corpus
(:func:`calibration_set`), never the evaluation text.

Axis vocabulary: B sequences, L layers, H heads, T/S positions, D d_model, K d_head,
P distinct (n, s) tables, N corpus tokens.
"""

# ruff: noqa: F722  (jaxtyping shape strings such as "R V" are not Python expressions)
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn.alignment import expected_for_layout, sample_sequences
from jaxattn.counts import CountMatrix
from jaxattn.model import ModelConfig, Params, forward_batch
from jaxattn.typing import Array, ArrayLike, Bool, Float, Int, Integer, PRNGKey

__all__ = ["calibrate_temperature", "calibration_set", "fit_tau"]

#: ``tokens [B, T] -> (q_in, k_in)``, each float32 [B, L, T, D] (a :class:`~jaxattn.options.derivation.QKInputs`).
QKInputsHook = Callable[[np.ndarray], tuple[jax.Array, jax.Array]]


@jax.jit
def _layer_scores(q_in: jax.Array, k_in: jax.Array, wq: jax.Array, wk: jax.Array) -> jax.Array:
    """Scores of one layer's heads, as :func:`jaxattn.model.attention_head` computes them.

    Args:
        q_in, k_in: [B, T, D].
        wq, wk: [H, D, K].

    Returns:
        float32 [H, B, T, T].
    """
    q = jnp.einsum("btd,hdk->hbtk", q_in, wq)
    k = jnp.einsum("bsd,hdk->hbsk", k_in, wk)
    return jnp.einsum("hbtk,hbsk->hbts", q, k) / jnp.sqrt(jnp.asarray(wq.shape[-1], jnp.float32))


@jax.jit
def _tau_loss(scores: jax.Array, expected: jax.Array, mask: jax.Array, log_tau: jax.Array) -> jax.Array:
    """Mean cross-entropy ``-sum_j e_ij log softmax(tau s_i)_j`` over valid queries, per head.

    Equal to the mean KL(expected || actual) up to a constant, so it has the same minimiser.

    Args:
        scores: float32 [H, B, T, T].
        expected: float32 [H, B, T, T].
        mask: bool [H, B, T, T] valid (query, key) pairs.
        log_tau: float32 [H].

    Returns:
        float32 [H].
    """
    T = scores.shape[-1]
    causal = jnp.tril(jnp.ones((T, T), bool))
    z = jnp.where(causal, scores * jnp.exp(log_tau)[:, None, None, None], jnp.finfo(jnp.float32).min)
    logp = z - jax.nn.logsumexp(z, axis=-1, keepdims=True)
    e = jnp.where(mask, expected, 0.0)
    e = e / jnp.maximum(e.sum(-1, keepdims=True), 1e-30)
    ce = -jnp.sum(jnp.where(mask, e * logp, 0.0), axis=-1)  # [H, B, T]
    valid = mask.any(-1)
    return jnp.sum(jnp.where(valid, ce, 0.0), axis=(1, 2)) / jnp.maximum(valid.sum(axis=(1, 2)), 1)


def fit_tau(
    scores: Float[Array, "H B T T"],
    expected: Float[Array, "H B T T"],
    mask: Bool[Array, "H B T T"],
    bounds: tuple[float, float],
    iters: int = 40,
) -> Float[np.ndarray, " H"]:
    """Per-head ``tau`` minimising the mean KL(expected || softmax(tau scores)).

    The loss is convex in tau (log-sum-exp of a linear function), hence unimodal in log tau:
    a golden-section search on log tau, run for all heads at once.

    Args:
        scores: float32 [H, B, T, T].
        expected: float32 [H, B, T, T].
        mask: bool [H, B, T, T].
        bounds: (lo, hi) search interval.
        iters: golden-section steps (each shrinks the interval by 0.618).

    Returns:
        float64 [H].
    """
    H = scores.shape[0]
    g = (np.sqrt(5.0) - 1.0) / 2.0
    lo = np.full(H, np.log(bounds[0]))
    hi = np.full(H, np.log(bounds[1]))

    def loss(x: np.ndarray) -> np.ndarray:
        return np.asarray(_tau_loss(scores, expected, mask, jnp.asarray(x, jnp.float32)), np.float64)

    x1, x2 = hi - g * (hi - lo), lo + g * (hi - lo)
    f1, f2 = loss(x1), loss(x2)
    for _ in range(iters):
        left = f1 <= f2  # minimum in [lo, x2]
        hi = np.where(left, x2, hi)
        lo = np.where(left, lo, x1)
        new = np.where(left, hi - g * (hi - lo), lo + g * (hi - lo))
        fn = loss(new)
        x2, f2, x1, f1 = (
            np.where(left, x1, new),
            np.where(left, f1, fn),
            np.where(left, new, x2),
            np.where(left, fn, f2),
        )
    return np.exp(0.5 * (lo + hi))


def calibration_set(
    tables: dict[tuple[int, int], CountMatrix],
    pairs: list[tuple[int, int]],
    tokens: Integer[ArrayLike, " N"],
    doc_ids: Integer[ArrayLike, " N"],
    seq_len: int,
    num_seqs: int,
    *,
    key: PRNGKey,
) -> tuple[Int[np.ndarray, "B T"], Float[np.ndarray, "P B T T"], Bool[np.ndarray, "P B T T"]]:
    """Sequences of the COUNT corpus (never the evaluation text) and their expected attention.

    Args:
        tables: ``{(n, s): CountMatrix}`` of the count corpus.
        pairs: the P distinct (n, s) of the layout, in order.
        tokens: int [N] count-corpus tokens.
        doc_ids: int [N] their documents.
        seq_len: T.
        num_seqs: B.
        key: PRNG key of the draw (a run uses ``prep.key("calibration")``).

    Returns:
        tokens int32 [B, T], expected float32 [P, B, T, T], mask bool [P, B, T, T].
    """
    tok = sample_sequences(tokens, doc_ids, seq_len, num_seqs, key)
    expected, mask = expected_for_layout(tables, tok, pairs)
    return tok, expected, mask


def calibrate_temperature(
    params: Params,
    qk_inputs: QKInputsHook | None,
    tokens: Integer[ArrayLike, "B T"],
    expected: Float[ArrayLike, "P B T T"],
    mask: Bool[ArrayLike, "P B T T"],
    pair_index: Int[ArrayLike, "L H"],
    config: ModelConfig,
    *,
    tau_bounds: tuple[float, float],
    batch_size: int = 16,
) -> tuple[Params, Float[np.ndarray, "L H"]]:
    """Fits tau per (layer, head) on count-corpus sequences and folds it into W_Q.

    With the embedding-stream hook every layer's inputs are known up front. Without it a
    layer's input depends on the layers below, so layers are calibrated in order, each on
    a forward pass of the model as calibrated so far.

    Args:
        params: the derived parameters (tau = 1); not modified.
        qk_inputs: the derivation's ``qk_inputs`` hook (None: the model's own ``LN(x)``).
        tokens: int [B, T] count-corpus sequences (:func:`calibration_set`).
        expected: float32 [P, B, T, T] their expected attention.
        mask: bool [P, B, T, T] their valid query-key pairs.
        pair_index: int [L, H] table of each head.
        config: the model config.
        tau_bounds: search interval of tau.
        batch_size: sequences per forward call (without the hook).

    Returns:
        (the parameters with ``wq`` rescaled by tau, float64 [L, H] the fitted tau).
    """
    params = dict(params)
    tok, expected, mask, pair_index = np.asarray(tokens), np.asarray(expected), np.asarray(mask), np.asarray(pair_index)
    L = config.num_layers
    taus = np.ones((L, config.num_heads))
    bs = max(1, int(batch_size))
    fixed = qk_inputs(tok) if qk_inputs is not None else None
    for l in range(L):
        if fixed is not None:
            q_in, k_in = fixed[0][:, l], fixed[1][:, l]
        else:
            chunks = [
                forward_batch(params, jnp.asarray(tok[i : i + bs]), config, return_inputs=True).query_inputs[:, l]
                for i in range(0, tok.shape[0], bs)
            ]
            q_in = k_in = jnp.concatenate(chunks)
        scores = _layer_scores(q_in, k_in, params["wq"][l], params["wk"][l])
        pi = pair_index[l]
        taus[l] = fit_tau(scores, jnp.asarray(expected[pi]), jnp.asarray(mask[pi]), tau_bounds)
        params["wq"] = params["wq"].at[l].multiply(jnp.asarray(taus[l], jnp.float32)[:, None, None])
    return params, taus
