"""Diagnostics 2, 3 and 5, the attention scores: their spread and fit, the QK circuit, the target ceiling.

Checks the seed's "Q_i·K_j ≈ 0 for all j", "W_Q and W_K don't preserve the count structure",
"the derivation loses positional information" and "the std-0.01 normalisation makes
attention nearly uniform".

Axis vocabulary: B sequences, L layers, H heads, T query positions, S key positions,
D d_model, K d_head, V vocabulary, R observed contexts (n-grams), P distinct (n, s) tables,
Z beta grid points.
"""

# ruff: noqa: F722  (jaxtyping shape strings such as "R V" are not Python expressions)
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn.alignment import METRIC_NAMES, alignment_metrics, context_ids, pool
from jaxattn.counts import CountMatrix, check_dense_size, probability_matrix
from jaxattn.derive import derive_qk
from jaxattn.diagnostics.inputs import Factors, dense_manifold, gather_table, ln_rows
from jaxattn.embeddings import ngram_embeddings
from jaxattn.errors import MemoryBudgetError
from jaxattn.model import ModelConfig, Params
from jaxattn.typing import Bool, Float, Int, PRNGKey

#: Inverse temperatures tried for the "perfect QK circuit" ceilings.
BETA_GRID = tuple(float(b) for b in np.logspace(-1, 4, 26))  # includes 1.0


# --------------------------------------------------------------------------- #
# 2 + 5. Score statistics per layer (actual vs un-normalised weights)
# --------------------------------------------------------------------------- #


def _head_score_stats(
    q_in: jax.Array, wq: jax.Array, wk: jax.Array, target: jax.Array, tmask: jax.Array
) -> dict[str, jax.Array]:
    """Score statistics of one head on one sequence (sums, pooled later).

    Args:
        q_in: [T, D] the layer's query (and key) input.
        wq, wk: [D, K].
        target: [T, S] the score the derivation aims at (``M_r[g_i, t_j]``).
        tmask: bool [T, S] valid (query, key) pairs of the expected attention.

    Returns:
        dict of float32 scalars: ``row_std_sum``, ``row_range_sum``, ``num_rows`` (rows with
        >= 2 keys), ``score_sum``, ``score_sq_sum``, ``num_pairs``, ``score_min``,
        ``score_max``, and within-row regression sums ``sxy``, ``sxx``, ``syy`` of scores on the
        target over ``tmask``.
    """
    T = q_in.shape[0]
    scores = (q_in @ wq) @ (q_in @ wk).T / jnp.sqrt(jnp.asarray(wq.shape[-1], jnp.float32))
    causal = jnp.tril(jnp.ones((T, T), bool))
    cnt = causal.sum(-1)
    row_mean = jnp.where(causal, scores, 0.0).sum(-1) / cnt
    row_std = jnp.sqrt(jnp.where(causal, (scores - row_mean[:, None]) ** 2, 0.0).sum(-1) / cnt)
    row_range = jnp.where(causal, scores, -jnp.inf).max(-1) - jnp.where(causal, scores, jnp.inf).min(-1)
    spread_rows = cnt >= 2
    # Softmax ignores a per-row shift, so the regression is within rows.
    tm = tmask
    nt = jnp.maximum(tm.sum(-1, keepdims=True), 1)
    s_c = jnp.where(tm, scores - jnp.where(tm, scores, 0.0).sum(-1, keepdims=True) / nt, 0.0)
    t_c = jnp.where(tm, target - jnp.where(tm, target, 0.0).sum(-1, keepdims=True) / nt, 0.0)
    return {
        "row_std_sum": jnp.where(spread_rows, row_std, 0.0).sum(),
        "row_range_sum": jnp.where(spread_rows, row_range, 0.0).sum(),
        "num_rows": spread_rows.sum().astype(jnp.float32),
        "score_sum": jnp.where(causal, scores, 0.0).sum(),
        "score_sq_sum": jnp.where(causal, scores**2, 0.0).sum(),
        "num_pairs": causal.sum().astype(jnp.float32),
        "score_min": jnp.where(causal, scores, jnp.inf).min(),
        "score_max": jnp.where(causal, scores, -jnp.inf).max(),
        "sxy": (s_c * t_c).sum(),
        "sxx": (t_c * t_c).sum(),
        "syy": (s_c * s_c).sum(),
    }


# Heads share the input and differ in weights and target; sequences share the weights.
_layer_score_stats = jax.jit(
    jax.vmap(jax.vmap(_head_score_stats, in_axes=(None, 0, 0, 0, 0)), in_axes=(0, None, None, 1, 1))
)


def _pool_score_stats(st: dict[str, np.ndarray]) -> dict[str, float]:
    """Pools per-(sequence, head) sums of :func:`_head_score_stats` into per-layer numbers."""
    st = {k: np.asarray(v, np.float64) for k, v in st.items()}
    nr, npairs = max(st["num_rows"].sum(), 1.0), max(st["num_pairs"].sum(), 1.0)
    mean = st["score_sum"].sum() / npairs
    # Per head: within-row R^2 and slope of scores on the target, then the mean over heads.
    sxy, sxx, syy = (st[k].sum(axis=0) for k in ("sxy", "sxx", "syy"))  # [H]
    ok = (sxx > 0) & (syy > 0)
    r2 = np.where(ok, sxy**2 / np.where(ok, sxx * syy, 1.0), 0.0)
    slope = np.where(sxx > 0, sxy / np.where(sxx > 0, sxx, 1.0), 0.0)
    return {
        "row_std": float(st["row_std_sum"].sum() / nr),
        "row_range": float(st["row_range_sum"].sum() / nr),
        "pooled_std": float(np.sqrt(max(st["score_sq_sum"].sum() / npairs - mean**2, 0.0))),
        "score_min": float(st["score_min"].min()),
        "score_max": float(st["score_max"].max()),
        "target_r2": float(r2.mean()),
        "target_r2_max": float(r2.max()),
        "target_slope": float(slope.mean()),
    }


def needed_logit_range(
    expected: Float[np.ndarray, "P B T T"], mask: Bool[np.ndarray, "P B T T"], pairs: Sequence[tuple[int, int]]
) -> list[dict[str, float]]:
    """The score spread the expected attention itself needs, per distinct (n, s).

    Softmax reproduces ``expected`` only if a query row's scores differ by
    ``log(max e / min e)`` across the keys with mass (and by infinity where e = 0).

    Args:
        expected: float32 [P, B, T, T] expected attention of each distinct (n, s).
        mask: bool [P, B, T, T] valid query-key pairs.
        pairs: the P distinct (n, s), in order.

    Returns:
        One dict per pair: ``n, s``, ``median_range`` and ``mean_range`` (nats, over valid rows
        with >= 2 positive keys), ``zero_key_fraction`` (share of valid pairs with e = 0).
    """
    out = []
    for p, (n, s) in enumerate(pairs):
        e, m = expected[p].astype(np.float64), mask[p]
        pos = m & (e > 0)
        with np.errstate(divide="ignore"):
            le = np.log(np.where(pos, e, 1.0))
        hi = np.where(pos, le, -np.inf).max(-1)
        lo = np.where(pos, le, np.inf).min(-1)
        rows = pos.sum(-1) >= 2
        rng = (hi - lo)[rows]
        out.append(
            {
                "n": n,
                "s": s,
                "median_range": float(np.median(rng)) if rng.size else 0.0,
                "mean_range": float(rng.mean()) if rng.size else 0.0,
                "zero_key_fraction": float((m & (e <= 0)).sum() / max(m.sum(), 1)),
            }
        )
    return out


def score_statistics(
    params: Params,
    q_inputs: Float[np.ndarray, "B L T D"],
    mask: Bool[np.ndarray, "P B T T"],
    pair_index: Int[np.ndarray, "L H"],
    config: ModelConfig,
    *,
    raw: Params | None = None,
    targets: Float[np.ndarray, "P B T T"] | None = None,
    attn: Float[np.ndarray, "B L H T T"] | None = None,
) -> list[dict[str, Any]]:
    """Diagnostics 2 and 5: the actual ``q·k / sqrt(K)`` per layer, with and without normalisation.

    Both score sets use the same query inputs (those of the model actually run), so their
    ratio isolates what the std-0.01 rescaling does to the logits.

    Args:
        params: the weights the model ran with.
        q_inputs: float32 [B, L, T, D] each layer's query input (``forward(return_inputs=True)``).
        mask: bool [P, B, T, T] valid query-key pairs of the expected attention.
        pair_index: int32 [L, H] index into the P tables per head.
        config: the model config.
        raw: the un-normalised weights (:func:`jaxattn.diagnostics.raw_params`); None skips
            the comparison.
        targets: float32 [P, B, T, S] ``M_r[g_i, t_j]``
            (:func:`jaxattn.diagnostics.manifold_targets`); zeros if None.
        attn: float32 [B, L, H, T, T] the attention (for its per-layer entropy and peak).

    Returns:
        One dict per layer: ``layer``, ``n``; ``row_std`` (mean within-row std of the scores
        over keys j <= i), ``row_range`` (mean max-min), ``pooled_std``, ``score_min``,
        ``score_max``, ``target_r2`` / ``target_slope`` (within-row fit of the scores to
        ``M_r[g_i, t_j]``: how much of the count structure the logits carry and at what inverse
        temperature); the same prefixed ``raw_`` for the un-normalised weights; ``qk_scale``
        (normalised over raw std(W_Q) std(W_K), the factor the rescaling applies to the
        logits); ``entropy`` and ``max_prob`` of the attention when ``attn`` is given.
    """
    L = config.num_layers
    P, B, T = mask.shape[:3]
    if targets is None:
        targets = np.zeros((P, B, T, T), np.float32)
    out = []
    for l in range(L):
        pi = pair_index[l]
        tgt, tm = jnp.asarray(targets[pi]), jnp.asarray(mask[pi])  # [H, B, T, S]
        q = jnp.asarray(q_inputs[:, l])
        row: dict[str, Any] = {"layer": l, "n": config.layout(l, 0)[0]}
        row.update(_pool_score_stats(jax.device_get(_layer_score_stats(q, params["wq"][l], params["wk"][l], tgt, tm))))
        if raw is not None:
            rs = _pool_score_stats(jax.device_get(_layer_score_stats(q, raw["wq"][l], raw["wk"][l], tgt, tm)))
            row.update({f"raw_{k}": v for k, v in rs.items()})
            num = float(jnp.std(params["wq"][l]) * jnp.std(params["wk"][l]))
            den = float(jnp.std(raw["wq"][l]) * jnp.std(raw["wk"][l]))
            row["qk_scale"] = num / den if den > 0 else 0.0
        if attn is not None:
            a = np.asarray(attn[:, l], np.float64)  # [B, H, T, S]
            keys = np.arange(1, T + 1, dtype=np.float64)
            ent = -np.sum(np.where(a > 0, a * np.log(np.where(a > 0, a, 1.0)), 0.0), -1)[..., 1:] / np.log(keys[1:])
            row["entropy"] = float(ent.mean())
            row["max_prob"] = float(a.max(-1)[..., 1:].mean())
            row["uniform_max_prob"] = float((1.0 / keys[1:]).mean())
        out.append(row)
    return out


# --------------------------------------------------------------------------- #
# 3. QK-circuit fidelity per (n, s)
# --------------------------------------------------------------------------- #


def _rel_err(a: np.ndarray, b: np.ndarray) -> float:
    nb = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / nb) if nb > 0 else 0.0


def _best_scalar(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """``(c, ||c a - b|| / ||b||)`` for the least-squares scalar c."""
    aa = float((a * a).sum())
    c = float((a * b).sum() / aa) if aa > 0 else 0.0
    return c, _rel_err(c * a, b)


def _group_mean_rows(x: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Each row replaced by the mean of the rows in its group (the best function of the group alone)."""
    _, inv = np.unique(groups, return_inverse=True)
    sums = np.zeros((inv.max() + 1, x.shape[1]))
    np.add.at(sums, inv, x)
    return (sums / np.bincount(inv)[:, None])[inv]


def qk_fidelity(
    tables: dict[tuple[int, int], CountMatrix],
    pairs: Sequence[tuple[int, int]],
    params: Params,
    config: ModelConfig,
    factors: Factors,
    *,
    key: PRNGKey,
) -> list[dict[str, Any]]:
    """Diagnostic 3: does ``E^n W_Q W_K^T E^1ᵀ`` reproduce the rank-K manifold ``M_r``?

    Uses the raw seed derivation (:func:`jaxattn.derive.derive_qk`, before the std rescaling)
    with the run's embeddings E.

    Args:
        tables: ``{(n, s): CountMatrix}``.
        pairs: the distinct (n, s) of the layout, in order.
        params: the seed-derived parameters (their embedding E and layer 0's LN1).
        config: the model config (``d_head`` is K).
        factors: :func:`jaxattn.diagnostics.manifold_factors` of the tables.
        key: PRNG key of the derivation's SVDs, ``fold_in(key, i)`` for the i-th pair (the
            run's "diagnostics-fidelity" key).

    Returns:
        One dict per (n, s): ``n, s, num_contexts``; ``truncation_error`` ``||M - M_r|| / ||M||``;
        ``raw_error`` ``||E^n W_Q W_K^T E^T - M_r|| / ||M_r||``; ``scaled_error`` and
        ``scale`` (the same with the best scalar, which the std rescaling is free to apply);
        ``ln_error`` / ``ln_scale`` (best-scalar error when the query is ``LN(E[last token])``
        and the key ``LN(E[t])``, the bare inputs layer 0's attention sees);
        ``last_token_floor`` (the best any query that knows only the last token can do:
        each row of M_r replaced by the mean over n-grams with the same last token);
        or ``skipped`` with the reason.
    """
    embed = jnp.asarray(params["embed"], jnp.float32)
    ln_e = np.asarray(ln_rows(embed, params, 0, config), np.float64)
    out = []
    for i, (n, s) in enumerate(pairs):
        cm = tables[(n, s)]
        row: dict[str, Any] = {"n": n, "s": s, "num_contexts": cm.num_contexts}
        m = dense_manifold(cm)
        if m is None or (n, s) not in factors:
            out.append(row | {"skipped": f"dense M of shape {cm.shape} exceeds the memory budget"})
            continue
        U, S, Vt = factors[(n, s)]
        mr = (U.astype(np.float64) * S) @ Vt.astype(np.float64)
        e_n = ngram_embeddings(embed, cm.contexts, tables.get((n - 1, 0)))
        k = jax.random.fold_in(key, i)
        wq, wk = derive_qk(m, e_n, embed, config.d_head, key=k)
        wq64, wk64 = np.asarray(wq, np.float64), np.asarray(wk, np.float64)
        a = (np.asarray(e_n, np.float64) @ wq64) @ (np.asarray(embed, np.float64) @ wk64).T
        c, scaled = _best_scalar(a, mr)
        last = cm.contexts[:, -1]
        a_ln = (ln_e[last] @ wq64) @ (ln_e @ wk64).T
        c_ln, ln_err = _best_scalar(a_ln, mr)
        row.update(
            truncation_error=_rel_err(mr, m.astype(np.float64)),
            raw_error=_rel_err(a, mr),
            scaled_error=scaled,
            scale=c,
            ln_error=ln_err,
            ln_scale=c_ln,
            last_token_floor=_rel_err(_group_mean_rows(mr, last), mr),
        )
        out.append(row)
    return out


# --------------------------------------------------------------------------- #
# The ceiling of a perfect QK circuit: softmax(beta * M) vs softmax(log P)
# --------------------------------------------------------------------------- #


@jax.jit
def _beta_sweep(expected: jax.Array, mask: jax.Array, target: jax.Array, betas: jax.Array) -> dict[str, jax.Array]:
    """Alignment of ``softmax(beta * target)`` (over valid keys) for every beta.

    Args:
        expected, target: float32 [B, T, S]; mask: bool [B, T, S]; betas: [Z].

    Returns:
        dict of [Z, B] metric arrays (see :func:`jaxattn.alignment.alignment_metrics`).
    """
    logits = jnp.where(mask[None], betas[:, None, None, None] * target[None], jnp.finfo(jnp.float32).min)
    probs = jnp.where(mask[None], jax.nn.softmax(logits, axis=-1), 0.0)
    return alignment_metrics(expected[None], probs, mask[None])


def _sweep_summary(m: dict[str, Any], betas: np.ndarray) -> dict[str, Any]:
    pooled = pool(jax.device_get(m), axis=1)  # [Z]
    best = int(np.argmax(pooled["cosine"]))
    return {
        "best_beta": float(betas[best]),
        **{k: float(pooled[k][best]) for k in METRIC_NAMES},
        "curve": {
            "beta": [float(b) for b in betas],
            **{k: [float(v) for v in pooled[k]] for k in ("cosine", "argmax_match_tied")},
        },
    }


def target_ceiling(
    tables: dict[tuple[int, int], CountMatrix],
    pairs: Sequence[tuple[int, int]],
    tokens: Int[np.ndarray, "B T"],
    expected: Float[np.ndarray, "P B T T"],
    mask: Bool[np.ndarray, "P B T T"],
    factors: Factors,
) -> list[dict[str, Any]]:
    """What a *perfect* QK circuit for each target would achieve on the evaluation sequences.

    Scores that equal ``beta * M[g_i, t_j]`` (the seed's target), ``beta * M_r[g_i, t_j]``
    (its rank-K reconstruction) or ``log P[g_i, t_j]`` (a type-level, log-domain target) are
    pushed through the causal softmax and scored like the model. The log-P row checks that a
    function of token *types* alone reproduces the position-level expected attention.

    Args:
        tables: ``{(n, s): CountMatrix}``.
        pairs: the P distinct (n, s) of the layout, in order.
        tokens: int32 [B, T] evaluation sequences.
        expected: float32 [P, B, T, T] expected attention.
        mask: bool [P, B, T, T] valid query-key pairs.
        factors: :func:`jaxattn.diagnostics.manifold_factors` of the tables.

    Returns:
        One dict per (n, s): ``{"n", "s", "manifold": {...}, "manifold_rank_k": {...},
        "log_probability": {...}}`` with the metrics at the best beta (by cosine) and the
        cosine / tied-argmax curve over beta.
    """
    betas = np.asarray(BETA_GRID, np.float32)
    out = []
    for p, (n, s) in enumerate(pairs):
        cm = tables[(n, s)]
        rows = context_ids(cm, tokens)
        e, mk = jnp.asarray(expected[p]), jnp.asarray(mask[p])
        row: dict[str, Any] = {"n": n, "s": s}
        m = dense_manifold(cm)
        if m is not None and (n, s) in factors:
            U, S, Vt = factors[(n, s)]
            for name, table in (("manifold", m), ("manifold_rank_k", (U * S) @ Vt)):
                tgt = jnp.asarray(gather_table(table, rows, tokens))
                row[name] = _sweep_summary(_beta_sweep(e, mk, tgt, jnp.asarray(betas)), betas)
        try:
            check_dense_size(cm.shape, 8, "probability matrix (diagnostics)", cm.max_dense_bytes)
            pr = np.asarray(probability_matrix(cm), np.float64)
            with np.errstate(divide="ignore"):
                logp = np.where(pr > 0, np.log(np.where(pr > 0, pr, 1.0)), -1e30)
            tgt = jnp.asarray(np.maximum(gather_table(logp, rows, tokens), np.finfo(np.float32).min / 2))
            # Same beta grid (one compiled shape); softmax(1 * log P) is the expected attention itself.
            row["log_probability"] = _sweep_summary(_beta_sweep(e, mk, tgt, jnp.asarray(betas)), betas)
        except MemoryBudgetError as err:
            row["log_probability"] = {"skipped": str(err)}
        out.append(row)
    return out
