"""Every diagnostic on a prepared run (:func:`diagnose`), and its per-layer digest (:func:`summary_rows`).

:func:`diagnose` is the entry point: it reads a :class:`jaxattn.pipeline.Prepared` and hands
each measurement the arrays and configs it uses, by name. Each step is computed once, in a
fixed order, and timed.

Axis vocabulary: B sequences, L layers, H heads, T positions.
"""

# ruff: noqa: F722  (jaxtyping shape strings such as "R V" are not Python expressions)
from __future__ import annotations

import time
from typing import Any

import numpy as np

from jaxattn.diagnostics.geometry import embedding_geometry
from jaxattn.diagnostics.inputs import manifold_factors, manifold_targets, query_inputs, raw_params
from jaxattn.diagnostics.scores import needed_logit_range, qk_fidelity, score_statistics, target_ceiling
from jaxattn.diagnostics.stream import counterfactuals, query_identity, residual_stream
from jaxattn.model import ModelConfig, Params
from jaxattn.pipeline import Prepared
from jaxattn.progress import Timer, progress_iter, stage
from jaxattn.typing import ArrayLike, Float

#: The steps of :func:`diagnose`, in the order they run (each one timed in ``timings_s``).
STEPS = (
    "factors",
    "embeddings",
    "raw",
    "inputs",
    "scores",
    "fidelity",
    "ceiling",
    "identity",
    "residual",
    "counterfactuals",
)


def _config_summary(config: ModelConfig, tokens: np.ndarray) -> dict[str, Any]:
    """The model and sequence sizes a diagnosis was made with (its ``config`` entry)."""
    return {
        "d_model": config.d_model,
        "d_head": config.d_head,
        "num_layers": config.num_layers,
        "num_heads": config.num_heads,
        "weight_std": config.weight_std,
        "vocab_size": config.vocab_size,
        "num_seqs": int(tokens.shape[0]),
        "seq_len": int(tokens.shape[1]),
    }


def _run_step(
    step: str,
    prep: Prepared,
    params: Params,
    attn: Any,
    state: dict[str, Any],
    diag: dict[str, Any],
    progress: bool,
) -> None:
    """Runs one step of :func:`diagnose`: shared inputs go into ``state``, measurements into ``diag``."""
    cfg, bs = prep.config, prep.run.batch_size
    if step == "factors":
        state["factors"] = manifold_factors(prep.tables, prep.pairs, cfg.d_head, key=prep.key("diagnostics-svd"))
        state["targets"] = manifold_targets(prep.tables, prep.pairs, prep.tokens, state["factors"])
    elif step == "embeddings":
        diag["embeddings"] = embedding_geometry(prep.tables, prep.pairs, params, cfg)
    elif step == "raw":
        state["raw"] = raw_params(prep.tables, cfg, params, key=prep.key("derive"))
    elif step == "inputs":
        state["q"], a = query_inputs(params, prep.tokens, cfg, batch_size=bs)
        state["attn"] = a if attn is None else np.asarray(attn)
    elif step == "scores":
        diag["scores"] = score_statistics(
            params,
            state["q"],
            prep.mask,
            prep.pair_index,
            cfg,
            raw=state["raw"],
            targets=state["targets"],
            attn=state["attn"],
        )
        diag["needed_logit_range"] = needed_logit_range(prep.expected, prep.mask, prep.pairs)
    elif step == "fidelity":
        key = prep.key("diagnostics-fidelity")
        diag["qk_fidelity"] = qk_fidelity(prep.tables, prep.pairs, params, cfg, state["factors"], key=key)
    elif step == "ceiling":
        diag["target_ceiling"] = target_ceiling(
            prep.tables, prep.pairs, prep.tokens, prep.expected, prep.mask, state["factors"]
        )
    elif step == "identity":
        diag["query_identity"] = query_identity(
            prep.tables, prep.pairs, params, cfg, prep.tokens, state["q"], state["factors"]
        )
    elif step == "residual":
        diag["residual_stream"] = residual_stream(params, prep.tokens, cfg, batch_size=bs)
    elif step == "counterfactuals":
        diag["counterfactuals"] = counterfactuals(
            params,
            state["raw"],
            prep.tokens,
            prep.expected,
            prep.mask,
            prep.pair_index,
            cfg,
            batch_size=bs,
            seed_inputs=(state["q"], state["attn"]),
            progress=progress,
        )


def diagnose(
    prep: Prepared,
    params: Params,
    attn: Float[ArrayLike, "B L H T T"] | None = None,
    *,
    progress: bool = True,
    timer: Timer | None = None,
) -> dict[str, Any]:
    """Runs every diagnostic on the seed-derived model of a prepared run.

    Args:
        prep: the prepared run.
        params: the seed derivation's parameters
            (``derive_params(prep.tables, prep.config, key=prep.key("derive"))``).
        attn: float32 [B, L, H, T, T] the model's attention on ``prep.tokens`` (recomputed when None).
        progress: show progress.
        timer: stage timer (the whole diagnosis is its stage "diagnostics"; None: untimed).

    Returns:
        A JSON-able dict with ``config``, ``embeddings``, ``scores``, ``needed_logit_range``,
        ``qk_fidelity``, ``target_ceiling``, ``query_identity``, ``residual_stream``,
        ``counterfactuals`` and ``timings_s`` (seconds per step of :data:`STEPS`).
    """
    diag: dict[str, Any] = {"config": _config_summary(prep.config, prep.tokens)}
    state: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    with stage(timer, "diagnostics"):
        for step in progress_iter(list(STEPS), desc="diagnostics", enabled=progress):
            t0 = time.perf_counter()
            _run_step(step, prep, params, attn, state, diag, progress)
            seconds[step] = round(time.perf_counter() - t0, 3)
    diag["timings_s"] = seconds
    return diag


def summary_rows(diag: dict[str, Any]) -> list[dict[str, Any]]:
    """Per-layer headline numbers of a diagnosis (for a printed table or a figure).

    Args:
        diag: :func:`diagnose`'s output (or the same read back from JSON).

    Returns:
        One dict per layer: ``layer``, ``n``, ``row_range`` / ``raw_row_range`` (nats),
        ``target_r2``, ``entropy``, ``token_cosine``, ``common_direction_energy``,
        ``attn_out_norm``, ``mlp_out_norm``, ``residual_norm``, and the tied argmax of the
        seed model and of the counterfactual variants.
    """
    rows = []
    cf = diag["counterfactuals"]
    for l, sc in enumerate(diag["scores"]):
        qi, rs = diag["query_identity"]["layers"][l], diag["residual_stream"][l]
        row = {
            "layer": l,
            "n": sc["n"],
            "row_range": sc["row_range"],
            "raw_row_range": sc.get("raw_row_range", float("nan")),
            "target_r2": sc["target_r2"],
            "entropy": sc.get("entropy", float("nan")),
            "token_cosine": qi["token_cosine"],
            "common_direction_energy": qi["common_direction_energy"],
            "residual_norm": rs["residual_norm"],
            "attn_out_norm": rs["attn_out_norm"],
            "mlp_out_norm": rs["mlp_out_norm"],
        }
        for name, res in cf.items():
            row[f"tied_{name}"] = res["layers"][l]["argmax_match_tied"]
            row[f"cosine_{name}"] = res["layers"][l]["cosine"]
        rows.append(row)
    return rows
