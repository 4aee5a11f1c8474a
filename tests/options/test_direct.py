"""Option 2: logits gathered from the count tables are the ceiling, and they are the log-probabilities."""

from __future__ import annotations

import numpy as np
import pytest

import jaxattn
from jaxattn import options
from jaxattn.alignment import context_ids
from jaxattn.errors import JaxattnError
from tests.options.common import layer_means


def check_option2_ceiling(prep, res):
    cos = layer_means(res.records, "cosine")
    assert np.all(cos > 0.99), cos
    assert np.all(layer_means(res.records, "argmax_match_tied") > 0.97)
    cost = res.extra["cost"]
    assert cost["table_bytes_dense"] > 0 and cost["wq_wk_bytes"] > 0
    assert cost["gather_s"] > 0 and cost["qk_scores_s"] > 0
    assert cost["table_nnz"] == sum(prep.tables[p].nnz for p in prep.pairs)
    # No W_Q/W_K in the loop: the logits replace the scores; V/O and the MLP are the seed's.
    assert res.extra["floor"] == options.DIRECT_FLOOR


def test_option2_is_the_ceiling_on_every_layer(markov, markov_results):
    check_option2_ceiling(markov[0], markov_results["2"])


@pytest.mark.slow
def test_option2_is_the_ceiling_on_real_text(real, real_results):
    check_option2_ceiling(real, real_results["2"])


def test_option2_logits_are_the_gathered_log_probabilities(real):
    dt = options.direct_tables(real.tables, real.pairs, 1e-9)
    tok = real.tokens[:2]
    got = np.asarray(options.direct_logits_fn(real.tables, real.pairs, real.pair_index, dt)(tok))  # [B, L, H, T, T]
    for l, h in [(0, 0), (1, 2), (3, 3)]:
        cm = real.tables[real.config.layout(l, h)]
        P = np.asarray(jaxattn.probability_matrix(cm), np.float64)
        g = context_ids(cm, tok)
        for b in range(2):
            for i in (0, 5, tok.shape[1] - 1):
                want = np.log(np.maximum(P[g[b, i], tok[b]], 1e-9)) if g[b, i] >= 0 else np.zeros(tok.shape[1])
                np.testing.assert_allclose(got[b, l, h, i], want, rtol=1e-5, atol=1e-5)


def test_option2_without_the_cost_measurement(markov, markov_results):
    prep, _ = markov
    res = options.run_option(prep, "2", progress=False, measure_cost=False)
    assert "cost" not in res.extra and res.extra["floor"] == options.DIRECT_FLOOR
    assert res.records == markov_results["2"].records


def test_a_zero_floor_is_refused(markov):
    prep, _ = markov
    with pytest.raises(JaxattnError, match="floor=0"):
        options.direct_tables(prep.tables, prep.pairs, 0.0)
