"""The common contract of every registered option, and the registry itself.

One parametrised test runs each option of :data:`jaxattn.options.REGISTRY` on the small preset
(a new option gets it for free; the real-text runs of each option are in its own test file): every (layer, head) gets a record labelled with
the option's label, nothing is NaN, and the metrics stay within their bounds.
"""

from __future__ import annotations

import math

import pytest

from jaxattn import options, pipeline
from jaxattn.alignment import METRIC_NAMES
from jaxattn.errors import JaxattnError
from jaxattn.progress import Timer

#: Knobs that keep an option fast here (Option 4: a few short steps).
FAST = {"4": {"steps": 3, "eval_every": 2, "batch_size": 2, "seq_len": 16}}

#: Bounded metrics, with float32 rounding room.
UNIT_INTERVAL = ("cosine", "argmax_match", "argmax_match_tied", "entropy")
EPS = 1e-5


@pytest.fixture(scope="module")
def small_run(markov):
    """The small preset on the planted chain of tests/options/conftest.py (shared: its shapes compile once)."""
    prep, _ = markov
    return prep


@pytest.mark.parametrize("name", list(options.REGISTRY))
def test_every_option_keeps_the_contract(small_run, name):
    prep = small_run
    spec = options.REGISTRY[name]
    timer = Timer()
    res = spec.run(prep, progress=False, timer=timer, **FAST.get(name, {}))
    L, H = prep.config.num_layers, prep.config.num_heads
    assert res.option == spec.label
    assert len(res.records) == L * H
    assert sorted((r["layer"], r["head"]) for r in res.records) == [(l, h) for l in range(L) for h in range(H)]
    assert res.attn.shape == (prep.tokens.shape[0], L, H, prep.tokens.shape[1], prep.tokens.shape[1])
    for r in res.records:
        assert r["option"] == spec.label
        assert (r["n"], r["s"]) == prep.config.layout(r["layer"], r["head"])
        for k, v in r.items():
            if isinstance(v, float):
                assert not math.isnan(v), (name, r["layer"], r["head"], k)
        for m in UNIT_INTERVAL:
            assert -EPS <= r[m] <= 1 + EPS, (name, m, r[m])
        assert r["kl"] >= 0, (name, r["kl"])
        assert r["num_queries"] > 0
        assert set(METRIC_NAMES) <= set(r)
    assert "forward" in timer.seconds and "metrics" in timer.seconds


def test_the_registry_lists_every_option_in_canonical_order():
    assert options.OPTIONS == ("baseline", "1", "2", "3", "4") == tuple(options.REGISTRY)
    assert dict(options.LABELS) == {
        "baseline": "baseline",
        "1": "option1",
        "2": "option2",
        "3": "option3",
        "4": "option4",
    }
    assert options.REGISTRY["baseline"].run is pipeline.run_baseline
    assert [n for n, s in options.REGISTRY.items() if s.ceiling] == ["2"]
    for name, spec in options.REGISTRY.items():
        assert spec.name == name and spec.description and "\n" not in spec.description


def test_parse_options():
    assert options.parse_options(None) == ["baseline", "1", "2", "3", "4"]
    assert options.parse_options("all") == ["baseline", "1", "2", "3", "4"]
    assert options.parse_options("4, baseline,option2") == ["baseline", "2", "4"]
    assert options.parse_options(["Option3", "1"]) == ["1", "3"]
    for bad in ("7", "baseline,optionX", " , "):
        with pytest.raises(JaxattnError):
            options.parse_options(bad)
    with pytest.raises(JaxattnError, match=r"unknown option 'optionX' in --options; choose from all, baseline, 1"):
        options.parse_options("baseline,optionX")
    with pytest.raises(JaxattnError, match="selects no option"):
        options.parse_options(" , ")


def test_unknown_options_are_refused(markov):
    prep, _ = markov
    with pytest.raises(JaxattnError, match="unknown option '5'"):
        options.run_option(prep, "5")
