"""Sharded counting on 8 simulated CPU devices equals the single-device counts exactly.

jax fixes its device count when it starts, so the 8-device checks run in one subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` set before jax is imported. The
subprocess compares with exact equality (np.array_equal, dtypes too) and reports one line per
check; the tests below assert on those lines. The metrics half is tests/alignment/test_sharded.py.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest

import jaxattn
from jaxattn.errors import JaxattnError

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    r"""
    import json, sys
    from collections import Counter
    import numpy as np
    import jax
    from jax.sharding import Mesh
    import jaxattn
    from jaxattn.counts import count_keys, make_mesh, sharded, sharded_count_keys, validate_tokens
    from tests.helpers import markov_corpus

    out = {"num_devices": len(jax.devices())}
    sharded._PIECE = 32  # shards of ~126 tokens then loop over 4 pieces; the tiny corpus uses one
    mesh = make_mesh(8)
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
            tok, seg = validate_tokens(tk, n, s, 6, dc)
            single = count_keys(tok, seg, n, s, 6)
            shard = sharded_count_keys(tok, seg, n, s, 6, m)
            ok = same(single, shard) and as_dict(*shard, 6, n) == dict(dict_counts(tok, seg, n, s))
            out[f"dense {label} n={n} s={s}"] = bool(ok)
    # Word-sized vocabulary: V**(n+1) bins are unaffordable, so shards sort and the host merges.
    rng = np.random.default_rng(1)
    wt = (rng.zipf(1.2, 777) % 40000).astype(np.int32)
    wd = np.repeat(np.arange(7), 111)
    for label, m, (n, s) in (("1d", mesh, (2, 1)), ("2d", mesh2, (1, 0))):
        tok, seg = validate_tokens(wt, n, s, 40000, wd)
        single = count_keys(tok, seg, n, s, 40000)
        shard = sharded_count_keys(tok, seg, n, s, 40000, m)
        out[f"sorted {label} n={n} s={s}"] = bool(same(single, shard))
    # The public entry point with mesh=, against the fused single-device path.
    a = jaxattn.count_tables(tokens, 6, 2, 1, doc_ids=docs, mesh=mesh)
    b = jaxattn.count_tables(tokens, 6, 2, 1, doc_ids=docs)
    fields = ("contexts", "rows", "cols", "values")
    out["count_tables mesh"] = all(
        same([getattr(a[p], f) for f in fields], [getattr(b[p], f) for f in fields]) for p in b
    )
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


def test_sharded_dense_counts_identical(eight_device_results):
    bad = [k for k, ok in _checks(eight_device_results, "dense").items() if not ok]
    assert not bad, f"sharded counts differ from single-device / dict loop: {bad}"


def test_sharded_sorted_counts_identical(eight_device_results):
    bad = [k for k, ok in _checks(eight_device_results, "sorted").items() if not ok]
    assert not bad, f"sharded sort-path counts differ: {bad}"


def test_count_tables_with_mesh_identical(eight_device_results):
    assert eight_device_results["count_tables mesh"]


# In-process checks on this process's devices (one CPU device is enough).


def test_single_device_mesh_counts():
    from jaxattn.counts import make_mesh
    from tests.helpers import markov_corpus

    mesh = make_mesh(1)
    tokens, docs, _ = markov_corpus(3, 5, 300)
    a = jaxattn.count_matrix(tokens, 2, 1, 5, doc_ids=docs, mesh=mesh)
    b = jaxattn.count_matrix(tokens, 2, 1, 5, doc_ids=docs)
    assert np.array_equal(a.values, b.values) and np.array_equal(a.contexts, b.contexts)


def test_bad_arguments_name_the_value():
    from jaxattn.counts import make_mesh

    with pytest.raises(JaxattnError, match="num_devices=99"):
        make_mesh(99)
