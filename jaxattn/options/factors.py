"""The derivation ingredients and the per-table algebra: targets, rank-K factors, n-gram query rows.

Shared by Option 3 (:mod:`jaxattn.options.gpt2`, which takes its factors and back-off rows from
here) and the oracle-inputs ceiling (:mod:`jaxattn.options.derivation`).

:class:`DerivationConfig` lists the ingredients of the Option 3 derivation (all off: the seed
derivation). For each count table the derivation picks a target ``T`` [R, V], factors it
``T ≈ A B^T`` at rank K (:func:`table_factors`), and, at layers with n-gram queries, builds one
query row per observed n-gram with suffix back-off (:func:`ngram_query_table`).
:mod:`jaxattn.options.derivation` assembles these into model weights.

Axis vocabulary: V vocabulary, R observed contexts of one table, K d_head (the rank),
D d_model, F concatenated query factors of one layer, Rq query rows of one layer.
"""

# ruff: noqa: F722  (jaxtyping shape strings such as "R V" are not Python expressions)
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from jaxattn.counts import CountMatrix, SparseMatrix, check_dense_size, manifold_matrix, pack_ngrams
from jaxattn.derive import dense_or_sparse, padded_svd
from jaxattn.embeddings import orthonormal_embeddings
from jaxattn.errors import JaxattnError
from jaxattn.typing import ArrayLike, Float, Int, Integer, PRNGKey

__all__ = [
    "INGREDIENTS",
    "ORACLE_INPUTS",
    "SEED_DERIVATION",
    "DerivationConfig",
    "NgramQueryTable",
    "TableFactors",
    "centred_target",
    "lstsq",
    "level_grams",
    "ngram_query_table",
    "query_factor_rows",
    "smoothed_log_probs",
    "table_factors",
]


@dataclasses.dataclass(frozen=True)
class DerivationConfig:
    """Ingredients of the Option 3 derivation; all off is exactly the seed derivation.

    Attention at a head with table ``(n, s)`` computes ``q_i . k_j / sqrt(K)`` with
    ``q_i = x_q[i] W_Q`` and ``k_j = x_k[j] W_K``. The derivation picks a target ``T`` [R, V]
    (one row per observed context, one column per token), factors it ``T ≈ A B^T`` at rank
    K, and solves ``X_q W_Q = A``, ``X_k W_K = B`` for representation rows ``X_q`` [R, D],
    ``X_k`` [V, D] of the contexts and tokens.

    Attributes:
        log_target: ``T`` is the smoothed, row-centred ``log P~`` with ``P~ = (C + smoothing) /
            (rowsum + smoothing V)`` (softmax of ``log P~`` is ``P~`` renormalised over the keys
            present, which is the expected attention; softmax ignores per-row constants, so
            rows are centred to spend no rank on them), instead of the seed's manifold ``M``.
        temperature: no std-0.01 rescaling of W_Q/W_K; they are scaled so that
            ``q.k / sqrt(K) = tau A B^T``, with ``tau`` per (layer, head) minimising the mean
            KL(expected || actual) on sequences of the count corpus (W_V/W_O keep the seed's
            rescaling).
        pinv: ``W = pinv(X) A`` instead of the seed's ``X^T A``, with ``X`` the rows the layer
            sees on the embedding stream (``LN(E[t])`` for tokens and, without n-gram queries,
            for an n-gram its last token), instead of the seed's ``E`` and ``E^n``. Exact
            whenever the rows of ``X`` are independent (V <= D for tokens).
        embed_stream: attention at every layer reads its queries and keys from the embedding
            stream ``LN(E[t])`` through the model's ``qk_inputs`` hook, instead of ``LN(x)`` of
            the residual stream (which from layer 1 on is dominated by the random MLP's output).
            Values, the MLP and the residual stream are unchanged.
        ngram_queries: at layers with ``n >= 2`` each observed n-gram gets its own query row
            (requires ``embed_stream``): the concatenated factors ``[A_s]`` of the layer's tables,
            mapped into D by a fixed orthogonal map. An unobserved n-gram backs off to the
            longest observed suffix, whose row is the least-squares fit of its own centred
            ``log P~`` onto the key factors.
        frequency_weighting: the rank-K factorisation and the least-squares fits weight each
            context by its count and each token by its count + 1 (``sqrt`` on both sides of a
            weighted SVD), so the approximation error lands on rare contexts and tokens.
        smoothing: add-alpha constant of ``P~`` (> 0; keeps unseen pairs finite and low).
        calibration_seqs: count-corpus sequences used to fit ``tau``.
        tau_bounds: search interval of ``tau``.
    """

    log_target: bool = False
    temperature: bool = False
    pinv: bool = False
    embed_stream: bool = False
    ngram_queries: bool = False
    frequency_weighting: bool = False
    smoothing: float = 0.01
    calibration_seqs: int = 16
    tau_bounds: tuple[float, float] = (1e-4, 1e4)

    def __post_init__(self) -> None:
        if self.ngram_queries and not self.embed_stream:
            raise JaxattnError(
                "DerivationConfig: ngram_queries=True needs embed_stream=True (queries come via qk_inputs)"
            )
        if not float(self.smoothing) > 0:
            raise JaxattnError(f"DerivationConfig.smoothing={self.smoothing} must be > 0")
        if int(self.calibration_seqs) < 1:
            raise JaxattnError(f"DerivationConfig.calibration_seqs={self.calibration_seqs} must be >= 1")
        lo, hi = self.tau_bounds
        if not 0 < lo < hi:
            raise JaxattnError(f"DerivationConfig.tau_bounds={self.tau_bounds} must satisfy 0 < lo < hi")


#: The ingredient switches of :class:`DerivationConfig` (its boolean fields), in field order.
INGREDIENTS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(DerivationConfig) if f.type in ("bool", bool))

#: The seed derivation (every ingredient off).
SEED_DERIVATION = DerivationConfig()

#: The oracle-inputs ceiling: every ingredient on (Option 3 before it ran as a standard GPT-2).
_ALL_ON: dict[str, Any] = dict.fromkeys(INGREDIENTS, True)
ORACLE_INPUTS = dataclasses.replace(SEED_DERIVATION, **_ALL_ON)


def smoothed_log_probs(cm: CountMatrix, smoothing: float) -> Float[np.ndarray, "R V"]:
    """``log P~`` with ``P~[g, b] = (C[g, b] + smoothing) / (rowsum[g] + smoothing V)``.

    Args:
        cm: the counts ``C^{n,s}``.
        smoothing: add-alpha constant.

    Returns:
        float64 [R, V] (dense; refused over the memory budget).
    """
    check_dense_size(cm.shape, 8, f"log-probability target of C^({cm.n},{cm.s})", cm.max_dense_bytes)
    R, V = cm.shape
    c = np.zeros((R, V), np.float64)
    c[cm.rows, cm.cols] = cm.values
    rs = cm.row_sums.astype(np.float64)
    return np.log(c + smoothing) - np.log(rs + smoothing * V)[:, None]


class TableFactors(NamedTuple):
    """Rank-K factors ``T ≈ A B^T`` of one table's target.

    Attributes:
        A: float [R, K] context factors (``U S^{1/2}``, unweighted).
        B: float [V, K] token factors (``V S^{1/2}``, unweighted).
        row_w: float64 [R] least-squares weight of each context (1 or its count).
        col_w: float64 [V] weight of each token (1 or its count + 1).
        energy_kept: fraction of the (weighted) target's squared norm kept at rank K.
    """

    A: Any
    B: Any
    row_w: np.ndarray
    col_w: np.ndarray
    energy_kept: float


def _weights(cm: CountMatrix, dcfg: DerivationConfig) -> tuple[np.ndarray, np.ndarray]:
    if dcfg.frequency_weighting:
        return cm.row_sums.astype(np.float64), cm.col_sums.astype(np.float64) + 1.0
    return np.ones(cm.num_contexts), np.ones(cm.vocab_size)


def centred_target(cm: CountMatrix, dcfg: DerivationConfig, col_w: Float[ArrayLike, " V"]) -> Float[np.ndarray, "R V"]:
    """The log target with each row's ``col_w``-weighted mean removed (softmax ignores it).

    Args:
        cm: the counts.
        dcfg: the ingredients (``smoothing``).
        col_w: float [V] token weights.

    Returns:
        float64 [R, V].
    """
    T = smoothed_log_probs(cm, dcfg.smoothing)
    return T - (T @ col_w)[:, None] / col_w.sum()


def table_factors(cm: CountMatrix, rank: int, dcfg: DerivationConfig, *, key: PRNGKey) -> TableFactors:
    """Rank-K factors of one table's target (the seed's ``U S^{1/2}``, ``V S^{1/2}`` of M by default).

    With weights, the SVD is of ``diag(sqrt(row_w)) T diag(sqrt(col_w))`` and the factors are
    un-weighted afterwards: the best rank-K approximation in the weighted norm.

    Args:
        cm: the counts.
        rank: K.
        dcfg: ingredients (``log_target``, ``frequency_weighting``, ``smoothing``).
        key: PRNG key of the truncated SVD.

    Returns:
        :class:`TableFactors`.
    """
    row_w, col_w = _weights(cm, dcfg)
    if not dcfg.log_target and not dcfg.frequency_weighting:
        # Bit-for-bit the seed's derive_qk factors.
        M = dense_or_sparse(manifold_matrix, cm)
        U, S, Vt = padded_svd(M, rank, key=key)
        root = jnp.sqrt(S)
        total = float(np.sum(np.asarray(M.values if isinstance(M, SparseMatrix) else M, np.float64) ** 2))
        kept = float(np.sum(np.asarray(S, np.float64) ** 2)) / max(total, 1e-300)
        return TableFactors(U * root, Vt.T * root, row_w, col_w, kept)
    # Weighting (and log P~) are dense [R, V]: refused over the memory budget like any dense table.
    T = centred_target(cm, dcfg, col_w) if dcfg.log_target else np.asarray(manifold_matrix(cm), np.float64)
    sr, sc = np.sqrt(row_w), np.sqrt(col_w)
    Z = sr[:, None] * T * sc[None, :]
    u, s, vt = (np.asarray(a, np.float64) for a in padded_svd(Z.astype(np.float32), rank, key=key))
    root_w = np.sqrt(s)
    kept = float((s**2).sum() / max(float((Z**2).sum()), 1e-300))
    return TableFactors((u * root_w) / sr[:, None], (vt.T * root_w) / sc[:, None], row_w, col_w, kept)


def lstsq(
    X: Float[ArrayLike, "R D"], Y: Float[ArrayLike, "R K"], w: Float[ArrayLike, " R"]
) -> tuple[Float[np.ndarray, "D K"], float]:
    """Minimum-norm ``W = argmin sum_r w_r ||X_r W - Y_r||^2`` (``pinv(sqrt(w) X) sqrt(w) Y``).

    Args:
        X: float [R, D] representation rows.
        Y: float [R, K] target factors.
        w: float [R] row weights.

    Returns:
        (W float64 [D, K], relative weighted residual ``||sqrt(w)(X W - Y)|| / ||sqrt(w) Y||``).
    """
    sw = np.sqrt(np.asarray(w, np.float64))[:, None]
    Xw, Yw = sw * np.asarray(X, np.float64), sw * np.asarray(Y, np.float64)
    W = np.linalg.lstsq(Xw, Yw, rcond=None)[0]
    res = float(np.linalg.norm(Xw @ W - Yw) / max(float(np.linalg.norm(Yw)), 1e-300))
    return W, res


def _suffix_rows(keys_prev: np.ndarray, ngrams: np.ndarray, vocab_size: int) -> np.ndarray:
    """Row of each n-gram's (n-1)-suffix among the sorted keys of the level below (-1 if absent)."""
    suffix = ngrams[:, 1:]
    q = (
        pack_ngrams(suffix, vocab_size, keys_prev.dtype)
        if suffix.shape[1] > 1
        else suffix[:, 0].astype(keys_prev.dtype)
    )
    idx = np.searchsorted(keys_prev, q)
    idx_c = np.minimum(idx, len(keys_prev) - 1)
    return np.where((idx < len(keys_prev)) & (keys_prev[idx_c] == q), idx_c, -1)


@dataclasses.dataclass(frozen=True, eq=False)
class NgramQueryTable:
    """Query rows of a layer with n-gram-aware queries (n >= 2), with suffix back-off.

    Attributes:
        n: the layer's context length.
        vocab_size: V.
        level_keys: for m = n, n-1, ..., 1: the sorted packed keys of the m-grams with a row
            (m = 1: every token id).
        level_offsets: first row of each level in :attr:`rows`.
        rows: float32 [Rq, D] the query representation of every row.
        rank: dimension of the representation (the rank of the concatenated factors).
    """

    n: int
    vocab_size: int
    level_keys: tuple[np.ndarray, ...]
    level_offsets: tuple[int, ...]
    rows: np.ndarray
    rank: int

    def lookup(self, tokens: Integer[ArrayLike, "*batch T"]) -> Int[np.ndarray, "*batch T"]:
        """Row of every query position: its n-gram, else its longest suffix with a row.

        Args:
            tokens: int [..., T].

        Returns:
            int32 [..., T] row indices into :attr:`rows`.
        """
        tokens = np.asarray(tokens)
        T = tokens.shape[-1]
        out = np.full(tokens.shape, -1, np.int64)
        for lvl, m in enumerate(range(self.n, 0, -1)):
            keys, off = self.level_keys[lvl], self.level_offsets[lvl]
            if T < m or not len(keys):
                continue
            win = np.stack([tokens[..., k : T - m + 1 + k] for k in range(m)], axis=-1)
            q = pack_ngrams(win, self.vocab_size, keys.dtype)
            idx = np.searchsorted(keys, q)
            idx_c = np.minimum(idx, len(keys) - 1)
            found = (idx < len(keys)) & (keys[idx_c] == q)
            tail = out[..., m - 1 :]
            out[..., m - 1 :] = np.where((tail < 0) & found, off + idx_c, tail)
        return out.astype(np.int32)


def level_grams(
    tables: dict[tuple[int, int], CountMatrix], n: int, s_values: list[int], vocab_size: int
) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """For m = 1 .. n: the sorted packed keys and the m-grams observed in any ``C^{m,s}``, s in ``s_values``.

    Args:
        tables: ``{(n, s): CountMatrix}``.
        n: the longest context length.
        s_values: the skips whose tables contribute contexts.
        vocab_size: V.

    Returns:
        (keys {m: int64 [R_m]}, grams {m: int [R_m, m]}); m = 1 is every token id.
    """
    keys: dict[int, np.ndarray] = {}
    grams: dict[int, np.ndarray] = {}
    for m in range(1, n + 1):
        if m == 1:
            grams[1] = np.arange(vocab_size, dtype=np.int32)[:, None]
            keys[1] = np.arange(vocab_size, dtype=np.int64)
        else:
            ctx = np.concatenate([tables[(m, s)].contexts for s in s_values if (m, s) in tables])
            k = pack_ngrams(ctx, vocab_size)
            keys[m], first = np.unique(k, return_index=True)
            grams[m] = ctx[first]
    return keys, grams


def query_factor_rows(
    tables: dict[tuple[int, int], CountMatrix],
    fac: TableFactors,
    keys: dict[int, np.ndarray],
    grams: dict[int, np.ndarray],
    n: int,
    s: int,
    vocab_size: int,
    dcfg: DerivationConfig,
) -> list[np.ndarray]:
    """The query factor of table ``(n, s)`` for every m-gram row, m = 1 .. n (see :func:`ngram_query_table`).

    Args:
        tables: ``{(n, s): CountMatrix}``.
        fac: :func:`table_factors` of ``C^{n,s}``.
        keys, grams: :func:`level_grams` of the layer.
        n, s: the table.
        vocab_size: V.
        dcfg: the ingredients (``smoothing``, for the centred log targets of shorter contexts).

    Returns:
        For m = 1 .. n: float64 [R_m, K].
    """
    B = np.asarray(fac.B, np.float64)
    K = B.shape[1]
    # Least-squares map from a centred log-probability row t [V] to f [K]: f = t W B (B^T W B)^+.
    proj = (fac.col_w[:, None] * B) @ np.linalg.pinv(B.T @ (fac.col_w[:, None] * B))
    out: list[np.ndarray] = []
    prev: np.ndarray | None = None
    for m in range(1, n + 1):
        rows = np.zeros((len(keys[m]), K), np.float64)
        cm = tables.get((m, s))
        idx = cm.context_index(grams[m]) if cm is not None else np.full(len(keys[m]), -1)
        have = idx >= 0
        if m == n:
            rows[have] = np.asarray(fac.A, np.float64)[idx[have]]
        elif cm is not None and have.any():  # (without the table no row is had)
            t = centred_target(cm, dcfg, fac.col_w)[idx[have]]
            rows[have] = t @ proj
        if m > 1 and prev is not None:
            suf = _suffix_rows(keys[m - 1], grams[m], vocab_size)
            back = ~have & (suf >= 0)
            rows[back] = prev[suf[back]]
        out.append(rows)
        prev = rows
    return out


def ngram_query_table(
    tables: dict[tuple[int, int], CountMatrix],
    factors: dict[tuple[int, int], TableFactors],
    n: int,
    s_values: list[int],
    d_model: int,
    dcfg: DerivationConfig,
    *,
    key: PRNGKey,
) -> NgramQueryTable:
    """Builds the n-gram query rows of a layer whose heads use tables ``(n, s)``, s in ``s_values``.

    Each row holds the concatenation over s of a query factor: ``A_{n,s}[g]`` for an n-gram
    observed in ``C^{n,s}``; for a shorter m-gram observed in ``C^{m,s}``, the weighted
    least-squares fit ``f`` of its centred ``log P~`` row by ``f B_{n,s}^T``; otherwise the
    row of its (m-1)-suffix (zeros for a token never seen as a context). The concatenation
    F [Rq, F] is mapped into D through its own row space and a fixed orthogonal map:
    ``X = F V_r^T Π`` (Π [r, D] orthonormal rows from ``key``), so that ``pinv(X) A_s`` is
    exact for every row when r <= D.

    Args:
        tables: ``{(n, s): CountMatrix}`` of the count corpus.
        factors: :func:`table_factors` of every ``(n, s)`` in the layout.
        n: the layer's context length (>= 2).
        s_values: the skips of the layer's heads.
        d_model: D.
        dcfg: the ingredients.
        key: PRNG key of Π.

    Returns:
        :class:`NgramQueryTable`.
    """
    V = next(iter(tables.values())).vocab_size
    levels = list(range(1, n + 1))
    keys, grams = level_grams(tables, n, s_values, V)
    blocks: dict[int, list[np.ndarray]] = {m: [] for m in levels}
    for s in s_values:
        for m, rows in zip(levels, query_factor_rows(tables, factors[(n, s)], keys, grams, n, s, V, dcfg), strict=True):
            blocks[m].append(rows)
    F = np.concatenate([np.concatenate(blocks[m], axis=1) for m in reversed(levels)], axis=0)
    _, S, Vt = np.linalg.svd(F, full_matrices=False)
    r = int((S > S[0] * 1e-10).sum()) if S.size and S[0] > 0 else 1
    r = min(r, d_model)
    pi = np.asarray(orthonormal_embeddings(key, r, d_model), np.float64)
    X = (F @ Vt[:r].T) @ pi
    obs = np.linalg.norm(X, axis=1)
    X = X / max(float(np.sqrt(np.mean(obs**2))), 1e-30)  # unit RMS row norm, like the base embeddings
    offsets, off = [], 0
    for m in reversed(levels):
        offsets.append(off)
        off += len(keys[m])
    return NgramQueryTable(
        n=n,
        vocab_size=V,
        level_keys=tuple(keys[m] for m in reversed(levels)),
        level_offsets=tuple(offsets),
        rows=X.astype(np.float32),
        rank=r,
    )
