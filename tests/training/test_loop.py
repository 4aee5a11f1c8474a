"""The training loop: one compilation, learning, exact resume, count-corpus-only data, the derived step 0."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxattn.errors import JaxattnError
from jaxattn.lm import bits_per_token
from jaxattn.pipeline import run_key
from jaxattn.training import (
    EvalSet,
    LMTrainConfig,
    TrainData,
    evaluate_model,
    init_state,
    load_train_checkpoint,
    make_optimizer,
    make_step,
    random_init,
    save_train_checkpoint,
    train,
)

CFG = LMTrainConfig(steps=6, learning_rate=3e-3, warmup_steps=2, batch_size=4, seq_len=16, eval_every=3)


def data_for(prep, cfg=CFG):
    return TrainData(prep.corpus.tokens, prep.corpus.doc_ids, cfg, run_key(0, "train-data"))


@pytest.fixture(scope="module")
def random_params(tiny):
    prep, derived = tiny
    return random_init(derived.params, prep.config, key=jax.random.PRNGKey(0))


def test_the_step_compiles_once_and_refuses_a_second_trace(tiny, random_params):
    prep, _ = tiny
    state, step = train(init_state(random_params, CFG), prep.config, CFG, data_for(prep), progress=False)
    assert step.traces == 1 and state.step == CFG.steps and len(state.curves["train_loss"]) == CFG.steps
    st = init_state(random_params, CFG)
    guarded = make_step(prep.config, make_optimizer(CFG, st.params))
    p, o, _ = guarded(st.params, st.opt_state, np.zeros((4, 16), np.int32))
    with pytest.raises(JaxattnError, match="traced 2 times"):
        guarded(p, o, np.zeros((4, 15), np.int32))


def test_loss_decreases_on_a_planted_markov_chain(tiny, random_params):
    prep, _ = tiny
    cfg = LMTrainConfig(steps=40, learning_rate=3e-3, warmup_steps=4, batch_size=8, seq_len=16, eval_every=40)
    state, _ = train(
        init_state(random_params, cfg),
        prep.config,
        cfg,
        data_for(prep, cfg),
        evalset=EvalSet.from_prepared(prep),
        progress=False,
    )
    loss = state.curves["train_loss"]
    assert np.mean(loss[-5:]) < loss[0] - 0.3, loss
    bits = state.curves["eval_bits_per_token"]
    assert state.curves["steps"] == [0, 40] and bits[1] < bits[0] - 0.2, bits


def test_derived_init_step0_bits_are_the_ngram_models(tiny):
    prep, derived = tiny
    ev = evaluate_model(derived.params, prep.config, EvalSet.from_prepared(prep))
    ngram = bits_per_token(prep.ngram_logprob)
    assert abs(ev["bits_per_token"] - ngram) <= 0.005 * ngram, (ev["bits_per_token"], ngram)
    assert [r["layer"] for r in ev["layers"]] == [0, 1]
    assert min(r["cosine"] for r in ev["layers"]) > 0.99  # the derived heads are n-gram heads at step 0


def test_resume_equals_uninterrupted_bitwise(tiny, random_params, tmp_path):
    prep, _ = tiny
    es = EvalSet.from_prepared(prep)
    full, _ = train(init_state(random_params, CFG), prep.config, CFG, data_for(prep), evalset=es, progress=False)
    half, _ = train(
        init_state(random_params, CFG), prep.config, CFG, data_for(prep), evalset=es, stop_after=3, progress=False
    )
    assert half.step == 3
    save_train_checkpoint(tmp_path, half, prep.config, CFG, data_key=run_key(0, "train-data"), info={"init": "r"})
    ck = load_train_checkpoint(tmp_path)
    assert ck.state.step == 3 and ck.train_config == CFG and ck.info == {"init": "r"}
    np.testing.assert_array_equal(np.asarray(ck.data_key), np.asarray(run_key(0, "train-data")))
    data = TrainData(prep.corpus.tokens, prep.corpus.doc_ids, ck.train_config, ck.data_key)
    resumed, _ = train(ck.state, ck.config, ck.train_config, data, evalset=es, progress=False)
    assert resumed.step == CFG.steps
    for k in full.params:
        np.testing.assert_array_equal(np.asarray(resumed.params[k]), np.asarray(full.params[k]), err_msg=k)
    for a, b in zip(jax.tree.leaves(resumed.opt_state), jax.tree.leaves(full.opt_state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert resumed.curves["train_loss"] == full.curves["train_loss"]
    assert resumed.curves["steps"] == full.curves["steps"] == [0, 3, 6]
    assert resumed.curves["eval_bits_per_token"] == full.curves["eval_bits_per_token"]


def test_training_reads_only_the_count_corpus(tiny, random_params):
    prep, _ = tiny
    es = EvalSet.from_prepared(prep)
    other = EvalSet(np.random.default_rng(0).integers(0, 8, (4, 16)).astype(np.int32), batch_size=4)
    a, _ = train(init_state(random_params, CFG), prep.config, CFG, data_for(prep), evalset=es, progress=False)
    b, _ = train(init_state(random_params, CFG), prep.config, CFG, data_for(prep), evalset=other, progress=False)
    for k in a.params:
        np.testing.assert_array_equal(np.asarray(a.params[k]), np.asarray(b.params[k]), err_msg=k)
    assert a.curves["eval_bits_per_token"] != b.curves["eval_bits_per_token"]
    # Every window lies inside one count-corpus document.
    data = data_for(prep)
    docs = np.asarray(prep.corpus.doc_ids)
    for i in range(3):
        starts = data.starts[np.asarray(jax.random.randint(jax.random.fold_in(data.key, i), (4,), 0, data.starts.size))]
        assert (docs[starts] == docs[starts + 15]).all()
        np.testing.assert_array_equal(data.batch(i), prep.corpus.tokens[starts[:, None] + np.arange(16)])


def test_bad_settings_are_refused():
    with pytest.raises(JaxattnError, match="learning_rate"):
        LMTrainConfig(learning_rate=0.0)
    with pytest.raises(JaxattnError, match="steps"):
        LMTrainConfig(steps=0)
