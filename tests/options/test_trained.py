"""Option 4: trainable embeddings with frozen attention (jaxattn.options.trained/training), on a tiny model."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxattn import pipeline
from jaxattn.corpus import corpus_from_ids
from jaxattn.derive import derive_params
from jaxattn.errors import JaxattnError
from jaxattn.model import forward_batch
from jaxattn.options.trained import default_train_config, heldout_alignment, run_option4, score_scale
from jaxattn.options.training import (
    Batch,
    TrainConfig,
    ce_loss,
    head_weights,
    kl_loss,
    layout_pairs,
    make_batch,
    make_optimizer,
    make_train_step,
    sample_training_tokens,
    train_embeddings,
    trainable_labels,
)
from tests.helpers import markov_corpus

V = 12
OVERRIDES = (("d_model", 32), ("d_head", 8), ("num_layers", 2), ("num_heads", 4))
CFG = TrainConfig(steps=30, learning_rate=1e-2, batch_size=4, seq_len=16, eval_every=15, warmup_steps=3)


@pytest.fixture(scope="module")
def prep():
    tokens, docs, _ = markov_corpus(1, V, 8000, num_docs=4)
    count = corpus_from_ids(tokens[docs < 3], docs[docs < 3], vocab_size=V)
    held = corpus_from_ids(tokens[docs == 3], vocab_size=V)
    run = pipeline.RunConfig(preset="small", seq_len=16, num_seqs=4, model_overrides=OVERRIDES, batch_size=4)
    return pipeline.prepare(count, held, run, progress=False)


@pytest.fixture(scope="module")
def base_params(prep):
    return jax.block_until_ready(derive_params(prep.tables, prep.config, key=prep.key("derive")))


def count_corpus(prep):
    """The keyword arguments of :func:`train_embeddings` that come from the count corpus."""
    return {"tables": prep.tables, "config": prep.config, "tokens": prep.corpus.tokens, "doc_ids": prep.corpus.doc_ids}


def heldout_fn(prep):
    """The held-out alignment of a run, as :func:`run_option4` hands it to :func:`train_embeddings`."""
    args = (prep.tokens, prep.expected, prep.mask, prep.pair_index, prep.config)
    return lambda p: heldout_alignment(p, *args, batch_size=prep.run.batch_size)[0]


def sample(prep, cfg, key):
    return sample_training_tokens(prep.corpus.tokens, prep.corpus.doc_ids, cfg, key)


def baseline_attention(prep, params):
    return pipeline.batched_attention(params, prep.tokens, prep.config, batch_size=prep.run.batch_size, progress=False)


@pytest.fixture(scope="module")
def trained(prep, base_params):
    before = jax.tree.map(np.array, base_params)  # host copy, independent of any device buffer
    params, curves = train_embeddings(
        base_params, CFG, key=jax.random.PRNGKey(3), progress=False, heldout=heldout_fn(prep), **count_corpus(prep)
    )
    return before, params, curves


def numpy_kl_loss(expected, mask, attn, pair_index, weights):
    """Obvious float64 reference: weighted mean over (layer, head, sequence, valid query) of KL(e || a)."""
    L, H = pair_index.shape
    B = attn.shape[0]
    num = den = 0.0
    for l in range(L):
        for h in range(H):
            p = pair_index[l, h]
            for b in range(B):
                for i in range(attn.shape[-1]):
                    m = mask[p, b, i]
                    e = np.where(m, expected[p, b, i], 0.0).astype(np.float64)
                    if not m.any() or e.sum() <= 0:
                        continue
                    a = np.where(m, attn[b, l, h, i], 0.0).astype(np.float64)
                    e, a = e / e.sum(), a / a.sum()
                    kl = np.sum(np.where(m, e * (np.log(e + 1e-10) - np.log(a + 1e-10)), 0.0))
                    num += weights[l, h] * max(kl, 0.0)
                    den += weights[l, h]
    return num / den


def test_kl_loss_matches_float64_reference(prep, base_params):
    pairs, pair_index = layout_pairs(prep.config)
    assert pairs == prep.pairs and np.array_equal(pair_index, prep.pair_index)
    toks = sample(prep, dataclasses.replace(CFG, steps=1), jax.random.PRNGKey(0))[0]
    batch = make_batch(toks, prep.tables, pairs, "kl")
    attn = np.asarray(forward_batch(base_params, jnp.asarray(toks), prep.config).attn)
    fast = jax.jit(lambda p, b, w: kl_loss(p, b, prep.config, pair_index, weights=w))  # one compile, two weightings
    for balance in ("queries", "tables"):
        w = head_weights(pair_index, balance)
        got = float(fast(base_params, batch, w))
        want = numpy_kl_loss(batch.expected, batch.mask, attn, pair_index, w)
        np.testing.assert_allclose(got, want, rtol=2e-4)


def test_head_weights_count_each_table_once():
    pair_index = np.array([[0, 1, 2, 3, 3, 3], [4, 5, 6, 7, 7, 7], [4, 5, 6, 7, 7, 7]])
    w = head_weights(pair_index, "tables")
    per_table = np.bincount(pair_index.ravel(), weights=w.ravel())
    np.testing.assert_allclose(per_table, 1.0, rtol=1e-6)
    assert np.all(head_weights(pair_index, "queries") == 1)
    with pytest.raises(JaxattnError, match="balance"):
        head_weights(pair_index, "nope")


def test_ce_loss_matches_numpy_reference(prep, base_params):
    toks = sample(prep, dataclasses.replace(CFG, steps=1), jax.random.PRNGKey(1))[0]
    logits = np.asarray(forward_batch(base_params, jnp.asarray(toks), prep.config).logits, np.float64)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    B, T = toks.shape
    want = np.mean([lse[b, t] - logits[b, t, toks[b, t + 1]] for b in range(B) for t in range(T - 1)])
    got = float(jax.jit(lambda p, b: ce_loss(p, b, prep.config))(base_params, Batch(toks)))
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_training_lowers_the_loss_freezes_attention_and_moves_embed(prep, trained):
    before, params, curves = trained
    loss = np.asarray(curves["loss"])
    assert loss.shape == (CFG.steps,) and np.all(np.isfinite(loss))
    assert loss[-10:].mean() < loss[:10].mean(), loss  # fresh batches each step: compare thirds
    # Every non-embedding leaf is bit-identical; the embedding moved.
    assert curves["frozen_bit_identical"] and curves["frozen_mismatched"] == []
    for k, v in before.items():
        if k == "embed":
            assert not np.array_equal(v, np.asarray(params[k]))
        else:
            assert np.array_equal(v, np.asarray(params[k])), k
    assert curves["trained_leaves"] == ["embed"] and curves["trained_changed"] == {"embed": True}
    # Held-out curve: step 0, every eval_every steps and the last step; one value per layer.
    assert curves["eval_step"] == [0, 15, 30]
    assert all(len(c) == prep.config.num_layers for c in curves["eval_kl"])
    assert np.mean(curves["eval_kl"][-1]) < np.mean(curves["eval_kl"][0])  # held-out KL fell too
    # On a fixed batch the trained embedding scores better than the derived one.
    pairs, pair_index = layout_pairs(prep.config)
    toks = sample(prep, dataclasses.replace(CFG, steps=1), jax.random.PRNGKey(99))[0]
    batch = make_batch(toks, prep.tables, pairs, "kl")
    w = head_weights(pair_index, CFG.balance)
    fast = jax.jit(lambda p: kl_loss(p, batch, prep.config, pair_index, weights=w))
    l0 = float(fast({k: jnp.asarray(v) for k, v in before.items()}))
    l1 = float(fast(params))
    assert l1 < l0


def test_step_traces_once_and_replays_training_exactly(prep, trained, base_params):
    """Driving make_train_step by hand with the same key and batches reproduces train_embeddings bit for bit."""
    _, params, curves = trained
    assert curves["num_traces"] == 1  # 30 steps, one trace
    opt = make_optimizer(CFG, base_params)
    step = make_train_step(prep.config, CFG, opt)
    p = jax.tree.map(jnp.copy, base_params)
    s = opt.init(p)
    toks = sample(prep, CFG, jax.random.PRNGKey(3))
    losses = []
    for t in toks:
        p, s, loss = step(p, s, make_batch(t, prep.tables, prep.pairs, "kl"))
        losses.append(float(loss))
    assert step.traces == 1
    assert losses == curves["loss"]
    assert np.array_equal(np.asarray(p["embed"]), np.asarray(params["embed"]))
    other = sample(prep, CFG, jax.random.PRNGKey(4))
    assert toks.shape == (CFG.steps, CFG.batch_size, CFG.seq_len) and not np.array_equal(toks, other)
    # A batch of another shape would recompile: the guard refuses it.
    short = sample(prep, dataclasses.replace(CFG, seq_len=8, steps=1), jax.random.PRNGKey(6))[0]
    with pytest.raises(JaxattnError, match="traced 2 times"):
        step(p, s, make_batch(short, prep.tables, prep.pairs, "kl"))


def test_training_batches_come_from_the_count_corpus(prep):
    toks = sample(prep, CFG, jax.random.PRNGKey(0)).reshape(-1, CFG.seq_len)[:40]
    windows = np.lib.stride_tricks.sliding_window_view(np.asarray(prep.corpus.tokens), CFG.seq_len)
    held = np.lib.stride_tricks.sliding_window_view(np.asarray(prep.eval_corpus.tokens), CFG.seq_len)
    in_count = [(windows == w).all(-1).any() for w in toks]
    in_held = [(held == w).all(-1).any() for w in toks]
    assert all(in_count) and not any(in_held)


def test_ce_objective_trains_embed_only(prep, base_params):
    cfg = dataclasses.replace(CFG, objective="ce", steps=12, eval_every=100, learning_rate=3e-2)
    params, curves = train_embeddings(base_params, cfg, key=jax.random.PRNGKey(0), progress=False, **count_corpus(prep))
    loss = np.asarray(curves["loss"])
    assert np.all(np.isfinite(loss)) and loss[-3:].mean() < loss[:3].mean()
    assert curves["frozen_bit_identical"] and curves["num_traces"] == 1
    assert not np.array_equal(np.asarray(params["embed"]), np.asarray(base_params["embed"]))


def test_train_ngram_trains_ngram_leaves_only_when_asked(prep, base_params):
    """A derivation with a trainable bigram query table (queries read it through qk_inputs)."""
    D, L = prep.config.d_model, prep.config.num_layers
    params = dict(base_params, ngram_embed=0.1 * jax.random.normal(jax.random.PRNGKey(2), (V * V, D)))
    # train_ngram=False: the optimiser's update of the n-gram leaf is exactly zero.
    cfg = dataclasses.replace(CFG, steps=4, eval_every=100, warmup_steps=0)  # warm-up's first lr is 0
    assert trainable_labels(params, False)["ngram_embed"] == "freeze"
    assert trainable_labels(params, True)["ngram_embed"] == "train"
    opt = make_optimizer(cfg, params)
    ones = jax.tree.map(jnp.ones_like, params)
    upd, _ = opt.update(ones, opt.init(params), params)
    assert all(not np.any(np.asarray(upd[k])) for k in params if k != "embed")
    assert np.any(np.asarray(upd["embed"]))

    def qk(p, tokens):  # q: bigram row (token row at position 0), k: token row; every layer
        prev = jnp.concatenate([tokens[:, :1], tokens[:, :-1]], axis=1)
        q = p["ngram_embed"][prev * V + tokens] * jnp.sqrt(D)
        k = p["embed"][tokens] * jnp.sqrt(D)
        return jnp.repeat(q[:, None], L, axis=1), jnp.repeat(k[:, None], L, axis=1)

    c = dataclasses.replace(cfg, train_ngram=True)
    out, curves = train_embeddings(
        params, c, key=jax.random.PRNGKey(0), progress=False, qk_inputs_fn=qk, **count_corpus(prep)
    )
    assert not np.array_equal(np.asarray(out["ngram_embed"]), np.asarray(params["ngram_embed"]))
    assert curves["trained_leaves"] == ["embed", "ngram_embed"] and curves["frozen_bit_identical"]
    assert np.array_equal(np.asarray(out["wq"]), np.asarray(params["wq"]))


def test_run_option4_end_to_end(prep, base_params):
    attn = baseline_attention(prep, base_params)
    records = pipeline.evaluate(prep.expected, prep.mask, prep.pair_index, attn, prep.config, option="baseline")
    base = pipeline.AnalysisResult("baseline", records, attn, base_params)
    res = run_option4(prep, progress=False, baseline=base, train_cfg=CFG, steps=10, eval_every=5)
    L, H = prep.config.num_layers, prep.config.num_heads
    assert res.option == "option4" and len(res.records) == L * H
    assert {r["option"] for r in res.records} == {"option4"}
    x = res.extra
    assert x["frozen_bit_identical"] and x["num_traces"] == 1 and x["train_config"]["steps"] == 10
    assert len(x["before"]) == len(x["after"]) == L and x["steps_per_sec"] > 0
    assert [r["kl"] for r in x["before"]] == [r["kl"] for r in pipeline.layer_summary(base.records)]
    assert x["curves"]["eval_step"] == [0, 5, 10]
    # The last curve point is the final held-out result.
    np.testing.assert_allclose(x["curves"]["eval_kl"][-1], [r["kl"] for r in x["after"]], rtol=1e-6)
    assert x["train_ngram_note"] is None
    with pytest.raises(JaxattnError, match="unknown option 4 setting"):
        run_option4(prep, progress=False, baseline=base, stepz=3)


def test_score_bound_holds(prep, base_params):
    """No head's score exceeds D * sigma_max(Wq Wk^T) / sqrt(K) (inputs are LayerNormed)."""
    sc = score_scale(base_params, prep.config)
    wq = np.asarray(base_params["wq"], np.float64)
    wk = np.asarray(base_params["wk"], np.float64)
    D, K = wq.shape[-2:]
    L, H = wq.shape[:2]
    dense = np.array([[np.linalg.norm(wq[l, h] @ wk[l, h].T, 2) for h in range(H)] for l in range(L)])
    np.testing.assert_allclose(sc["score_bound"], D * dense.max(-1) / np.sqrt(K), rtol=1e-6)
    # Realised logit ranges (from the attention) stay within twice the bound.
    attn = baseline_attention(prep, base_params)
    sc2 = score_scale(base_params, prep.config, attn)
    assert np.all(np.asarray(sc2["logit_range_max"]) <= 2 * np.asarray(sc2["score_bound"]) + 1e-4)


def test_labels_agree_with_the_nnx_module(prep, base_params):
    """The optax label pytree trains exactly what DerivedTransformer marks nnx.Param (E); the rest is FrozenWeight."""
    from flax import nnx

    from jaxattn.nnx_module import DerivedTransformer, FrozenWeight

    model = DerivedTransformer(base_params, prep.config)
    params_state = nnx.state(model, nnx.Param)
    frozen_state = nnx.state(model, FrozenWeight)
    assert len(jax.tree.leaves(params_state)) == 1
    assert np.array_equal(np.asarray(jax.tree.leaves(params_state)[0]), np.asarray(base_params["embed"]))
    labels = trainable_labels(base_params)
    assert [k for k, v in labels.items() if v == "train"] == ["embed"]
    assert len(jax.tree.leaves(frozen_state)) == sum(v == "freeze" for v in labels.values())


def test_config_validation():
    for kw, word in (
        ({"steps": 0}, "steps"),
        ({"objective": "mse"}, "objective"),
        ({"learning_rate": -1.0}, "learning_rate"),
        ({"balance": "x"}, "balance"),
        ({"batch_size": 0}, "batch_size"),
    ):
        with pytest.raises(JaxattnError, match=word):
            TrainConfig(**kw)


def test_default_train_config_is_sized_to_the_model(prep):
    cfg = default_train_config(prep.config, prep.run)
    assert (cfg.steps, cfg.batch_size, cfg.eval_every) == (300, 8, 50)  # a small model
    assert cfg.seq_len == prep.run.seq_len and cfg.seed == prep.run.seed
    assert default_train_config(prep.config, prep.run, CFG, steps=7, balance=None) == dataclasses.replace(CFG, steps=7)
    with pytest.raises(JaxattnError, match="unknown option 4 setting"):
        default_train_config(prep.config, prep.run, stepz=3)


def test_run_option4_without_a_baseline_derives_the_seed(prep, base_params):
    res = run_option4(prep, progress=False, train_cfg=CFG, steps=2, eval_every=1)
    assert res.option == "option4" and res.extra["curves"]["eval_step"] == [0, 1, 2]
    attn = baseline_attention(prep, base_params)
    records = pipeline.evaluate(prep.expected, prep.mask, prep.pair_index, attn, prep.config, option="option4")
    assert [r["kl"] for r in res.extra["before"]] == [r["kl"] for r in pipeline.layer_summary(records)]
