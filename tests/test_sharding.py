"""Sharded counting and alignment on 8 simulated CPU devices equal the single-device results exactly.

jax fixes its device count when it starts, so the 8-device checks run in one subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` set before jax is imported. The
subprocess compares with exact equality (np.array_equal, dtypes too) and reports one line per
check; the tests below assert on those lines.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import jaxattn
from jaxattn.errors import JaxattnError

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    r"""
    import json, sys
    from collections import Counter
    import numpy as np
    import jax
    from jax.sharding import Mesh
    import jaxattn
    from jaxattn import counts, sharding
    from jaxattn.alignment import layer_head_metrics
    from tests.conftest import markov_corpus

    out = {"num_devices": len(jax.devices())}
    sharding._PIECE = 32  # shards of ~126 tokens then loop over 4 pieces; the tiny corpus uses one
    mesh = sharding.make_mesh(8)
    mesh2 = Mesh(np.array(jax.devices()).reshape(2, 4), ("a", "b"))

    def same(x, y):
        return all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(x, y, strict=True))

    def dict_counts(tokens, seg, n, s):
        c = Counter()
        for i in range(len(tokens) - n - s):
            if seg is None or seg[i] == seg[i + n + s]:
                c[(tuple(int(t) for t in tokens[i : i + n]) , int(tokens[i + n + s]))] += 1
        return c

    def as_dict(keys, vals, V, n):
        return {(tuple(int(k) // V ** (n - j) % V for j in range(n)), int(k) % V): int(v) for k, v in zip(keys, vals)}

    # 1003 tokens (not a multiple of 8) in 9 documents, so windows cross both shard edges and
    # document boundaries; and a 12-token corpus (shards of 1-2 tokens, shorter than a halo).
    tokens, docs, _ = markov_corpus(0, 6, 1003, num_docs=9)
    tiny, tiny_docs = tokens[:12], np.array([0] * 5 + [1] * 7)
    cases = [
        ("1d main", mesh, tokens, docs, ((1, 0), (2, 3))),
        ("1d tiny", mesh, tiny, tiny_docs, ((2, 3),)),
        ("2d main", mesh2, tokens, docs, ((1, 2),)),
    ]
    for label, m, tk, dc, pairs in cases:
        for n, s in pairs:
            tok, seg = counts._validate(tk, n, s, 6, dc)
            single = counts.count_keys(tok, seg, n, s, 6)
            shard = sharding.sharded_count_keys(tok, seg, n, s, 6, m)
            ok = same(single, shard) and as_dict(*shard, 6, n) == dict(dict_counts(tok, seg, n, s))
            out[f"dense {label} n={n} s={s}"] = bool(ok)
    # Word-sized vocabulary: V**(n+1) bins are unaffordable, so shards sort and the host merges.
    rng = np.random.default_rng(1)
    wt = (rng.zipf(1.2, 777) % 40000).astype(np.int32)
    wd = np.repeat(np.arange(7), 111)
    for label, m, (n, s) in (("1d", mesh, (2, 1)), ("2d", mesh2, (1, 0))):
        tok, seg = counts._validate(wt, n, s, 40000, wd)
        single = counts.count_keys(tok, seg, n, s, 40000)
        shard = sharding.sharded_count_keys(tok, seg, n, s, 40000, m)
        out[f"sorted {label} n={n} s={s}"] = bool(same(single, shard))
    # The public entry point with mesh=, against the fused single-device path.
    a = jaxattn.count_tables(tokens, 6, 2, 1, doc_ids=docs, mesh=mesh)
    b = jaxattn.count_tables(tokens, 6, 2, 1, doc_ids=docs)
    fields = ("contexts", "rows", "cols", "values")
    out["count_tables mesh"] = all(
        same([getattr(a[p], f) for f in fields], [getattr(b[p], f) for f in fields]) for p in b
    )

    # Alignment: shapes where a shard's slice would be small (see _local_batch) and a larger one.
    for P_, B, L, H, T, m in ((3, 13, 4, 5, 16, mesh), (2, 16, 2, 3, 64, mesh2), (2, 20, 3, 4, 32, mesh)):
        rng = np.random.default_rng(B)
        ex = rng.random((P_, B, T, T)).astype(np.float32)
        mk = (rng.random((P_, B, T, T)) > 0.3) & np.tril(np.ones((T, T), bool))
        at = rng.random((B, L, H, T, T)).astype(np.float32)
        at /= at.sum(-1, keepdims=True)
        pi = rng.integers(0, P_, (L, H)).astype(np.int32)
        ref = {k: np.asarray(v) for k, v in layer_head_metrics(ex, mk, pi, at).items()}
        got = sharding.sharded_layer_head_metrics(ex, mk, pi, at, m)
        ok = set(got) == set(ref) and all(
            np.array_equal(np.asarray(got[k]), ref[k]) and np.asarray(got[k]).dtype == ref[k].dtype for k in ref
        )
        out[f"metrics {len(m.axis_names)}d-mesh P={P_} B={B} L={L} H={H} T={T}"] = bool(ok)
    print("RESULT " + json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def eight_device_results() -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"subprocess failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(lines[-1][len("RESULT ") :])


def _checks(results: dict, prefix: str) -> dict:
    got = {k: v for k, v in results.items() if k.startswith(prefix)}
    assert got, f"no {prefix!r} checks ran"
    return got


def test_runs_on_eight_devices(eight_device_results):
    assert eight_device_results["num_devices"] == 8


def test_sharded_dense_counts_identical(eight_device_results):
    bad = [k for k, ok in _checks(eight_device_results, "dense").items() if not ok]
    assert not bad, f"sharded counts differ from single-device / dict loop: {bad}"


def test_sharded_sorted_counts_identical(eight_device_results):
    bad = [k for k, ok in _checks(eight_device_results, "sorted").items() if not ok]
    assert not bad, f"sharded sort-path counts differ: {bad}"


def test_count_tables_with_mesh_identical(eight_device_results):
    assert eight_device_results["count_tables mesh"]


def test_sharded_metrics_bit_identical(eight_device_results):
    bad = [k for k, ok in _checks(eight_device_results, "metrics").items() if not ok]
    assert not bad, f"sharded metrics not bit-identical: {bad}"


# In-process checks on this process's devices (one CPU device is enough).


def test_single_device_mesh_counts_and_metrics():
    from jaxattn import sharding
    from jaxattn.alignment import layer_head_metrics
    from tests.conftest import markov_corpus

    mesh = sharding.make_mesh(1)
    tokens, docs, _ = markov_corpus(3, 5, 300)
    a = jaxattn.count_matrix(tokens, 2, 1, 5, doc_ids=docs, mesh=mesh)
    b = jaxattn.count_matrix(tokens, 2, 1, 5, doc_ids=docs)
    assert np.array_equal(a.values, b.values) and np.array_equal(a.contexts, b.contexts)
    rng = np.random.default_rng(0)
    ex = rng.random((2, 3, 8, 8)).astype(np.float32)
    mk = np.broadcast_to(np.tril(np.ones((8, 8), bool)), ex.shape)
    at = rng.random((3, 2, 2, 8, 8)).astype(np.float32)
    pi = np.array([[0, 1], [1, 1]], np.int32)
    got = sharding.sharded_layer_head_metrics(ex, mk, pi, at, mesh)
    ref = layer_head_metrics(ex, mk, pi, at)
    assert all(np.array_equal(np.asarray(got[k]), np.asarray(ref[k])) for k in ref)


def test_bad_arguments_name_the_value():
    from jaxattn import sharding

    with pytest.raises(JaxattnError, match="num_devices=99"):
        sharding.make_mesh(99)
    mesh = sharding.make_mesh(1)
    x = np.zeros((1, 2, 4, 4), np.float32)
    with pytest.raises(JaxattnError, match="mismatch"):
        sharding.sharded_layer_head_metrics(x, x > 0, np.zeros((1, 1), np.int32), np.zeros((3, 1, 1, 4, 4)), mesh)


def test_local_batch_keeps_single_device_reduction_regime():
    from jaxattn.alignment import _reduction_sizes
    from jaxattn.sharding import _XLA_SMALL_REDUCTION, _local_batch

    # Every sum that is large on one device is large on each shard; small ones need no padding.
    for B, shards, T in ((64, 8, 256), (16, 8, 64), (20, 8, 32), (13, 8, 16)):
        b = _local_batch(B, shards, T, T)
        assert b >= -(-B // shards)
        for size in _reduction_sizes(T, T):
            if B * size >= _XLA_SMALL_REDUCTION:
                assert b * size >= _XLA_SMALL_REDUCTION, (B, T, size, b)
    assert _local_batch(64, 8, 256, 256) == 16  # the per-query sums: 16 * 256 = 4096
    assert _local_batch(16, 8, 64, 64) == 16  # the 16-row block sums: 16 * 16 * 16 = 4096 on one device
    assert _local_batch(3, 8, 4, 4) == 1  # all sums small on one device already
