"""Next-token scoring (jaxattn.lm): the n-gram model against a slow dict-loop reference, bits per token."""

from __future__ import annotations

import math
from collections import Counter, defaultdict

import jax.numpy as jnp
import numpy as np
import pytest
from jaxtyping import TypeCheckError

from jaxattn import lm, pipeline
from jaxattn.corpus import corpus_from_ids
from jaxattn.counts import count_tables
from jaxattn.errors import JaxattnError
from tests.helpers import markov_corpus


def reference_logprobs(tokens, doc_ids, seqs, V, max_n, alpha=lm.NGRAM_SMOOTHING) -> np.ndarray:
    """The back-off add-alpha n-gram model, counted and scored with Python dicts (obviously right, slow)."""
    counts: dict[tuple[int, ...], Counter] = defaultdict(Counter)
    toks, docs = [int(t) for t in tokens], [int(d) for d in doc_ids]
    for i in range(len(toks)):
        for m in range(1, max_n + 1):
            j = i + m  # context toks[i .. i+m-1], target toks[i+m], inside one document
            if j < len(toks) and docs[i] == docs[j]:
                counts[tuple(toks[i:j])][toks[j]] += 1
    out = np.zeros((len(seqs), len(seqs[0]) - 1))
    for b, seq in enumerate(seqs):
        seq = [int(t) for t in seq]
        for i in range(len(seq) - 1):
            lp = -math.log(V)
            for m in range(min(max_n, i + 1), 0, -1):
                g = tuple(seq[i - m + 1 : i + 1])
                if g in counts:
                    c = counts[g]
                    lp = math.log((c[seq[i + 1]] + alpha) / (sum(c.values()) + alpha * V))
                    break
            out[b, i] = lp
    return out


def _sequences(rng, tokens, num, length) -> np.ndarray:
    starts = rng.integers(0, len(tokens) - length, size=num)
    return np.stack([tokens[s : s + length] for s in starts]).astype(np.int32)


@pytest.mark.parametrize("max_n", [1, 2, 3])
def test_ngram_matches_dict_reference_on_planted_markov(max_n):
    V = 7
    tokens, docs, _ = markov_corpus(0, V, 3000, num_docs=3)
    tables = count_tables(tokens, V, max_n, 0, doc_ids=docs)
    rng = np.random.default_rng(1)
    seqs = _sequences(rng, tokens, 6, 20)
    seqs[0, 5] = seqs[0, 6] = 0  # a run of equal tokens, and random sequences: unseen n-grams
    seqs[1] = rng.integers(0, V, 20)
    got = lm.ngram_logprobs(tables, seqs, max_n)
    want = reference_logprobs(tokens, docs, seqs, V, max_n)
    assert got.shape == (6, 19) and got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def test_ngram_matches_dict_reference_on_real_text(shakespeare_text):
    text = shakespeare_text[:40000]
    vocab = sorted(set(text))
    ids = np.array([vocab.index(c) for c in text], np.int32)
    train, held = ids[:35000], ids[35000:]
    docs = np.zeros_like(train)
    V = len(vocab)
    tables = count_tables(train, V, 3, 0, doc_ids=docs)
    seqs = _sequences(np.random.default_rng(2), held, 8, 48)
    for max_n in (1, 2, 3):
        got = lm.ngram_logprobs(tables, seqs, max_n)
        np.testing.assert_allclose(got, reference_logprobs(train, docs, seqs, V, max_n), rtol=0, atol=1e-12)
    bits = [lm.bits_per_token(lm.ngram_logprobs(tables, seqs, m)) for m in (1, 2, 3)]
    assert bits[2] < bits[1] < bits[0] < math.log2(V)  # longer contexts predict real text better


def test_back_off_cases():
    """Unseen bigram context -> unigram row; unseen token context -> 1/V; the start never reaches back."""
    V = 5
    # Count corpus over tokens 0..3 only (4 never occurs); bigram contexts: (0,1), (1,2), (2,3), (3,0).
    tokens = np.array([0, 1, 2, 3, 0, 1, 2, 3, 0], np.int32)
    tables = count_tables(tokens, V, 2, 0)
    a = lm.NGRAM_SMOOTHING
    seq = np.array([[0, 1, 2, 0, 2, 4, 1, 3]], np.int32)
    got = lm.ngram_logprobs(tables, seq, 2)[0]
    rs1 = {0: 2, 1: 2, 2: 2, 3: 2}  # C^{1,0} row sums: each of 0..3 is followed twice
    # i=0: only the 1-gram (0,) fits (start of the sequence): P(1|0) = (2+a)/(2+aV)
    assert got[0] == pytest.approx(math.log((2 + a) / (rs1[0] + a * V)), abs=1e-12)
    # i=1: context (0,1) seen, followed by 2 twice: P(2|0,1) = (2+a)/(2+aV)
    assert got[1] == pytest.approx(math.log((2 + a) / (2 + a * V)), abs=1e-12)
    # i=2: context (1,2) seen, but never followed by 0: (0+a)/(2+aV)
    assert got[2] == pytest.approx(math.log(a / (2 + a * V)), abs=1e-12)
    # i=3: context (2,0) never seen -> back off to (0,): P(2|0) = (0+a)/(2+aV)
    assert got[3] == pytest.approx(math.log(a / (2 + a * V)), abs=1e-12)
    # i=4: context (0,2) unseen -> (2,): P(4|2) = a/(2+aV)
    assert got[4] == pytest.approx(math.log(a / (2 + a * V)), abs=1e-12)
    # i=5: context (2,4) unseen and token 4 never seen as a context -> uniform 1/V
    assert got[5] == pytest.approx(-math.log(V), abs=1e-12)
    # i=6: (4,1) unseen -> (1,): P(3|1) = a/(2+aV)
    assert got[6] == pytest.approx(math.log(a / (2 + a * V)), abs=1e-12)
    assert np.isfinite(got).all()


def test_model_whose_logits_are_the_ngram_logprobs_scores_the_ngram_bits():
    V, max_n = 6, 2
    tokens, docs, _ = markov_corpus(3, V, 2000)
    tables = count_tables(tokens, V, max_n, 0, doc_ids=docs)
    seqs = _sequences(np.random.default_rng(4), tokens, 4, 16)
    want = lm.ngram_logprobs(tables, seqs, max_n)
    # Logits at position i: log P~(. | context at i) for every candidate token (plus an arbitrary shift).
    B, T = seqs.shape
    logits = np.zeros((B, T, V))
    for v in range(V):  # prediction i reads tokens <= i and scores token i+1: put v there
        for i in range(T - 1):
            c = seqs.copy()
            c[:, i + 1] = v
            logits[:, i, v] = lm.ngram_logprobs(tables, c[:, : i + 2], max_n)[:, i]
    logits += np.random.default_rng(5).normal(size=(B, T, 1)) * 3.0  # softmax is shift invariant
    got = lm.model_logprobs(jnp.asarray(logits, jnp.float32), seqs)
    assert got.shape == (B, T - 1) and got.dtype == np.float64
    np.testing.assert_allclose(got, want, atol=2e-5)
    assert lm.bits_per_token(got) == pytest.approx(lm.bits_per_token(want), rel=1e-5)


def test_uniform_logits_give_log2_v_and_never_nan():
    V = 11
    seqs = np.random.default_rng(0).integers(0, V, (3, 9)).astype(np.int32)
    lp = lm.model_logprobs(np.zeros((3, 9, V), np.float32), seqs)
    assert lm.bits_per_token(lp) == pytest.approx(math.log2(V), rel=1e-6)
    # Extreme logits: finite, never NaN (a probability that underflows gives a large finite cost).
    big = np.zeros((3, 9, V), np.float32)
    big[..., 0] = 80.0
    lp = lm.model_logprobs(big, seqs)
    assert np.isfinite(lp).all() and not np.isnan(lm.bits_per_token(lp))


def test_bits_per_token_errors_and_scores():
    with pytest.raises(JaxattnError, match="at least one prediction"):
        lm.bits_per_token(np.zeros((2, 0)))
    with pytest.raises(JaxattnError, match="NaN"):
        lm.bits_per_token(np.array([-1.0, np.nan]))
    assert lm.bits_per_token(np.full(4, -math.log(2))) == pytest.approx(1.0)
    s = lm.lm_scores(np.full((2, 3), -math.log(4)), np.full((2, 3), -math.log(2)), 8, ngram_order=3)
    d = s.to_dict()
    assert d == {
        "derived_bits_per_token": pytest.approx(2.0),
        "ngram_bits_per_token": pytest.approx(1.0),
        "uniform_bits_per_token": pytest.approx(3.0),
        "num_predictions": 6,
        "ngram_order": 3,
        "smoothing": lm.NGRAM_SMOOTHING,
    }
    with pytest.raises((JaxattnError, TypeCheckError)):  # the test-time type checker sees it first
        lm.lm_scores(np.zeros((2, 3)), np.zeros((2, 4)), 8)


def test_ngram_errors():
    tokens, docs, _ = markov_corpus(0, 4, 200)
    tables = count_tables(tokens, 4, 1, 0, doc_ids=docs)
    seqs = tokens[None, :10].astype(np.int32)
    with pytest.raises(JaxattnError, match=r"needs tables \[\(2, 0\)\]"):
        lm.ngram_logprobs(tables, seqs, 2)
    with pytest.raises(JaxattnError, match="smoothing=0"):
        lm.ngram_logprobs(tables, seqs, 1, smoothing=0)
    with pytest.raises(JaxattnError, match="token id 9"):
        lm.ngram_logprobs(tables, np.array([[1, 9]], np.int32), 1)
    with pytest.raises((JaxattnError, TypeCheckError)):  # "must be a 2-D [B, T] int array" without the checker
        lm.ngram_logprobs(tables, tokens[:10], 1)
    assert lm.ngram_max_n(tables, 3) == 1
    assert lm.ngram_logprobs(tables, seqs[:, :1], 1).shape == (1, 0)


def test_prepared_run_scores_every_model_alike():
    """run_model keeps the forward's next-token log-probs; the baseline's scores sit beside its n-gram model's."""
    tokens, docs, _ = markov_corpus(7, 6, 3000)
    corpus = corpus_from_ids(tokens, docs, vocab_size=6)
    run = pipeline.RunConfig(
        preset="small",
        seq_len=12,
        num_seqs=5,
        batch_size=2,
        model_overrides=(("num_layers", 2), ("num_heads", 2), ("d_model", 16), ("d_head", 4)),
    )
    prep = pipeline.prepare(corpus, corpus, run, progress=False)
    assert prep.ngram_logprob.shape == (5, 11) and prep.ngram_logprob is prep.ngram_logprob  # cached
    want = lm.ngram_logprobs(prep.tables, prep.tokens, prep.config.max_n)
    np.testing.assert_array_equal(prep.ngram_logprob, want)
    res = pipeline.run_baseline(prep, progress=False)
    out = pipeline.run_model(res.params, prep.tokens, prep.config, batch_size=2, progress=False)
    np.testing.assert_array_equal(out.attn, res.attn)
    np.testing.assert_array_equal(
        out.attn, pipeline.batched_attention(res.params, prep.tokens, prep.config, batch_size=5, progress=False)
    )
    from jaxattn.model import forward_batch

    full = forward_batch(res.params, jnp.asarray(prep.tokens), prep.config)
    np.testing.assert_allclose(out.next_logprob, lm.model_logprobs(full.logits, prep.tokens), atol=1e-6)
    d = res.language_model
    assert d is not None and d["num_predictions"] == 5 * 11 and d["ngram_order"] == prep.config.max_n + 1
    assert d["uniform_bits_per_token"] == pytest.approx(math.log2(6))
    assert d["derived_bits_per_token"] == pytest.approx(lm.bits_per_token(out.next_logprob))
    assert d["ngram_bits_per_token"] < d["uniform_bits_per_token"]  # a planted chain is predictable
    with pytest.raises(JaxattnError, match="expected"):
        pipeline.language_model_scores(prep, out.next_logprob[:, 1:])
