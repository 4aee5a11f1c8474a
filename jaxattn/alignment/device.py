"""Expected attention as a JAX function of token ids: jittable, vmappable, differentiable where it means something.

:func:`jaxattn.alignment.expected_attention` reads a :class:`~jaxattn.counts.CountMatrix` with
numpy and raises ``TracerArrayConversionError`` under ``jax.jit``. Here a count table is moved
to the device once, as a :class:`DeviceTable`:

* ``rows`` float32 [R+1, V]: the dense count rows ``C^{n,s}[a, :]`` of the R observed contexts
  (row-proportional to ``P^{n,s}``, so the renormalised expected rows are the same), plus one
  zero row at index R for "context not observed";
* ``keys`` int [R+1]: each context packed as ``sum_k a_k V^(n-1-k)`` (lexicographic, so sorted,
  as :attr:`CountMatrix.contexts` is), with a sentinel at the end.

:func:`expected_attention_jax` then finds each query's n-gram with ``jnp.searchsorted`` on the
packed keys and gathers ``rows[row(g_i), tokens[j]]``: no host round trip, any leading batch
axes, and it runs inside ``jit``, ``vmap`` and ``grad``. The expected attention does not depend
on anything continuous but ``rows``, so gradients flow to the attention side of a loss such as
``KL(expected || actual)`` (:func:`jaxattn.alignment.alignment_metrics`), and to ``rows`` if a
user differentiates the table.

Out-of-range ids. Concrete ids (not tracers) outside ``[0, V)`` raise
:class:`~jaxattn.errors.JaxattnError`. Traced ids cannot be checked; there a query whose
n-gram holds a bad id is masked out (no row), and a key with a bad id is masked out (expected 0),
so a bad id never reads another token's counts.

Axis vocabulary: R observed contexts, V vocabulary, T query positions, S = T key positions.
"""

# ruff: noqa: F722  (jaxtyping shape strings such as "R V" are not Python expressions)
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn.counts import CountMatrix, check_dense_size
from jaxattn.errors import JaxattnError
from jaxattn.typing import Array, ArrayLike, Bool, Float, Integer

__all__ = ["DeviceTable", "device_table", "device_tables", "expected_attention_jax"]


@dataclasses.dataclass(frozen=True)
class DeviceTable:
    """One count table ``C^{n,s}`` on the device, for :func:`expected_attention_jax` (a JAX pytree).

    Attributes:
        rows: float32 [R+1, V] count rows of the observed contexts; row R is all zero.
        keys: int32 [R+1] (int64 with ``jax_enable_x64`` where ``V**n`` needs it) packed
            contexts, ascending; ``keys[R]`` is a sentinel (the dtype's maximum).
        n: context length (static).
        s: skip (static).
        vocab_size: V (static).
    """

    rows: jax.Array
    keys: jax.Array
    n: int
    s: int
    vocab_size: int

    @property
    def num_contexts(self) -> int:
        """R, the number of observed contexts."""
        return int(self.rows.shape[0]) - 1


jax.tree_util.register_dataclass(DeviceTable, data_fields=["rows", "keys"], meta_fields=["n", "s", "vocab_size"])


def _key_dtype(vocab_size: int, n: int) -> np.dtype:
    """int32 when every packed n-gram ``< V**n`` fits, else int64 if x64 is on; refused otherwise."""
    top = int(vocab_size) ** int(n) - 1
    if top < np.iinfo(np.int32).max:
        return np.dtype(np.int32)
    if jax.config.read("jax_enable_x64") and top < np.iinfo(np.int64).max:
        return np.dtype(np.int64)
    raise JaxattnError(
        f"vocab_size={vocab_size} with n={n}: packed contexts reach V**n - 1 = {top}, beyond int32; "
        "enable jax_enable_x64 or reduce the vocabulary"
    )


def device_table(cm: CountMatrix, *, max_dense_bytes: int | None = None) -> DeviceTable:
    """Moves a count table to the device for :func:`expected_attention_jax`.

    Args:
        cm: the table ``C^{n,s}``.
        max_dense_bytes: budget for the dense float32 [R+1, V] rows (None: ``cm.max_dense_bytes``,
            else the global default).

    Returns:
        :class:`DeviceTable`.

    Raises:
        MemoryBudgetError: the dense rows exceed the budget (size and budget named).
        JaxattnError: packed contexts overflow the key dtype.
    """
    R, V, n = cm.num_contexts, int(cm.vocab_size), int(cm.n)
    budget = max_dense_bytes if max_dense_bytes is not None else cm.max_dense_bytes
    check_dense_size((R + 1, V), 4, f"device rows of C^{{{n},{cm.s}}}", budget)
    dt = _key_dtype(V, n)
    rows = np.zeros((R + 1, V), np.float32)
    rows[cm.rows, cm.cols] = cm.values
    keys = np.zeros(R + 1, dt)
    for k in range(n):
        keys[:R] = keys[:R] * V + cm.contexts[:, k].astype(dt)
    keys[R] = np.iinfo(dt).max
    return DeviceTable(jnp.asarray(rows), jnp.asarray(keys), n, int(cm.s), V)


def device_tables(
    tables: dict[tuple[int, int], CountMatrix],
    pairs: list[tuple[int, int]] | None = None,
    *,
    max_dense_bytes: int | None = None,
) -> dict[tuple[int, int], DeviceTable]:
    """:func:`device_table` of each (n, s) in ``pairs`` (default: every table).

    Args:
        tables: ``{(n, s): CountMatrix}``.
        pairs: the (n, s) to move (e.g. ``config.pairs`` or a layout's distinct pairs).
        max_dense_bytes: budget for each table's dense rows.

    Returns:
        ``{(n, s): DeviceTable}``.

    Raises:
        JaxattnError: a pair without a table.
    """
    pairs = sorted(tables) if pairs is None else list(pairs)
    missing = [p for p in pairs if p not in tables]
    if missing:
        raise JaxattnError(f"no count table for (n, s) = {missing}; have {sorted(tables)}")
    return {p: device_table(tables[p], max_dense_bytes=max_dense_bytes) for p in pairs}


def _check_concrete_ids(tokens: ArrayLike, vocab_size: int) -> None:
    if isinstance(tokens, jax.core.Tracer):
        return
    arr = np.asarray(tokens)
    if not np.issubdtype(arr.dtype, np.integer):
        raise JaxattnError(f"tokens must be integers, got dtype {arr.dtype}")
    if arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= vocab_size:
            raise JaxattnError(f"token id {lo if lo < 0 else hi} is outside [0, vocab_size={vocab_size})")


@jax.jit
def _expected(table: DeviceTable, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    n, V, R = table.n, table.vocab_size, table.num_contexts
    T = tokens.shape[-1]
    ok = (tokens >= 0) & (tokens < V)
    tc = jnp.clip(tokens, 0, V - 1).astype(table.keys.dtype)
    lead = tokens.shape[:-1]
    row = jnp.full(lead + (T,), R, jnp.int32)
    if T >= n:
        q = jnp.zeros(lead + (T - n + 1,), table.keys.dtype)
        q_ok = jnp.ones(lead + (T - n + 1,), bool)
        for k in range(n):
            q = q * V + tc[..., k : T - n + 1 + k]
            q_ok = q_ok & ok[..., k : T - n + 1 + k]
        idx = jnp.searchsorted(table.keys, q).astype(jnp.int32)  # in [0, R]: the sentinel is the maximum
        found = q_ok & (idx < R) & (table.keys[idx] == q)
        row = row.at[..., n - 1 :].set(jnp.where(found, idx, R))
    key_ok = ok[..., None, :] & jnp.tril(jnp.ones((T, T), bool))
    counts = table.rows[row[..., :, None], tc.astype(jnp.int32)[..., None, :]]
    counts = jnp.where(key_ok, counts, 0.0)
    mass = counts.sum(-1, keepdims=True)
    valid_q = mass > 0
    expected = jnp.where(valid_q, counts / jnp.where(valid_q, mass, 1.0), 0.0)
    return expected, key_ok & valid_q


def expected_attention_jax(
    table: DeviceTable, tokens: Integer[ArrayLike, "*B T"]
) -> tuple[Float[Array, "*B T T"], Bool[Array, "*B T T"]]:
    """The attention the counts predict, as a JAX function: ``expected[i, j] ∝ C^{n,s}[g_i, tokens[j]]``, j <= i.

    Equals :func:`jaxattn.alignment.expected_attention` (float32 rounding aside), and works
    under ``jax.jit`` and ``jax.vmap`` with traced ``tokens``: the query n-gram ``g_i`` is found
    by ``jnp.searchsorted`` on the table's packed keys. Query rows whose n-gram is unobserved, or
    whose expected mass over ``j <= i`` is zero, are masked out.

    Args:
        table: the device table (:func:`device_table`).
        tokens: int [..., T] token ids; any leading axes.

    Returns:
        expected float32 [..., T, T] (rows normalised over the valid keys, zero elsewhere) and
        mask bool [..., T, T] (valid query-key pairs).

    Raises:
        JaxattnError: concrete ``tokens`` with an id outside ``[0, V)`` (traced ids: such a query
            or key is masked out; see the module docstring).
    """
    _check_concrete_ids(tokens, table.vocab_size)
    tokens = jnp.asarray(tokens)
    if tokens.ndim < 1:
        raise JaxattnError(f"tokens must have a position axis [..., T], got shape {tokens.shape}")
    return _expected(table, tokens)
