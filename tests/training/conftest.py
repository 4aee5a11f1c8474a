"""A tiny derived Option 3 model on a planted Markov chain, derived once for tests/training/."""

from __future__ import annotations

import pytest

from jaxattn import options, pipeline
from jaxattn.corpus import corpus_from_ids
from jaxattn.options import GPT2Config
from tests.helpers import markov_corpus

#: d_model 96 = 6 heads x 16, two layout layers (n = 1, 2), skips 0..1, 32 learned positions.
OVERRIDES = (("d_model", 96), ("d_head", 16), ("num_heads", 6), ("num_layers", 2), ("max_s", 1))
DERIVATION = GPT2Config(n_ctx=32)


@pytest.fixture(scope="package")
def tiny():
    """(prepared run, Option 3 result): counts on 2 documents of a V=8 chain, evaluation on a third."""
    tokens, docs, _ = markov_corpus(3, 8, 6000, num_docs=3)
    count = docs < 2
    corpus = corpus_from_ids(tokens[count], docs[count], 8)
    eval_corpus = corpus_from_ids(tokens[~count], None, 8)
    run = pipeline.RunConfig(preset="small", seq_len=16, num_seqs=4, batch_size=4, model_overrides=OVERRIDES)
    prep = pipeline.prepare(corpus, eval_corpus, run, progress=False)
    return prep, options.run_option(prep, "3", progress=False, derivation=DERIVATION)
