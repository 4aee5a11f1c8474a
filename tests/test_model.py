"""The frozen derived transformer: shapes, causality, NNX wrapper, tracing once."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
from jaxattn.model import attention_head, causal_softmax, forward, init_mlp
from tests.helpers import markov_corpus


@pytest.fixture(scope="module")
def small_model():
    tokens, docs, _ = markov_corpus(0, 10, 3000)
    cfg = jaxattn.preset("small", 10, d_model=48, d_head=8, num_layers=3, num_heads=4)
    tables = jaxattn.count_tables(tokens, 10, cfg.max_n, cfg.max_s, doc_ids=docs)
    params = jaxattn.derive_params(tables, cfg, key=jax.random.PRNGKey(0))
    return cfg, params, tokens


def test_forward_shapes_causal_rows_sum_to_one(small_model):
    cfg, params, tokens = small_model
    out = forward(params, jnp.asarray(tokens[:12]), cfg)
    assert out.attn.shape == (3, 4, 12, 12)
    assert out.logits.shape == (12, 10)
    attn = np.asarray(out.attn)
    np.testing.assert_allclose(attn.sum(-1), 1.0, atol=1e-5)
    assert np.all(attn[..., np.triu_indices(12, 1)[0], np.triu_indices(12, 1)[1]] == 0)
    assert attn.dtype == np.float32


def test_batch_equals_single_and_nnx_module_equals_pure(small_model):
    cfg, params, tokens = small_model
    batch = jnp.asarray(tokens[:40].reshape(4, 10))
    out_b = jaxattn.forward_batch(params, batch, cfg)
    for b in range(4):
        single = forward(params, batch[b], cfg)
        np.testing.assert_allclose(np.asarray(out_b.attn[b]), np.asarray(single.attn), rtol=1e-5, atol=1e-6)
    module = jaxattn.DerivedTransformer(params, cfg)
    np.testing.assert_array_equal(np.asarray(module(batch).attn), np.asarray(out_b.attn))


def test_layers_match_unscanned_reference(small_model):
    """The scanned forward equals an explicit per-layer, per-head Python loop."""
    cfg, params, tokens = small_model
    t = jnp.asarray(tokens[:9])
    x = params["embed"][t]
    ref_attn = []
    for l in range(cfg.num_layers):
        h = jaxattn.model.layer_norm(x, params["ln1_scale"][l], params["ln1_bias"][l])
        outs = []
        probs_l = []
        for hd in range(cfg.num_heads):
            o, p = attention_head(
                h, h, h, params["wq"][l, hd], params["wk"][l, hd], params["wv"][l, hd], params["wo"][l, hd]
            )
            outs.append(o)
            probs_l.append(p)
        x = x + sum(outs)
        h2 = jaxattn.model.layer_norm(x, params["ln2_scale"][l], params["ln2_bias"][l])
        x = x + jax.nn.gelu(h2 @ params["w1"][l] + params["b1"][l]) @ params["w2"][l] + params["b2"][l]
        ref_attn.append(jnp.stack(probs_l))
    got = forward(params, t, cfg).attn
    np.testing.assert_allclose(np.asarray(got), np.asarray(jnp.stack(ref_attn)), rtol=1e-5, atol=1e-6)


def test_causal_softmax_masks_with_finite_min():
    s = jnp.zeros((4, 4))
    p = causal_softmax(s)
    np.testing.assert_allclose(np.asarray(p[3]), 0.25)
    assert np.isfinite(np.asarray(p)).all()


def test_forward_batch_traces_once(small_model):
    cfg, params, tokens = small_model

    @chex.assert_max_traces(n=1)
    def fwd(p, t):
        return forward(p, t, cfg).attn

    jf = jax.jit(fwd)
    for i in range(3):
        jf(params, jnp.asarray(tokens[i * 8 : i * 8 + 8])).block_until_ready()


def test_mlp_init_is_deterministic_and_keyed():
    cfg = jaxattn.ModelConfig(vocab_size=5, d_model=16, d_head=4, num_layers=2, num_heads=2)
    a = init_mlp(jax.random.PRNGKey(0), cfg)
    b = init_mlp(jax.random.PRNGKey(0), cfg)
    c = init_mlp(jax.random.PRNGKey(1), cfg)
    np.testing.assert_array_equal(np.asarray(a["w1"]), np.asarray(b["w1"]))
    assert not np.array_equal(np.asarray(a["w1"]), np.asarray(c["w1"]))
    assert abs(float(np.asarray(a["w1"]).std()) - 0.02) < 2e-3


def test_presets_and_layout():
    cfg = jaxattn.preset("seed", 84)
    assert (cfg.d_model, cfg.d_head, cfg.num_layers, cfg.num_heads, cfg.max_n, cfg.max_s) == (768, 64, 12, 12, 2, 3)
    assert cfg.layout(0, 0) == (1, 0) and cfg.layout(5, 7) == (2, 3)
    assert cfg.pairs == [(1, 0), (1, 1), (1, 2), (1, 3), (2, 0), (2, 1), (2, 2), (2, 3)]
    with pytest.raises(jaxattn.JaxattnError, match="unknown preset 'huge'"):
        jaxattn.preset("huge", 84)


@pytest.mark.parametrize("bad", [10 + 50, -1])
def test_out_of_range_token_ids_are_refused_and_clipped_under_jit(small_model, bad):
    cfg, params, tokens = small_model
    toks = np.array([bad, 1, 2], np.int32)
    with pytest.raises(jaxattn.JaxattnError, match=rf"token id {bad} is outside \[0, vocab_size=10\)"):
        forward(params, toks, cfg)
    with pytest.raises(jaxattn.JaxattnError, match=rf"token id {bad}"):
        jaxattn.forward_batch(params, toks[None], cfg)
    with pytest.raises(jaxattn.JaxattnError, match=rf"token id {bad}"):
        jaxattn.DerivedTransformer(params, cfg)(toks)
    # Under jit the ids are tracers: documented clipping into [0, V), so -1 reads id 0 and V+50 reads V-1.
    jitted = np.asarray(jax.jit(lambda t: forward(params, t, cfg).attn)(jnp.asarray(toks)))
    clipped = np.clip(toks, 0, 9)
    np.testing.assert_allclose(jitted, np.asarray(forward(params, clipped, cfg).attn), rtol=1e-6, atol=1e-7)
