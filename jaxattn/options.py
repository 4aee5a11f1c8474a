"""The seed's solution options 1-3 (SPEC §3) and the Option 3 ablation table.

Every option is measured with :func:`jaxattn.pipeline.evaluate` on the same held-out
sequences (``prep.tokens``) as the baseline. Everything an option derives or calibrates
comes from the count corpus only (``prep.tables`` and ``prep.corpus``), never from
``prep.eval_corpus``.

* **Option 1** (:func:`run_option1`): token embeddings from the corpus itself, PPMI with
  context-distribution smoothing, truncated SVD, eigenvalue weighting ``U Σ^p`` (Levy,
  Goldberg & Dagan 2015), placed into ``d_model`` by a fixed orthogonal map; then the
  unchanged seed derivation on top.
* **Option 2** (:func:`run_option2`): no W_Q/W_K; the attention logits are gathered from the
  count tables, ``score[i, j] = log max(P[g_i, t_j], floor)``. The ceiling; its memory and
  time cost against the derived weights is measured (:func:`option2_costs`).
* **Option 3** (:func:`run_option3`): a closed-form derivation whose ingredients switch on
  one by one (:class:`DerivationConfig`); :func:`ablation` adds them cumulatively, starting
  from the seed derivation, and its last row is Option 3.

What the Option 3 model gets as input. The residual stream is the seed's (``x_0 = E[t]``,
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

Axis vocabulary: B sequences, L layers, H heads, T/S positions, D d_model, K d_head,
V vocabulary, R observed contexts of one table, P distinct (n, s) tables, F concatenated
query factors of one layer.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn.alignment import context_ids, expected_for_layout, sample_sequences
from jaxattn.counts import (
    CountMatrix,
    SparseMatrix,
    check_dense_size,
    count_matrix,
    manifold_matrix,
    pack_ngrams,
    probability_matrix,
)
from jaxattn.derive import HeadWeights, assemble_params, dense_or_sparse, derive_vo, normalize_std, padded_svd
from jaxattn.embeddings import base_embeddings, ngram_embeddings, orthonormal_embeddings
from jaxattn.errors import JaxattnError
from jaxattn.model import ModelConfig, Params, forward_batch, layer_norm
from jaxattn.pipeline import AnalysisResult, Prepared, batched_attention, evaluate, run_baseline
from jaxattn.progress import progress_iter

OPTIONS = ("baseline", "1", "2", "3", "4")

#: Summary metrics of the ablation table (per-layer means over heads, and overall means).
ABLATION_METRICS = ("cosine", "argmax_match_tied", "kl", "entropy")


# --------------------------------------------------------------------------- #
# Option 1: co-occurrence (PPMI) embeddings
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class PPMIConfig:
    """Knobs of the PPMI + SVD token embeddings (Levy, Goldberg & Dagan 2015).

    Co-occurrence of tokens ``a`` and ``b`` at distance ``d`` (``b`` follows ``a`` by
    ``d = s + 1`` positions, inside one document) is read from the skip-bigram tables
    ``C^{1,s}``, ``s = 0 .. window-1``, each distance weighted equally. ``symmetric`` adds
    the transpose, so "b follows a" and "a follows b" count alike (the usual symmetric
    word2vec/GloVe window); without it, rows are left tokens and columns right tokens.

    Attributes:
        window: maximum distance d counted (>= 1).
        alpha: context-distribution smoothing exponent (``P_alpha(b) ∝ count(b)^alpha``).
        shift: subtracted from PMI before clipping at 0 (``log k`` of SGNS with k negatives).
        power: eigenvalue weighting ``p`` of ``U Σ^p`` (0.5 is the recommended symmetric split).
        normalize: scale every embedding row to unit length (like the seed's base embeddings).
        dim: SVD rank (None: ``min(V, d_model)``).
        symmetric: count both directions (see above).
    """

    window: int = 4
    alpha: float = 0.75
    shift: float = 0.0
    power: float = 0.5
    normalize: bool = True
    dim: int | None = None
    symmetric: bool = True

    def __post_init__(self) -> None:
        if int(self.window) < 1:
            raise JaxattnError(f"PPMIConfig.window={self.window} must be >= 1")
        if not 0.0 < float(self.alpha) <= 1.0:
            raise JaxattnError(f"PPMIConfig.alpha={self.alpha} must be in (0, 1]")
        if float(self.shift) < 0:
            raise JaxattnError(f"PPMIConfig.shift={self.shift} must be >= 0")
        if self.dim is not None and int(self.dim) < 1:
            raise JaxattnError(f"PPMIConfig.dim={self.dim} must be >= 1")


def cooccurrence_matrix(
    tables: dict[tuple[int, int], CountMatrix],
    vocab_size: int,
    window: int,
    *,
    symmetric: bool = True,
    tokens: np.ndarray | None = None,
    doc_ids: np.ndarray | None = None,
) -> np.ndarray:
    """Token co-occurrence counts within ``window`` from the ``C^{1,s}`` tables.

    Args:
        tables: ``{(n, s): CountMatrix}``; ``C^{1,s}`` is used when present.
        vocab_size: V.
        window: distances ``1 .. window`` (tables ``s = 0 .. window-1``).
        symmetric: add the transpose.
        tokens: int [N] count corpus, to count ``C^{1,s}`` tables that are missing.
        doc_ids: int [N] documents of ``tokens``.

    Returns:
        float64 [V, V]; ``[a, b]`` counts ``b`` at distance ``1..window`` after ``a``.

    Raises:
        JaxattnError: a table is missing and no ``tokens`` were given.
        MemoryBudgetError: the dense [V, V] matrix exceeds the memory budget.
    """
    V = int(vocab_size)
    budget = next((cm.max_dense_bytes for cm in tables.values()), None)
    check_dense_size((V, V), 8, "co-occurrence matrix", budget)
    out = np.zeros((V, V), np.float64)
    for s in range(int(window)):
        cm = tables.get((1, s))
        if cm is None:
            if tokens is None:
                raise JaxattnError(f"co-occurrence window={window} needs table C^(1,{s}); pass the corpus tokens")
            cm = count_matrix(tokens, 1, s, V, doc_ids=doc_ids)
        np.add.at(out, (cm.contexts[cm.rows, 0], cm.cols), cm.values.astype(np.float64))
    return out + out.T if symmetric else out


def ppmi_matrix(cooc: np.ndarray, alpha: float = 0.75, shift: float = 0.0) -> np.ndarray:
    """Positive PMI with context-distribution smoothing.

    ``PMI(a, b) = log(P(a, b) / (P(a) P_alpha(b)))`` with ``P_alpha(b) = c(b)^alpha / Σ c^alpha``;
    ``PPMI = max(PMI - shift, 0)``, and 0 wherever ``cooc`` is 0.

    Args:
        cooc: float [V, V] co-occurrence counts (rows: words, columns: contexts).
        alpha: smoothing exponent.
        shift: subtracted before clipping (``log k``).

    Returns:
        float64 [V, V].
    """
    c = np.asarray(cooc, np.float64)
    total = c.sum()
    if total <= 0:
        raise JaxattnError("co-occurrence matrix is all zero: the corpus has no token pairs in the window")
    row = c.sum(1)
    col_a = c.sum(0) ** alpha
    p_ab = c / total
    p_a = row / total
    p_b = col_a / col_a.sum()
    denom = p_a[:, None] * p_b[None, :]
    pos = (c > 0) & (denom > 0)
    pmi = np.log(np.where(pos, p_ab, 1.0) / np.where(pos, denom, 1.0))
    return np.where(pos, np.maximum(pmi - shift, 0.0), 0.0)


def ppmi_vectors(ppmi: np.ndarray, cfg: PPMIConfig, *, key: jax.Array | None = None) -> np.ndarray:
    """``U_r Σ_r^p`` of the truncated SVD of a PPMI matrix (rows optionally unit length).

    Uses :func:`jaxattn.truncated_svd` and its sign convention (the largest-|.| entry of each
    U column is positive).

    Args:
        ppmi: float [V, V].
        cfg: the knobs (``dim``, ``power``, ``normalize``).
        key: PRNG key for the randomized SVD.

    Returns:
        float32 [V, r], r = ``cfg.dim`` (or V), zero-padded past the matrix rank.
    """
    V = ppmi.shape[0]
    r = int(cfg.dim) if cfg.dim is not None else V
    U, S, _ = padded_svd(np.asarray(ppmi, np.float32), r, key=key)
    w = np.asarray(U, np.float64) * np.asarray(S, np.float64) ** cfg.power
    if cfg.normalize:
        norm = np.linalg.norm(w, axis=1, keepdims=True)
        w = w / np.where(norm > 0, norm, 1.0)  # a token that never co-occurs keeps a zero row
    return w.astype(np.float32)


def place_embeddings(vectors: np.ndarray, d_model: int, key: jax.Array) -> jax.Array:
    """Places r-dimensional vectors into ``d_model`` with a fixed random orthogonal map.

    ``E = W Π`` with Π [r, D] orthonormal rows drawn from ``key``, so every inner product
    and norm of the rows of ``W`` is kept exactly (``E E^T = W W^T``); a random map rather
    than zero padding, so no coordinate of the residual stream is special.

    Args:
        vectors: float [V, r], r <= D.
        d_model: D.
        key: PRNG key of Π.

    Returns:
        float32 [V, D].
    """
    r = vectors.shape[1]
    if r > d_model:
        raise JaxattnError(f"embedding dim={r} > d_model={d_model}; lower PPMIConfig.dim")
    pi = orthonormal_embeddings(key, r, d_model)
    return jnp.asarray(vectors, jnp.float32) @ pi


def ppmi_embeddings(prep: Prepared, cfg: PPMIConfig = PPMIConfig(), *, key: jax.Array) -> tuple[jax.Array, dict]:
    """Option 1 embeddings for a prepared run, from the count corpus only.

    Args:
        prep: the prepared run.
        cfg: PPMI knobs.
        key: PRNG key (SVD and the orthogonal placement).

    Returns:
        (E float32 [V, D], info dict with the window, the PPMI density and the spectrum kept).
    """
    V, D = prep.config.vocab_size, prep.config.d_model
    k_svd, k_place = jax.random.split(key)
    cooc = cooccurrence_matrix(
        prep.tables, V, cfg.window, symmetric=cfg.symmetric, tokens=prep.corpus.tokens, doc_ids=prep.corpus.doc_ids
    )
    ppmi = ppmi_matrix(cooc, cfg.alpha, cfg.shift)
    if cfg.dim is None:
        cfg = dataclasses.replace(cfg, dim=min(V, D))
    vec = ppmi_vectors(ppmi, cfg, key=k_svd)
    E = place_embeddings(vec, D, k_place)
    sim = np.asarray(vec, np.float64) @ np.asarray(vec, np.float64).T
    off = sim[~np.eye(V, dtype=bool)]
    info = {
        "config": dataclasses.asdict(cfg),
        "ppmi_density": float((ppmi > 0).mean()),
        "embedding_offdiag_abs_cos_mean": float(np.abs(off).mean()) if off.size else 0.0,
    }
    return E, info


def layer0_circuit_error(prep: Prepared, params: Params) -> dict[str, float]:
    """How far layer 0's Q/K circuit is from the rank-K manifold the seed derivation targets.

    The circuit is ``C = (LN(E) W_Q)(LN(E) W_K)^T`` over token pairs (what layer 0 computes
    before the 1/sqrt(K) and the softmax); the target is ``M_K``, the rank-K truncation of
    ``M^{1,s}``. The error is ``min_c ||c C - M_K|| / ||M_K||`` (the best overall scale, since
    the std rescaling sets the scale separately): 0 when the seed's transposes act as
    pseudo-inverses, i.e. when ``E E^T`` is close to the identity.

    Returns:
        ``{"1,s": relative error}`` for each distinct table of layer 0.
    """
    cfg = prep.config
    x = np.asarray(_stream_rows(params["embed"], cfg), np.float64)
    out: dict[str, float] = {}
    for h in range(cfg.num_heads):
        n, s = cfg.layout(0, h)
        if n != 1 or f"1,{s}" in out:
            continue
        cm = prep.tables[(1, s)]
        M = np.asarray(manifold_matrix(cm), np.float64)
        U, S, Vt = np.linalg.svd(M, full_matrices=False)
        K = min(cfg.d_head, S.size)
        MK = (U[:, :K] * S[:K]) @ Vt[:K]
        q = x[cm.contexts[:, 0]] @ np.asarray(params["wq"][0, h], np.float64)
        k = x @ np.asarray(params["wk"][0, h], np.float64)
        C = q @ k.T
        c = float((C * MK).sum() / max(float((C * C).sum()), 1e-300))
        out[f"1,{s}"] = float(np.linalg.norm(c * C - MK) / max(float(np.linalg.norm(MK)), 1e-300))
    return out


def run_option1(prep: Prepared, *, progress: bool = True, ppmi: PPMIConfig = PPMIConfig()) -> AnalysisResult:
    """Option 1: PPMI embeddings, then the unchanged seed derivation and model.

    The MLP, SVD keys and everything else are those of the baseline (same ``derive`` key).
    ``extra["layer0_circuit_error"]`` compares how well layer 0 realises the seed's target
    with these embeddings and with the seed's random ones (:func:`layer0_circuit_error`).
    """
    from jaxattn.derive import derive_params

    with prep.timer.stage("derive"):
        E, info = ppmi_embeddings(prep, ppmi, key=prep.key("option1"))
        params = derive_params(prep.tables, prep.config, key=prep.key("derive"), embed=E)
        seed_params = derive_params(prep.tables, prep.config, key=prep.key("derive"))
        jax.block_until_ready(params)
    errors = {"ppmi": layer0_circuit_error(prep, params), "random": layer0_circuit_error(prep, seed_params)}
    attn = batched_attention(prep, params, progress=progress, desc="option1")
    extra = {"ppmi": info, "layer0_circuit_error": errors}
    return AnalysisResult("option1", evaluate(prep, attn, "option1"), attn, params, extra)


# --------------------------------------------------------------------------- #
# Option 2: direct position-to-position attention from the tables
# --------------------------------------------------------------------------- #

#: Probability floor inside Option 2's log: below the smallest non-zero P (1 / rowsum) of any
#: row with fewer than 1e9 counts, so unseen (context, token) pairs get ~0 attention, but a
#: finite logit (no -inf, so a row whose keys are all unseen stays a valid softmax).
DIRECT_FLOOR = 1e-9


class DirectTables(NamedTuple):
    """Option 2's gather source: every (n, s) table's ``log max(P, floor)``, stacked.

    Attributes:
        logp: float32 [sum_p (R_p + 1), V]; table p occupies rows ``offsets[p] .. offsets[p] + R_p``,
            and row ``offsets[p] + R_p`` is all zeros (the uniform back-off for unseen contexts).
        offsets: int [P] first row of each table.
        sizes: int [P] R_p.
    """

    logp: jax.Array
    offsets: np.ndarray
    sizes: np.ndarray


def direct_tables(
    tables: dict[tuple[int, int], CountMatrix], pairs: list[tuple[int, int]], floor: float = DIRECT_FLOOR
) -> DirectTables:
    """Builds the dense log-probability tables Option 2 gathers from.

    Args:
        tables: ``{(n, s): CountMatrix}``.
        pairs: the P distinct (n, s) of the layout, in order.
        floor: probability floor (> 0) inside the log.

    Returns:
        :class:`DirectTables`.
    """
    if not floor > 0:
        raise JaxattnError(f"floor={floor} must be > 0")
    blocks, offsets, sizes, off = [], [], [], 0
    for p in pairs:
        cm = tables[p]
        R, V = cm.shape
        check_dense_size((R + 1, V), 4, f"Option 2 log-probability table {p}", cm.max_dense_bytes)
        rs = cm.row_sums.astype(np.float64)
        logp = np.full((R + 1, V), np.log(floor), np.float64)
        logp[cm.rows, cm.cols] = np.log(np.maximum(cm.values / np.maximum(rs[cm.rows], 1.0), floor))
        logp[R] = 0.0
        blocks.append(logp.astype(np.float32))
        offsets.append(off)
        sizes.append(R)
        off += R + 1
    return DirectTables(jnp.asarray(np.concatenate(blocks)), np.asarray(offsets), np.asarray(sizes))


def direct_row_ids(
    tables: dict[tuple[int, int], CountMatrix], pairs: list[tuple[int, int]], dt: DirectTables, tokens: np.ndarray
) -> np.ndarray:
    """Row of :attr:`DirectTables.logp` for every query: its context's row, or the uniform row.

    Args:
        tables: the count tables.
        pairs: the P pairs of ``dt``.
        dt: the stacked tables.
        tokens: int [B, T].

    Returns:
        int32 [B, P, T].
    """
    ids = []
    for p, pair in enumerate(pairs):
        g = context_ids(tables[pair], tokens)
        ids.append(dt.offsets[p] + np.where(g >= 0, g, dt.sizes[p]))
    return np.stack(ids, axis=1).astype(np.int32)


@jax.jit
def direct_logits(logp: jax.Array, row_ids: jax.Array, tokens: jax.Array, pair_index: jax.Array) -> jax.Array:
    """The gather ``score[i, j] = logp[row(g_i), t_j]`` for every layer and head.

    Args:
        logp: float32 [Rtot, V] stacked tables.
        row_ids: int32 [B, P, T] query rows.
        tokens: int32 [B, T].
        pair_index: int32 [L, H] table of each head.

    Returns:
        float32 [B, L, H, T, T].
    """

    def one(ids: jax.Array, tok: jax.Array) -> jax.Array:  # ids [P, T], tok [T] -> [P, T, T]
        return logp[ids[:, :, None], tok[None, None, :]]

    per_pair = jax.vmap(one)(row_ids, tokens)  # [B, P, T, T]
    return per_pair[:, pair_index]


def direct_logits_fn(prep: Prepared, dt: DirectTables) -> Callable[[np.ndarray], jax.Array]:
    """``tokens [b, T] -> logits [b, L, H, T, T]`` for :func:`jaxattn.pipeline.batched_attention`."""
    pair_index = jnp.asarray(prep.pair_index)

    def fn(tokens: np.ndarray) -> jax.Array:
        ids = direct_row_ids(prep.tables, prep.pairs, dt, tokens)
        return direct_logits(dt.logp, jnp.asarray(ids), jnp.asarray(tokens), pair_index)

    return fn


@jax.jit
def _qk_scores(h: jax.Array, wq: jax.Array, wk: jax.Array) -> jax.Array:
    """Derived-weight scores for every layer and head, as the model computes them.

    Args:
        h: [B, L, T, D] attention inputs.
        wq, wk: [L, H, D, K].

    Returns:
        [B, L, H, T, T].
    """
    q = jnp.einsum("bltd,lhdk->blhtk", h, wq)
    k = jnp.einsum("bltd,lhdk->blhtk", h, wk)
    return jnp.einsum("blhtk,blhsk->blhts", q, k) / jnp.sqrt(jnp.asarray(wq.shape[-1], jnp.float32))


def _median_time(fn: Callable[[], Any], repeats: int) -> tuple[float, float]:
    """(first call incl. compile, median of ``repeats`` warm calls), seconds, with block_until_ready."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return first, float(np.median(times))


def option2_costs(prep: Prepared, params: Params, dt: DirectTables, *, repeats: int = 5) -> dict[str, Any]:
    """Memory and time of Option 2's gathered logits against the derived W_Q/W_K scores.

    Memory: the tables Option 2 needs (dense ``(R+1) x V`` float32 as used, and the sparse
    COO alternative ``nnz x (4 + 4 + 4)`` bytes) against the W_Q/W_K arrays of ``params``
    (all L x H heads, and the distinct (n, s) ones). Time, per batch of ``run.batch_size``
    evaluation sequences: the host context lookup, the jitted gather, and the jitted
    ``q k^T / sqrt(K)`` of the derived weights on the same batch; warm-up first (its time,
    compile included, is reported apart), then the median of ``repeats`` calls, each ended
    with ``block_until_ready``.

    Args:
        prep: the prepared run.
        params: derived parameters (the seed's) whose W_Q/W_K are the peer.
        dt: Option 2's tables.
        repeats: timed repeats.

    Returns:
        JSON-able dict of bytes and seconds.
    """
    cfg = prep.config
    nnz = sum(prep.tables[p].nnz for p in prep.pairs)
    dense_bytes = int(dt.logp.size) * 4
    wqk_bytes = int(params["wq"].size + params["wk"].size) * 4
    distinct_wqk = 2 * len(prep.pairs) * cfg.d_model * cfg.d_head * 4
    tok = np.asarray(prep.tokens[: max(1, int(prep.run.batch_size))])
    pair_index = jnp.asarray(prep.pair_index)
    tok_j = jnp.asarray(tok)
    ids = direct_row_ids(prep.tables, prep.pairs, dt, tok)
    host = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        ids = direct_row_ids(prep.tables, prep.pairs, dt, tok)
        host.append(time.perf_counter() - t0)
    ids_j = jnp.asarray(ids)
    g_first, g_med = _median_time(lambda: direct_logits(dt.logp, ids_j, tok_j, pair_index), repeats)
    # The derived heads' input at layer 0 is LN(E[t]); later layers see a different x of the same shape.
    h = layer_norm(params["embed"][tok_j], params["ln1_scale"][0], params["ln1_bias"][0])
    h = jnp.broadcast_to(h[:, None], (tok.shape[0], cfg.num_layers, tok.shape[1], cfg.d_model))
    s_first, s_med = _median_time(lambda: _qk_scores(h, params["wq"], params["wk"]), repeats)
    return {
        "tables": [list(p) for p in prep.pairs],
        "table_bytes_dense": dense_bytes,
        "table_bytes_sparse_coo": int(nnz) * 12,
        "table_nnz": int(nnz),
        "wq_wk_bytes": wqk_bytes,
        "wq_wk_bytes_distinct_tables": distinct_wqk,
        "dense_table_over_wq_wk": dense_bytes / wqk_bytes,
        "batch": [int(d) for d in tok.shape],
        "context_lookup_s": float(np.median(host)),
        "gather_s": g_med,
        "gather_first_call_s": g_first,
        "qk_scores_s": s_med,
        "qk_scores_first_call_s": s_first,
        "gather_total_over_qk": (float(np.median(host)) + g_med) / max(s_med, 1e-12),
        "repeats": int(repeats),
    }


def run_option2(
    prep: Prepared, *, progress: bool = True, floor: float = DIRECT_FLOOR, measure_cost: bool = True
) -> AnalysisResult:
    """Option 2: attention logits gathered from the count tables; no W_Q/W_K.

    Each head uses its own (n, s) table; queries whose context was never observed get a
    uniform row (all-zero logits). V/O, the MLP and the embeddings are the seed's, so only
    the attention logits differ from the baseline model.

    Args:
        prep: the prepared run.
        progress: progress bars.
        floor: probability floor of ``log max(P, floor)``.
        measure_cost: time the gather against the derived Q/K scores (see :func:`option2_costs`).
    """
    from jaxattn.derive import derive_params

    with prep.timer.stage("derive"):
        dt = direct_tables(prep.tables, prep.pairs, floor)
        params = derive_params(prep.tables, prep.config, key=prep.key("derive"))
    attn = batched_attention(prep, params, attn_logits_fn=direct_logits_fn(prep, dt), progress=progress, desc="option2")
    extra: dict[str, Any] = {"floor": floor}
    if measure_cost:
        extra["cost"] = option2_costs(prep, params, dt)
    return AnalysisResult("option2", evaluate(prep, attn, "option2"), attn, params, extra)


# --------------------------------------------------------------------------- #
# Option 3: a closed-form derivation with switchable ingredients
# --------------------------------------------------------------------------- #


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


#: The seed derivation (every ingredient off).
SEED_DERIVATION = DerivationConfig()

#: Ablation order: (ingredient field, short label, what it changes). The order is the greedy
#: forward selection of :func:`greedy_order` at the seed preset on Shakespeare minus King Lear
#: (evaluated on King Lear): each round adds the ingredient with the largest gain in mean
#: cosine + tie-aware argmax match. The structural fixes (what the layer reads, exact
#: inverses) come first; the log-P target pays off only once they are in place.
ABLATION_STEPS: tuple[tuple[str, str, str], ...] = (
    (
        "embed_stream",
        "embedding-stream Q/K",
        "queries and keys read LN(E[t]) via qk_inputs, not the MLP-dominated LN(x)",
    ),
    ("pinv", "pseudo-inverse", "W = pinv(LN(E) rows) A instead of E^T A (exact for independent rows)"),
    ("temperature", "calibrated tau", "drop the std-0.01 rescaling of W_Q/W_K; fit tau on the count corpus"),
    ("ngram_queries", "n-gram queries", "one query row per observed n-gram at n >= 2 (back-off to suffixes)"),
    ("log_target", "log-P target", "factor the smoothed, row-centred log P~ instead of the manifold M"),
    ("frequency_weighting", "frequency weighting", "count-weighted rank-K factorisation and least squares"),
)

#: Option 3: every ingredient on.
OPTION3 = dataclasses.replace(SEED_DERIVATION, **{name: True for name, _, _ in ABLATION_STEPS})


def smoothed_log_probs(cm: CountMatrix, smoothing: float) -> np.ndarray:
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


def centred_target(cm: CountMatrix, dcfg: DerivationConfig, col_w: np.ndarray) -> np.ndarray:
    """The log target with each row's ``col_w``-weighted mean removed (softmax ignores it).

    Returns:
        float64 [R, V].
    """
    T = smoothed_log_probs(cm, dcfg.smoothing)
    return T - (T @ col_w)[:, None] / col_w.sum()


def table_factors(cm: CountMatrix, rank: int, dcfg: DerivationConfig, *, key: jax.Array) -> TableFactors:
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
    U, S, Vt = padded_svd(Z.astype(np.float32), rank, key=key)
    U, S, Vt = (np.asarray(a, np.float64) for a in (U, S, Vt))
    root = np.sqrt(S)
    kept = float((S**2).sum() / max(float((Z**2).sum()), 1e-300))
    return TableFactors((U * root) / sr[:, None], (Vt.T * root) / sc[:, None], row_w, col_w, kept)


def _lstsq(X: np.ndarray, Y: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, float]:
    """Minimum-norm ``W = argmin sum_r w_r ||X_r W - Y_r||^2`` (``pinv(sqrt(w) X) sqrt(w) Y``).

    Returns:
        (W [D, K], relative weighted residual ``||sqrt(w)(X W - Y)|| / ||sqrt(w) Y||``).
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

    def lookup(self, tokens: np.ndarray) -> np.ndarray:
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


def ngram_query_table(
    tables: dict[tuple[int, int], CountMatrix],
    factors: dict[tuple[int, int], TableFactors],
    n: int,
    s_values: list[int],
    d_model: int,
    dcfg: DerivationConfig,
    *,
    key: jax.Array,
) -> NgramQueryTable:
    """Builds the n-gram query rows of a layer whose heads use tables ``(n, s)``, s in ``s_values``.

    Each row holds the concatenation over s of a query factor: ``A_{n,s}[g]`` for an n-gram
    observed in ``C^{n,s}``; for a shorter m-gram observed in ``C^{m,s}``, the weighted
    least-squares fit ``f`` of its centred ``log P~`` row by ``f B_{n,s}^T``; otherwise the
    row of its (m-1)-suffix (zeros for a token never seen as a context). The concatenation
    F [Rq, F] is mapped into D through its own row space and a fixed orthogonal map:
    ``X = F V_r^T Π`` (Π [r, D] orthonormal rows from ``key``), so that ``pinv(X) A_s`` is
    exact for every row when r <= D.

    Returns:
        :class:`NgramQueryTable`.
    """
    V = next(iter(tables.values())).vocab_size
    levels = list(range(1, n + 1))
    keys: dict[int, np.ndarray] = {}
    grams: dict[int, np.ndarray] = {}
    for m in levels:
        if m == 1:
            grams[1] = np.arange(V, dtype=np.int32)[:, None]
            keys[1] = np.arange(V, dtype=np.int64)
        else:
            ctx = np.concatenate([tables[(m, s)].contexts for s in s_values if (m, s) in tables])
            k = pack_ngrams(ctx, V)
            keys[m], first = np.unique(k, return_index=True)
            grams[m] = ctx[first]
    blocks: dict[int, list[np.ndarray]] = {m: [] for m in levels}
    for s in s_values:
        fac = factors[(n, s)]
        B = np.asarray(fac.B, np.float64)
        K = B.shape[1]
        # Least-squares map from a centred log-probability row t [V] to f [K]: f = t W B (B^T W B)^+.
        proj = (fac.col_w[:, None] * B) @ np.linalg.pinv(B.T @ (fac.col_w[:, None] * B))
        prev: np.ndarray | None = None
        for m in levels:
            rows = np.zeros((len(keys[m]), K), np.float64)
            cm = tables.get((m, s))
            idx = cm.context_index(grams[m]) if cm is not None else np.full(len(keys[m]), -1)
            have = idx >= 0
            if m == n:
                rows[have] = np.asarray(fac.A, np.float64)[idx[have]]
            elif have.any():
                t = centred_target(cm, dcfg, fac.col_w)[idx[have]]
                rows[have] = t @ proj
            if m > 1 and prev is not None:
                suf = _suffix_rows(keys[m - 1], grams[m], V)
                back = ~have & (suf >= 0)
                rows[back] = prev[suf[back]]
            blocks[m].append(rows)
            prev = rows
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

    def __call__(self, tokens: np.ndarray) -> tuple[jax.Array, jax.Array]:
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


@dataclasses.dataclass
class Derivation:
    """Output of :func:`derive_option3`.

    Attributes:
        params: the model's parameter pytree.
        qk_inputs: the hook (None: the model's own ``LN(x)``).
        info: diagnostics (energy kept, least-squares residuals, query ranks, tau).
    """

    params: Params
    qk_inputs: QKInputs | None
    info: dict[str, Any]


def _stream_rows(embed: jax.Array, config: ModelConfig, eps: float = 1e-5) -> np.ndarray:
    """``LN(E)`` as the first layer sees it (the frozen LayerNorm has unit scale and zero bias).

    The formula of :func:`jaxattn.model.layer_norm`, in numpy (no compile for a [V, D] table).

    Returns:
        float32 [V, D].
    """
    e = np.asarray(embed, np.float64)
    if not config.layernorm:
        return e.astype(np.float32)
    c = e - e.mean(-1, keepdims=True)
    return (c / np.sqrt((c**2).mean(-1, keepdims=True) + eps)).astype(np.float32)


def derive_option3(
    tables: dict[tuple[int, int], CountMatrix],
    config: ModelConfig,
    dcfg: DerivationConfig,
    *,
    key: jax.Array,
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
    L, H, K, D = config.num_layers, config.num_heads, config.d_head, config.d_model
    k_embed, k_svd, k_mlp = jax.random.split(key, 3)
    k_rep = jax.random.fold_in(key, 3)
    embed = base_embeddings(k_embed, config.vocab_size, D)
    stream = _stream_rows(embed, config)
    pairs = sorted({config.layout(l, h) for l in range(L) for h in range(H)})
    factors: dict[tuple[int, int], TableFactors] = {}
    vo: dict[tuple[int, int], tuple[jax.Array, jax.Array]] = {}
    seed_en: dict[tuple[int, int], jax.Array] = {}
    for i, (n, s) in enumerate(pairs):
        cm = tables[(n, s)]
        kq, kv = jax.random.split(jax.random.fold_in(k_svd, i))
        seed_en[(n, s)] = ngram_embeddings(embed, cm.contexts, tables.get((n - 1, 0)))
        factors[(n, s)] = table_factors(cm, K, dcfg, key=kq)
        vo[(n, s)] = derive_vo(dense_or_sparse(probability_matrix, cm), seed_en[(n, s)], embed, K, key=kv)
    # n-gram query tables, one per context length n >= 2 in the layout.
    ngram: dict[int, NgramQueryTable] = {}
    if dcfg.ngram_queries:
        for n in sorted({n for n, _ in pairs if n >= 2}):
            s_values = sorted({s for m, s in pairs if m == n})
            ngram[n] = ngram_query_table(tables, factors, n, s_values, D, dcfg, key=jax.random.fold_in(k_rep, n))
    info: dict[str, Any] = {"tables": {}}
    table_weights: dict[tuple[int, int], HeadWeights] = {}
    for n, s in pairs:
        cm, fac = tables[(n, s)], factors[(n, s)]
        if n in ngram:
            qt = ngram[n]
            idx = qt.lookup(cm.contexts)[:, -1]  # an observed n-gram finds its own row
            X_q = qt.rows[idx]
        elif dcfg.pinv:
            X_q = stream[cm.contexts[:, -1]]
        else:
            X_q = seed_en[(n, s)]
        if dcfg.pinv:
            wq, res_q = _lstsq(X_q, fac.A, fac.row_w)
            wk, res_k = _lstsq(stream, fac.B, fac.col_w)
            wq, wk = jnp.asarray(wq, jnp.float32), jnp.asarray(wk, jnp.float32)
        else:
            wq = jnp.asarray(X_q).T @ jnp.asarray(fac.A, jnp.asarray(X_q).dtype)
            wk = embed.T @ jnp.asarray(fac.B, embed.dtype)
            res_q = res_k = float("nan")
        wv, wo = vo[(n, s)]
        table_weights[(n, s)] = HeadWeights(wq, wk, wv, wo)
        info["tables"][f"{n},{s}"] = {
            "contexts": cm.num_contexts,
            "energy_kept": fac.energy_kept,
            "lstsq_residual_q": res_q,
            "lstsq_residual_k": res_k,
        }
    raw = assemble_params(table_weights, embed, dataclasses.replace(config, weight_std=None), key=k_mlp)
    params = dict(raw)
    std = config.weight_std
    for name in ("wq", "wk", "wv", "wo"):
        if name in ("wq", "wk") and dcfg.temperature:
            # q.k / sqrt(K) = A B^T at tau = 1: K^(1/4) on each side.
            params[name] = raw[name] * jnp.float32(K**0.25)
        elif std is not None:
            params[name] = jnp.stack([normalize_std(raw[name][l], std) for l in range(L)])
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
    scores: jax.Array, expected: jax.Array, mask: jax.Array, bounds: tuple[float, float], iters: int = 40
) -> np.ndarray:
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


def calibration_set(prep: Prepared, num_seqs: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sequences of the COUNT corpus (never the evaluation text) and their expected attention.

    Returns:
        tokens int32 [B, T], expected float32 [P, B, T, T], mask bool [P, B, T, T].
    """
    T = prep.tokens.shape[1]
    tok = sample_sequences(prep.corpus.tokens, prep.corpus.doc_ids, T, num_seqs, prep.key("calibration"))
    expected, mask = expected_for_layout(prep.tables, tok, prep.pairs)
    return tok, expected, mask


def calibrate_temperature(prep: Prepared, der: Derivation, dcfg: DerivationConfig) -> np.ndarray:
    """Fits tau per (layer, head) on count-corpus sequences and folds it into W_Q.

    With the embedding-stream hook every layer's inputs are known up front. Without it a
    layer's input depends on the layers below, so layers are calibrated in order, each on
    a forward pass of the model as calibrated so far.

    Args:
        prep: the prepared run.
        der: the derivation (its ``params["wq"]`` is rescaled in place of the dict).
        dcfg: the ingredients (``calibration_seqs``, ``tau_bounds``).

    Returns:
        float64 [L, H] the fitted tau.
    """
    cfg = prep.config
    L = cfg.num_layers
    tok, expected, mask = calibration_set(prep, dcfg.calibration_seqs)
    taus = np.ones((L, cfg.num_heads))
    bs = max(1, int(prep.run.batch_size))
    fixed = der.qk_inputs(tok) if der.qk_inputs is not None else None
    for l in range(L):
        if fixed is not None:
            q_in, k_in = fixed[0][:, l], fixed[1][:, l]
        else:
            chunks = [
                forward_batch(der.params, jnp.asarray(tok[i : i + bs]), cfg, return_inputs=True).query_inputs[:, l]
                for i in range(0, tok.shape[0], bs)
            ]
            q_in = k_in = jnp.concatenate(chunks)
        scores = _layer_scores(q_in, k_in, der.params["wq"][l], der.params["wk"][l])
        pi = prep.pair_index[l]
        taus[l] = fit_tau(scores, jnp.asarray(expected[pi]), jnp.asarray(mask[pi]), dcfg.tau_bounds)
        der.params["wq"] = der.params["wq"].at[l].multiply(jnp.asarray(taus[l], jnp.float32)[:, None, None])
    return taus


def run_derivation(
    prep: Prepared, dcfg: DerivationConfig, *, label: str = "option3", progress: bool = True
) -> AnalysisResult:
    """Derives with ``dcfg``, calibrates tau when asked, runs the model and measures.

    Args:
        prep: the prepared run.
        dcfg: the ingredients.
        label: the option label of the records.
        progress: progress bars.

    Returns:
        :class:`AnalysisResult` whose ``extra`` holds the derivation config, tau and diagnostics.
    """
    with prep.timer.stage("derive"):
        der = derive_option3(prep.tables, prep.config, dcfg, key=prep.key("derive"))
        taus = calibrate_temperature(prep, der, dcfg) if dcfg.temperature else None
        jax.block_until_ready(der.params)
    attn = batched_attention(prep, der.params, qk_inputs_fn=der.qk_inputs, progress=progress, desc=label)
    extra = {"derivation": dataclasses.asdict(dcfg), **der.info}
    if taus is not None:
        extra["tau"] = taus.tolist()
    return AnalysisResult(label, evaluate(prep, attn, label), attn, der.params, extra)


def run_option3(prep: Prepared, *, progress: bool = True, derivation: DerivationConfig = OPTION3) -> AnalysisResult:
    """Option 3: the derivation with every ingredient (:data:`OPTION3`)."""
    return run_derivation(prep, derivation, label="option3", progress=progress)


# --------------------------------------------------------------------------- #
# Dispatch and the ablation table
# --------------------------------------------------------------------------- #


def run_option(prep: Prepared, option: str, *, progress: bool = True, **kw: Any) -> AnalysisResult:
    """Runs one option on a prepared run.

    Args:
        prep: the prepared run (count tables, held-out sequences, expected attention).
        option: "baseline", "1", "2", "3" or "4".
        progress: progress bars.
        **kw: option-specific knobs: ``ppmi=PPMIConfig`` (1), ``floor``/``measure_cost`` (2),
            ``derivation=DerivationConfig`` (3), anything ``train.run_option4`` takes (4).

    Returns:
        :class:`AnalysisResult` labelled "baseline", "option1", ..., "option4".

    Raises:
        JaxattnError: unknown option.
    """
    option = str(option)
    if option == "baseline":
        return run_baseline(prep, progress=progress)
    if option == "1":
        return run_option1(prep, progress=progress, **kw)
    if option == "2":
        return run_option2(prep, progress=progress, **kw)
    if option == "3":
        return run_option3(prep, progress=progress, **kw)
    if option == "4":
        from jaxattn.train import run_option4

        return run_option4(prep, progress=progress, **kw)
    raise JaxattnError(f"unknown option {option!r}; choose one of {list(OPTIONS)}")


def summarize(records: list[dict[str, Any]], num_layers: int) -> dict[str, Any]:
    """Per-layer means over heads (lists over layers) and overall means of the ablation metrics."""
    out: dict[str, Any] = {}
    for m in ABLATION_METRICS:
        per = [float(np.mean([r[m] for r in records if r["layer"] == l])) for l in range(num_layers)]
        out[m] = per
        out[f"{m}_mean"] = float(np.mean([r[m] for r in records]))
        out[f"{m}_worst_layer"] = float(max(per) if m == "kl" else min(per))
    return out


def ablation(
    prep: Prepared, *, progress: bool = True, steps: tuple[tuple[str, str, str], ...] = ABLATION_STEPS
) -> list[dict[str, Any]]:
    """The Option 3 ablation: the seed derivation, then one ingredient more per row.

    Row 0 is the seed baseline (:data:`SEED_DERIVATION`, identical to
    :func:`jaxattn.pipeline.run_baseline`); row k adds ``steps[k-1]`` to row k-1; the last
    row is Option 3 (with the default steps). Every row is measured like the baseline, on
    ``prep.tokens``.

    Args:
        prep: the prepared run.
        progress: progress bars.
        steps: (ingredient field, label, description) in the order to add them.

    Returns:
        One dict per row: ``step``, ``ingredient``, ``description``, ``config`` (the
        :class:`DerivationConfig` as a dict), and for each of cosine, argmax_match_tied, kl,
        entropy: the per-layer means over heads (a list over layers), ``{metric}_mean``
        (over all heads) and ``{metric}_worst_layer``; plus ``tau`` per layer (mean over heads).
    """
    rows = []
    dcfg = SEED_DERIVATION
    plan = [("seed", "seed baseline", "the seed derivation (SPEC §2)")] + list(steps)
    for k, (field, label, desc) in enumerate(progress_iter(plan, desc="ablation", enabled=progress)):
        if k > 0:
            dcfg = dataclasses.replace(dcfg, **{field: True})
        res = run_derivation(prep, dcfg, label=f"ablation{k}", progress=False)
        row: dict[str, Any] = {"step": k, "ingredient": label, "description": desc, "config": dataclasses.asdict(dcfg)}
        row.update(summarize(res.records, prep.config.num_layers))
        tau = res.extra.get("tau")
        row["tau"] = [float(np.mean(t)) for t in tau] if tau is not None else None
        rows.append(row)
    return rows


def greedy_order(
    prep: Prepared, *, progress: bool = True, fields: tuple[str, ...] | None = None
) -> tuple[list[str], list[dict[str, Any]]]:
    """Greedy forward selection of the ablation order (how :data:`ABLATION_STEPS` was chosen).

    From the seed derivation, each round tries every remaining ingredient on top of the ones
    chosen so far and keeps the one with the largest mean cosine + mean tie-aware argmax
    match (over all heads) on ``prep.tokens``. Costs ``k (k + 1) / 2`` derivations for k
    ingredients.

    Args:
        prep: the prepared run.
        progress: progress bars.
        fields: the ingredients to order (default: those of :data:`ABLATION_STEPS`).

    Returns:
        (the chosen order, one row per tried candidate with its round, the ingredients
        already chosen, the candidate and the :func:`summarize` numbers).
    """
    fields = tuple(fields or (f for f, _, _ in ABLATION_STEPS))
    chosen: list[str] = []
    tried: list[dict[str, Any]] = []
    dcfg = SEED_DERIVATION
    for rnd in progress_iter(range(len(fields)), desc="greedy order", enabled=progress):
        best: tuple[float, str, DerivationConfig] | None = None
        for f in fields:
            if f in chosen:
                continue
            try:
                cand = dataclasses.replace(dcfg, **{f: True})
            except JaxattnError:  # e.g. n-gram queries before the embedding stream
                continue
            res = run_derivation(prep, cand, label="greedy", progress=False)
            summ = summarize(res.records, prep.config.num_layers)
            tried.append({"round": rnd, "chosen": list(chosen), "candidate": f, **summ})
            score = summ["cosine_mean"] + summ["argmax_match_tied_mean"]
            if best is None or score > best[0]:
                best = (score, f, cand)
        assert best is not None  # every round has a valid candidate: embed_stream is always allowed
        chosen.append(best[1])
        dcfg = best[2]
    return chosen, tried


def _row_label(row: dict[str, Any]) -> str:
    label = row["ingredient"]
    return label if row["step"] == 0 or label.startswith("- ") else "+ " + label


def leave_one_out(prep: Prepared, *, progress: bool = True) -> list[dict[str, Any]]:
    """Option 3 with one ingredient removed at a time (the complement of :func:`ablation`).

    Removing ``embed_stream`` also removes ``ngram_queries`` (which needs it). Rows have the
    same fields as :func:`ablation`'s; ``step`` 0 is Option 3 itself.

    Args:
        prep: the prepared run.
        progress: progress bars.

    Returns:
        One dict per row.
    """
    plan = [("", "option 3", "every ingredient")] + [
        (f, f"- {label}", f"Option 3 without: {desc}") for f, label, desc in ABLATION_STEPS
    ]
    rows = []
    for k, (field, label, desc) in enumerate(progress_iter(plan, desc="leave-one-out", enabled=progress)):
        off = {field: False} if field else {}
        if field == "embed_stream":
            off["ngram_queries"] = False
        dcfg = dataclasses.replace(OPTION3, **off)
        res = run_derivation(prep, dcfg, label=f"loo{k}", progress=False)
        row: dict[str, Any] = {"step": k, "ingredient": label, "description": desc, "config": dataclasses.asdict(dcfg)}
        row.update(summarize(res.records, prep.config.num_layers))
        rows.append(row)
    return rows


def format_ablation(rows: list[dict[str, Any]]) -> str:
    """The ablation table: overall means, the worst layer, and per-layer cosine / tied match."""
    head = f"{'step':>4} {'ingredient':<24} {'cos':>6} {'worst':>6} {'tied':>6} {'worst':>6} {'KL':>6} {'entropy':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['step']:>4} {_row_label(r):<24} {r['cosine_mean']:6.3f} "
            f"{r['cosine_worst_layer']:6.3f} {r['argmax_match_tied_mean']:6.1%} "
            f"{r['argmax_match_tied_worst_layer']:6.1%} "
            f"{r['kl_mean']:6.3f} {r['entropy_mean']:7.3f}"
        )
    lines.append("")
    L = len(rows[0]["cosine"]) if rows else 0
    lines.append("per-layer cosine / tied argmax match:")
    lines.append(f"{'step':>4} " + " ".join(f"{'L' + str(l):>11}" for l in range(L)))
    for r in rows:
        cells = " ".join(f"{c:5.3f}/{t:4.0%}" for c, t in zip(r["cosine"], r["argmax_match_tied"], strict=True))
        lines.append(f"{r['step']:>4} {cells}")
    return "\n".join(lines)


__all__ = [
    "ABLATION_STEPS",
    "OPTION3",
    "SEED_DERIVATION",
    "DerivationConfig",
    "PPMIConfig",
    "ablation",
    "derive_option3",
    "format_ablation",
    "greedy_order",
    "leave_one_out",
    "run_option",
    "run_option1",
    "run_option2",
    "run_option3",
]
