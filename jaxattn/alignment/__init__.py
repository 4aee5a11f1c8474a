"""Expected attention from count tables, and how well a model's attention aligns with it.

Modules:
    :mod:`~jaxattn.alignment.metrics`  expected attention, the per-query metric kernel and its
                                       batched forms (:func:`alignment_metrics`,
                                       :func:`layer_head_metrics`), pooling over sequences.
    :mod:`~jaxattn.alignment.sharded`  :func:`layer_head_metrics` over a device mesh.
"""

from jaxattn.alignment.metrics import (
    CAUSAL_ROW_BLOCKS,
    KL_EPS,
    METRIC_NAMES,
    TIE_RTOL,
    alignment_metrics,
    context_ids,
    expected_attention,
    expected_for_layout,
    layer_head_metrics,
    pool,
    query_metrics,
    reduction_sizes,
    sample_sequences,
)
from jaxattn.alignment.sharded import sharded_layer_head_metrics

__all__ = [
    "CAUSAL_ROW_BLOCKS",
    "KL_EPS",
    "METRIC_NAMES",
    "TIE_RTOL",
    "alignment_metrics",
    "context_ids",
    "expected_attention",
    "expected_for_layout",
    "layer_head_metrics",
    "pool",
    "query_metrics",
    "reduction_sizes",
    "sample_sequences",
    "sharded_layer_head_metrics",
]
