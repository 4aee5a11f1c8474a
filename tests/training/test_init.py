"""GPT-2's random init: the derived model's keys and shapes, GPT-2's stds."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest

from jaxattn.errors import JaxattnError
from jaxattn.training import random_init


def test_random_init_has_the_derived_shapes_and_gpt2_stds(tiny):
    prep, derived = tiny
    params = random_init(derived.params, prep.config, key=jax.random.PRNGKey(0))
    assert sorted(params) == sorted(derived.params)
    for k, v in derived.params.items():
        assert params[k].shape == v.shape and params[k].dtype == np.float32, k
    NB = derived.params["wq"].shape[0]
    assert NB == prep.config.num_layers + 1  # the preparation block is kept
    want = {k: 0.02 for k in ("embed", "lm_head", "wq", "wk", "wv", "w1")}
    want.update(wpe=0.01, wo=0.02 / math.sqrt(2 * NB), w2=0.02 / math.sqrt(2 * NB))
    for k, std in want.items():
        a = np.asarray(params[k])
        tol = 4 * std / math.sqrt(2 * a.size) + 0.03 * std * (a.size < 2000)
        assert abs(a.std() - std) <= tol, f"{k}: std {a.std():.5f}, want {std:.5f}"
        assert abs(a.mean()) <= 5 * std / math.sqrt(a.size), k
    for k in ("bq", "bk", "bv", "bo", "b1", "b2", "ln1_bias", "ln2_bias", "lnf_bias"):
        assert not np.asarray(params[k]).any(), k
    for k in ("ln1_scale", "ln2_scale", "lnf_scale"):
        assert (np.asarray(params[k]) == 1).all(), k
    # Different arrays and different keys give different draws.
    assert not np.array_equal(params["wq"], params["wk"])
    other = random_init(derived.params, prep.config, key=jax.random.PRNGKey(1))
    assert not np.array_equal(params["wq"], other["wq"])


def test_random_init_refuses_unknown_keys_and_wrong_shapes(tiny):
    prep, derived = tiny
    with pytest.raises(JaxattnError, match="'ngram_x'"):
        random_init({**derived.params, "ngram_x": np.zeros(3)}, prep.config, key=jax.random.PRNGKey(0))
    with pytest.raises(JaxattnError, match="do not match"):
        random_init({**derived.params, "embed": np.zeros((9, 96))}, prep.config, key=jax.random.PRNGKey(0))
