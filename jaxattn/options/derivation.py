"""The "oracle inputs" derivation (Option 3's ceiling): closed-form Q/K fed through the ``qk_inputs`` hook.

Option 3 itself is the standard-GPT-2 construction of :mod:`jaxattn.options.gpt2`. This module
is the earlier derivation, kept as the ablation's ceiling: it reaches the same alignment by
telling each query its n-gram's identity from outside the model.

The ingredients are the fields of :class:`~jaxattn.options.factors.DerivationConfig`; all off
(:data:`SEED_DERIVATION`) reproduces :func:`jaxattn.derive.derive_params` bit for bit, all on
is the oracle-inputs ceiling (:data:`ORACLE_INPUTS`). :func:`derive_oracle` builds the weights from the per-table
factors (:mod:`jaxattn.options.factors`), :func:`~jaxattn.options.calibration.calibrate_temperature`
fits tau, and :func:`run_derivation` runs and measures the model like every option.

What the oracle-inputs model gets as input. The residual stream is the seed's (``x_0 = E[t]``,
seed W_V/W_O, the random MLP), but attention reads its queries and keys through the model's
``qk_inputs`` hook (:class:`QKInputs`), not from ``LN(x)``: keys at every layer are
``LN(E[t_j])``; queries are ``LN(E[t_i])`` at n = 1 layers and, at n >= 2 layers, the row of
the query's n-gram ``g_i`` in a per-n table (its longest observed suffix when ``g_i`` was
never counted). Why: from layer 1 on, ``LN(x)`` is mostly the random MLP's output (measured
at the seed preset on Shakespeare: its cosine with ``LN(E[t])`` is 0.27 at layer 1 and 0.24
by layer 11), and a token-only query cannot tell apart the bigrams that end in one token.
With these inputs ``W_Q = pinv(X_q) A`` and ``W_K = pinv(X_k) B`` are exact, so
``q_i . k_j / sqrt(K) = tau (A B^T)[g_i, t_j]``, the rank-K, frequency-weighted approximation
of the row-centred ``log P~``, whose row softmax over the keys present is the expected
attention; so tau, fitted on the count corpus, should come out near 1 (it does: 1.000-1.001
at the seed preset).

Everything derived or calibrated comes from the count corpus only (``prep.tables`` and
``prep.corpus``), never from ``prep.eval_corpus``.

Axis vocabulary: B sequences, L layers, H heads, T positions, D d_model, K d_head,
V vocabulary, R observed contexts of one table, P distinct (n, s) tables.
"""

# ruff: noqa: F722  (jaxtyping shape strings such as "R V" are not Python expressions)
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn.counts import CountMatrix, probability_matrix
from jaxattn.derive import HeadWeights, assemble_params, dense_or_sparse, derive_params, derive_vo, normalize_std
from jaxattn.embeddings import base_embeddings, ngram_embeddings
from jaxattn.errors import JaxattnError
from jaxattn.model import ModelConfig, Params
from jaxattn.options.calibration import calibrate_temperature, calibration_set
from jaxattn.options.factors import (
    SEED_DERIVATION,
    DerivationConfig,
    NgramQueryTable,
    TableFactors,
    lstsq,
    ngram_query_table,
    table_factors,
)
from jaxattn.pipeline import AnalysisResult, Prepared, measure
from jaxattn.progress import Timer, stage
from jaxattn.typing import Array, ArrayLike, Float, Integer, PRNGKey

__all__ = [
    "Derivation",
    "QKInputs",
    "derive_calibrated",
    "derive_oracle",
    "run_derivation",
    "stream_rows",
]


@dataclasses.dataclass(frozen=True, eq=False)
class QKInputs:
    """The ``qk_inputs`` hook of a derivation: queries and keys read from the embedding stream.

    Keys at every layer are ``LN(E[t_j])`` (the rows the layer would see at layer 0). Queries
    are the same token rows, except at layers with an n-gram table, where they are the row of
    the query's n-gram (or its back-off suffix).

    Attributes:
        key_rows: float32 [V, D] ``LN(E)`` (``E`` without LayerNorm).
        layer_tables: per layer, the index into :attr:`ngram_tables` or -1 (token rows).
        ngram_tables: the n-gram query tables.
    """

    key_rows: np.ndarray
    layer_tables: tuple[int, ...]
    ngram_tables: tuple[NgramQueryTable, ...]

    @functools.cached_property
    def _stacked(self) -> tuple[jax.Array, np.ndarray]:
        # Token rows first, then each n-gram table: one gather serves every layer.
        rows = [self.key_rows] + [t.rows for t in self.ngram_tables]
        return jnp.asarray(np.concatenate(rows)), np.cumsum([0] + [r.shape[0] for r in rows])

    def __call__(self, tokens: Integer[ArrayLike, "B T"]) -> tuple[Float[Array, "B L T D"], Float[Array, "B L T D"]]:
        """(q_in, k_in), each float32 [B, L, T, D], for int [B, T] tokens."""
        tokens = np.asarray(tokens)
        table, offsets = self._stacked
        ids = []
        for t in self.layer_tables:
            ids.append(tokens if t < 0 else offsets[t + 1] + self.ngram_tables[t].lookup(tokens))
        q_in = jnp.take(table, jnp.asarray(np.stack(ids, axis=1)), axis=0)
        k_in = jnp.take(jnp.asarray(self.key_rows), jnp.asarray(tokens), axis=0)
        k_in = jnp.broadcast_to(k_in[:, None], q_in.shape)
        return q_in, k_in


@dataclasses.dataclass(frozen=True)
class Derivation:
    """Output of :func:`derive_oracle`.

    Attributes:
        params: the model's parameter pytree.
        qk_inputs: the hook (None: the model's own ``LN(x)``).
        info: diagnostics (energy kept, least-squares residuals, query ranks, tau).
    """

    params: Params
    qk_inputs: QKInputs | None
    info: dict[str, Any]


def stream_rows(embed: Float[ArrayLike, "V D"], config: ModelConfig, eps: float = 1e-5) -> Float[np.ndarray, "V D"]:
    """``LN(E)`` as the first layer sees it (the frozen LayerNorm has unit scale and zero bias).

    The formula of :func:`jaxattn.model.layer_norm`, in numpy (no compile for a [V, D] table).

    Args:
        embed: float [V, D] token embeddings.
        config: the model config (``layernorm``).
        eps: the LayerNorm epsilon.

    Returns:
        float32 [V, D].
    """
    e = np.asarray(embed, np.float64)
    if not config.layernorm:
        return e.astype(np.float32)
    c = e - e.mean(-1, keepdims=True)
    return (c / np.sqrt((c**2).mean(-1, keepdims=True) + eps)).astype(np.float32)


def _table_parts(
    tables: dict[tuple[int, int], CountMatrix],
    pairs: list[tuple[int, int]],
    embed: jax.Array,
    rank: int,
    dcfg: DerivationConfig,
    k_svd: jax.Array,
) -> tuple[
    dict[tuple[int, int], TableFactors],
    dict[tuple[int, int], tuple[jax.Array, jax.Array]],
    dict[tuple[int, int], ArrayLike],
]:
    """Per table: its Q/K factors, the seed's V/O weights and the seed's n-gram embeddings ``E^n``."""
    factors: dict[tuple[int, int], TableFactors] = {}
    vo: dict[tuple[int, int], tuple[jax.Array, jax.Array]] = {}
    seed_en: dict[tuple[int, int], ArrayLike] = {}
    for i, (n, s) in enumerate(pairs):
        cm = tables[(n, s)]
        kq, kv = jax.random.split(jax.random.fold_in(k_svd, i))
        seed_en[(n, s)] = ngram_embeddings(embed, cm.contexts, tables.get((n - 1, 0)))
        factors[(n, s)] = table_factors(cm, rank, dcfg, key=kq)
        vo[(n, s)] = derive_vo(dense_or_sparse(probability_matrix, cm), seed_en[(n, s)], embed, rank, key=kv)
    return factors, vo, seed_en


def _ngram_tables(
    tables: dict[tuple[int, int], CountMatrix],
    factors: dict[tuple[int, int], TableFactors],
    pairs: list[tuple[int, int]],
    d_model: int,
    dcfg: DerivationConfig,
    k_rep: jax.Array,
) -> dict[int, NgramQueryTable]:
    """The n-gram query tables, one per context length n >= 2 in the layout (none without the ingredient)."""
    ngram: dict[int, NgramQueryTable] = {}
    if dcfg.ngram_queries:
        for n in sorted({n for n, _ in pairs if n >= 2}):
            s_values = sorted({s for m, s in pairs if m == n})
            ngram[n] = ngram_query_table(tables, factors, n, s_values, d_model, dcfg, key=jax.random.fold_in(k_rep, n))
    return ngram


def _head_qk(
    cm: CountMatrix,
    fac: TableFactors,
    seed_en: ArrayLike,
    stream: np.ndarray,
    embed: jax.Array,
    qt: NgramQueryTable | None,
    dcfg: DerivationConfig,
) -> tuple[jax.Array, jax.Array, float, float]:
    """W_Q [D, K] and W_K [D, K] of one table, with the least-squares residuals (NaN without ``pinv``)."""
    X_q: Any
    if qt is not None:
        idx = qt.lookup(cm.contexts)[:, -1]  # an observed n-gram finds its own row
        X_q = qt.rows[idx]
    elif dcfg.pinv:
        X_q = stream[cm.contexts[:, -1]]
    else:
        X_q = seed_en
    if dcfg.pinv:
        wq_np, res_q = lstsq(X_q, fac.A, fac.row_w)
        wk_np, res_k = lstsq(stream, fac.B, fac.col_w)
        return jnp.asarray(wq_np, jnp.float32), jnp.asarray(wk_np, jnp.float32), res_q, res_k
    # On the host, as jaxattn.derive.derive_qk computes them: the seed derivation then matches it bit for bit.
    xq = np.asarray(X_q)
    wq = jax.device_put(xq.T @ np.asarray(fac.A, xq.dtype))
    wk = jax.device_put(np.asarray(embed).T @ np.asarray(fac.B, np.asarray(embed).dtype))
    return wq, wk, float("nan"), float("nan")


def _scaled_params(raw: Params, config: ModelConfig, dcfg: DerivationConfig) -> Params:
    """W_Q/W_K scaled for tau = 1 (with ``temperature``) or to the seed's std; W_V/W_O to the seed's std."""
    params = dict(raw)
    std, K = config.weight_std, config.d_head
    for name in ("wq", "wk", "wv", "wo"):
        if name in ("wq", "wk") and dcfg.temperature:
            # q.k / sqrt(K) = A B^T at tau = 1: K^(1/4) on each side.
            params[name] = raw[name] * jnp.float32(K**0.25)
        elif std is not None:
            params[name] = jnp.stack([normalize_std(raw[name][l], std) for l in range(config.num_layers)])
    return params


def derive_oracle(
    tables: dict[tuple[int, int], CountMatrix],
    config: ModelConfig,
    dcfg: DerivationConfig,
    *,
    key: PRNGKey,
) -> Derivation:
    """Derives all weights with the chosen ingredients (tau not yet calibrated: tau = 1).

    Key splitting, base embeddings, V/O and the MLP are those of
    :func:`jaxattn.derive.derive_params`, so ``SEED_DERIVATION`` reproduces the seed exactly.

    Args:
        tables: ``{(n, s): CountMatrix}`` of the count corpus.
        config: the model config.
        dcfg: the ingredients.
        key: the derivation key (the baseline's ``prep.key("derive")``).

    Returns:
        :class:`Derivation`.
    """
    missing = [p for p in config.pairs if p not in tables]
    if missing:
        raise JaxattnError(f"missing count tables {missing} for this config")
    if dcfg == SEED_DERIVATION:
        # Every ingredient off is the seed derivation itself: one code path, so row 0 of an
        # ablation is the baseline bit for bit.
        return Derivation(derive_params(tables, config, key=key), None, {"tables": {}})
    L, H, K, D = config.num_layers, config.num_heads, config.d_head, config.d_model
    k_embed, k_svd, k_mlp = jax.random.split(key, 3)
    k_rep = jax.random.fold_in(key, 3)
    embed = base_embeddings(k_embed, config.vocab_size, D)
    stream = stream_rows(embed, config)
    pairs = sorted({config.layout(l, h) for l in range(L) for h in range(H)})
    factors, vo, seed_en = _table_parts(tables, pairs, embed, K, dcfg, k_svd)
    ngram = _ngram_tables(tables, factors, pairs, D, dcfg, k_rep)
    info: dict[str, Any] = {"tables": {}}
    table_weights: dict[tuple[int, int], HeadWeights] = {}
    for n, s in pairs:
        cm, fac = tables[(n, s)], factors[(n, s)]
        wq, wk, res_q, res_k = _head_qk(cm, fac, seed_en[(n, s)], stream, embed, ngram.get(n), dcfg)
        wv, wo = vo[(n, s)]
        table_weights[(n, s)] = HeadWeights(wq, wk, wv, wo)
        info["tables"][f"{n},{s}"] = {
            "contexts": cm.num_contexts,
            "energy_kept": fac.energy_kept,
            "lstsq_residual_q": res_q,
            "lstsq_residual_k": res_k,
        }
    raw = assemble_params(table_weights, embed, dataclasses.replace(config, weight_std=None), key=k_mlp)
    params = _scaled_params(raw, config, dcfg)
    qk = None
    if dcfg.embed_stream:
        order = sorted(ngram)
        layer_tables = tuple(
            order.index(config.layout(l, 0)[0]) if config.layout(l, 0)[0] in ngram else -1 for l in range(L)
        )
        qk = QKInputs(stream, layer_tables, tuple(ngram[n] for n in order))
    info["ngram_query_rank"] = {str(n): t.rank for n, t in ngram.items()}
    info["ngram_query_rows"] = {str(n): int(t.rows.shape[0]) for n, t in ngram.items()}
    return Derivation(params, qk, info)


def derive_calibrated(prep: Prepared, dcfg: DerivationConfig) -> tuple[Derivation, np.ndarray | None]:
    """:func:`derive_oracle` on a run's count tables, then the tau calibration when ``dcfg.temperature``.

    Reads only the count corpus (``prep.tables``, ``prep.corpus``) and the run's shapes; the
    calibration sequences are drawn with ``prep.key("calibration")``.

    Args:
        prep: the prepared run.
        dcfg: the ingredients.

    Returns:
        (the derivation, with ``wq`` calibrated; float64 [L, H] tau, or None without ``temperature``).
    """
    der = derive_oracle(prep.tables, prep.config, dcfg, key=prep.key("derive"))
    if not dcfg.temperature:
        return der, None
    tok, expected, mask = calibration_set(
        prep.tables,
        prep.pairs,
        prep.corpus.tokens,
        prep.corpus.doc_ids,
        prep.tokens.shape[1],
        dcfg.calibration_seqs,
        key=prep.key("calibration"),
    )
    params, taus = calibrate_temperature(
        der.params,
        der.qk_inputs,
        tok,
        expected,
        mask,
        prep.pair_index,
        prep.config,
        tau_bounds=dcfg.tau_bounds,
        batch_size=prep.run.batch_size,
    )
    return dataclasses.replace(der, params=params), taus


def run_derivation(
    prep: Prepared,
    dcfg: DerivationConfig,
    *,
    label: str = "option3",
    progress: bool = True,
    timer: Timer | None = None,
) -> AnalysisResult:
    """Derives with ``dcfg``, calibrates tau when asked, runs the model and measures.

    Args:
        prep: the prepared run.
        dcfg: the ingredients.
        label: the option label of the records.
        progress: progress bars.
        timer: stage timer (stages "derive", "forward", "metrics").

    Returns:
        :class:`~jaxattn.pipeline.AnalysisResult` whose ``extra`` holds the derivation config, tau
        and diagnostics.
    """
    with stage(timer, "derive"):
        der, taus = derive_calibrated(prep, dcfg)
        jax.block_until_ready(der.params)
    extra = {"derivation": dataclasses.asdict(dcfg), **der.info}
    if taus is not None:
        extra["tau"] = taus.tolist()
    return measure(prep, der.params, label, extra=extra, qk_inputs_fn=der.qk_inputs, progress=progress, timer=timer)
