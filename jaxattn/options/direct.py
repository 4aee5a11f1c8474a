"""Option 2 (SPEC §3.2): attention logits gathered straight from the count tables; no W_Q/W_K.

``score[i, j] = log max(P[g_i, t_j], floor)`` for each head's own (n, s) table; queries whose
context was never observed get a uniform row. V/O, the MLP and the embeddings are the seed's,
so only the attention logits differ from the baseline model. This is the ceiling of what
count-table attention can reach; :func:`option2_costs` measures its memory and time against
the derived weights.

Axis vocabulary: B sequences, L layers, H heads, T positions, D d_model, K d_head,
V vocabulary, P distinct (n, s) tables, R contexts of one table, Rtot stacked rows.
"""

# ruff: noqa: F722  (jaxtyping shape strings such as "R V" are not Python expressions)
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn.alignment import context_ids
from jaxattn.counts import CountMatrix, check_dense_size
from jaxattn.derive import derive_params
from jaxattn.errors import JaxattnError
from jaxattn.model import ModelConfig, Params, layer_norm
from jaxattn.pipeline import AnalysisResult, Prepared, measure
from jaxattn.progress import Timer, stage
from jaxattn.typing import Array, ArrayLike, Float, Int, Integer

__all__ = [
    "DIRECT_FLOOR",
    "DirectTables",
    "direct_logits",
    "direct_logits_fn",
    "direct_row_ids",
    "direct_tables",
    "option2_costs",
    "run_option2",
]

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
    tables: dict[tuple[int, int], CountMatrix],
    pairs: list[tuple[int, int]],
    dt: DirectTables,
    tokens: Integer[ArrayLike, "B T"],
) -> Int[np.ndarray, "B P T"]:
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
def direct_logits(
    logp: Float[Array, "Rtot V"],
    row_ids: Int[Array, "B P T"],
    tokens: Integer[Array, "B T"],
    pair_index: Int[Array, "L H"],
) -> Float[Array, "B L H T T"]:
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


def direct_logits_fn(
    tables: dict[tuple[int, int], CountMatrix],
    pairs: list[tuple[int, int]],
    pair_index: Int[ArrayLike, "L H"],
    dt: DirectTables,
) -> Callable[[np.ndarray], jax.Array]:
    """``tokens [b, T] -> logits [b, L, H, T, T]`` for :func:`jaxattn.pipeline.run_model`.

    Args:
        tables: the count tables.
        pairs: the P pairs of ``dt``.
        pair_index: int [L, H] table of each head.
        dt: the stacked tables (:func:`direct_tables`).

    Returns:
        The logits function.
    """
    index = jnp.asarray(pair_index)

    def fn(tokens: np.ndarray) -> jax.Array:
        ids = direct_row_ids(tables, pairs, dt, tokens)
        return direct_logits(dt.logp, jnp.asarray(ids), jnp.asarray(tokens), index)

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


def option2_costs(
    params: Params,
    dt: DirectTables,
    tokens: Integer[ArrayLike, "B T"],
    tables: dict[tuple[int, int], CountMatrix],
    pairs: list[tuple[int, int]],
    pair_index: Int[ArrayLike, "L H"],
    config: ModelConfig,
    *,
    repeats: int = 5,
) -> dict[str, Any]:
    """Memory and time of Option 2's gathered logits against the derived W_Q/W_K scores.

    Memory: the tables Option 2 needs (dense ``(R+1) x V`` float32 as used, and the sparse
    COO alternative ``nnz x (4 + 4 + 4)`` bytes) against the W_Q/W_K arrays of ``params``
    (all L x H heads, and the distinct (n, s) ones). Time, per batch of evaluation sequences
    (``tokens``; the run uses its first ``run.batch_size``): the host context lookup, the
    jitted gather, and the jitted ``q k^T / sqrt(K)`` of the derived weights on the same
    batch; warm-up first (its time, compile included, is reported apart), then the median of
    ``repeats`` calls, each ended with ``block_until_ready``.

    Args:
        params: derived parameters (the seed's) whose W_Q/W_K are the peer.
        dt: Option 2's tables.
        tokens: int [B, T] the batch to time.
        tables: the count tables.
        pairs: the P pairs of ``dt``.
        pair_index: int [L, H] table of each head.
        config: the model config.
        repeats: timed repeats.

    Returns:
        JSON-able dict of bytes and seconds.
    """
    nnz = sum(tables[p].nnz for p in pairs)
    dense_bytes = int(dt.logp.size) * 4
    wqk_bytes = int(params["wq"].size + params["wk"].size) * 4
    distinct_wqk = 2 * len(pairs) * config.d_model * config.d_head * 4
    tok = np.asarray(tokens)
    index = jnp.asarray(pair_index)
    tok_j = jnp.asarray(tok)
    ids = direct_row_ids(tables, pairs, dt, tok)
    host = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        ids = direct_row_ids(tables, pairs, dt, tok)
        host.append(time.perf_counter() - t0)
    ids_j = jnp.asarray(ids)
    g_first, g_med = _median_time(lambda: direct_logits(dt.logp, ids_j, tok_j, index), repeats)
    # The derived heads' input at layer 0 is LN(E[t]); later layers see a different x of the same shape.
    h = layer_norm(params["embed"][tok_j], params["ln1_scale"][0], params["ln1_bias"][0])
    h = jnp.broadcast_to(h[:, None], (tok.shape[0], config.num_layers, tok.shape[1], config.d_model))
    s_first, s_med = _median_time(lambda: _qk_scores(h, params["wq"], params["wk"]), repeats)
    return {
        "tables": [list(p) for p in pairs],
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
    prep: Prepared,
    *,
    progress: bool = True,
    timer: Timer | None = None,
    floor: float = DIRECT_FLOOR,
    measure_cost: bool = True,
) -> AnalysisResult:
    """Option 2: attention logits gathered from the count tables; no W_Q/W_K.

    Each head uses its own (n, s) table; queries whose context was never observed get a
    uniform row (all-zero logits). V/O, the MLP and the embeddings are the seed's, so only
    the attention logits differ from the baseline model. The model with the gathered logits
    still predicts the next token through the seed's V/O, MLP and unembedding; its bits per
    token are scored (:func:`~jaxattn.pipeline.language_model_scores`).

    Args:
        prep: the prepared run.
        progress: progress bars.
        timer: stage timer (stages "derive", "forward", "metrics").
        floor: probability floor of ``log max(P, floor)``.
        measure_cost: time the gather against the derived Q/K scores (see :func:`option2_costs`).

    Returns:
        :class:`~jaxattn.pipeline.AnalysisResult` labelled "option2".
    """
    with stage(timer, "derive"):
        dt = direct_tables(prep.tables, prep.pairs, floor)
        params = derive_params(prep.tables, prep.config, key=prep.key("derive"))
    logits_fn = direct_logits_fn(prep.tables, prep.pairs, prep.pair_index, dt)
    res = measure(prep, params, "option2", attn_logits_fn=logits_fn, progress=progress, timer=timer)
    res.extra["floor"] = floor
    if measure_cost:
        batch = prep.tokens[: max(1, int(prep.run.batch_size))]
        res.extra["cost"] = option2_costs(params, dt, batch, prep.tables, prep.pairs, prep.pair_index, prep.config)
    return res
