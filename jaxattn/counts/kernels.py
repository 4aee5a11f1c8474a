"""Counting kernels: packed (context, target) keys of every window, counted and sorted.

Axis vocabulary: N corpus tokens, S skips counted in one pass, Z non-zero counts.

Windows are counted with packed integer keys (:mod:`jaxattn.counts.keys`). When ``V**(n+1)`` is
small (char level) every key has its own int32 bin: numpy's bincount for small corpora, else a
jitted scatter-add (the same code on CPU, GPU and TPU). Larger key spaces (word level) sort int64
keys in place, so memory stays O(N + nnz), never O(V**n * V). Document boundaries are not tested
per window: the few windows that cross one are counted with everything else and then subtracted,
which costs O(num_docs * (n+s)), not a pass over N.

Everything here takes validated tokens (see :func:`jaxattn.counts.tables.validate_tokens`) and
returns sorted unique keys with their counts; :mod:`jaxattn.counts.tables` turns them into tables.
"""

# ruff: noqa: F722  (jaxtyping shape strings such as "R V" are not Python expressions)
from __future__ import annotations

import functools
from typing import Any, cast

import numpy as np

from jaxattn.counts.keys import key_dtype, shrink_counts
from jaxattn.typing import ArrayLike, Bool, Int, Integer, Shaped

#: Dense bins (one int32 per possible key) are used up to this many keys per table (here and in
#: :mod:`jaxattn.counts.sharded`).
DENSE_BINS_MAX = 1 << 24
#: Below this many windows numpy's bincount is used (nothing to compile or dispatch).
_JAX_MIN_WINDOWS = 1 << 20
#: Windows per kernel launch, here and in :mod:`jaxattn.counts.sharded`: keeps every int32 bin (and
#: position) far from overflow.
MAX_WINDOWS_PER_LAUNCH = 1 << 30
#: Windows per piece when building sort keys (a piece's temporaries stay in cache).
_KEY_PIECE = 1 << 16
#: Token positions per scatter in the kernel's loop: small enough on CPU that the chunk's keys stay in
#: cache, large on accelerators so each scatter has enough parallel work.
_CHUNK_CPU = 1 << 16
_CHUNK_ACCEL = 1 << 22

__all__ = [
    "DENSE_BINS_MAX",
    "MAX_WINDOWS_PER_LAUNCH",
    "count_keys",
    "count_tables_keys",
    "segment_starts",
    "valid_window_starts",
]


def valid_window_starts(
    length: int, n: int, s: int, segments: Integer[np.ndarray, " N"] | None
) -> Bool[np.ndarray, " M"]:
    """Boolean [N - n - s] mask of window starts that stay inside one document.

    Args:
        length: N.
        n: context length.
        s: skip.
        segments: int [N] non-decreasing segment ids, or None for one document.

    Returns:
        bool [max(N - n - s, 0)].
    """
    span = n + s
    m = max(length - span, 0)
    if segments is None:
        return np.ones(m, dtype=bool)
    return segments[:m] == segments[span : span + m]


def count_keys(
    tok: Integer[np.ndarray, " N"], seg: Integer[np.ndarray, " N"] | None, n: int, s: int, vocab_size: int
) -> tuple[Integer[np.ndarray, " Z"], Integer[np.ndarray, " Z"]]:
    """Sorted unique packed (context, target) keys and their counts.

    Small key spaces (``V**(n+1)`` up to ``DENSE_BINS_MAX``, char level) count into one int32 bin
    per key: numpy's bincount for small corpora, else the jitted scatter-add kernel on the default
    jax device. Large key spaces (word level) sort int64 keys in place: memory O(N + nnz).

    Args:
        tok: int [N] token ids in ``[0, vocab_size)``, validated (see
            :func:`jaxattn.counts.tables.validate_tokens`).
        seg: int [N] non-decreasing segment (document) ids, or None for one document.
        n: context length.
        s: skip.
        vocab_size: V.

    Returns:
        keys: int32/int64 [Z] sorted ascending; counts: int [Z] > 0.
    """
    dt = key_dtype(vocab_size, n)
    span = n + s
    m = max(tok.shape[0] - span, 0)
    if m == 0:
        return np.zeros(0, dt), np.zeros(0, np.int32)
    starts = segment_starts(seg)
    if _dense_ok(vocab_size, n, m):
        t = _narrow_tokens(tok, vocab_size)
        return _dense_to_keys(_dense_table_counts(t, starts, n, (s,), vocab_size)[0], dt)
    return _sorted_count_keys(tok, starts, n, s, vocab_size)


def _dense_ok(vocab_size: int, n: int, num_windows: int) -> bool:
    """True when ``V**(n+1)`` int32 bins are affordable and not much larger than the corpus."""
    nbins = vocab_size ** (n + 1)
    return nbins <= DENSE_BINS_MAX and nbins <= max(8 * num_windows, 1 << 16)


def _narrow_tokens(tok: np.ndarray, vocab_size: int) -> np.ndarray:
    """Tokens in the smallest unsigned dtype holding ids < V (1 byte per char-level token)."""
    dt = np.uint8 if vocab_size <= 1 << 8 else np.uint16 if vocab_size <= 1 << 16 else np.int32
    return tok.astype(dt, copy=False)


def segment_starts(doc_ids: Shaped[ArrayLike, " N"] | None) -> Int[np.ndarray, " K"]:
    """int64 positions ``p > 0`` where a new document (or segment) starts.

    Args:
        doc_ids: [N] document (or segment) ids, or None for one document.

    Returns:
        int64 [K], ascending; empty for None.
    """
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

    dev = cast(Any, jax.config).jax_default_device  # jax's Config declares its options at run time
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

    The corpus is cut into launches of at most ``MAX_WINDOWS_PER_LAUNCH`` windows (each bin fits
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
    for start in range(0, max(length - n - min(skips), 0), MAX_WINDOWS_PER_LAUNCH):
        piece = t[start : start + MAX_WINDOWS_PER_LAUNCH + halo]
        num_chunks = -(-(piece.shape[0] - n - min(skips)) // chunk)
        padded_chunks = 1 << max(num_chunks - 1, 0).bit_length()
        buf = np.zeros(padded_chunks * chunk + halo, piece.dtype)
        buf[: piece.shape[0]] = piece
        owned = min(MAX_WINDOWS_PER_LAUNCH, piece.shape[0])  # later windows belong to the next launch
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
    return keys.astype(dt), shrink_counts(counts[keys])


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
    return uniq, shrink_counts(np.diff(first))


def count_tables_keys(
    tok: Integer[np.ndarray, " N"], vocab_size: int, max_n: int, max_s: int, doc_ids: Any
) -> dict[tuple[int, int], tuple[np.ndarray, np.ndarray]]:
    """Sorted unique keys and counts of every ``C^{n,s}``, ``n <= max_n``, ``s <= max_s``, in few passes.

    The largest dense-countable n is counted for all skips in one pass sharing the context key;
    each smaller n is then exact marginalisation of the one above it,
    ``C^{n,s}[a, b] = sum_{a0} C^{n+1,s}[(a0, a), b]``, plus the windows that start at a
    document's first token (they have no a0). Larger n, if any, sort.

    Args:
        tok: int [N] validated token ids in ``[0, vocab_size)``.
        vocab_size: V.
        max_n: largest context length.
        max_s: largest skip.
        doc_ids: int [N] document ids of the tokens (any values; a change of id starts a
            document), or None for one document. Its shape is checked by the caller.

    Returns:
        ``{(n, s): (keys, counts)}``, as :func:`count_keys` returns them (empty when the corpus
        is shorter than ``n + s + 1``).
    """
    starts = segment_starts(doc_ids)
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
