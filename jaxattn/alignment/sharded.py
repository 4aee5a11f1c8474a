"""Alignment metrics over a device mesh: the batch of sequences split with ``NamedSharding`` and ``shard_map``.

Axis vocabulary: D devices in the mesh, P distinct (n, s) tables, B sequences, L layers, H heads,
T query positions, S key positions.

:func:`sharded_layer_head_metrics` shards the batch of sequences of
:func:`jaxattn.alignment.layer_head_metrics`. Every metric is a per-sequence quantity, so no value
is reduced across devices and each device runs the single-device kernel on its slice. (Sharding
the layer axis too was tried and dropped: XLA:CPU then compiles the float sums with a different
loop structure, e.g. for a size-1 layer axis, and the last ulp of ``cosine`` can move.)

The mesh may have several axes; by default the batch is split over all of them. Counting over a
mesh is :mod:`jaxattn.counts.sharded` (which also has :func:`~jaxattn.counts.make_mesh`).
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

from jaxattn.alignment.metrics import layer_head_metrics, reduction_sizes
from jaxattn.errors import JaxattnError

__all__ = ["sharded_layer_head_metrics"]


@functools.cache
def _metrics_fn(mesh: Mesh) -> Any:
    b = _axes(mesh)
    in_specs = (P(None, b), P(None, b), P(), P(b))
    # check_vma=False: the kernel's loops start from zero buffers that are not marked as varying
    # over the batch axes; every sequence's metrics depend only on that shard's data.
    fn = jax.shard_map(layer_head_metrics, mesh=mesh, in_specs=in_specs, out_specs=P(None, None, b), check_vma=False)
    return jax.jit(fn)


def _axes(mesh: Mesh) -> tuple[str, ...]:
    return tuple(mesh.axis_names)


def _pad_axis(x: Any, axis: int, size: int) -> np.ndarray | jax.Array:
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return np.pad(np.asarray(x), widths)


#: XLA:CPU sums a reduction whose input has fewer elements than this in a different order than a
#: larger one (measured on jaxlib 0.10: a row sum over 16 floats differs in the last ulp between
#: 255 and 256 rows, and never within either regime). See :func:`_local_batch`.
_XLA_SMALL_REDUCTION = 4096


def _local_batch(B: int, num_shards: int, T: int, S: int) -> int:
    """Sequences per shard: ``ceil(B / shards)``, raised so each float sum stays in the single-device regime.

    Each float sum of the metric kernel has an input of B times a per-sequence size
    (:func:`jaxattn.alignment.metrics.reduction_sizes`). The per-sequence results are independent of B,
    except that XLA:CPU picks its summation order by input size (see ``_XLA_SMALL_REDUCTION``).
    When the single-device input of a sum is large, the shard's must be too, so the shard gets
    extra masked sequences; a small single-device input implies small shard inputs. Then every
    metric is bit-identical to the single-device call.
    """
    need = -(-B // num_shards)
    for per_seq in reduction_sizes(T, S):
        if B * per_seq >= _XLA_SMALL_REDUCTION:
            need = max(need, -(-_XLA_SMALL_REDUCTION // per_seq))
    return need


def sharded_layer_head_metrics(
    expected: Any, mask: Any, pair_index: Any, attn: Any, mesh: Mesh
) -> dict[str, jax.Array]:
    """:func:`jaxattn.alignment.layer_head_metrics` with the batch of sequences split over ``mesh``.

    Args:
        expected: float [P, B, T, T] expected attention per distinct (n, s).
        mask: bool [P, B, T, T] valid query-key pairs.
        pair_index: int [L, H], which (n, s) each head uses.
        attn: float [B, L, H, T, T] actual attention.
        mesh: device mesh; B is split over all of its axes (``NamedSharding``), the rest replicated.

    Returns:
        dict of [L, H, B] arrays, equal bit for bit to the single-device call. B is padded with
        masked sequences (all metrics 0) to the shards' size, and those are dropped; see
        :func:`_local_batch` for why a shard may get more padding than ``ceil(B / D)`` needs.

    Raises:
        JaxattnError: mismatched shapes.
    """
    axes = _axes(mesh)
    nd = int(mesh.devices.size)
    if np.ndim(attn) != 5 or np.ndim(expected) != 4 or np.shape(mask) != np.shape(expected):
        raise JaxattnError(
            f"expected [P,B,T,T], mask like it and attn [B,L,H,T,T]; got {np.shape(expected)}, "
            f"{np.shape(mask)}, {np.shape(attn)}"
        )
    B, L, H, T, S = attn.shape
    if expected.shape[1] != B or np.shape(pair_index) != (L, H) or expected.shape[2:] != (T, S):
        raise JaxattnError(
            f"batch or layout mismatch: expected {np.shape(expected)}, pair_index {np.shape(pair_index)}, "
            f"attn {np.shape(attn)}"
        )
    Bp = _local_batch(B, nd, T, S) * nd
    placed = [
        jax.device_put(jnp.asarray(_pad_axis(x, axis, Bp), dt), NamedSharding(mesh, spec))
        for x, axis, dt, spec in (
            (expected, 1, jnp.float32, P(None, axes)),
            (mask, 1, bool, P(None, axes)),  # padded sequences have no valid query
            (attn, 0, jnp.float32, P(axes)),
        )
    ]
    pi = jax.device_put(jnp.asarray(pair_index, jnp.int32), NamedSharding(mesh, P()))
    out = _metrics_fn(mesh)(placed[0], placed[1], pi, placed[2])
    return {k: v[:, :, :B] for k, v in out.items()}
