"""Fixtures of the diagnostics tests: a small synthetic run and its diagnosis, computed once."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest

from jaxattn import diagnostics, pipeline
from jaxattn.corpus import corpus_from_ids
from tests.helpers import markov_corpus

V = 12


def _small_prep(
    d_model: int = 64, d_head: int = 8, layers: int = 3, heads: int = 4, weight_std: float | None = 0.01
) -> pipeline.Prepared:
    tokens, docs, _ = markov_corpus(3, V, 7000, num_docs=4)
    cut = 6000
    corpus = corpus_from_ids(tokens[:cut], docs[:cut], vocab_size=V)
    eval_corpus = corpus_from_ids(tokens[cut:], vocab_size=V)
    over = (("d_model", d_model), ("d_head", d_head), ("num_layers", layers), ("num_heads", heads))
    run = pipeline.RunConfig(preset="small", seq_len=16, num_seqs=6, model_overrides=over, batch_size=4)
    prep = pipeline.prepare(corpus, eval_corpus, run, progress=False)
    if weight_std != prep.config.weight_std:
        prep = dataclasses.replace(prep, config=dataclasses.replace(prep.config, weight_std=weight_std))
    return prep


@pytest.fixture(scope="package")
def make_prep() -> Callable[..., pipeline.Prepared]:
    """Builds a small prepared run on a planted Markov chain (V=12, B=6, T=16)."""
    return _small_prep


@pytest.fixture(scope="package")
def run(
    make_prep: Callable[..., pipeline.Prepared],
) -> tuple[pipeline.Prepared, pipeline.AnalysisResult, dict[str, Any]]:
    """(prepared run, seed baseline, its diagnosis) of the default small run (3 layers, 4 heads)."""
    prep = make_prep()
    base = pipeline.run_baseline(prep, progress=False)
    diag = diagnostics.diagnose(prep, base.params, base.attn, progress=False)
    return prep, base, diag
