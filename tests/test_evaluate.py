"""pipeline.evaluate and its consumers on heads that have no valid query (seq_len < n)."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

import jaxattn
from jaxattn import pipeline
from jaxattn.alignment import expected_for_layout
from jaxattn.output import tables as out_tables


def test_heads_without_queries_are_null_na_and_warned():
    tokens = np.tile(np.array([0, 0, 1, 1, 2, 2, 3, 3], np.int32), 100)  # every token follows itself once
    cfg = jaxattn.preset("small", 4, d_model=32, d_head=4, num_layers=2, num_heads=2, max_s=0)
    tabs = jaxattn.count_tables(tokens, 4, cfg.max_n, cfg.max_s)
    params = jaxattn.derive_params(tabs, cfg, key=jax.random.PRNGKey(0))
    seqs = np.array([[0], [2]], np.int32)  # seq_len 1: layer 0 scores both, layer 1 (n = 2) has no query
    pairs = sorted({cfg.layout(l, h) for l in range(2) for h in range(2)})
    pair_index = np.array([[pairs.index(cfg.layout(l, h)) for h in range(2)] for l in range(2)], np.int32)
    expected, mask = expected_for_layout(tabs, seqs, pairs)
    attn = pipeline.batched_attention(params, seqs, cfg, progress=False)
    with pytest.warns(UserWarning, match=r"2 of 4 heads \(layers 1\) have no valid query \(seq_len 1 < n = 2\)"):
        records = pipeline.evaluate(expected, mask, pair_index, attn, cfg)
    by_layer = {l: [r for r in records if r["layer"] == l] for l in (0, 1)}
    assert all(r["num_queries"] == 2 and r["kl"] is not None for r in by_layer[0])
    for r in by_layer[1]:
        assert r["num_queries"] == 0
        assert all(r[k] is None for k in ("kl", "cosine", "argmax_match", "argmax_match_tied", "entropy", "kl_std"))
    assert '"kl": null' in json.dumps(records)
    rows = pipeline.layer_summary(records)
    assert rows[1]["kl"] is None and rows[0]["kl"] is not None
    table = out_tables.format_table(records).splitlines()
    assert "n/a" not in " ".join(table[2:4]) and table[4].count("n/a") == 6  # KL cos ± match tied entropy
    assert "0.000" not in table[4]
    summary = out_tables.format_layer_summary(rows).splitlines()
    assert summary[3].count("n/a") == 5 and "n/a" not in summary[2]
    opts = out_tables.format_options_summary([{"option": "x", "cosine": None, "kl": None}])
    assert opts.splitlines()[2].count("n/a") == 9
    from jaxattn.options.ablation import summarize

    s = summarize(records, 2)
    assert np.isnan(s["kl"][1]) and np.isfinite(s["kl"][0]) and s["kl_mean"] == pytest.approx(s["kl"][0])


def test_heads_with_queries_keep_numbers_and_no_warning(recwarn):
    e = np.tril(np.ones((1, 1, 4, 4), np.float32))
    m = e.astype(bool)
    attn = (e / e.sum(-1, keepdims=True))[:, :, None]  # [B=1, L=1, H=1, T, T]
    cfg = jaxattn.ModelConfig(vocab_size=4, d_model=8, d_head=4, num_layers=1, num_heads=1, max_n=1, max_s=0)
    records = pipeline.evaluate(e, m, np.zeros((1, 1), np.int32), attn, cfg)
    assert records[0]["kl"] == pytest.approx(0.0, abs=1e-6) and records[0]["num_queries"] == 4
    assert not [w for w in recwarn if "no valid query" in str(w.message)]
