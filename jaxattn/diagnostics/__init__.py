"""Root-cause diagnostics: each of the seed's explanations for the misalignment, as a number.

The seed write-up explains the misalignment with a chain of claims ("embeddings are nearly
orthogonal, so Q·K ≈ 0 for all j", "W_Q and W_K don't preserve count structure", "the
normalisation makes attention nearly uniform", ...). Each measurement measures one link of
that chain and returns a plain, JSON-able dict; :func:`diagnose` runs them all on a prepared
run and :func:`verdicts` turns the numbers into "supported" / "refuted" / "partly" with the
evidence spelled out.

Modules:

- :mod:`~jaxattn.diagnostics.inputs`: what the measurements share (SVD factors of every M,
  the targets M_r[g_i, t_j], the un-normalised weights, each layer's query input);
- :mod:`~jaxattn.diagnostics.geometry`: diagnostics 1 and 4, Gram statistics of E, LN(E), E^n
  and the rank of E^n;
- :mod:`~jaxattn.diagnostics.scores`: diagnostics 2, 3 and 5, the attention scores' spread
  and fit, the QK circuit's fidelity and the ceiling of a perfect QK circuit;
- :mod:`~jaxattn.diagnostics.stream`: diagnostic 6, what each layer's query input
  represents, the residual stream and counterfactual runs;
- :mod:`~jaxattn.diagnostics.measure`: :func:`diagnose` (the entry point) and
  :func:`summary_rows`;
- :mod:`~jaxattn.diagnostics.verdicts`: one rule per claim, :data:`RULES` and :func:`verdicts`.

Axis vocabulary: B sequences, L layers, H heads, T query positions, S key positions,
D d_model, K d_head, V vocabulary, R observed contexts (n-grams), P distinct (n, s) tables,
Z beta grid points.
"""

from jaxattn.diagnostics.geometry import (
    MAX_GRAM_ROWS,
    PARALLEL_COS,
    embedding_geometry,
    gram_statistics,
    ngram_rank,
    random_unit_abs_cosine,
)
from jaxattn.diagnostics.inputs import (
    EXACT_SVD_MAX,
    Factors,
    dense_manifold,
    exact_svd,
    gather_table,
    ln_rows,
    manifold_factors,
    manifold_targets,
    padded_batches,
    query_inputs,
    raw_params,
)
from jaxattn.diagnostics.measure import STEPS, diagnose, summary_rows
from jaxattn.diagnostics.scores import BETA_GRID, needed_logit_range, qk_fidelity, score_statistics, target_ceiling
from jaxattn.diagnostics.stream import (
    MAX_DECODE_ROWS,
    counterfactuals,
    query_identity,
    residual_stream,
    residual_trace,
)
from jaxattn.diagnostics.verdicts import (
    FIDELITY_LOST,
    FIDELITY_OK,
    RULES,
    Rule,
    Verdict,
    deeper_layers_are_worse,
    derivation_loses_positions,
    embeddings_nearly_orthogonal,
    ngram_embeddings_only_rescale,
    normalisation_flattens_attention,
    orthogonal_embeddings_make_attention_uniform,
    qk_weights_lose_count_structure,
    query_inputs_keep_token_identity,
    random_embeddings_are_the_root_cause,
    svd_does_not_help,
    verdicts,
)

__all__ = [
    "BETA_GRID",
    "EXACT_SVD_MAX",
    "FIDELITY_LOST",
    "FIDELITY_OK",
    "MAX_DECODE_ROWS",
    "MAX_GRAM_ROWS",
    "PARALLEL_COS",
    "RULES",
    "STEPS",
    "Factors",
    "Rule",
    "Verdict",
    "counterfactuals",
    "deeper_layers_are_worse",
    "dense_manifold",
    "derivation_loses_positions",
    "diagnose",
    "embedding_geometry",
    "embeddings_nearly_orthogonal",
    "exact_svd",
    "gather_table",
    "gram_statistics",
    "ln_rows",
    "manifold_factors",
    "manifold_targets",
    "needed_logit_range",
    "ngram_embeddings_only_rescale",
    "ngram_rank",
    "normalisation_flattens_attention",
    "orthogonal_embeddings_make_attention_uniform",
    "padded_batches",
    "qk_fidelity",
    "qk_weights_lose_count_structure",
    "query_identity",
    "query_inputs",
    "query_inputs_keep_token_identity",
    "random_embeddings_are_the_root_cause",
    "random_unit_abs_cosine",
    "raw_params",
    "residual_stream",
    "residual_trace",
    "score_statistics",
    "summary_rows",
    "svd_does_not_help",
    "target_ceiling",
    "verdicts",
]
