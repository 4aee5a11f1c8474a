"""Expected attention from count tables, and alignment metrics against actual attention.

Axis vocabulary: B sequences, L layers, H heads, T query positions, S key positions.

The metric kernel is written for one head and one sequence (:func:`query_metrics`) and
vmapped over any leading axes by :func:`alignment_metrics`. :func:`layer_head_metrics` scores
every layer and head of a model in one call: it loops over the count tables and, inside, over
the heads that use each table, running the kernel vmapped over the sequences.
:mod:`jaxattn.alignment.sharded` runs :func:`layer_head_metrics` with the sequences split over a
device mesh.
"""

# ruff: noqa: F722  (jaxtyping shape strings such as "R V" are not Python expressions)
from __future__ import annotations

import functools
from typing import Any, NamedTuple

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

#: Query-row blocks of the causal fast path of :func:`layer_head_metrics` (at most; T // 16 for short T).
CAUSAL_ROW_BLOCKS = 8

#: The per-query metrics, in the order every table and report lists them.
METRIC_NAMES = ("kl", "cosine", "argmax_match", "argmax_match_tied", "entropy")

__all__ = [
    "CAUSAL_ROW_BLOCKS",
    "KL_EPS",
    "METRIC_NAMES",
    "TIE_RTOL",
    "alignment_metrics",
    "context_ids",
    "expected_attention",
    "expected_for_layout",
    "layer_head_metrics",
    "pool",
    "query_metrics",
    "reduction_sizes",
    "sample_sequences",
]


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


def _checked_ids(tokens: Any, vocab_size: int) -> np.ndarray:
    """``tokens`` as a numpy int array, refused when an id lies outside ``[0, vocab_size)``."""
    tokens = np.asarray(tokens)
    if not np.issubdtype(tokens.dtype, np.integer):
        raise JaxattnError(f"tokens must be integers, got dtype {tokens.dtype}")
    if tokens.size:
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= vocab_size:
            raise JaxattnError(f"token id {lo if lo < 0 else hi} is outside [0, vocab_size={vocab_size})")
    return tokens


def context_ids(cm: CountMatrix, tokens: Integer[ArrayLike, "*B T"]) -> Int[np.ndarray, "*B T"]:
    """Row of ``cm`` for each query's n-gram ``g_i = tokens[i-n+1 .. i]``.

    Args:
        cm: the table whose contexts are looked up.
        tokens: int [..., T].

    Returns:
        int32 [..., T]; -1 for ``i < n-1`` or an n-gram never observed.

    Raises:
        JaxattnError: a token id outside ``[0, cm.vocab_size)``, named with V.
    """
    tokens = _checked_ids(tokens, cm.vocab_size)
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

    Raises:
        JaxattnError: a token id outside ``[0, cm.vocab_size)``, named with V. (For token ids
        inside ``jax.jit``, use :func:`jaxattn.alignment.expected_attention_jax`.)
    """
    tokens = _checked_ids(tokens, cm.vocab_size)
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


class _PairTerms(NamedTuple):
    """Head-independent terms of one sequence under one (n, s) table: computed once, shared by its heads.

    Attributes:
        e: float32 [T, S] expected rows renormalised over the valid keys (0 elsewhere).
        keep: float32 [T, S] the mask as 0.0 / 1.0 (arithmetic, not selects, in the head kernel).
        e_log_e: float32 [T] ``sum_s e log(e + eps)``.
        e_norm: float32 [T] ``||e||``.
        e_max: float32 [T] the row's expected maximum.
        e_arg: int32 [T] its first index.
        log_keys: float32 [T] ``log(#valid keys)``; 0 for queries with fewer than 2 keys.
        valid: bool [T] queries that have a valid key and positive expected mass.
    """

    e: jax.Array
    keep: jax.Array
    e_log_e: jax.Array
    e_norm: jax.Array
    e_max: jax.Array
    e_arg: jax.Array
    log_keys: jax.Array
    valid: jax.Array


def _first_argmax(v_keep: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Maximum over the kept keys and its first index: [T, S] -> (float32 [T], int32 [T]).

    ``v_keep`` is >= 0 on the kept keys and below 0 (-1) on masked ones. The gap to the row
    maximum is >= 0, and 0 exactly at the maxima, so ``ceil(gap)`` is 0 there and >= 1 elsewhere
    (even for a subnormal gap), and the smallest ``index + S * ceil(gap)`` is the first maximum.
    Arithmetic, not ``argmax``: XLA:CPU lowers ``argmax`` to a variadic reduction it does not
    vectorise (5x slower), and ``ceil`` costs half of ``sign`` or a select there.
    """
    v_max = jnp.max(v_keep, -1)
    S = v_keep.shape[-1]
    iota = jax.lax.broadcasted_iota(jnp.float32, v_keep.shape, v_keep.ndim - 1)
    arg = jnp.min(iota + jnp.ceil(v_max[..., None] - v_keep) * S, -1).astype(jnp.int32)
    return v_max, arg


def _safe_sqrt(x: jax.Array) -> jax.Array:
    """``sqrt(x)`` for ``x >= 0`` with a finite gradient at 0 (the double-``where`` pattern).

    ``d sqrt(x)/dx`` is infinite at 0, and ``0 * inf`` is NaN however the result is masked
    afterwards, so empty rows (all-zero ``x``) would poison every gradient. The inner ``where``
    keeps the argument away from 0; the outer one restores the value 0 with a zero gradient.
    """
    pos = x > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, x, 1.0)), 0.0)


def _pair_terms(expected: jax.Array, mask: jax.Array) -> _PairTerms:
    """The expected side of :func:`query_metrics` for one sequence: [T, S] -> :class:`_PairTerms`.

    Float arithmetic throughout (no boolean or integer reductions): XLA:CPU vectorises float
    reductions, and these run once per table over every [T, S] pair.
    """
    mask = mask.astype(bool)
    keep = mask.astype(jnp.float32)
    e = jnp.where(mask, expected.astype(jnp.float32), 0.0)
    e_sum = e.sum(-1)
    n_keys = keep.sum(-1)
    valid = (e_sum > 0) & (n_keys > 0)
    e = e / jnp.where(e_sum > 0, e_sum, 1.0)[:, None]
    e_max, e_arg = _first_argmax(e + (keep - 1.0))
    e_sq = jnp.sum(e * e, -1)
    return _PairTerms(
        e=e,
        keep=keep,
        e_log_e=jnp.sum(e * jnp.log(e + KL_EPS), -1),  # e is 0 off the mask, so those terms vanish
        e_norm=_safe_sqrt(e_sq),
        e_max=e_max,
        e_arg=e_arg,
        log_keys=jnp.where(n_keys > 1, jnp.log(jnp.maximum(n_keys, 1.0)), 0.0),
        valid=valid,
    )


def _head_terms(pt: _PairTerms, actual: jax.Array, row0: int | None = None) -> dict[str, jax.Array]:
    """The per-query metrics of one head on one sequence, given its :class:`_PairTerms`.

    Written with arithmetic instead of compare-and-select in the [T, S] passes: XLA:CPU
    vectorises ``ceil`` and multiplies but not selects inside a reduction, a 4-5x difference.

    Args:
        pt: the expected side, [T, S] leaves.
        actual: [T, S].
        row0: None for any mask. An int promises a causal-prefix mask: on every valid row ``i``
            the valid keys are exactly ``j <= row0 + i`` (``row0`` is the query index of row 0).
            Then ``pt.keep`` is never read: masked keys are zeroed by position, and as key 0 is
            always valid, the first maximum of the zeroed row lies on a valid key.
    """
    x = actual.astype(jnp.float32)
    if row0 is None:
        a = x * pt.keep
        a_keep = a + (pt.keep - 1.0)
    else:
        rows = jax.lax.broadcasted_iota(jnp.int32, x.shape, 0) + row0
        # A select is fine here: XLA writes this masked copy in its own loop, outside the reductions.
        a = jnp.where(jax.lax.broadcasted_iota(jnp.int32, x.shape, 1) <= rows, x, 0.0)
        a_keep = a
    a_sum = a.sum(-1)
    s = jnp.where(a_sum > 0, a_sum, 1.0)
    # log(a/s + eps) = log(a + eps*s) - log(s): no [T, S] division.
    log_s = jnp.log(s)
    log_a = jnp.log(a + (KL_EPS * s)[:, None])
    kl = jnp.maximum(pt.e_log_e - (jnp.sum(pt.e * log_a, -1) - log_s), 0.0)
    # Entropy from a * log(a + tiny): its own log, so XLA fuses each log into its reduction instead of
    # writing a [T, S] log(a) for both; tiny only keeps 0 * log(0) at 0.
    tiny = jnp.finfo(jnp.float32).tiny
    ent = jnp.maximum(-(jnp.sum(a * jnp.log(a + tiny), -1) / s - log_s), 0.0)
    entropy = jnp.where(pt.log_keys > 0, ent / jnp.where(pt.log_keys > 0, pt.log_keys, 1.0), 1.0)
    # cos(e, a/s) = cos(e, a): the row sum cancels.
    denom = pt.e_norm * _safe_sqrt(jnp.sum(a * a, -1))
    cosine = jnp.clip(jnp.sum(pt.e * a, -1) / jnp.where(denom > 0, denom, 1.0), 0.0, 1.0)
    _, a_arg = _first_argmax(a_keep)
    match = (a_arg == pt.e_arg).astype(jnp.float32)
    e_at_a = jnp.take_along_axis(pt.e, a_arg[:, None], -1)[:, 0]
    tied = (e_at_a >= pt.e_max * (1.0 - TIE_RTOL)).astype(jnp.float32)
    out = {"kl": kl, "cosine": cosine, "argmax_match": match, "argmax_match_tied": tied, "entropy": entropy}
    return {k: jnp.where(pt.valid, v, 0.0) for k, v in out.items()} | {"valid": pt.valid}


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
    return _head_terms(_pair_terms(jnp.asarray(expected), jnp.asarray(mask)), jnp.asarray(actual))


def _means(q: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Means over a sequence's valid queries, and their number."""
    nq = q["valid"].sum()
    out = {k: q[k].sum() / jnp.maximum(nq, 1) for k in METRIC_NAMES}
    out["num_queries"] = nq.astype(jnp.int32)
    return out


def _sequence_metrics(expected: jax.Array, actual: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
    return _means(query_metrics(expected, actual, mask))


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


def _row_blocks(T: int, S: int, causal: bool) -> list[tuple[int, int, int]]:
    """Static blocks ``(r0, r1, c1)``: query rows ``[r0, r1)`` against keys ``[0, c1)``.

    With a causal mask, row block ``[r0, r1)`` needs keys ``[0, r1)`` only, so about half of
    the [T, T] pairs (all of them masked) are never read. Otherwise one block holds everything.
    """
    if not causal or T != S:
        return [(0, T, S)]
    nb = max(min(CAUSAL_ROW_BLOCKS, T // 16), 1)
    edges = [T * k // nb for k in range(nb + 1)]
    return [(r0, r1, r1) for r0, r1 in zip(edges[:-1], edges[1:], strict=True)]


def reduction_sizes(T: int, S: int) -> list[int]:
    """Per-sequence input sizes of the float sums in :func:`layer_head_metrics` (each is B times one of these).

    :mod:`jaxattn.alignment.sharded` sizes each shard's batch from these, so that every sum keeps
    the summation order XLA picks for it on one device.

    Args:
        T: query positions.
        S: key positions.

    Returns:
        The number of elements each per-sequence float sum reduces over.
    """
    blocks = _row_blocks(T, S, True) + _row_blocks(T, S, False)
    return [T] + [(r1 - r0) * c1 for r0, r1, c1 in blocks]


#: What :func:`_mask_kind` can say of a mask, in the order of :func:`layer_head_metrics`' branches.
_PREFIX, _CAUSAL, _GENERAL = 0, 1, 2


def _mask_kind(mask: jax.Array) -> jax.Array:
    """Which kernel a mask [..., T, S] allows: int32 [].

    ``_PREFIX``: every row is empty or exactly the keys ``j <= i`` (what :func:`expected_attention`
    builds). ``_CAUSAL``: no entry above the diagonal. ``_GENERAL``: anything else.
    """
    T, S = mask.shape[-2:]
    tri = np.tri(T, S, dtype=bool)
    if S % 4:
        rows, diag, above = mask.any(-1), mask == tri, mask & ~tri
    else:  # 4 booleans per uint32: a quarter of the elements to reduce

        def words(m: Any) -> jax.Array:
            m = jnp.asarray(m).astype(jnp.uint8)
            return jax.lax.bitcast_convert_type(m.reshape(*m.shape[:-1], S // 4, 4), jnp.uint32)

        w = words(mask)
        rows, diag, above = (w != 0).any(-1), w == words(tri), (w & words(~tri)) != 0
    prefix = jnp.all(diag | ~rows[..., None])
    return jnp.where(prefix, _PREFIX, jnp.where(jnp.any(above), _GENERAL, _CAUSAL)).astype(jnp.int32)


def _block(tree: Any, r0: int, r1: int, c1: int) -> Any:
    """Rows ``[r0, r1)`` and keys ``[0, c1)`` of every leaf: [B, T, S] -> [B, r1-r0, c1], [B, T] -> [B, r1-r0]."""
    return jax.tree.map(lambda x: x[:, r0:r1, :c1] if x.ndim == 3 else x[:, r0:r1], tree)


def _host_mask_kind(mask: Any) -> int | None:
    """:func:`_mask_kind` of a concrete mask, on the host; None for a traced one."""
    if isinstance(mask, jax.core.Tracer):
        return None
    m: np.ndarray = np.asarray(mask, dtype=np.bool_)
    T, S = m.shape[-2:]
    tri: np.ndarray = np.tri(T, S) > 0
    rows: np.ndarray = np.any(m, axis=-1)
    if np.all((m == tri) | np.logical_not(rows)[..., None]):
        return _PREFIX
    return _GENERAL if np.any(m & np.logical_not(tri)) else _CAUSAL


def layer_head_metrics(
    expected: Float[ArrayLike, "P B T T"],
    mask: Bool[ArrayLike, "P B T T"],
    pair_index: Integer[ArrayLike, "L H"],
    attn: Float[ArrayLike, "B L H T T"],
) -> dict[str, Array]:
    """Metrics for every layer, head and sequence in one jitted call.

    A concrete mask's kind is found on the host, so only its branch is traced and compiled (the
    three branches cost half a second of tracing per process); a traced mask picks its branch on
    the device.

    The expected side (:class:`_PairTerms`) is computed once per (n, s) table and sequence, not
    once per head. A loop over the tables runs an inner loop over the heads that use that table,
    so each table's terms are sliced into row blocks once and every head reads them in place. The
    kernel runs vmapped over the B sequences of one head at a time: temporaries are [B, T, T],
    not [L, H, B, T, T]. The mask picks one of three branches, checked on the data
    (:func:`_mask_kind`): for a causal-prefix mask (the one :func:`expected_attention` builds)
    the row blocks of :func:`_row_blocks` skip the upper triangle and the head kernel masks by
    position, never reading the mask; for another mask with nothing above the diagonal the row
    blocks read the mask; otherwise the full kernel runs.

    Args:
        expected: [P, B, T, T] expected attention per distinct (n, s).
        mask: bool [P, B, T, T].
        pair_index: int32 [L, H], which (n, s) each head uses (clipped to ``[0, P)``).
        attn: [B, L, H, T, T] actual attention.

    Returns:
        dict of [L, H, B] arrays (see :func:`alignment_metrics`).
    """
    return _layer_head_metrics(expected, mask, pair_index, attn, kind=_host_mask_kind(mask))


@functools.partial(jax.jit, static_argnames=("kind",))
def _layer_head_metrics(
    expected: Float[Array, "P B T T"],
    mask: Bool[Array, "P B T T"],
    pair_index: Integer[Array, "L H"],
    attn: Float[Array, "B L H T T"],
    *,
    kind: int | None,
) -> dict[str, Array]:
    """:func:`layer_head_metrics` with the mask's kind given (static), or None to pick it on the device."""
    expected, mask = jnp.asarray(expected), jnp.asarray(mask, bool)
    B, L, H, T, S = attn.shape
    P = expected.shape[0]
    head_pair = jnp.clip(jnp.asarray(pair_index, jnp.int32).reshape(L * H), 0, P - 1)
    order = jnp.argsort(head_pair, stable=True).astype(jnp.int32)  # heads grouped by table
    n_heads = jnp.bincount(head_pair, length=P).astype(jnp.int32)
    first = jnp.cumsum(n_heads) - n_heads
    init = {k: jnp.zeros((L * H, B), jnp.float32) for k in METRIC_NAMES} | {
        "num_queries": jnp.zeros((L * H, B), jnp.int32)
    }

    def run(blocks: list[tuple[int, int, int]], prefix: bool) -> dict[str, jax.Array]:
        def table(p: jax.Array, out: dict[str, jax.Array]) -> dict[str, jax.Array]:
            ex, mk = expected[p], mask[p]
            pt_blocks = [jax.vmap(_pair_terms)(*_block((ex, mk), *blk)) for blk in blocks]

            def head(k: jax.Array, out: dict[str, jax.Array]) -> dict[str, jax.Array]:
                lh = order[k]
                x = attn[:, lh // H, lh % H]
                parts = [
                    jax.vmap(functools.partial(_head_terms, row0=blk[0] if prefix else None))(pt, _block(x, *blk))
                    for pt, blk in zip(pt_blocks, blocks, strict=True)
                ]
                q = {name: jnp.concatenate([part[name] for part in parts], 1) for name in parts[0]}
                res = jax.vmap(_means)(q)
                return {name: out[name].at[lh].set(res[name]) for name in out}

            return jax.lax.fori_loop(first[p], first[p] + n_heads[p], head, out)

        return jax.lax.fori_loop(0, P, table, init)

    branches = [  # indexed by _mask_kind
        lambda: run(_row_blocks(T, S, True), prefix=True),
        lambda: run(_row_blocks(T, S, True), prefix=False),
        lambda: run(_row_blocks(T, S, False), prefix=False),
    ]
    out = jax.lax.switch(_mask_kind(mask), branches) if kind is None else branches[kind]()
    return {k: v.reshape(L, H, B) for k, v in out.items()}
