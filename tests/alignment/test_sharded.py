"""Sharded alignment metrics on 8 simulated CPU devices equal the single-device metrics bit for bit.

jax fixes its device count when it starts, so the 8-device checks run in one subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` set before jax is imported. The
subprocess compares with exact equality (np.array_equal, dtypes too) and reports one line per
check; the tests below assert on those lines. The counting half is tests/counts/test_sharded.py.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest

from jaxattn.errors import JaxattnError

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    r"""
    import json, sys
    import numpy as np
    import jax
    from jax.sharding import Mesh
    from jaxattn.alignment import layer_head_metrics, sharded_layer_head_metrics
    from jaxattn.counts import make_mesh

    out = {"num_devices": len(jax.devices())}
    mesh = make_mesh(8)
    mesh2 = Mesh(np.array(jax.devices()).reshape(2, 4), ("a", "b"))

    # Alignment: shapes where a shard's slice would be small (see _local_batch) and a larger one.
    for P_, B, L, H, T, m in ((3, 13, 4, 5, 16, mesh), (2, 16, 2, 3, 64, mesh2), (2, 20, 3, 4, 32, mesh)):
        rng = np.random.default_rng(B)
        ex = rng.random((P_, B, T, T)).astype(np.float32)
        mk = (rng.random((P_, B, T, T)) > 0.3) & np.tril(np.ones((T, T), bool))
        at = rng.random((B, L, H, T, T)).astype(np.float32)
        at /= at.sum(-1, keepdims=True)
        pi = rng.integers(0, P_, (L, H)).astype(np.int32)
        ref = {k: np.asarray(v) for k, v in layer_head_metrics(ex, mk, pi, at).items()}
        got = sharded_layer_head_metrics(ex, mk, pi, at, m)
        ok = set(got) == set(ref) and all(
            np.array_equal(np.asarray(got[k]), ref[k]) and np.asarray(got[k]).dtype == ref[k].dtype for k in ref
        )
        out[f"metrics {len(m.axis_names)}d-mesh P={P_} B={B} L={L} H={H} T={T}"] = bool(ok)
    print("RESULT " + json.dumps(out))
    """
)


# eight_device_results: tests/conftest.py runs this SCRIPT and the other package's in one subprocess.


def _checks(results: dict, prefix: str) -> dict:
    got = {k: v for k, v in results.items() if k.startswith(prefix)}
    errors = {k: v for k, v in results.items() if k.endswith(": error")}
    assert got, f"no {prefix!r} checks ran; errors: {errors}"
    return got


def test_runs_on_eight_devices(eight_device_results):
    assert eight_device_results["num_devices"] == 8


def test_sharded_metrics_bit_identical(eight_device_results):
    bad = [k for k, ok in _checks(eight_device_results, "metrics").items() if not ok]
    assert not bad, f"sharded metrics not bit-identical: {bad}"


# In-process checks on this process's devices (one CPU device is enough).


def test_single_device_mesh_metrics():
    from jaxattn.alignment import layer_head_metrics, sharded_layer_head_metrics
    from jaxattn.counts import make_mesh

    mesh = make_mesh(1)
    rng = np.random.default_rng(0)
    ex = rng.random((2, 3, 8, 8)).astype(np.float32)
    mk = np.broadcast_to(np.tril(np.ones((8, 8), bool)), ex.shape)
    at = rng.random((3, 2, 2, 8, 8)).astype(np.float32)
    pi = np.array([[0, 1], [1, 1]], np.int32)
    got = sharded_layer_head_metrics(ex, mk, pi, at, mesh)
    ref = layer_head_metrics(ex, mk, pi, at)
    assert all(np.array_equal(np.asarray(got[k]), np.asarray(ref[k])) for k in ref)


def test_bad_arguments_name_the_value():
    from jaxattn.alignment import sharded_layer_head_metrics
    from jaxattn.counts import make_mesh

    mesh = make_mesh(1)
    x = np.zeros((1, 2, 4, 4), np.float32)
    with pytest.raises(JaxattnError, match="mismatch"):
        sharded_layer_head_metrics(x, x > 0, np.zeros((1, 1), np.int32), np.zeros((3, 1, 1, 4, 4)), mesh)


def test_local_batch_keeps_single_device_reduction_regime():
    from jaxattn.alignment.metrics import reduction_sizes
    from jaxattn.alignment.sharded import _XLA_SMALL_REDUCTION, _local_batch

    # Every sum that is large on one device is large on each shard; small ones need no padding.
    for B, shards, T in ((64, 8, 256), (16, 8, 64), (20, 8, 32), (13, 8, 16)):
        b = _local_batch(B, shards, T, T)
        assert b >= -(-B // shards)
        for size in reduction_sizes(T, T):
            if B * size >= _XLA_SMALL_REDUCTION:
                assert b * size >= _XLA_SMALL_REDUCTION, (B, T, size, b)
    assert _local_batch(64, 8, 256, 256) == 16  # the per-query sums: 16 * 256 = 4096
    assert _local_batch(16, 8, 64, 64) == 16  # the 16-row block sums: 16 * 16 * 16 = 4096 on one device
    assert _local_batch(3, 8, 4, 4) == 1  # all sums small on one device already
