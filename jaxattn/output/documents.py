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

from jaxattn.version import VERSION

__all__ = ["environment_info", "git_commit", "language_model_block", "metrics_document"]


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
        ``{"results", "config", "corpus", "eval_corpus", "language_model", "environment",
        "created_utc", "timings_s", ...extra}``.
    """
    doc: dict[str, Any] = {"results": records, "config": config, "corpus": corpus}
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
