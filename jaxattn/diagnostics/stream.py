"""Diagnostic 6, the residual stream: what each layer's query input represents, and counterfactual runs.

Checks the seed's root cause ("random embeddings don't encode n-gram structure"), the
implicit assumption that every layer's query input still represents its token / n-gram, and
"deeper layers are even worse", by tracing the residual stream and by switching one
suspected cause off at a time.

Axis vocabulary: B sequences, L layers, H heads, T query positions, S key positions,
D d_model, K d_head, V vocabulary, R observed contexts (n-grams), P distinct (n, s) tables,
N decoded queries.
"""

# ruff: noqa: F722  (jaxtyping shape strings such as "R V" are not Python expressions)
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn.alignment import METRIC_NAMES, context_ids, layer_head_metrics, pool
from jaxattn.counts import CountMatrix
from jaxattn.diagnostics.inputs import Factors, ln_rows, padded_batches, query_inputs
from jaxattn.embeddings import ngram_embeddings
from jaxattn.model import ModelConfig, Params, attention_head, layer_norm
from jaxattn.progress import progress_iter
from jaxattn.typing import Array, Bool, Float, Int, Integer

#: Largest R for which n-gram decoding compares every query against every n-gram.
MAX_DECODE_ROWS = 65536


# --------------------------------------------------------------------------- #
# 6. Does each layer's query input still carry the token / n-gram it should?
# --------------------------------------------------------------------------- #


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-30)


def _decode(queries: np.ndarray, dictionary: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Index of the cosine-nearest dictionary row for each query row (float32 [N, K] vs [R, K])."""
    d = _unit(dictionary.astype(np.float32))
    q = _unit(queries.astype(np.float32))
    return np.concatenate([np.argmax(q[i : i + chunk] @ d.T, axis=-1) for i in range(0, q.shape[0], chunk)])


def _layer_identity(q_in: np.ndarray, ln_e: np.ndarray, tokens: np.ndarray, layer: int, n: int) -> dict[str, Any]:
    """What one layer's query inputs (float [B, T, D]) represent, against unit LN(E) rows [V, D]."""
    q = _unit(q_in.astype(np.float32))  # [B, T, D]
    sims = q @ ln_e.T  # [B, T, V]
    own = np.take_along_axis(sims, tokens[..., None], -1)[..., 0]
    prev = np.take_along_axis(sims[:, 1:], tokens[:, :-1, None], -1)[..., 0]
    other = (np.abs(sims).sum(-1) - np.abs(own)) / max(sims.shape[-1] - 1, 1)
    flat = q_in.reshape(-1, q_in.shape[-1]).astype(np.float64)
    mean = flat.mean(0)
    return {
        "layer": layer,
        "n": n,
        "token_cosine": float(own.mean()),
        "prev_token_cosine": float(prev.mean()) if prev.size else 0.0,
        "other_token_abs_cosine": float(other.mean()),
        "token_decode_accuracy": float((sims.argmax(-1) == tokens).mean()),
        "common_direction_energy": float(mean @ mean / max(np.mean(np.sum(flat * flat, -1)), 1e-30)),
    }


def _most_frequent_per_last_token(cm: CountMatrix) -> np.ndarray:
    """int64 [V]: the row of the most frequent n-gram ending in each token (-1: none ends in it)."""
    last_tok = cm.contexts[:, -1]
    freq = cm.row_sums.astype(np.float64)
    order = np.lexsort((-freq, last_tok))
    best_for = np.full(cm.vocab_size, -1, np.int64)
    first = np.ones(order.size, bool)
    first[1:] = last_tok[order][1:] != last_tok[order][:-1]
    best_for[last_tok[order][first]] = order[first]
    return best_for


def _ngram_decoding(
    cm: CountMatrix,
    factors: tuple[np.ndarray, np.ndarray, np.ndarray],
    e_n: np.ndarray,
    tokens: np.ndarray,
    q_inputs: np.ndarray,
    wq: jax.Array,
    heads: list[list[int]],
) -> dict[str, Any]:
    """Nearest-n-gram decoding of one n >= 2 table (see :func:`query_identity`).

    Args:
        cm: the table; factors: its (U, S, Vt); e_n: float32 [R, D] its seed n-gram embeddings.
        tokens: int [B, T]; q_inputs: float32 [B, L, T, D]; wq: [L, H, D, K].
        heads: per layer, the heads that use this table.
    """
    U, S, _ = factors
    ideal = U * np.sqrt(S)  # [R, K]
    g = context_ids(cm, tokens)  # [B, T]
    ok = g >= 0
    gi = g[ok]
    last_tok = cm.contexts[:, -1]
    # Most frequent n-gram for each last token: the best a last-token-only query can name.
    best_for = _most_frequent_per_last_token(cm)
    wq_seed = np.asarray(e_n.T @ ideal, np.float32)  # the raw seed W_Q [D, K]
    out: dict[str, Any] = {
        "num_queries": int(gi.size),
        "ideal_query_accuracy": float((_decode(ideal[gi], ideal) == gi).mean()) if gi.size else 0.0,
        "seed_input_accuracy": float((_decode(e_n[gi] @ wq_seed, ideal) == gi).mean()) if gi.size else 0.0,
        "last_token_ceiling": float((best_for[last_tok[gi]] == gi).mean()) if gi.size else 0.0,
        "layers": [],
    }
    for l, hs in enumerate(heads):
        if not hs or not gi.size:
            continue
        acc, acc_last = [], []
        for h in hs:
            qq = q_inputs[:, l][ok] @ np.asarray(wq[l, h], np.float32)  # [N, K]
            dec = _decode(qq, ideal)
            acc.append(float((dec == gi).mean()))
            acc_last.append(float((last_tok[dec] == last_tok[gi]).mean()))
        out["layers"].append(
            {"layer": l, "accuracy": float(np.mean(acc)), "last_token_accuracy": float(np.mean(acc_last))}
        )
    return out


def query_identity(
    tables: dict[tuple[int, int], CountMatrix],
    pairs: Sequence[tuple[int, int]],
    params: Params,
    config: ModelConfig,
    tokens: Integer[np.ndarray, "B T"],
    q_inputs: Float[np.ndarray, "B L T D"],
    factors: Factors,
) -> dict[str, Any]:
    """Diagnostic 6: what the query input of each layer actually represents.

    Per layer: cosine of ``LN(x_i)`` with the bare token direction ``LN(E[t_i])`` (1.0 at
    layer 0 by construction), with the previous token's, and with other tokens'; nearest-
    token decoding accuracy; and the share of the query inputs' energy in one direction
    common to every position (position-invariant inputs give position-invariant scores).

    For every (n, s) with n >= 2: nearest-n-gram decoding in the head's query space, where the
    n-gram g's ideal query is ``U_r[g] S_r^{1/2}`` (row g of M_r = that times the keys):
    ``ideal_query_accuracy`` (decoding the ideal queries themselves, the rank-K ceiling),
    ``seed_input_accuracy`` (the query the seed's own ``E^n[g_i] W_Q`` makes),
    ``last_token_ceiling`` (best possible from the last token alone: always guess the most
    frequent n-gram ending in t_i), and per layer the accuracy from the actual query input.

    Args:
        tables: ``{(n, s): CountMatrix}``.
        pairs: the distinct (n, s) of the layout, in order.
        params: the seed-derived parameters.
        config: the model config.
        tokens: int32 [B, T] evaluation sequences.
        q_inputs: float32 [B, L, T, D] each layer's query input.
        factors: :func:`jaxattn.diagnostics.manifold_factors` of the tables.

    Returns:
        ``{"layers": [...], "ngram_decoding": [...]}``.
    """
    ln_e = _unit(np.asarray(ln_rows(params["embed"], params, 0, config), np.float32))  # [V, D]
    layers = [
        _layer_identity(q_inputs[:, l], ln_e, tokens, l, config.layout(l, 0)[0]) for l in range(config.num_layers)
    ]
    decoding = []
    embed = jnp.asarray(params["embed"], jnp.float32)
    for n, s in pairs:
        if n < 2:
            continue
        cm = tables[(n, s)]
        row: dict[str, Any] = {"n": n, "s": s, "num_contexts": cm.num_contexts}
        if (n, s) not in factors or cm.num_contexts > MAX_DECODE_ROWS:
            decoding.append(
                row | {"skipped": f"R={cm.num_contexts} contexts (limit {MAX_DECODE_ROWS}) or dense M too large"}
            )
            continue
        e_n = np.asarray(ngram_embeddings(embed, cm.contexts, tables.get((n - 1, 0))), np.float32)
        heads = [
            [h for h in range(config.num_heads) if config.layout(l, h) == (n, s)] for l in range(config.num_layers)
        ]
        decoding.append(row | _ngram_decoding(cm, factors[(n, s)], e_n, tokens, q_inputs, params["wq"], heads))
    return {"layers": layers, "ngram_decoding": decoding}


# --------------------------------------------------------------------------- #
# The residual stream: what the attention and MLP outputs do to the token embedding
# --------------------------------------------------------------------------- #


def _trace_one(params: Params, tokens: jax.Array, config: ModelConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-layer residual, attention-output and MLP-output vectors for one sequence.

    Mirrors :func:`jaxattn.model.forward` (tested against its query inputs).

    Returns:
        x_in [L, T, D] (the residual entering each layer), attn_out [L, T, D], mlp_out [L, T, D].
    """
    heads = jax.vmap(attention_head, in_axes=(None, None, None, 0, 0, 0, 0))

    def block(x: jax.Array, p: Params) -> tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array]]:
        h = layer_norm(x, p["ln1_scale"], p["ln1_bias"]) if config.layernorm else x
        outs, _ = heads(h, h, h, p["wq"], p["wk"], p["wv"], p["wo"])
        a = outs.sum(0)
        x1 = x + a
        if config.mlp:
            h2 = layer_norm(x1, p["ln2_scale"], p["ln2_bias"]) if config.layernorm else x1
            m = jax.nn.gelu(h2 @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
        else:
            m = jnp.zeros_like(x1)
        return x1 + m, (x, a, m)

    layer_keys = ("wq", "wk", "wv", "wo", "ln1_scale", "ln1_bias", "ln2_scale", "ln2_bias", "w1", "b1", "w2", "b2")
    _, (xs, attn_out, mlp_out) = jax.lax.scan(block, params["embed"][tokens], {k: params[k] for k in layer_keys})
    return xs, attn_out, mlp_out


@functools.partial(jax.jit, static_argnames=("config",))
def residual_trace(
    params: Params, tokens: Integer[Array, "B T"], config: ModelConfig
) -> tuple[Float[Array, "B L T D"], Float[Array, "B L T D"], Float[Array, "B L T D"]]:
    """:func:`_trace_one` vmapped over a batch.

    Args:
        params: model parameters.
        tokens: int [B, T].
        config: the model config (static).

    Returns:
        The residual entering each layer, the attention output and the MLP output, each
        float32 [B, L, T, D].
    """
    return jax.vmap(lambda t: _trace_one(params, t, config))(tokens)


def residual_stream(
    params: Params, tokens: Integer[np.ndarray, "B T"], config: ModelConfig, *, batch_size: int
) -> list[dict[str, Any]]:
    """Norms in the residual stream per layer: how big the token embedding is next to what is added.

    Args:
        params: model parameters.
        tokens: int32 [B, T] evaluation sequences.
        config: the model config.
        batch_size: sequences per traced batch (the run's ``batch_size``).

    Returns:
        One dict per layer: ``residual_norm`` (mean ||x|| entering the layer; layer 0 is
        ||E[t]||), ``attn_out_norm``, ``mlp_out_norm``, ``token_share`` (mean cosine of x with
        the bare E[t_i]) and ``common_direction_energy`` (share of x's energy in the mean
        direction over all positions).
    """
    sums: dict[str, list[np.ndarray]] = {"x": [], "a": [], "m": [], "tok": []}
    xs_all = []
    e = _unit(np.asarray(params["embed"], np.float32))
    for padded, n in padded_batches(tokens, batch_size):
        tok = padded[:n]
        xs, a, m = (np.asarray(v)[:n] for v in residual_trace(params, jnp.asarray(padded), config))
        sums["x"].append(np.linalg.norm(xs, axis=-1))
        sums["a"].append(np.linalg.norm(a, axis=-1))
        sums["m"].append(np.linalg.norm(m, axis=-1))
        sums["tok"].append(np.einsum("bltd,btd->blt", _unit(xs), e[tok]))
        xs_all.append(xs.astype(np.float64).sum(axis=(0, 2)))  # [L, D] sum over b, t
    cat = {k: np.concatenate(v) for k, v in sums.items()}  # [B, L, T]
    sq = (cat["x"].astype(np.float64) ** 2).mean(axis=(0, 2))
    mean_vec = np.sum(xs_all, axis=0) / (cat["x"].shape[0] * cat["x"].shape[2])  # [L, D]
    out = []
    for l in range(config.num_layers):
        out.append(
            {
                "layer": l,
                "residual_norm": float(cat["x"][:, l].mean()),
                "attn_out_norm": float(cat["a"][:, l].mean()),
                "mlp_out_norm": float(cat["m"][:, l].mean()),
                "token_share": float(cat["tok"][:, l].mean()),
                "common_direction_energy": float(mean_vec[l] @ mean_vec[l] / max(sq[l], 1e-30)),
            }
        )
    return out


# --------------------------------------------------------------------------- #
# Counterfactual runs: switch one suspected cause off at a time
# --------------------------------------------------------------------------- #


def _layer_means(
    expected: np.ndarray, mask: np.ndarray, pair_index: np.ndarray, attn: np.ndarray, num_layers: int
) -> dict[str, Any]:
    m = layer_head_metrics(jnp.asarray(expected), jnp.asarray(mask), jnp.asarray(pair_index), jnp.asarray(attn))
    pooled = pool(jax.device_get(m), axis=2)  # [L, H]
    out: dict[str, Any] = {"layers": []}
    for l in range(num_layers):
        out["layers"].append({"layer": l, **{k: float(pooled[k][l].mean()) for k in METRIC_NAMES}})
    for name, sl in (("overall", slice(None)), ("layer0", slice(0, 1)), ("deeper", slice(1, None))):
        if num_layers > 1 or name != "deeper":
            out[name] = {k: float(pooled[k][sl].mean()) for k in METRIC_NAMES}
    return out


def counterfactuals(
    params: Params,
    raw: Params,
    tokens: Integer[np.ndarray, "B T"],
    expected: Float[np.ndarray, "P B T T"],
    mask: Bool[np.ndarray, "P B T T"],
    pair_index: Int[np.ndarray, "L H"],
    config: ModelConfig,
    *,
    batch_size: int,
    seed_inputs: tuple[np.ndarray, np.ndarray] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Alignment when one suspected cause is switched off (same E, SVDs, MLP and sequences).

    Variants: ``seed`` (as run), ``no_normalisation`` (the raw derivation), ``no_mlp`` (the
    random MLP removed), ``no_value_output`` (W_O = 0: attention no longer writes into the
    residual stream), ``no_value_output_no_mlp`` (every layer's input is exactly the token
    embedding, so each layer shows its own Q/K derivation in isolation).

    Args:
        params: the seed derivation's parameters.
        raw: the same without the std rescaling (:func:`jaxattn.diagnostics.raw_params`).
        tokens: int32 [B, T] evaluation sequences.
        expected: float32 [P, B, T, T] expected attention.
        mask: bool [P, B, T, T] valid query-key pairs.
        pair_index: int32 [L, H] index into the P tables per head.
        config: the model config of ``params``.
        batch_size: sequences per forward call (the run's ``batch_size``).
        seed_inputs: (query inputs [B, L, T, D], attention [B, L, H, T, T]) of ``params``
            already computed by :func:`jaxattn.diagnostics.query_inputs` (reused for the
            "seed" variant).
        progress: show progress.

    Returns:
        ``{variant: {"layers": [per-layer metric means over heads], "overall", "layer0",
        "deeper", "token_cosine": [per layer]}}``.
    """
    no_wo = dict(params) | {"wo": jnp.zeros_like(params["wo"])}
    variants = {
        "seed": (params, config),
        "no_normalisation": (raw, config),
        "no_mlp": (params, dataclasses.replace(config, mlp=False)),
        "no_value_output": (no_wo, config),
        "no_value_output_no_mlp": (no_wo, dataclasses.replace(config, mlp=False)),
    }
    ln_e = _unit(np.asarray(ln_rows(params["embed"], params, 0, config), np.float32))
    out = {}
    for name in progress_iter(list(variants), desc="diagnostics: counterfactuals", enabled=progress):
        p, c = variants[name]
        if name == "seed" and seed_inputs is not None:
            q, attn = seed_inputs
        else:
            q, attn = query_inputs(p, tokens, c, batch_size=batch_size)
        res = _layer_means(expected, mask, pair_index, attn, config.num_layers)
        own = np.einsum("bltd,btd->blt", _unit(q.astype(np.float32)), ln_e[tokens])
        res["token_cosine"] = [float(v) for v in own.mean(axis=(0, 2))]
        out[name] = res
    return out
