"""Option 4 (SPEC §3.4): train the token embeddings, keep every derived attention weight frozen.

Starting from the seed derivation, only ``params["embed"]`` (E, [V, D]) is trained with optax
Adam (:mod:`jaxattn.options.training`: the objectives, the optimiser and the loop); the held-out
alignment is measured before, during and after training on the run's evaluation sequences.

Why the room to move is limited (quantified by :func:`score_scale`): every attention input is
``LN(x)``, whose norm is ``sqrt(D)``, so at layer 0 only the directions of E matter and a head's
scores are bounded by ``D * sigma_max(W_Q W_K^T) / sqrt(K)``; the std-0.01 normalisation fixes
that bound. In deeper layers the norm of E matters too, because it sets E's share of the
residual stream against the frozen random MLP's output.

Axis vocabulary: B sequences, L layers, H heads, T/S positions, D d_model, K d_head,
V vocabulary, P distinct (n, s) tables.
"""

# ruff: noqa: F722  (jaxtyping shape strings such as "R V" are not Python expressions)
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn.derive import derive_params
from jaxattn.errors import JaxattnError
from jaxattn.model import ModelConfig, Params
from jaxattn.options.training import NGRAM_PREFIX, QKInputsFn, TrainConfig, train_embeddings
from jaxattn.pipeline import (
    AnalysisResult,
    ModelRun,
    Prepared,
    RunConfig,
    evaluate,
    language_model_scores,
    layer_summary,
    run_model,
)
from jaxattn.progress import Timer, stage
from jaxattn.typing import ArrayLike, Bool, Float, Int, Integer

__all__ = [
    "default_train_config",
    "embedding_stats",
    "forward_flops_per_token",
    "heldout_alignment",
    "run_option4",
    "score_scale",
]


def heldout_alignment(
    params: Params,
    tokens: Integer[ArrayLike, "B T"],
    expected: Float[ArrayLike, "P B T T"],
    mask: Bool[ArrayLike, "P B T T"],
    pair_index: Int[ArrayLike, "L H"],
    config: ModelConfig,
    *,
    batch_size: int = 16,
    qk_inputs_fn: QKInputsFn | None = None,
    progress: bool = False,
    timer: Timer | None = None,
) -> tuple[list[dict[str, Any]], Float[np.ndarray, "B L H T T"]]:
    """Per-(layer, head) alignment records of ``params`` on the held-out sequences, and their attention.

    Args:
        params: model parameters.
        tokens: int [B, T] held-out sequences.
        expected: float32 [P, B, T, T] their expected attention.
        mask: bool [P, B, T, T] their valid query-key pairs.
        pair_index: int [L, H] table of each head.
        config: the model config.
        batch_size: sequences per forward call.
        qk_inputs_fn: optional ``(params, tokens) -> (q_in, k_in)``.
        progress: show a progress bar.
        timer: stage timer (stages "forward", "metrics").

    Returns:
        (records with option "option4", attention float32 [B, L, H, T, T]).
    """
    records, out = _heldout_run(
        params,
        tokens,
        expected,
        mask,
        pair_index,
        config,
        batch_size=batch_size,
        qk_inputs_fn=qk_inputs_fn,
        progress=progress,
        timer=timer,
    )
    return records, out.attn


def _heldout_run(
    params: Params,
    tokens: Any,
    expected: Any,
    mask: Any,
    pair_index: Any,
    config: ModelConfig,
    *,
    batch_size: int = 16,
    qk_inputs_fn: QKInputsFn | None = None,
    progress: bool = False,
    timer: Timer | None = None,
) -> tuple[list[dict[str, Any]], ModelRun]:
    """:func:`heldout_alignment` that keeps the whole :class:`~jaxattn.pipeline.ModelRun` (next-token log-probs too)."""
    fn = (lambda tok: qk_inputs_fn(params, jnp.asarray(tok))) if qk_inputs_fn is not None else None
    with stage(timer, "forward"):
        out = run_model(
            params, tokens, config, batch_size=batch_size, qk_inputs_fn=fn, progress=progress, desc="held-out forward"
        )
    with stage(timer, "metrics"):
        records = evaluate(expected, mask, pair_index, out.attn, config, option="option4")
    return records, out


def score_scale(
    params: Params, config: ModelConfig, attn: Float[ArrayLike, "B L H T T"] | None = None
) -> dict[str, list[float]]:
    """How far the frozen weights let attention scores move, per layer.

    With LayerNorm (scale 1, bias 0) every query/key input has norm <= sqrt(D), so a head's
    score ``q.k / sqrt(K)`` is bounded by ``D * sigma_max(W_Q W_K^T) / sqrt(K)``; a row's
    logit range (max - min over keys) is at most twice that. When ``attn`` is given, the
    realised logit range ``log max_j a_ij - log min_j a_ij`` (rows with >= 2 keys) is
    reported next to it.

    Args:
        params: wq, wk [L, H, D, K], ln1_scale, ln1_bias [L, D].
        config: model config.
        attn: optional float32 [B, L, H, T, T] attention.

    Returns:
        ``score_bound`` [L] (max over heads), ``score_bound_mean`` [L] (mean over heads),
        ``logit_range_mean``/``logit_range_max`` [L] (when ``attn`` is given).
    """
    wq = np.asarray(params["wq"], np.float64)
    wk = np.asarray(params["wk"], np.float64)
    D, K = wq.shape[-2], wq.shape[-1]
    # sigma_max(Wq Wk^T) = sigma_max(R_q R_k^T) with thin QR Wq = Q_q R_q, Wk = Q_k R_k (K x K, not D x D).
    rq = np.linalg.qr(wq, mode="r")
    rk = np.linalg.qr(wk, mode="r")
    smax = np.linalg.norm(np.einsum("lhij,lhkj->lhik", rq, rk), ord=2, axis=(-2, -1))
    if config.layernorm:
        scale = np.asarray(params["ln1_scale"], np.float64)
        bias = np.asarray(params["ln1_bias"], np.float64)
        in_norm = np.sqrt(D) * np.abs(scale).max(-1) + np.linalg.norm(bias, axis=-1)  # [L]
        bound = (in_norm[:, None] ** 2) * smax / np.sqrt(K)
    else:
        bound = np.full(smax.shape, np.nan)  # unbounded without LayerNorm: the input norm is free
    out: dict[str, list[float]] = {
        "score_bound": bound.max(-1).tolist(),
        "score_bound_mean": bound.mean(-1).tolist(),
    }
    if attn is not None:
        a = np.asarray(attn, np.float64)
        T = a.shape[-1]
        causal = np.tril(np.ones((T, T), bool))
        rows = np.arange(T) >= 1  # rows with >= 2 keys
        with np.errstate(divide="ignore"):
            la = np.where(causal, np.log(np.where(causal, a, 1.0)), np.nan)
        rng = np.nanmax(la, -1) - np.nanmin(la, -1)  # [B, L, H, T]
        # A probability that underflowed to 0 has no finite logit: such rows are left out.
        rng = np.where(np.isfinite(rng), rng, np.nan)[..., rows]
        out["logit_range_mean"] = np.nanmean(rng, axis=(0, 2, 3)).tolist()
        out["logit_range_max"] = np.nanmax(rng, axis=(0, 2, 3)).tolist()
    return out


def embedding_stats(before: Float[ArrayLike, "V D"], after: Float[ArrayLike, "V D"]) -> dict[str, float]:
    """How much E moved: relative change, row norms, off-diagonal cosine, direction change.

    Args:
        before, after: float [V, D].

    Returns:
        JSON-able dict of floats.
    """
    e0 = np.asarray(before, np.float64)
    e1 = np.asarray(after, np.float64)
    n0 = np.linalg.norm(e0, axis=1)
    n1 = np.linalg.norm(e1, axis=1)
    u0 = e0 / np.maximum(n0, 1e-12)[:, None]
    u1 = e1 / np.maximum(n1, 1e-12)[:, None]

    def offdiag_abs_cos(u: np.ndarray) -> float:
        s = u @ u.T
        off = s[~np.eye(s.shape[0], dtype=bool)]
        return float(np.abs(off).mean()) if off.size else 0.0

    return {
        "relative_change": float(np.linalg.norm(e1 - e0) / max(float(np.linalg.norm(e0)), 1e-12)),
        "row_norm_mean_before": float(n0.mean()),
        "row_norm_mean_after": float(n1.mean()),
        "row_norm_min_after": float(n1.min()),
        "row_norm_max_after": float(n1.max()),
        "direction_cos_mean": float(np.mean(np.sum(u0 * u1, axis=1))),
        "offdiag_abs_cos_before": offdiag_abs_cos(u0),
        "offdiag_abs_cos_after": offdiag_abs_cos(u1),
    }


#: Above this many analytic FLOPs per training token the smaller default schedule is used.
_LARGE_MODEL_FLOPS_PER_TOKEN = 2e7


def forward_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Analytic matmul FLOPs of the forward pass per token (projections, causal scores, MLP, logits)."""
    D, K, H, L, V = config.d_model, config.d_head, config.num_heads, config.num_layers, config.vocab_size
    per_layer = H * (3 * 2 * D * K + 2 * K * D) + H * 2 * K * seq_len  # QK^T and PV over the causal half
    if config.mlp:
        per_layer += 2 * 2 * D * 4 * D
    return float(L * per_layer + 2 * D * V)


def default_train_config(
    config: ModelConfig, run: RunConfig, base: TrainConfig | None = None, **overrides: Any
) -> TrainConfig:
    """Training settings for a run: ``base`` (default: sized to the model), then non-None ``overrides``.

    Without ``base``, models up to 2e7 forward FLOPs per token (the "small" preset: ~2e6) train 300
    steps of 8 sequences; larger ones (the seed preset, ~1.7e8) 100 steps of 4, which measured
    as enough for every layer of the seed preset on Shakespeare to improve (about 2 minutes on
    2 idle CPU cores). Sequences are ``run.seq_len`` long and the batch seed is the run seed.

    Args:
        config: the model config (sizes the default schedule).
        run: the run config (``seq_len`` and ``seed``).
        base: settings to start from instead of the sized default.
        **overrides: :class:`TrainConfig` fields; None values are ignored.

    Returns:
        :class:`TrainConfig`.

    Raises:
        JaxattnError: an override that is not a :class:`TrainConfig` field, or a bad value.
    """
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    bad = sorted(set(overrides) - fields)
    if bad:
        raise JaxattnError(f"unknown option 4 setting(s) {bad}; TrainConfig has {sorted(fields)}")
    if base is None:
        large = forward_flops_per_token(config, run.seq_len) > _LARGE_MODEL_FLOPS_PER_TOKEN
        steps, batch, every = (100, 4, 25) if large else (300, 8, 50)
        base = TrainConfig(steps=steps, batch_size=batch, eval_every=every, seq_len=run.seq_len, seed=run.seed)
    return dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})


def _improvement(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> dict[str, list[bool]]:
    """Per layer: did cosine and tie-aware argmax rise, and KL fall (layer summaries, after vs before)."""
    pairs_ab = list(zip(after, before, strict=True))

    def better(a: Any, b: Any, larger: bool) -> bool:
        if a is None or b is None:  # a layer with no valid queries (n/a) did not improve
            return False
        return bool(a > b) if larger else bool(a < b)

    return {
        "cosine": [better(a["cosine"], b["cosine"], True) for a, b in pairs_ab],
        "argmax_match_tied": [better(a["argmax_match_tied"], b["argmax_match_tied"], True) for a, b in pairs_ab],
        "kl": [better(a["kl"], b["kl"], False) for a, b in pairs_ab],
    }


def _option4_extra(
    train_cfg: TrainConfig,
    curves: dict[str, Any],
    before_records: list[dict[str, Any]],
    records: list[dict[str, Any]],
    start: tuple[Params, np.ndarray],
    end: tuple[Params, np.ndarray],
    config: ModelConfig,
) -> dict[str, Any]:
    """The ``extra`` of Option 4's result (see :func:`run_option4`); ``start``/``end`` are (params, attention)."""
    (params, before_attn), (trained, attn) = start, end
    before = [dict(r, option="before") for r in layer_summary(before_records)]
    after = [dict(r, option="option4") for r in layer_summary(records)]
    improved = _improvement(before, after)
    scale_before = score_scale(params, config, before_attn)
    scale_after = score_scale(trained, config, attn)
    return {
        "train_config": train_cfg.to_dict(),
        "curves": curves,
        "before": before,
        "after": after,
        "improved": improved,
        "improved_every_layer": {k: bool(all(v)) for k, v in improved.items()},
        "steps_per_sec": curves["steps_per_sec"],
        "compile_s": curves["compile_s"],
        "num_traces": curves["num_traces"],
        "frozen_bit_identical": curves["frozen_bit_identical"],
        "frozen_mismatched": curves["frozen_mismatched"],
        "trained_leaves": curves["trained_leaves"],
        "train_ngram_note": (
            None
            if not train_cfg.train_ngram or any(k.startswith(NGRAM_PREFIX) for k in params)
            else "train_ngram=True but the params hold no n-gram embedding leaves (the seed derivation folds E^n "
            "into W_Q), so only E was trained"
        ),
        "score_scale": {
            "score_bound": scale_before["score_bound"],
            "score_bound_mean": scale_before["score_bound_mean"],
            "logit_range_mean_before": scale_before.get("logit_range_mean"),
            "logit_range_mean_after": scale_after.get("logit_range_mean"),
            "logit_range_max_before": scale_before.get("logit_range_max"),
            "logit_range_max_after": scale_after.get("logit_range_max"),
        },
        "embedding": embedding_stats(params["embed"], trained["embed"]),
    }


def run_option4(
    prep: Prepared,
    *,
    progress: bool = True,
    timer: Timer | None = None,
    train_cfg: TrainConfig | None = None,
    params: Params | None = None,
    baseline: AnalysisResult | None = None,
    qk_inputs_fn: QKInputsFn | None = None,
    **overrides: Any,
) -> AnalysisResult:
    """Option 4 end to end: seed derivation -> train E (attention frozen) -> held-out alignment.

    Args:
        prep: the prepared run.
        progress: show progress bars.
        timer: stage timer (stages "derive", "train", "forward", "metrics").
        train_cfg: training settings (default: :func:`default_train_config`).
        params: starting parameters (default: the baseline's, else the seed derivation's).
        baseline: an already computed baseline result (reused for the "before" numbers).
        qk_inputs_fn: optional n-gram-aware query/key inputs as a function of params.
        **overrides: TrainConfig fields to override (e.g. ``steps=50``).

    Returns:
        :class:`~jaxattn.pipeline.AnalysisResult` labelled "option4"; ``extra`` holds
        ``train_config``, ``curves`` (see :func:`~jaxattn.options.training.train_embeddings`),
        ``before`` and ``after`` (per-layer summaries on the held-out sequences), ``improved``
        (per-layer booleans for cosine, tie-aware argmax and KL) and ``improved_every_layer``,
        ``steps_per_sec``, ``compile_s``, ``num_traces``, ``frozen_bit_identical`` and
        ``frozen_mismatched``, ``trained_leaves``, ``train_ngram_note``, ``score_scale``
        (:func:`score_scale` before/after), ``embedding`` (:func:`embedding_stats`) and
        ``language_model_before`` (the start's next-token scores; the result's own are the trained model's).
    """
    train_cfg = default_train_config(prep.config, prep.run, train_cfg, **overrides)
    base_params = baseline.params if baseline is not None else None
    if params is None and base_params is not None:
        params = base_params
    elif params is None:
        with stage(timer, "derive"):
            params = derive_params(prep.tables, prep.config, key=prep.key("derive"))
            jax.block_until_ready(params)
    heldout = functools.partial(
        _heldout_run,
        tokens=prep.tokens,
        expected=prep.expected,
        mask=prep.mask,
        pair_index=prep.pair_index,
        config=prep.config,
        batch_size=prep.run.batch_size,
        qk_inputs_fn=qk_inputs_fn,
        timer=timer,
    )
    # The baseline's numbers are "before" only when training starts from its parameters and inputs.
    if baseline is not None and base_params is not None and qk_inputs_fn is None and params is base_params:
        before_records, before_attn, lm_before = baseline.records, baseline.attn, baseline.language_model
    else:
        before_records, before_out = heldout(params, progress=progress)
        before_attn, lm_before = before_out.attn, language_model_scores(prep, before_out.next_logprob)
    key = jax.random.fold_in(prep.key("option4"), train_cfg.seed)
    with stage(timer, "train"):
        trained, curves = train_embeddings(
            params,
            train_cfg,
            key=key,
            tables=prep.tables,
            config=prep.config,
            tokens=prep.corpus.tokens,
            doc_ids=prep.corpus.doc_ids,
            progress=progress,
            qk_inputs_fn=qk_inputs_fn,
            heldout=lambda p: heldout(p)[0],
            before_records=before_records,
        )
    records, out = heldout(trained, progress=progress)
    extra = _option4_extra(
        train_cfg, curves, before_records, records, (params, before_attn), (trained, out.attn), prep.config
    )
    extra["language_model_before"] = lm_before
    lm = language_model_scores(prep, out.next_logprob)
    return AnalysisResult("option4", records, out.attn, trained, extra, language_model=lm)
