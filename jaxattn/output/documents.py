"""The ``metrics.json`` document and the provenance it records (versions, device, commit)."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxattn.alignment import KL_EPS, TIE_RTOL
from jaxattn.version import VERSION

#: Version of the ``metrics.json`` layout. "2": ``schema_version`` and ``definitions`` added, and
#: the metrics of a head with no valid query are null (they were 0.0).
SCHEMA_VERSION = "2"

__all__ = [
    "SCHEMA_VERSION",
    "definitions",
    "environment_info",
    "git_commit",
    "language_model_block",
    "metrics_document",
]


def definitions() -> dict[str, str]:
    """``metrics.json``'s ``"definitions"`` block: what every number in ``results`` and ``language_model`` means.

    Returns:
        ``{name: one-sentence definition}`` for ``kl``, ``cosine``, ``argmax_match``,
        ``argmax_match_tied``, ``entropy``, ``num_queries``, ``num_dropped``, ``null``, the
        ``_std/_min/_max`` spread fields, ``expected`` and ``language_model``; the constants
        (:data:`~jaxattn.alignment.KL_EPS`, :data:`~jaxattn.alignment.TIE_RTOL`) are the ones the
        code uses.
    """
    return {
        "expected": "expected[i, j] = P^{n,s}[g_i, tokens[j]] / sum_{j' <= i} P^{n,s}[g_i, tokens[j']] for keys "
        "j <= i, where g_i = tokens[i-n+1 .. i] is the query's n-gram and (n, s) the head's layout entry",
        "kl": f"KL(expected || actual) in nats (natural log), sum_j e_j (ln(e_j + {KL_EPS:g}) - ln(a_j + {KL_EPS:g})) "
        "with eps inside the logs, both rows renormalised over the query's valid keys; mean over valid queries",
        "cosine": "cosine similarity e.a / (|e| |a|) of the expected and actual rows over the valid keys, clipped "
        "to [0, 1] (0 where either row is all zero); mean over valid queries",
        "argmax_match": "strict: the actual and expected argmax key positions are equal, ties broken by the first "
        "index on both sides; fraction of valid queries",
        "argmax_match_tied": "tie-aware: the actual argmax lands on a key whose expected mass equals the row's "
        f"maximum within {TIE_RTOL:g} relative (e[argmax a] >= max(e) (1 - {TIE_RTOL:g})); fraction of valid queries",
        "entropy": "entropy of the actual row over its valid keys, in nats, divided by log(number of valid keys) "
        "= log(i+1) for query position i with the causal mask (1.0 is uniform; 1.0 for a single key); "
        "mean over valid queries",
        "num_queries": "valid queries pooled over every sequence: positions i >= n-1 whose n-gram was observed and "
        "whose expected row has positive mass",
        "num_dropped": "queries left out: B x max(T - n + 1, 0) positions with a full n-gram, minus num_queries "
        "(their n-gram is unobserved in the count tables, or its expected mass over the keys j <= i is zero)",
        "null": "a head with num_queries 0 has null for every metric (undefined, not a perfect 0)",
        "spread": "{metric}_std, _min, _max: the unweighted std, min and max over the sequences that had a valid "
        "query of that sequence's mean; the metric itself is the mean over all valid queries",
        "language_model": "per option, next-token cross-entropy in bits per token (log base 2) over the same "
        "num_predictions = B x (T-1) predictions: derived_bits_per_token (the option's model), "
        "ngram_bits_per_token (the back-off n-gram model of the same count tables, of order ngram_order = "
        "longest context + 1, add-alpha smoothing with alpha = smoothing), uniform_bits_per_token = log2 V",
    }


def environment_info() -> dict[str, Any]:
    """Versions, device and numerics switches, for reproducible reports.

    Returns:
        ``{"jaxattn", "jaxattn_git", "jax", "jaxlib", "numpy", "python", "platform", "device",
        "jax_enable_x64", "xla_flags"}``; ``device`` holds the default backend's platform, the
        device kind and the device count; ``jaxattn_git`` is the source checkout's commit (None
        outside a git checkout).
    """
    import jax
    import jaxlib

    dev = jax.devices()[0]
    return {
        "jaxattn": VERSION,
        "jaxattn_git": git_commit(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": {"platform": dev.platform, "kind": dev.device_kind, "count": jax.device_count()},
        "jax_enable_x64": bool(jax.config.read("jax_enable_x64")),
        "xla_flags": os.environ.get("XLA_FLAGS"),
    }


def git_commit() -> str | None:
    """The commit of the checkout jaxattn runs from (with ``-dirty`` when modified), or None."""
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=40"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def language_model_block(results: Sequence[Any]) -> dict[str, dict[str, Any] | None]:
    """``metrics.json``'s ``"language_model"`` block: each option's next-token scores, by label.

    Args:
        results: :class:`~jaxattn.pipeline.AnalysisResult` s (anything with ``.option`` and
            ``.language_model``), in order.

    Returns:
        ``{option label: {"derived_bits_per_token", "ngram_bits_per_token",
        "uniform_bits_per_token", "num_predictions", "ngram_order", "smoothing"} or None}``
        (None for an option that did not score its predictions); see
        :func:`jaxattn.pipeline.language_model_scores`.
    """
    out: dict[str, dict[str, Any] | None] = {}
    for res in results:
        lm = getattr(res, "language_model", None)
        out[str(res.option)] = dict(lm) if lm is not None else None
    return out


def metrics_document(
    records: list[dict[str, Any]],
    *,
    config: dict[str, Any],
    corpus: dict[str, Any],
    eval_corpus: dict[str, Any] | None = None,
    timings: dict[str, float] | None = None,
    extra: dict[str, Any] | None = None,
    language_model: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``metrics.json`` document (SPEC §5 schema plus provenance).

    ``results`` depends only on the inputs and the seed, so two runs give byte-identical
    ``results``; the provenance fields (``created_utc``, ``timings_s``, ``environment``) vary.

    Args:
        records: per-(option, layer, head) metric records.
        config: the full configuration (run, model, command-line arguments).
        corpus: ``Corpus.info()`` of the count corpus (source, files, sha256 of their text).
        eval_corpus: ``Corpus.info()`` of the evaluation corpus.
        timings: wall time of each stage, seconds.
        extra: more top-level fields.
        language_model: the ``"language_model"`` block (:func:`language_model_block`): per option,
            the next-token bits per token of the derived model, its n-gram model and uniform.

    Returns:
        ``{"schema_version", "definitions", "results", "config", "corpus", "eval_corpus",
        "language_model", "environment", "created_utc", "timings_s", ...extra}``;
        ``schema_version`` is :data:`SCHEMA_VERSION` and ``definitions`` :func:`definitions`.
    """
    doc: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "definitions": definitions(),
        "results": records,
        "config": config,
        "corpus": corpus,
    }
    if eval_corpus is not None:
        doc["eval_corpus"] = eval_corpus
    if language_model is not None:
        doc["language_model"] = language_model
    doc["environment"] = environment_info()
    doc["created_utc"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    if timings is not None:
        doc["timings_s"] = {k: round(v, 4) for k, v in timings.items()}
    if extra:
        doc.update(extra)
    return doc
