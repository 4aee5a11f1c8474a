"""Expected attention from count tables, and how well a model's attention aligns with it.

Modules:
    :mod:`~jaxattn.alignment.metrics`  expected attention, the per-query metric kernel and its
                                       batched forms (:func:`alignment_metrics`,
                                       :func:`layer_head_metrics`), pooling over sequences.
    :mod:`~jaxattn.alignment.sharded`  :func:`layer_head_metrics` over a device mesh.
    :mod:`~jaxattn.alignment.device`   expected attention as a jittable, vmappable JAX function
                                       of token ids (:func:`expected_attention_jax`).
    :mod:`~jaxattn.alignment.heads`    every head of any model against every (n, s) table
                                       (:func:`score_heads`, ``jaxattn score``).
"""

from jaxattn.alignment.device import DeviceTable, device_table, device_tables, expected_attention_jax
from jaxattn.alignment.heads import (
    COSINE_TIE,
    SCORED_METRICS,
    HeadScores,
    best_pairs,
    block_attention,
    score_heads,
    score_pairs,
)
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
    "COSINE_TIE",
    "DeviceTable",
    "HeadScores",
    "KL_EPS",
    "METRIC_NAMES",
    "SCORED_METRICS",
    "TIE_RTOL",
    "alignment_metrics",
    "best_pairs",
    "block_attention",
    "context_ids",
    "device_table",
    "device_tables",
    "expected_attention",
    "expected_attention_jax",
    "expected_for_layout",
    "layer_head_metrics",
    "pool",
    "query_metrics",
    "reduction_sizes",
    "sample_sequences",
    "score_heads",
    "score_pairs",
    "sharded_layer_head_metrics",
]
