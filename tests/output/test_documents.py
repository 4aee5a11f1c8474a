"""The ``metrics.json`` language-model block and its printed table."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

from jaxattn.output import jsonable, metrics_document
from jaxattn.output.documents import language_model_block
from jaxattn.output.tables import format_language_model

SCORES = {
    "derived_bits_per_token": 3.5,
    "ngram_bits_per_token": 3.0,
    "uniform_bits_per_token": math.log2(60),
    "num_predictions": 1984,
    "ngram_order": 3,
    "smoothing": 0.01,
}


def test_block_keeps_every_option_and_the_results_untouched():
    results = [
        SimpleNamespace(option="baseline", language_model=dict(SCORES)),
        SimpleNamespace(option="option2", language_model=None),
        SimpleNamespace(option="option4", language_model=dict(SCORES, derived_bits_per_token=float("inf"))),
    ]
    block = language_model_block(results)
    assert list(block) == ["baseline", "option2", "option4"] and block["option2"] is None
    records = [{"option": "baseline", "layer": 0, "head": 0, "cosine": 0.5}]
    doc = metrics_document(records, config={}, corpus={}, language_model=jsonable(block))
    without = metrics_document(records, config={}, corpus={})
    assert json.dumps(doc["results"]) == json.dumps(without["results"]) and "language_model" not in without
    text = json.dumps(doc, allow_nan=False)  # inf became null: strict JSON
    assert json.loads(text)["language_model"]["option4"]["derived_bits_per_token"] is None
    table = format_language_model(block)
    lines = table.splitlines()
    assert "1,984 predictions" in lines[0] and "order 3" in lines[0] and "add-0.01" in lines[0]
    base = next(ln for ln in lines if ln.split()[0] == "baseline").split()
    assert base == ["baseline", "3.500", "3.000", f"{math.log2(60):.3f}", f"{3.5 / 3.0:.3f}"]
    assert next(ln for ln in lines if ln.split()[0] == "option2").split()[1:] == ["-"] * 4
    assert next(ln for ln in lines if ln.split()[0] == "option4").split()[1] == "-"
    assert format_language_model({"option1": None}) == ""


def test_metrics_document_is_self_describing():
    from jaxattn.alignment import KL_EPS, METRIC_NAMES, TIE_RTOL

    doc = json.loads(json.dumps(metrics_document([], config={}, corpus={}), allow_nan=False))
    assert doc["schema_version"] == "2"
    d = doc["definitions"]
    assert set(METRIC_NAMES) | {"num_queries", "num_dropped", "null", "language_model", "expected"} <= set(d)
    assert "natural log" in d["kl"] and f"{KL_EPS:g}" == "1e-10" and "1e-10" in d["kl"]
    assert "log(number of valid keys)" in d["entropy"] and "log(i+1)" in d["entropy"]
    assert f"{TIE_RTOL:g} relative" in d["argmax_match_tied"] and TIE_RTOL == 1e-6
    assert "unobserved" in d["num_dropped"] and "num_queries" in d["num_dropped"]
    assert all(w in d["language_model"] for w in ("bits", "ngram_order", "smoothing", "log2 V"))
    assert "|e| |a|" in d["cosine"]
