"""Counting over a device mesh with JAX's own SPMD: ``Mesh``, ``NamedSharding``, ``shard_map``.

Axis vocabulary: N corpus tokens, D devices in the mesh, C tokens per shard, Z non-zero counts.

:func:`sharded_count_keys` splits the corpus into D contiguous shards of C tokens.
Each shard receives, with ``ppermute``, the first ``n+s`` tokens of the next shard (its halo), so
the windows that straddle a shard edge are counted exactly once, by the shard they start in.
Windows that span a document boundary or run past the corpus end are masked. The shards then
reduce exactly: a ``psum`` of int32 bincounts when ``V**(n+1)`` bins are affordable, else each
shard sorts its windows (``lax.sort`` on the n+1 token columns) into unique rows and counts, and
the host merges the D sorted lists. Integer sums are associative, so the result is the
single-device count (:func:`jaxattn.counts.kernels.count_keys`), bit for bit.

In a multi-process run (``jax.distributed``) the mesh must span every process and each process
passes the same whole corpus: each places only its own devices' shards, reads only addressable
shards, and the sorted lists are merged across processes with
:func:`jaxattn.counts.distributed.allreduce_sorted`. To have each process read only its own share
of the corpus, count locally and reduce with :func:`jaxattn.counts.distributed.allreduce_keyed`.

The mesh may have several axes; by default the corpus is split over all of them. The metrics half
(:func:`jaxattn.alignment.sharded_layer_head_metrics`) lives in :mod:`jaxattn.alignment.sharded`.
"""

# ruff: noqa: F722  (jaxtyping shape strings such as "R V" are not Python expressions)
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxattn.counts.distributed import allreduce_sorted
from jaxattn.counts.kernels import DENSE_BINS_MAX, MAX_WINDOWS_PER_LAUNCH
from jaxattn.counts.keys import key_dtype, merge_keyed_runs, shrink_counts
from jaxattn.errors import JaxattnError
from jaxattn.typing import Int, Integer

#: A shard's windows are scattered in pieces of this many: one huge scatter is several times slower
#: on CPU than a loop of cache-sized ones (shards are padded to a multiple of it when larger).
_PIECE = 1 << 16

__all__ = ["make_mesh", "sharded_count_keys"]


def make_mesh(num_devices: int | None = None, axis_name: str = "data") -> Mesh:
    """A 1-D mesh over the first ``num_devices`` devices of the default backend.

    Raises:
        JaxattnError: when more devices are asked for than exist.
    """
    devs = jax.devices()
    k = len(devs) if num_devices is None else int(num_devices)
    if not 1 <= k <= len(devs):
        raise JaxattnError(f"num_devices={num_devices} is not in [1, {len(devs)}] (devices available here)")
    return Mesh(np.array(devs[:k]), (axis_name,))


def _axes(mesh: Mesh) -> tuple[str, ...]:
    return tuple(mesh.axis_names)


def _halo(x: jax.Array, span: int, axes: tuple[str, ...], num_devices: int) -> jax.Array:
    """``x`` [C] followed by the first ``span`` entries of the next shard (the last shard gets shard 0's)."""
    perm = [(i, (i - 1) % num_devices) for i in range(num_devices)]
    return jnp.concatenate([x, jax.lax.ppermute(x[:span], axes, perm)])


def _local_windows(
    tok: jax.Array, seg: jax.Array, *, n: int, s: int, chunk: int, length: jax.Array, axes: tuple[str, ...], nd: int
) -> tuple[list[jax.Array], jax.Array]:
    """Token columns [n+1] x [C] of the windows starting in this shard, and their validity [C]."""
    span = n + s
    x = _halo(tok, span, axes, nd)
    g = _halo(seg, span, axes, nd)
    pos = jax.lax.axis_index(axes) * chunk + jnp.arange(chunk, dtype=jnp.int32)
    valid = (pos < length - span) & (g[:chunk] == g[span : span + chunk])
    cols = [x[k : k + chunk] for k in range(n)] + [x[span : span + chunk]]
    return cols, valid


@functools.cache
def _dense_fn(mesh: Mesh, n: int, s: int, vocab_size: int, chunk: int) -> Any:
    axes, nd = _axes(mesh), mesh.devices.size
    nbins = vocab_size ** (n + 1)

    span = n + s
    piece = min(chunk, _PIECE)  # chunk is a multiple of piece (see _shard_inputs)

    def local(tok: jax.Array, seg: jax.Array, length: jax.Array) -> jax.Array:
        x = _halo(tok, span, axes, nd)
        g = _halo(seg, span, axes, nd)
        base = jax.lax.axis_index(axes) * chunk

        def body(j: jax.Array, acc: jax.Array) -> jax.Array:
            xs = jax.lax.dynamic_slice(x, (j * piece,), (piece + span,))
            gs = jax.lax.dynamic_slice(g, (j * piece,), (piece + span,))
            pos = base + j * piece + jnp.arange(piece, dtype=jnp.int32)
            valid = (pos < length - span) & (gs[:piece] == gs[span : span + piece])
            key = xs[:piece]
            for k in range(1, n):
                key = key * vocab_size + xs[k : k + piece]
            key = key * vocab_size + xs[span : span + piece]
            key = jnp.where(valid, key, nbins)  # invalid windows land in a dump bin
            return acc.at[key].add(1, mode="promise_in_bounds")

        # The carry varies across devices (shard_map's type check): start from a device-varying zero.
        acc0 = jax.lax.pcast(jnp.zeros(nbins + 1, jnp.int32), axes, to="varying")
        counts = jax.lax.fori_loop(0, chunk // piece, body, acc0)[:nbins]
        return jax.lax.psum(counts, axes)  # int32 sums: exact and order-independent

    f = jax.shard_map(local, mesh=mesh, in_specs=(P(axes), P(axes), P()), out_specs=P())
    return jax.jit(f)


@functools.cache
def _sorted_fn(mesh: Mesh, n: int, s: int, vocab_size: int, chunk: int) -> Any:
    axes, nd = _axes(mesh), mesh.devices.size

    def local(tok: jax.Array, seg: jax.Array, length: jax.Array) -> tuple[jax.Array, ...]:
        cols, valid = _local_windows(tok, seg, n=n, s=s, chunk=chunk, length=length, axes=axes, nd=nd)
        # Lexicographic order of the token columns is the order of the packed keys; invalid
        # windows become the row (V, ..., V) and sort last.
        cols = [jnp.where(valid, c, vocab_size) for c in cols]
        cols = list(jax.lax.sort(tuple(cols), num_keys=n + 1))
        new = jnp.zeros(chunk, bool).at[0].set(True)
        for c in cols:
            new = new.at[1:].set(new[1:] | (c[1:] != c[:-1]))
        run = jnp.cumsum(new.astype(jnp.int32)) - 1
        counts = jnp.zeros(chunk, jnp.int32).at[run].add(1)
        heads = [jnp.zeros(chunk, jnp.int32).at[run].set(c) for c in cols]
        return (*heads, counts)

    f = jax.shard_map(local, mesh=mesh, in_specs=(P(axes), P(axes), P()), out_specs=P(axes))
    return jax.jit(f)


def _shard_inputs(
    tok: np.ndarray, seg: np.ndarray | None, span: int, nd: int, mesh: Mesh
) -> tuple[jax.Array, jax.Array, int]:
    """Pads the tokens and segment ids to D equal shards (>= span tokens each) and places them."""
    length = tok.shape[0]
    chunk = max(-(-length // nd), span, 1)
    if chunk > _PIECE:
        chunk = -(-chunk // _PIECE) * _PIECE
    t = np.zeros(nd * chunk, np.int32)
    t[:length] = tok
    g = np.full(nd * chunk, -1, np.int32)  # padding never matches a real segment
    g[:length] = 0 if seg is None else seg
    sharding = NamedSharding(mesh, P(_axes(mesh)))
    # Each process places only its own devices' shards (no cross-process check of the whole array).
    return _place(t, sharding), _place(g, sharding), chunk


def _place(host: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array from the host copy, transferring only this process's addressable shards."""
    if jax.process_count() == 1:
        return jax.device_put(host, sharding)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def _local_value(x: jax.Array) -> np.ndarray:
    """A replicated global array's value, read from this process's first shard."""
    return np.asarray(x.addressable_data(0))


def _local_rows(x: jax.Array) -> np.ndarray:
    """The addressable shards of a ``P(axes)``-sharded [D * C] array, concatenated: this process's windows."""
    return np.concatenate([np.asarray(sh.data) for sh in x.addressable_shards])


def _check_mesh_processes(mesh: Mesh) -> None:
    """In a multi-process run, the mesh must include devices of every process (each runs the same program)."""
    count = jax.process_count()
    if count == 1:
        return
    procs = {int(d.process_index) for d in mesh.devices.flat}
    if procs != set(range(count)):
        raise JaxattnError(
            f"the mesh spans processes {sorted(procs)} of {count}: in a multi-process run it must include "
            f"devices of every process (use jax.devices(), or count per process with jaxattn.counts.distributed)"
        )


def sharded_count_keys(
    tok: Integer[np.ndarray, " N"], seg: Integer[np.ndarray, " N"] | None, n: int, s: int, vocab_size: int, mesh: Mesh
) -> tuple[Integer[np.ndarray, " Z"], Int[np.ndarray, " Z"]]:
    """Counts ``C^{n,s}`` over ``mesh``: bit for bit the result of :func:`~jaxattn.counts.kernels.count_keys`.

    Args:
        tok: int [N] token ids in ``[0, vocab_size)`` (validated by the caller).
        seg: int [N] non-decreasing segment (document) ids, or None for one document.
        n: context length.
        s: skip.
        vocab_size: V.
        mesh: the device mesh; the corpus is split over all its axes.

    Returns:
        keys: int32/int64 [Z] packed ``context * V + target``, sorted ascending and unique;
        counts: int32 (int64 on overflow) [Z] > 0.
    """
    dt = key_dtype(vocab_size, n)
    span = n + s
    tok = np.asarray(tok)
    length = tok.shape[0]
    if length - span <= 0:
        return np.zeros(0, dt), np.zeros(0, np.int32)
    nd = int(mesh.devices.size)
    _check_mesh_processes(mesh)
    dense = vocab_size ** (n + 1) <= DENSE_BINS_MAX
    if not dense and vocab_size >= np.iinfo(np.int32).max:
        raise JaxattnError(f"vocab_size={vocab_size} is too large for int32 token columns")
    total: np.ndarray | None = None
    parts: list[tuple[np.ndarray, np.ndarray]] = []
    # Launches of at most MAX_WINDOWS_PER_LAUNCH windows; each sees `span` tokens past its end.
    for start in range(0, length - span, MAX_WINDOWS_PER_LAUNCH):
        stop = min(start + MAX_WINDOWS_PER_LAUNCH + span, length)
        t_dev, g_dev, chunk = _shard_inputs(tok[start:stop], None if seg is None else seg[start:stop], span, nd, mesh)
        piece_len = jnp.int32(stop - start)
        if dense:
            counts = _local_value(_dense_fn(mesh, n, s, vocab_size, chunk)(t_dev, g_dev, piece_len)).astype(np.int64)
            total = counts if total is None else total + counts
        else:
            *heads, counts = (
                _local_rows(a) for a in _sorted_fn(mesh, n, s, vocab_size, chunk)(t_dev, g_dev, piece_len)
            )
            keep = (counts > 0) & (heads[0] < vocab_size)
            key = np.zeros(int(keep.sum()), dt)
            for h in heads:
                key = key * dt.type(vocab_size) + h[keep].astype(dt)
            parts.append((key, counts[keep]))
    if dense:
        assert total is not None
        keys = np.flatnonzero(total)
        return keys.astype(dt), shrink_counts(total[keys])
    keys, vals = merge_keyed_runs(parts, presorted=False)
    if jax.process_count() > 1:  # each process merged the windows of its own devices: merge across processes
        keys, vals = allreduce_sorted(keys, vals)
    return keys.astype(dt, copy=False), shrink_counts(vals)
