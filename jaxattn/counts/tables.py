"""Skip-n-gram count tensors, stored sparse and made dense only over observed contexts.

Axis vocabulary used in this module:
    N  corpus length (tokens)
    R  number of observed n-gram contexts (rows)
    V  vocabulary size (columns)
    Z  number of non-zero counts (nnz)

``C^{n,s}[a, b] = #{ i : tokens[i:i+n] = a and tokens[i+n+s] = b }``, with windows
that never cross a document boundary (SPEC §2).

The windows are counted by :mod:`jaxattn.counts.kernels` (one device) or
:mod:`jaxattn.counts.sharded` (a device mesh) as sorted packed keys; this module validates the
corpus, turns the keys into :class:`CountMatrix` tables and derives P and M from them.
"""

# ruff: noqa: F722  (jaxtyping shape strings such as "R V" are not Python expressions)
from __future__ import annotations

import dataclasses
import os
from typing import Any, NamedTuple

import numpy as np

from jaxattn.counts.kernels import count_keys, count_tables_keys, segment_starts
from jaxattn.counts.keys import INT32_MAX, key_dtype, pack_ngrams, unpack_ngrams
from jaxattn.counts.sharded import sharded_count_keys
from jaxattn.errors import JaxattnError, MemoryBudgetError
from jaxattn.progress import progress_iter
from jaxattn.typing import ArrayLike, Float, Int, Integer

#: Default budget for any dense array jaxattn materialises (bytes). Override with the
#: ``JAXATTN_MAX_DENSE_BYTES`` environment variable or the ``max_dense_bytes`` arguments.
DEFAULT_MAX_DENSE_BYTES = 4 * 1024**3

__all__ = [
    "DEFAULT_MAX_DENSE_BYTES",
    "CountMatrix",
    "SparseMatrix",
    "check_dense_size",
    "count_matrix",
    "count_tables",
    "dense_budget",
    "manifold_matrix",
    "probability_matrix",
    "tables_from_keys",
    "validate_tokens",
]


def dense_budget(max_dense_bytes: int | None = None) -> int:
    """Returns the dense-allocation budget in bytes (argument, env var, then default)."""
    if max_dense_bytes is not None:
        return int(max_dense_bytes)
    env = os.environ.get("JAXATTN_MAX_DENSE_BYTES")
    if env:
        try:
            return int(float(env))
        except ValueError as e:
            raise JaxattnError(f"JAXATTN_MAX_DENSE_BYTES={env!r} is not a number of bytes") from e
    return DEFAULT_MAX_DENSE_BYTES


def check_dense_size(shape: tuple[int, ...], itemsize: int, what: str, max_dense_bytes: int | None = None) -> None:
    """Refuses (before allocating) a dense array that would exceed the memory budget.

    Raises:
        MemoryBudgetError: naming the shape, the estimated size and the budget.
    """
    budget = dense_budget(max_dense_bytes)
    size = int(np.prod(np.asarray(shape, dtype=np.float64))) * itemsize
    if size > budget:
        raise MemoryBudgetError(
            f"dense {what} of shape {tuple(int(d) for d in shape)} needs {_fmt_bytes(size)}, over the "
            f"memory budget of {_fmt_bytes(budget)} (raise it with max_dense_bytes= or "
            f"JAXATTN_MAX_DENSE_BYTES, or use the sparse form)"
        )


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} PiB"


class SparseMatrix(NamedTuple):
    """A COO sparse matrix: ``M[rows[z], cols[z]] = values[z]``; sorted by row, then column.

    Attributes:
        rows: int32 [Z].
        cols: int32 [Z].
        values: float32 or int [Z].
        shape: (R, V).
    """

    rows: np.ndarray
    cols: np.ndarray
    values: np.ndarray
    shape: tuple[int, int]

    def todense(self, max_dense_bytes: int | None = None) -> np.ndarray:
        """Dense [R, V] copy, refused over the memory budget."""
        check_dense_size(self.shape, np.dtype(self.values.dtype).itemsize, "matrix", max_dense_bytes)
        out = np.zeros(self.shape, dtype=self.values.dtype)
        out[self.rows, self.cols] = self.values
        return out


@dataclasses.dataclass(frozen=True, eq=False)
class CountMatrix:
    """Sparse count table ``C^{n,s}`` over observed contexts.

    Attributes:
        n: context length.
        s: skip.
        vocab_size: V.
        contexts: int32 [R, n], observed n-grams sorted lexicographically.
        rows: int32 [Z], row into ``contexts`` of each non-zero.
        cols: int32 [Z], target token of each non-zero.
        values: int32 (int64 if a count overflows int32) [Z], sorted by row then column.
        num_windows: number of counted windows (== values.sum()).
        max_dense_bytes: budget for :attr:`counts` (None: the global default).
    """

    n: int
    s: int
    vocab_size: int
    contexts: np.ndarray
    rows: np.ndarray
    cols: np.ndarray
    values: np.ndarray
    num_windows: int
    max_dense_bytes: int | None = None

    @property
    def num_contexts(self) -> int:
        """R, the number of observed contexts."""
        return int(self.contexts.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """(R, V)."""
        return (self.num_contexts, int(self.vocab_size))

    @property
    def nnz(self) -> int:
        """Z, the number of non-zero counts."""
        return int(self.values.shape[0])

    @property
    def counts(self) -> np.ndarray:
        """Dense int [R, V] counts; refused with the size and budget when too large."""
        return self.sparse().todense(self.max_dense_bytes)

    def sparse(self) -> SparseMatrix:
        """The counts as a :class:`SparseMatrix` (no copy)."""
        return SparseMatrix(self.rows, self.cols, self.values, self.shape)

    @property
    def row_sums(self) -> np.ndarray:
        """int64 [R], D_row."""
        return np.bincount(self.rows, weights=self.values.astype(np.float64), minlength=self.num_contexts).astype(
            np.int64
        )

    @property
    def col_sums(self) -> np.ndarray:
        """int64 [V], D_col."""
        return np.bincount(self.cols, weights=self.values.astype(np.float64), minlength=self.vocab_size).astype(
            np.int64
        )

    def context_keys(self) -> np.ndarray:
        """Sorted packed keys [R] of :attr:`contexts`."""
        return pack_ngrams(self.contexts, self.vocab_size, key_dtype(self.vocab_size, self.n))

    def context_index(self, ngrams: Integer[ArrayLike, "*batch n"]) -> Int[np.ndarray, "*batch"]:
        """Row index of each n-gram, or -1 when it was never observed.

        Args:
            ngrams: int [..., n].

        Returns:
            int32 [...].
        """
        ngrams = np.asarray(ngrams)
        if ngrams.shape[-1] != self.n:
            raise JaxattnError(f"context_index expects n-grams of length n={self.n}, got {ngrams.shape[-1]}")
        keys = self.context_keys()
        q = pack_ngrams(ngrams, self.vocab_size, keys.dtype)
        idx = np.searchsorted(keys, q)
        idx_c = np.minimum(idx, max(len(keys) - 1, 0))
        found = (idx < len(keys)) & (keys[idx_c] == q) if len(keys) else np.zeros(q.shape, bool)
        return np.where(found, idx_c, -1).astype(np.int32)

    def lookup(
        self, rows: Integer[ArrayLike, "*#rb"], cols: Integer[ArrayLike, "*#cb"]
    ) -> Integer[np.ndarray, "*shape"]:
        """Counts ``C[rows, cols]`` for arbitrary index arrays (0 where absent; rows may be -1).

        Args:
            rows: int [...], row indices (−1 allowed: gives 0).
            cols: int [...], token ids, broadcastable with rows.

        Returns:
            counts with the broadcast shape, same dtype as :attr:`values`.
        """
        rows, cols = np.broadcast_arrays(np.asarray(rows), np.asarray(cols))
        keys = self.rows.astype(np.int64) * self.vocab_size + self.cols
        q = rows.astype(np.int64) * self.vocab_size + cols
        idx = np.searchsorted(keys, q)
        idx_c = np.minimum(idx, max(len(keys) - 1, 0))
        if not len(keys):
            return np.zeros(q.shape, self.values.dtype)
        found = (rows >= 0) & (idx < len(keys)) & (keys[idx_c] == q)
        return np.where(found, self.values[idx_c], 0).astype(self.values.dtype)

    def __repr__(self) -> str:
        return (
            f"CountMatrix(n={self.n}, s={self.s}, vocab_size={self.vocab_size}, contexts={self.num_contexts}, "
            f"nnz={self.nnz}, windows={self.num_windows})"
        )


def validate_tokens(
    tokens: Any, n: int, s: int, vocab_size: int, doc_ids: Any
) -> tuple[Integer[np.ndarray, " N"], Int[np.ndarray, " N"] | None]:
    """Checks a corpus and the table's parameters; returns the tokens and their segment ids.

    Args:
        tokens: int [N] token ids in ``[0, vocab_size)`` (numpy or jax).
        n: context length, >= 1.
        s: skip, >= 0.
        vocab_size: V, >= 1.
        doc_ids: optional [N] document ids; a change of id starts a new document.

    Returns:
        The tokens as a numpy int [N] array, and int32 (int64 for a corpus over int32) [N]
        segment ids ``0, 0, ..., 1, 1, ...`` numbering the documents, or None without doc_ids.

    Raises:
        JaxattnError: naming the bad value (n, s, V, shape, dtype, token id, doc_ids shape).
    """
    if int(n) < 1:
        raise JaxattnError(f"n={n} must be >= 1")
    if int(s) < 0:
        raise JaxattnError(f"s={s} must be >= 0")
    if int(vocab_size) < 1:
        raise JaxattnError(f"vocab_size={vocab_size} must be >= 1")
    tok = np.asarray(tokens)
    if tok.ndim != 1:
        raise JaxattnError(f"tokens must be a 1-D int array, got shape {tok.shape}")
    if tok.size == 0:
        raise JaxattnError("corpus is empty: tokens has length 0")
    if not np.issubdtype(tok.dtype, np.integer):
        raise JaxattnError(f"tokens must be integers, got dtype {tok.dtype}")
    lo, hi = int(tok.min()), int(tok.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise JaxattnError(f"token id {bad} is outside [0, vocab_size={vocab_size})")
    seg = None
    if doc_ids is not None:
        d = np.asarray(doc_ids)
        if d.shape != tok.shape:
            raise JaxattnError(f"doc_ids shape {d.shape} differs from tokens shape {tok.shape}")
        # A document boundary is wherever the id changes; segments are contiguous runs. Built
        # in place (int32 when it fits) so a 1e8-token corpus costs one array, not four.
        seg = np.zeros(tok.shape, np.int32 if tok.size < INT32_MAX else np.int64)
        seg[1:][d[1:] != d[:-1]] = 1
        np.cumsum(seg, out=seg)
    return tok, seg


def count_matrix(
    tokens: Integer[ArrayLike, " N"],
    n: int,
    s: int,
    vocab_size: int,
    *,
    doc_ids: Integer[ArrayLike, " N"] | None = None,
    mesh: Any = None,
    max_dense_bytes: int | None = None,
) -> CountMatrix:
    """Counts ``C^{n,s}`` sparse-then-dense: never allocates ``V**n x V``.

    Args:
        tokens: int [N] token ids in ``[0, vocab_size)`` (numpy or jax).
        n: context length, >= 1.
        s: skip, >= 0.
        vocab_size: V.
        doc_ids: optional int [N]; the document of each token. No window spans two.
        mesh: optional ``jax.sharding.Mesh``; shards the corpus over its devices and
            reduces exactly (see :mod:`jaxattn.counts.sharded`).
        max_dense_bytes: budget for the dense :attr:`CountMatrix.counts`.

    Returns:
        The :class:`CountMatrix`, with contexts sorted lexicographically and the COO
        triplets sorted by row then column.

    Raises:
        JaxattnError: empty corpus, a corpus shorter than n+s+1 (no window), ids out of
            range, or keys that overflow int64.
    """
    tok, seg = validate_tokens(tokens, n, s, vocab_size, doc_ids)
    n, s, vocab_size = int(n), int(s), int(vocab_size)
    if mesh is not None:
        keys, vals = sharded_count_keys(tok, seg, n, s, vocab_size, mesh)
    else:
        keys, vals = count_keys(tok, seg, n, s, vocab_size)
    if vals.size == 0:
        longest = _longest_segment(tok.shape[0], seg)
        raise JaxattnError(
            f"corpus too short for n={n}, s={s}: a window needs n+s+1={n + s + 1} tokens in one "
            f"document, the longest document has {longest}"
        )
    return _from_keys(keys, vals, n, s, vocab_size, max_dense_bytes)


def _no_window_error(n: int, s: int, tokens: Any, doc_ids: Any) -> JaxattnError:
    """The error :func:`count_matrix` raises when no window of ``n+s+1`` tokens fits in a document."""
    length = int(np.shape(tokens)[0])
    bounds = np.concatenate([[0], segment_starts(doc_ids), [length]])
    longest = int(np.diff(bounds).max())
    return JaxattnError(
        f"corpus too short for n={n}, s={s}: a window needs n+s+1={n + s + 1} tokens in one "
        f"document, the longest document has {longest}"
    )


def tables_from_keys(
    keyed: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]],
    vocab_size: int,
    max_dense_bytes: int | None = None,
    *,
    longest_doc: int | None = None,
    consume: bool = False,
) -> dict[tuple[int, int], CountMatrix]:
    """Turns sorted unique keys and counts into tables, as :func:`count_tables` does at its end.

    Args:
        keyed: ``{(n, s): (keys [Z], counts [Z])}``: sorted unique packed ``(context, target)``
            keys (``key_dtype(V, n)``) and their positive counts (int32, or int64 over int32).
        vocab_size: V.
        max_dense_bytes: budget for the dense counts of every table.
        longest_doc: the longest document's length, named by the error for a table without windows.
        consume: remove each entry from ``keyed`` once its table is built, so that the peak memory
            is the tables plus one keyed table, not plus all of them.

    Returns:
        ``{(n, s): CountMatrix}``, in ``(n, s)`` order.

    Raises:
        JaxattnError: a table without windows (the first in ``(n, s)`` order), as :func:`count_tables`.
    """
    out: dict[tuple[int, int], CountMatrix] = {}
    for n, s in sorted(keyed):
        keys, vals = keyed.pop((n, s)) if consume else keyed[(n, s)]
        if vals.size == 0:
            longest = "?" if longest_doc is None else str(int(longest_doc))
            raise JaxattnError(
                f"corpus too short for n={n}, s={s}: a window needs n+s+1={n + s + 1} tokens in one "
                f"document, the longest document has {longest}"
            )
        out[(n, s)] = _from_keys(keys, vals, int(n), int(s), int(vocab_size), max_dense_bytes)
    return out


def _longest_segment(length: int, seg: np.ndarray | None) -> int:
    if seg is None:
        return length
    return int(np.bincount(seg).max())


def _from_keys(
    keys: np.ndarray, vals: np.ndarray, n: int, s: int, vocab_size: int, max_dense_bytes: int | None
) -> CountMatrix:
    """Builds a CountMatrix from sorted unique (context*V + target) keys."""
    dt = keys.dtype.type
    ctx_key, cols = np.divmod(keys, dt(vocab_size))
    cols = cols.astype(np.int32)
    # Rows: rank of each context key among the distinct ones (keys are sorted).
    new_row = np.empty(ctx_key.shape, dtype=bool)
    new_row[:1] = True
    np.not_equal(ctx_key[1:], ctx_key[:-1], out=new_row[1:])
    rows = np.cumsum(new_row, dtype=np.int32)
    rows -= 1
    uniq = ctx_key[new_row]
    del ctx_key
    contexts = unpack_ngrams(uniq, vocab_size, n)
    return CountMatrix(
        n=n,
        s=s,
        vocab_size=vocab_size,
        contexts=contexts,
        rows=rows,
        cols=cols,
        values=vals,
        num_windows=int(vals.sum(dtype=np.int64)),
        max_dense_bytes=max_dense_bytes,
    )


def count_tables(
    tokens: Integer[ArrayLike, " N"],
    vocab_size: int,
    max_n: int,
    max_s: int,
    *,
    doc_ids: Integer[ArrayLike, " N"] | None = None,
    mesh: Any = None,
    max_dense_bytes: int | None = None,
    progress: bool = False,
) -> dict[tuple[int, int], CountMatrix]:
    """Counts every table ``C^{n,s}`` for ``1 <= n <= max_n`` and ``0 <= s <= max_s``.

    Args:
        tokens: int [N] token ids in ``[0, vocab_size)`` (numpy or jax).
        vocab_size: V.
        max_n: largest context length.
        max_s: largest skip.
        doc_ids: optional int [N], the document of each token (see :func:`count_matrix`).
        mesh: optional ``jax.sharding.Mesh`` to shard the counting over.
        max_dense_bytes: budget for the dense counts of every table.
        progress: show a progress bar over the tables.

    Returns:
        ``{(n, s): CountMatrix}`` with ``max_n * (max_s + 1)`` tables.

    Raises:
        JaxattnError: as for :func:`count_matrix`.
    """
    pairs = [(n, s) for n in range(1, max_n + 1) for s in range(max_s + 1)]
    out: dict[tuple[int, int], CountMatrix] = {}
    if mesh is None and pairs:
        # One fused pass for every table (shared context keys; smaller n by exact marginalisation).
        tok, _ = validate_tokens(tokens, 1, 0, int(vocab_size), None)
        if doc_ids is not None and np.shape(doc_ids) != tok.shape:
            raise JaxattnError(f"doc_ids shape {np.shape(doc_ids)} differs from tokens shape {tok.shape}")
        keyed = count_tables_keys(tok, int(vocab_size), int(max_n), int(max_s), doc_ids)
        for n, s in progress_iter(pairs, desc="counting", enabled=progress):
            keys, vals = keyed.pop((n, s))
            if vals.size == 0:
                raise _no_window_error(n, s, tokens, doc_ids)
            out[(n, s)] = _from_keys(keys, vals, n, s, int(vocab_size), max_dense_bytes)
        return out
    for n, s in progress_iter(pairs, desc="counting", enabled=progress):
        out[(n, s)] = count_matrix(
            tokens, n, s, vocab_size, doc_ids=doc_ids, mesh=mesh, max_dense_bytes=max_dense_bytes
        )
    return out


def probability_matrix(cm: CountMatrix, *, sparse: bool = False) -> Float[np.ndarray, "R V"] | SparseMatrix:
    """``P = C / rowsum(C)``.

    Args:
        cm: the counts.
        sparse: return a :class:`SparseMatrix` with the same sparsity as ``cm``.

    Returns:
        float32 [R, V] (dense, refused over the memory budget) or SparseMatrix.
        Rows with zero sum are all zero (never NaN).
    """
    rs = cm.row_sums.astype(np.float64)
    denom = np.where(rs > 0, rs, 1.0)
    vals = (cm.values.astype(np.float64) / denom[cm.rows]).astype(np.float32)
    sm = SparseMatrix(cm.rows, cm.cols, vals, cm.shape)
    return sm if sparse else sm.todense(cm.max_dense_bytes)


def manifold_matrix(cm: CountMatrix, *, sparse: bool = False) -> Float[np.ndarray, "R V"] | SparseMatrix:
    """``M[a, b] = C[a, b] / sqrt(D_row[a] * D_col[b])`` (zero where a sum is zero).

    Args:
        cm: the counts.
        sparse: return a :class:`SparseMatrix` with the same sparsity as ``cm``.

    Returns:
        float32 [R, V] or SparseMatrix.
    """
    rs = cm.row_sums.astype(np.float64)
    cs = cm.col_sums.astype(np.float64)
    d = rs[cm.rows] * cs[cm.cols]
    vals = np.where(d > 0, cm.values / np.sqrt(np.where(d > 0, d, 1.0)), 0.0).astype(np.float32)
    sm = SparseMatrix(cm.rows, cm.cols, vals, cm.shape)
    return sm if sparse else sm.todense(cm.max_dense_bytes)
