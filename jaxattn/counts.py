"""Skip-n-gram count tensors, stored sparse and made dense only over observed contexts.

Axis vocabulary used in this module:
    N  corpus length (tokens)
    R  number of observed n-gram contexts (rows)
    V  vocabulary size (columns)
    Z  number of non-zero counts (nnz)

``C^{n,s}[a, b] = #{ i : tokens[i:i+n] = a and tokens[i+n+s] = b }``, with windows
that never cross a document boundary (SPEC §2).
"""

# ruff: noqa: F722  (jaxtyping shape strings such as "R V" are not Python expressions)
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, NamedTuple

import numpy as np

from jaxattn.errors import JaxattnError, MemoryBudgetError
from jaxattn.typing import ArrayLike, Float, Int, Integer

#: Default budget for any dense array jaxattn materialises (bytes). Override with the
#: ``JAXATTN_MAX_DENSE_BYTES`` environment variable or the ``max_dense_bytes`` arguments.
DEFAULT_MAX_DENSE_BYTES = 4 * 1024**3

_INT32_MAX = np.iinfo(np.int32).max
_INT64_MAX = np.iinfo(np.int64).max


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


def key_dtype(vocab_size: int, n: int) -> np.dtype:
    """Integer dtype able to hold packed ``(n+1)``-token keys ``< vocab_size**(n+1)``.

    Keys use int32 when they fit and switch to int64 otherwise.

    Raises:
        JaxattnError: if even int64 overflows (the vocabulary size and n are named).
    """
    top = int(vocab_size) ** (n + 1)
    if top - 1 <= _INT32_MAX:
        return np.dtype(np.int32)
    if top - 1 <= _INT64_MAX:
        return np.dtype(np.int64)
    raise JaxattnError(
        f"vocab_size={vocab_size} with n={n}: packed keys reach vocab_size**(n+1)={top}, "
        f"which overflows int64; reduce the vocabulary (e.g. --max-vocab) or n"
    )


def pack_ngrams(
    ngrams: Integer[ArrayLike, "*batch n"], vocab_size: int, dtype: np.dtype | None = None
) -> Integer[np.ndarray, "*batch"]:
    """Packs n-grams into integer keys in lexicographic order.

    Args:
        ngrams: int [..., n] token ids.
        vocab_size: V.
        dtype: key dtype; default from :func:`key_dtype`.

    Returns:
        int [...] keys ``sum_k ngrams[..., k] * V**(n-1-k)``.
    """
    ngrams = np.asarray(ngrams)
    n = ngrams.shape[-1]
    dt = dtype or key_dtype(vocab_size, max(n - 1, 0))
    key = np.zeros(ngrams.shape[:-1], dtype=dt)
    for k in range(n):
        key = key * dt.type(vocab_size) + ngrams[..., k].astype(dt)
    return key


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


def _validate(tokens: Any, n: int, s: int, vocab_size: int, doc_ids: Any) -> tuple[np.ndarray, np.ndarray | None]:
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
        seg = np.zeros(tok.shape, np.int32 if tok.size < _INT32_MAX else np.int64)
        seg[1:][d[1:] != d[:-1]] = 1
        np.cumsum(seg, out=seg)
    return tok, seg


def valid_window_starts(length: int, n: int, s: int, segments: np.ndarray | None) -> np.ndarray:
    """Boolean [N - n - s] mask of window starts that stay inside one document."""
    span = n + s
    m = max(length - span, 0)
    if segments is None:
        return np.ones(m, dtype=bool)
    return segments[:m] == segments[span : span + m]


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
            reduces exactly (see :mod:`jaxattn.sharding`).
        max_dense_bytes: budget for the dense :attr:`CountMatrix.counts`.

    Returns:
        The :class:`CountMatrix`, with contexts sorted lexicographically and the COO
        triplets sorted by row then column.

    Raises:
        JaxattnError: empty corpus, a corpus shorter than n+s+1 (no window), ids out of
            range, or keys that overflow int64.
    """
    tok, seg = _validate(tokens, n, s, vocab_size, doc_ids)
    n, s, vocab_size = int(n), int(s), int(vocab_size)
    if mesh is not None:
        from jaxattn import sharding  # local import: keeps jax.sharding off the import path

        keys, vals = sharding.sharded_count_keys(tok, seg, n, s, vocab_size, mesh)
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
    bounds = np.concatenate([[0], _segment_starts(doc_ids), [length]])
    longest = int(np.diff(bounds).max())
    return JaxattnError(
        f"corpus too short for n={n}, s={s}: a window needs n+s+1={n + s + 1} tokens in one "
        f"document, the longest document has {longest}"
    )


def _longest_segment(length: int, seg: np.ndarray | None) -> int:
    if seg is None:
        return length
    return int(np.bincount(seg).max())


def count_keys(
    tok: np.ndarray, seg: np.ndarray | None, n: int, s: int, vocab_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique packed (context, target) keys and their counts.

    Small key spaces (``V**(n+1)`` up to ``_DENSE_BINS_MAX``, char level) count into one int32 bin
    per key: numpy's bincount for small corpora, else the jitted scatter-add kernel on the default
    jax device. Large key spaces (word level) sort int64 keys in place: memory O(N + nnz).

    Returns:
        keys: int32/int64 [Z] sorted ascending; counts: int [Z] > 0.
    """
    dt = key_dtype(vocab_size, n)
    span = n + s
    m = max(tok.shape[0] - span, 0)
    if m == 0:
        return np.zeros(0, dt), np.zeros(0, np.int32)
    starts = _segment_starts(seg)
    if _dense_ok(vocab_size, n, m):
        t = _narrow_tokens(tok, vocab_size)
        return _dense_to_keys(_dense_table_counts(t, starts, n, (s,), vocab_size)[0], dt)
    return _sorted_count_keys(tok, starts, n, s, vocab_size)


def _shrink_counts(vals: np.ndarray) -> np.ndarray:
    if vals.size and int(vals.max()) > _INT32_MAX:
        return vals.astype(np.int64)
    return vals.astype(np.int32)


# --- fast counting ------------------------------------------------------------------------------
# Windows are counted with packed integer keys. When V**(n+1) is small (char level) every key has
# its own int32 bin: a jitted scatter-add (the same code on CPU, GPU and TPU). Larger key spaces
# (word level) sort int64 keys in place, so memory stays O(N + nnz), never O(V**n * V).
# Document boundaries are not tested per window: the few windows that cross one are counted
# with everything else and then subtracted, which costs O(num_docs * (n+s)), not a pass over N.

#: Dense bins (one int32 per possible key) are used up to this many keys per table.
_DENSE_BINS_MAX = 1 << 24
#: Below this many windows numpy's bincount is used (nothing to compile or dispatch).
_JAX_MIN_WINDOWS = 1 << 20
#: Windows per kernel launch: keeps every int32 bin (and position) far from overflow.
_MAX_WINDOWS_PER_LAUNCH = 1 << 30
#: Windows per piece when building sort keys (a piece's temporaries stay in cache).
_KEY_PIECE = 1 << 16
#: Token positions per scatter in the kernel's loop: small enough on CPU that the chunk's keys stay in
#: cache, large on accelerators so each scatter has enough parallel work.
_CHUNK_CPU = 1 << 16
_CHUNK_ACCEL = 1 << 22


def _dense_ok(vocab_size: int, n: int, num_windows: int) -> bool:
    """True when ``V**(n+1)`` int32 bins are affordable and not much larger than the corpus."""
    nbins = vocab_size ** (n + 1)
    return nbins <= _DENSE_BINS_MAX and nbins <= max(8 * num_windows, 1 << 16)


def _narrow_tokens(tok: np.ndarray, vocab_size: int) -> np.ndarray:
    """Tokens in the smallest unsigned dtype holding ids < V (1 byte per char-level token)."""
    dt = np.uint8 if vocab_size <= 1 << 8 else np.uint16 if vocab_size <= 1 << 16 else np.int32
    return tok.astype(dt, copy=False)


def _segment_starts(doc_ids: Any) -> np.ndarray:
    """int64 positions ``p > 0`` where a new document (or segment) starts."""
    if doc_ids is None:
        return np.zeros(0, np.int64)
    d = np.asarray(doc_ids)
    return (np.flatnonzero(d[1:] != d[:-1]) + 1).astype(np.int64)


def _crossing_starts(starts: np.ndarray, length: int, span: int) -> np.ndarray:
    """Sorted int64 window starts ``i < length - span`` whose window ``[i, i+span]`` spans a boundary.

    Window ``i`` crosses boundary ``b`` exactly when ``b - span <= i < b``.
    """
    m = length - span
    if starts.size == 0 or m <= 0:
        return np.zeros(0, np.int64)
    idx = (starts[:, None] - np.arange(1, span + 1, dtype=np.int64)[None, :]).ravel()
    return np.unique(idx[(idx >= 0) & (idx < m)])


def _head_windows(starts: np.ndarray, length: int, span: int) -> np.ndarray:
    """int64 window starts at a document's first token whose window stays inside that document."""
    heads = np.concatenate([np.zeros(1, np.int64), starts])
    nxt = np.append(starts, length)  # the boundary after each head
    return heads[heads + span < nxt]


def _window_keys(t: np.ndarray, idx: np.ndarray, n: int, s: int, vocab_size: int, dt: Any = np.int64) -> np.ndarray:
    """Packed keys ``(t[i:i+n], t[i+n+s])`` of the windows starting at ``idx``."""
    key = t[idx].astype(dt)
    for k in range(1, n):
        key = key * dt(vocab_size) + t[idx + k]
    return key * dt(vocab_size) + t[idx + n + s]


def _dense_counts_numpy(t: np.ndarray, n: int, skips: tuple[int, ...], vocab_size: int) -> np.ndarray:
    """int64 [S, V**(n+1)] counts of every window (documents ignored), the context key shared over skips."""
    length = t.shape[0]
    nbins = vocab_size ** (n + 1)
    out = np.zeros((len(skips), nbins), np.int64)
    m0 = length - n - min(skips)
    if m0 <= 0:
        return out
    ctx = t[:m0].astype(np.int64)
    for k in range(1, n):
        ctx *= vocab_size
        ctx += t[k : k + m0]
    ctx *= vocab_size
    buf = np.empty_like(ctx)
    for i, s in enumerate(skips):
        m = length - n - s
        if m > 0:
            np.add(ctx[:m], t[n + s : n + s + m], out=buf[:m])
            out[i] = np.bincount(buf[:m], minlength=nbins)
    return out


def _chunk_size() -> int:
    return _CHUNK_CPU if _platform() == "cpu" else _CHUNK_ACCEL


def _platform() -> str:
    """Platform of the device jax computes on by default (honours ``jax.default_device``)."""
    import jax

    dev = jax.config.jax_default_device
    if dev is None:
        return jax.default_backend()
    return dev if isinstance(dev, str) else dev.platform


@functools.cache
def _count_kernel(n: int, skips: tuple[int, ...], vocab_size: int, chunk: int) -> Any:
    """The jitted dense counter for one (n, skips, V, chunk); see :func:`_dense_counts_jax`."""
    import jax
    import jax.numpy as jnp

    nbins = vocab_size ** (n + 1)
    halo = n + max(skips)

    def kernel(tok: jax.Array, num_chunks: jax.Array, length: jax.Array, owned: jax.Array) -> jax.Array:
        # tok: [num_chunks_padded * chunk + halo] uint8/uint16/int32 -> int32 [S, nbins]. Counts the
        # windows starting at pos < owned that end inside tok[:length].
        def count_skip(s: int) -> jax.Array:
            def body(j: jax.Array, acc: jax.Array) -> jax.Array:
                x = jax.lax.dynamic_slice(tok, (j * chunk,), (chunk + halo,)).astype(jnp.int32)
                pos = j * chunk + jnp.arange(chunk, dtype=jnp.int32)
                key = x[:chunk]
                for k in range(1, n):
                    key = key * vocab_size + x[k : k + chunk]
                key = key * vocab_size + x[n + s : n + s + chunk]
                # Windows past the end (or owned by the next launch) go to a dump bin, dropped below.
                ok = (pos < length - (n + s)) & (pos < owned)
                return acc.at[jnp.where(ok, key, nbins)].add(1, mode="promise_in_bounds")

            return jax.lax.fori_loop(0, num_chunks, body, jnp.zeros(nbins + 1, jnp.int32))[:nbins]

        # One pass per skip over the (1-byte) tokens: re-reading them is cheaper than scattering
        # into S accumulators at once, whose working set would not fit the cache.
        return jnp.stack([count_skip(s) for s in skips])

    return jax.jit(kernel)


def _dense_counts_jax(t: np.ndarray, n: int, skips: tuple[int, ...], vocab_size: int) -> np.ndarray:
    """Same as :func:`_dense_counts_numpy` with the jitted int32 scatter-add kernel on the default device.

    The corpus is cut into launches of at most ``_MAX_WINDOWS_PER_LAUNCH`` windows (each bin fits
    int32 within a launch; launches add up in int64 on the host). Padded lengths are rounded to a
    power of two of chunks so that the kernel compiles O(log N) times, not once per corpus length.
    """
    import jax
    import jax.numpy as jnp

    length = t.shape[0]
    halo = n + max(skips)
    chunk = _chunk_size()
    kern = _count_kernel(n, tuple(skips), vocab_size, chunk)
    total = np.zeros((len(skips), vocab_size ** (n + 1)), np.int64)
    for start in range(0, max(length - n - min(skips), 0), _MAX_WINDOWS_PER_LAUNCH):
        piece = t[start : start + _MAX_WINDOWS_PER_LAUNCH + halo]
        num_chunks = -(-(piece.shape[0] - n - min(skips)) // chunk)
        padded_chunks = 1 << max(num_chunks - 1, 0).bit_length()
        buf = np.zeros(padded_chunks * chunk + halo, piece.dtype)
        buf[: piece.shape[0]] = piece
        owned = min(_MAX_WINDOWS_PER_LAUNCH, piece.shape[0])  # later windows belong to the next launch
        # device_put, not jnp.asarray: a plain transfer, several times faster for a large host array.
        out = kern(jax.device_put(buf), jnp.int32(num_chunks), jnp.int32(piece.shape[0]), jnp.int32(owned))
        total += np.asarray(out)
    return total


def _dense_table_counts(
    t: np.ndarray, starts: np.ndarray, n: int, skips: tuple[int, ...], vocab_size: int
) -> np.ndarray:
    """int64 [S, V**(n+1)] counts of ``C^{n,s}`` for each skip, windows inside one document only."""
    windows = t.shape[0] - n - min(skips)
    use_jax = windows >= _JAX_MIN_WINDOWS
    counts = (_dense_counts_jax if use_jax else _dense_counts_numpy)(t, n, skips, vocab_size)
    for i, s in enumerate(skips):
        bad = _crossing_starts(starts, t.shape[0], n + s)
        if bad.size:
            counts[i] -= np.bincount(_window_keys(t, bad, n, s, vocab_size), minlength=counts.shape[1])
    return counts


def _dense_to_keys(counts: np.ndarray, dt: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    keys = np.flatnonzero(counts)
    return keys.astype(dt), _shrink_counts(counts[keys])


def _sorted_count_keys(
    t: np.ndarray, starts: np.ndarray, n: int, s: int, vocab_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Sort-based counting for large key spaces: one key array [N] sorted in place, then run lengths.

    Peak extra memory is the key array plus a 1-byte flag per window and O(nnz) outputs.
    """
    dt = key_dtype(vocab_size, n)
    span = n + s
    m = t.shape[0] - span
    key = np.empty(m, dt)
    v = dt.type(vocab_size)
    # Keys built in cache-sized pieces: one pass over memory instead of 2n+1.
    for a in range(0, m, _KEY_PIECE):
        b = min(a + _KEY_PIECE, m)
        k = key[a:b]
        k[:] = t[a:b]
        for j in range(1, n):
            k *= v
            k += t[a + j : b + j]
        k *= v
        k += t[a + span : b + span]
    bad = _crossing_starts(starts, t.shape[0], span)
    # Crossing windows get a sentinel above every real key, then sort to the end and are dropped.
    if vocab_size ** (n + 1) - 1 < np.iinfo(dt).max:
        key[bad] = np.iinfo(dt).max
        key.sort()
        key = key[: m - bad.size]
    else:  # no spare value for a sentinel: drop them (a copy)
        key = np.delete(key, bad)
        key.sort()
    m_ok = key.shape[0]
    if m_ok == 0:
        return np.zeros(0, dt), np.zeros(0, np.int32)
    new = np.empty(m_ok, bool)
    new[0] = True
    np.not_equal(key[1:], key[:-1], out=new[1:])
    first = np.flatnonzero(new)
    del new
    uniq = key[first]
    del key  # frees N keys before the O(nnz) counts are made
    first = np.append(first, m_ok)
    return uniq, _shrink_counts(np.diff(first))


def _count_tables_keys(
    tokens: Any, vocab_size: int, max_n: int, max_s: int, doc_ids: Any
) -> dict[tuple[int, int], tuple[np.ndarray, np.ndarray]]:
    """Sorted unique keys and counts of every ``C^{n,s}``, ``n <= max_n``, ``s <= max_s``, in few passes.

    The largest dense-countable n is counted for all skips in one pass sharing the context key;
    each smaller n is then exact marginalisation of the one above it,
    ``C^{n,s}[a, b] = sum_{a0} C^{n+1,s}[(a0, a), b]``, plus the windows that start at a
    document's first token (they have no a0). Larger n, if any, sort.
    """
    tok, _ = _validate(tokens, 1, 0, vocab_size, None)
    if doc_ids is not None and np.shape(doc_ids) != tok.shape:
        raise JaxattnError(f"doc_ids shape {np.shape(doc_ids)} differs from tokens shape {tok.shape}")
    starts = _segment_starts(doc_ids)
    t = _narrow_tokens(tok, vocab_size)
    length = t.shape[0]
    skips = tuple(range(max_s + 1))
    out: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
    n_top = 0
    for n in range(max_n, 0, -1):
        if length - n - max_s > 0 and _dense_ok(vocab_size, n, length):
            n_top = n
            break
    for n in range(max_n, n_top, -1):
        for s in skips:
            if length - n - s <= 0:
                out[(n, s)] = (np.zeros(0, key_dtype(vocab_size, n)), np.zeros(0, np.int32))
            else:
                out[(n, s)] = _sorted_count_keys(t, starts, n, s, vocab_size)
    if n_top:
        cur = _dense_table_counts(t, starts, n_top, skips, vocab_size)
        for n in range(n_top, 0, -1):
            dt = key_dtype(vocab_size, n)
            for i, s in enumerate(skips):
                out[(n, s)] = _dense_to_keys(cur[i], dt)
            if n > 1:
                cur = cur.reshape(len(skips), vocab_size, vocab_size**n).sum(axis=1)
                for i, s in enumerate(skips):
                    heads = _head_windows(starts, length, n - 1 + s)
                    if heads.size:
                        cur[i] += np.bincount(_window_keys(t, heads, n - 1, s, vocab_size), minlength=cur.shape[1])
    return out


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


def unpack_ngrams(keys: Integer[ArrayLike, " R"], vocab_size: int, n: int) -> Int[np.ndarray, "R _"]:
    """Inverse of :func:`pack_ngrams`: int [R] keys -> int32 [R, n]."""
    out = np.empty((keys.shape[0], n), dtype=np.int32)
    k = keys.copy()
    for pos in range(n - 1, -1, -1):
        out[:, pos] = k % vocab_size
        k //= vocab_size
    return out


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
    from jaxattn.progress import progress_iter

    pairs = [(n, s) for n in range(1, max_n + 1) for s in range(max_s + 1)]
    out: dict[tuple[int, int], CountMatrix] = {}
    if mesh is None and pairs:
        # One fused pass for every table (shared context keys; smaller n by exact marginalisation).
        keyed = _count_tables_keys(tokens, int(vocab_size), int(max_n), int(max_s), doc_ids)
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
