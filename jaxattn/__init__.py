"""jaxattn: attention weights derived in closed form from corpus n-gram statistics.

The public surface is re-exported here; implementation lives in modules named after
what they hold (corpus, counts, svd, embeddings, derive, model, alignment, pipeline, options,
diagnostics, output, cli); the README draws the layout.
"""

from typing import Any

from jaxattn.alignment import (
    DeviceTable,
    alignment_metrics,
    device_table,
    device_tables,
    expected_attention,
    expected_attention_jax,
    query_metrics,
    sample_sequences,
)
from jaxattn.corpus import Corpus, Tokenizer, load_corpus
from jaxattn.counts import (
    CountMatrix,
    SparseMatrix,
    count_matrix,
    count_stream,
    count_tables,
    manifold_matrix,
    probability_matrix,
)
from jaxattn.derive import derive_params, derive_qk, derive_vo, normalize_std
from jaxattn.embeddings import base_embeddings, ngram_embeddings
from jaxattn.errors import JaxattnError, MemoryBudgetError
from jaxattn.model import ModelConfig, check_token_ids, forward, forward_batch, preset
from jaxattn.output.artefacts import load_tables, save_tables
from jaxattn.output.html_report import write_report
from jaxattn.report import AttentionReport, attention_report
from jaxattn.svd import truncated_svd
from jaxattn.version import VERSION

__version__ = VERSION


def __getattr__(name: str) -> Any:
    """``jaxattn.DerivedTransformer``, imported on first use (the NNX module needs flax; nothing else here does)."""
    if name == "DerivedTransformer":
        from jaxattn.nnx_module import DerivedTransformer

        return DerivedTransformer
    raise AttributeError(f"module 'jaxattn' has no attribute {name!r}")


__all__ = [
    "AttentionReport",
    "Corpus",
    "CountMatrix",
    "DerivedTransformer",
    "DeviceTable",
    "JaxattnError",
    "MemoryBudgetError",
    "ModelConfig",
    "SparseMatrix",
    "Tokenizer",
    "__version__",
    "alignment_metrics",
    "attention_report",
    "base_embeddings",
    "check_token_ids",
    "count_matrix",
    "count_stream",
    "count_tables",
    "derive_params",
    "derive_qk",
    "derive_vo",
    "device_table",
    "device_tables",
    "expected_attention",
    "expected_attention_jax",
    "forward",
    "forward_batch",
    "load_corpus",
    "load_tables",
    "manifold_matrix",
    "ngram_embeddings",
    "normalize_std",
    "preset",
    "probability_matrix",
    "query_metrics",
    "sample_sequences",
    "save_tables",
    "truncated_svd",
    "write_report",
]
