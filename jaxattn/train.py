"""Option 4 (SPEC §3.4): train the token embeddings, keep every derived attention weight frozen.

Starting from the seed derivation, only ``params["embed"]`` (E, [V, D]) is trained with optax
Adam; W_Q, W_K, W_V, W_O, the MLP and the LayerNorms are frozen with ``optax.multi_transform``
and ``optax.set_to_zero()`` and checked bit-identical after training.

Objectives:
    "kl": KL(expected || actual) averaged over the valid queries of every layer and head, where
        the expected attention comes from the count tables on sequences drawn from the COUNT
        corpus (never the evaluation corpus). The per-query KL is
        :func:`jaxattn.alignment.query_metrics`. Heads are weighted per ``TrainConfig.balance``:
        by default each distinct (n, s) table counts once (see :func:`head_weights`).
    "ce": next-token cross-entropy of the model's (tied) logits on the same sequences.

Axis vocabulary: B sequences, L layers, H heads, T/S positions, D d_model, K d_head,
V vocabulary, P distinct (n, s) tables.

Why the room to move is limited (quantified by :func:`score_scale`): every attention input is
``LN(x)``, whose norm is ``sqrt(D)``, so at layer 0 only the directions of E matter and a head's
scores are bounded by ``D * sigma_max(W_Q W_K^T) / sqrt(K)``; the std-0.01 normalisation fixes
that bound. In deeper layers the norm of E matters too, because it sets E's share of the
residual stream against the frozen random MLP's output.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxattn.alignment import expected_for_layout, query_metrics, sample_sequences
from jaxattn.errors import JaxattnError
from jaxattn.model import ModelConfig, Params, forward_batch
from jaxattn.pipeline import AnalysisResult, Prepared, baseline_params, batched_attention, evaluate, layer_summary
from jaxattn.progress import progress_iter

OBJECTIVES = ("kl", "ce")
BALANCES = ("tables", "queries")
#: Leaves a derivation may add for trainable n-gram query embeddings (trained when ``train_ngram``).
NGRAM_PREFIX = "ngram"
TRAIN, FREEZE = "train", "freeze"

#: ``qk_inputs_fn(params, tokens [B, T]) -> (q_in, k_in)`` each [B, L, T, D], traced inside the step.
QKInputsFn = Callable[[Params, jax.Array], tuple[jax.Array, jax.Array]]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Option 4 training settings.

    Attributes:
        steps: optimiser steps.
        learning_rate: Adam peak learning rate (cosine-decayed to ``lr_final_frac`` of it).
        batch_size: training sequences per step.
        seq_len: tokens per training sequence.
        objective: "kl" (expected vs actual attention) or "ce" (next-token cross-entropy).
        train_ngram: also train n-gram query-embedding leaves (``params`` keys starting with
            "ngram") when a derivation adds them; the seed model folds E^n into W_Q, so for it
            only E exists and this changes nothing (recorded in the result).
        eval_every: held-out alignment every this many steps (and before the first and after the
            last step).
        seed: folded into the training PRNG key of :func:`run_option4` (which batches are drawn).
        warmup_steps: linear warm-up steps of the learning rate.
        lr_final_frac: final learning rate as a fraction of the peak.
        grad_clip: global-norm gradient clipping (None: off).
        balance: how the "kl" objective weights heads. "queries": every valid query of every
            layer and head counts once (a plain pool). "tables": every distinct (n, s) table
            counts once, split evenly over the heads that use it; the layout repeats the same
            n=2 heads in layers 1..L-1, so a plain pool lets those copies outvote layer 0
            (11:1 in the seed preset) and E is bent towards them at layer 0's expense.
    """

    steps: int = 100
    learning_rate: float = 3e-3
    batch_size: int = 4
    seq_len: int = 64
    objective: str = "kl"
    train_ngram: bool = False
    eval_every: int = 25
    seed: int = 0
    warmup_steps: int = 10
    lr_final_frac: float = 0.1
    grad_clip: float | None = 1.0
    balance: str = "tables"

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "eval_every"):
            if int(getattr(self, name)) < 1:
                raise JaxattnError(f"{name}={getattr(self, name)} must be >= 1")
        if self.objective not in OBJECTIVES:
            raise JaxattnError(f"objective={self.objective!r}; choose one of {list(OBJECTIVES)}")
        if not (self.learning_rate > 0 and np.isfinite(self.learning_rate)):
            raise JaxattnError(f"learning_rate={self.learning_rate} must be a positive finite number")
        if self.warmup_steps < 0:
            raise JaxattnError(f"warmup_steps={self.warmup_steps} must be >= 0")
        if not 0.0 <= self.lr_final_frac <= 1.0:
            raise JaxattnError(f"lr_final_frac={self.lr_final_frac} must be in [0, 1]")
        if self.balance not in BALANCES:
            raise JaxattnError(f"balance={self.balance!r}; choose one of {list(BALANCES)}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise JaxattnError(f"grad_clip={self.grad_clip} must be > 0 or None")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict."""
        return dataclasses.asdict(self)


class Batch(NamedTuple):
    """One training batch, built on the host.

    Attributes:
        tokens: int32 [B, T].
        expected: float32 [P, B, T, T] expected attention ("kl"; None for "ce").
        mask: bool [P, B, T, T] valid query-key pairs ("kl"; None for "ce").
    """

    tokens: Any
    expected: Any = None
    mask: Any = None


def layout_pairs(config: ModelConfig) -> tuple[list[tuple[int, int]], np.ndarray]:
    """The distinct (n, s) of the layout and each head's index into them (as ``pipeline.prepare``).

    Returns:
        pairs (sorted), pair_index int32 [L, H].
    """
    pairs = sorted({config.layout(l, h) for l in range(config.num_layers) for h in range(config.num_heads)})
    index = np.array(
        [[pairs.index(config.layout(l, h)) for h in range(config.num_heads)] for l in range(config.num_layers)],
        dtype=np.int32,
    )
    return pairs, index


def trainable_labels(params: Params, train_ngram: bool = False) -> dict[str, str]:
    """``"train"`` for E (and n-gram leaves when ``train_ngram``), ``"freeze"`` for everything else."""
    if "embed" not in params:
        raise JaxattnError(f"params have no 'embed' leaf to train (keys: {sorted(params)})")
    return {k: TRAIN if k == "embed" or (train_ngram and k.startswith(NGRAM_PREFIX)) else FREEZE for k in params}


def make_optimizer(train_cfg: TrainConfig, params: Params) -> optax.GradientTransformation:
    """Adam (warm-up + cosine decay, optional clipping) on the trainable leaves; ``set_to_zero`` on the rest."""
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0 if train_cfg.warmup_steps else train_cfg.learning_rate,
        peak_value=train_cfg.learning_rate,
        warmup_steps=min(train_cfg.warmup_steps, max(train_cfg.steps - 1, 0)),
        decay_steps=train_cfg.steps,
        end_value=train_cfg.learning_rate * train_cfg.lr_final_frac,
    )
    chain = [optax.clip_by_global_norm(train_cfg.grad_clip)] if train_cfg.grad_clip is not None else []
    adam = optax.chain(*chain, optax.adam(schedule))
    # Frozen leaves get no optimiser state and an exactly-zero update.
    return optax.multi_transform(
        {TRAIN: adam, FREEZE: optax.set_to_zero()}, trainable_labels(params, train_cfg.train_ngram)
    )


def head_weights(pair_index: np.ndarray, balance: str = "tables") -> np.ndarray:
    """Per-head weights of the "kl" objective.

    Args:
        pair_index: int [L, H], each head's (n, s) table.
        balance: "queries" (all ones) or "tables" (1 / number of heads sharing the head's table).

    Returns:
        float32 [L, H].
    """
    pair_index = np.asarray(pair_index)
    if balance == "queries":
        return np.ones(pair_index.shape, np.float32)
    if balance != "tables":
        raise JaxattnError(f"balance={balance!r}; choose one of {list(BALANCES)}")
    uses = np.bincount(pair_index.reshape(-1))
    return (1.0 / uses[pair_index]).astype(np.float32)


def kl_loss(
    params: Params,
    batch: Batch,
    config: ModelConfig,
    pair_index: np.ndarray,
    qk_inputs_fn: QKInputsFn | None = None,
    weights: np.ndarray | None = None,
) -> jax.Array:
    """KL(expected || actual) averaged over the valid queries of every layer, head and sequence.

    Args:
        params: model parameters.
        batch: tokens [B, T], expected [P, B, T, T], mask [P, B, T, T].
        config: static model config.
        pair_index: int [L, H] (static) index of each head's (n, s) into P.
        qk_inputs_fn: optional n-gram-aware query/key inputs as a function of ``params``.
        weights: optional float [L, H] head weights (:func:`head_weights`); None: all ones.

    Returns:
        float32 scalar: ``sum w_lh KL_lhbi / sum w_lh [valid_lhbi]``.
    """
    kw = {"qk_inputs": qk_inputs_fn(params, batch.tokens)} if qk_inputs_fn is not None else {}
    attn = forward_batch(params, batch.tokens, config, **kw).attn  # [B, L, H, T, T]
    L, H = pair_index.shape
    B, T = batch.tokens.shape
    idx = np.asarray(pair_index).reshape(-1)  # static: a gather with constant indices
    exp = jnp.asarray(batch.expected)[idx].reshape(L * H * B, T, T)
    msk = jnp.asarray(batch.mask)[idx].reshape(L * H * B, T, T)
    act = jnp.moveaxis(attn, 0, 2).reshape(L * H * B, T, T)
    # The metric kernel's own KL (ε=1e-10 in the logs); unused outputs are dead code under jit.
    q = jax.vmap(query_metrics)(exp, act, msk)
    w = jnp.ones(L * H, jnp.float32) if weights is None else jnp.asarray(weights, jnp.float32).reshape(-1)
    w = jnp.repeat(w, B)[:, None]  # [L*H*B, 1], same order as the flattening above
    denom = jnp.sum(w * q["valid"])
    return jnp.sum(w * q["kl"]) / jnp.where(denom > 0, denom, 1.0)


def ce_loss(params: Params, batch: Batch, config: ModelConfig, qk_inputs_fn: QKInputsFn | None = None) -> jax.Array:
    """Mean next-token cross-entropy (nats) of the tied-unembedding logits.

    Args:
        params: model parameters.
        batch: tokens [B, T].
        config: static model config.
        qk_inputs_fn: optional query/key inputs as a function of ``params``.

    Returns:
        float32 scalar.
    """
    kw = {"qk_inputs": qk_inputs_fn(params, batch.tokens)} if qk_inputs_fn is not None else {}
    logits = forward_batch(params, batch.tokens, config, **kw).logits  # [B, T, V]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1].astype(jnp.float32), batch.tokens[:, 1:])
    return jnp.mean(ce)


class TrainStep:
    """A jitted Option 4 step ``(params, opt_state, batch) -> (params, opt_state, loss)`` that counts its traces.

    ``params`` and ``opt_state`` are donated: pass copies if the caller still needs the originals.
    """

    def __init__(self, fn: Callable[..., Any], max_traces: int | None):
        self.traces = 0
        self.max_traces = max_traces

        def counted(*args: Any) -> Any:
            # Python side effect: runs once per trace, never per call. (A per-instance counter:
            # chex.assert_max_traces keys on the function's code, shared by every TrainStep.)
            self.traces += 1
            if self.max_traces is not None and self.traces > self.max_traces:
                raise JaxattnError(
                    f"the option 4 train step was traced {self.traces} times (max_traces={self.max_traces}); "
                    "batch shapes or dtypes changed between steps"
                )
            return fn(*args)

        self.jitted = jax.jit(counted, donate_argnums=(0, 1))

    def __call__(self, params: Params, opt_state: Any, batch: Batch) -> tuple[Params, Any, jax.Array]:
        return self.jitted(params, opt_state, batch)

    def lower(self, *args: Any) -> Any:
        """``jax.jit(...).lower`` for ahead-of-time compilation (benchmarks)."""
        return self.jitted.lower(*args)


def _step_fn(
    config: ModelConfig,
    train_cfg: TrainConfig,
    optimizer: optax.GradientTransformation,
    qk_inputs_fn: QKInputsFn | None,
) -> Callable[[Params, Any, Batch], tuple[Params, Any, jax.Array]]:
    """The un-jitted step (also the op-by-op peer of the benchmark)."""
    _, pair_index = layout_pairs(config)
    weights = head_weights(pair_index, train_cfg.balance)

    def loss_fn(params: Params, batch: Batch) -> jax.Array:
        if train_cfg.objective == "kl":
            return kl_loss(params, batch, config, pair_index, qk_inputs_fn, weights)
        return ce_loss(params, batch, config, qk_inputs_fn)

    def step(params: Params, opt_state: Any, batch: Batch) -> tuple[Params, Any, jax.Array]:
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        # Frozen leaves' gradients feed only set_to_zero, so XLA drops their computation.
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def make_train_step(
    config: ModelConfig,
    train_cfg: TrainConfig,
    optimizer: optax.GradientTransformation,
    *,
    qk_inputs_fn: QKInputsFn | None = None,
    max_traces: int | None = 1,
) -> TrainStep:
    """The jitted training step, compiled once for fixed batch shapes.

    Args:
        config: static model config (closed over).
        train_cfg: training settings (objective closed over).
        optimizer: from :func:`make_optimizer`.
        qk_inputs_fn: optional ``(params, tokens [B, T]) -> (q_in, k_in)`` each [B, L, T, D].
        max_traces: raise :class:`JaxattnError` if traced more often than this; None: no guard.

    Returns:
        :class:`TrainStep`: ``step(params, opt_state, batch) -> (params, opt_state, loss)``.
    """
    return TrainStep(_step_fn(config, train_cfg, optimizer, qk_inputs_fn), max_traces)


def sample_training_tokens(prep: Prepared, train_cfg: TrainConfig, key: jax.Array) -> np.ndarray:
    """Every step's training sequences, drawn from the COUNT corpus (never the evaluation corpus).

    One :func:`~jaxattn.alignment.sample_sequences` call for all steps: its document scan is
    over the whole corpus, so it is done once rather than per step.

    Returns:
        int32 [steps, B, T].
    """
    S, B, T = train_cfg.steps, train_cfg.batch_size, train_cfg.seq_len
    tokens = sample_sequences(prep.corpus.tokens, prep.corpus.doc_ids, T, S * B, key)
    return tokens.reshape(S, B, T)


def make_batch(
    prep: Prepared, tokens: np.ndarray, objective: str = "kl", pairs: list[tuple[int, int]] | None = None
) -> Batch:
    """A training batch with its expected attention built on the host from the count tables.

    Args:
        prep: the prepared run (``prep.tables`` give the expected attention).
        tokens: int [B, T] count-corpus sequences (from :func:`sample_training_tokens`).
        objective: "kl" builds expected/mask; "ce" needs only the tokens.
        pairs: the layout's (n, s) pairs (default: from ``prep.config``).

    Returns:
        :class:`Batch` of numpy arrays.
    """
    tokens = np.asarray(tokens, np.int32)
    if objective == "ce":
        return Batch(tokens)
    expected, mask = expected_for_layout(prep.tables, tokens, pairs or layout_pairs(prep.config)[0])
    return Batch(tokens, expected, mask)


def heldout_alignment(
    prep: Prepared, params: Params, *, qk_inputs_fn: QKInputsFn | None = None, progress: bool = False
) -> tuple[list[dict[str, Any]], np.ndarray]:
    """Per-(layer, head) alignment records of ``params`` on the held-out sequences, and their attention.

    Returns:
        (records with option "option4", attention float32 [B, L, H, T, T]).
    """
    fn = (lambda tok: qk_inputs_fn(params, jnp.asarray(tok))) if qk_inputs_fn is not None else None
    attn = batched_attention(prep, params, qk_inputs_fn=fn, progress=progress, desc="held-out forward")
    return evaluate(prep, attn, "option4"), attn


def _layer_means(records: list[dict[str, Any]], key: str) -> list[float]:
    return [float(r[key]) for r in layer_summary(records)]


def score_scale(params: Params, config: ModelConfig, attn: np.ndarray | None = None) -> dict[str, list[float]]:
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


def embedding_stats(before: jax.Array, after: jax.Array) -> dict[str, float]:
    """How much E moved: relative change, row norms, off-diagonal cosine, direction change.

    Args:
        before, after: float [V, D].
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
        "relative_change": float(np.linalg.norm(e1 - e0) / max(np.linalg.norm(e0), 1e-12)),
        "row_norm_mean_before": float(n0.mean()),
        "row_norm_mean_after": float(n1.mean()),
        "row_norm_min_after": float(n1.min()),
        "row_norm_max_after": float(n1.max()),
        "direction_cos_mean": float(np.mean(np.sum(u0 * u1, axis=1))),
        "offdiag_abs_cos_before": offdiag_abs_cos(u0),
        "offdiag_abs_cos_after": offdiag_abs_cos(u1),
    }


def frozen_check(before: Params, after: Params, labels: dict[str, str]) -> dict[str, Any]:
    """Bit-identity of every frozen leaf (``np.array_equal``), and whether each trained leaf changed."""
    mismatched = [
        k
        for k, lab in labels.items()
        if lab == FREEZE and not np.array_equal(np.asarray(before[k]), np.asarray(after[k]))
    ]
    changed = {
        k: bool(not np.array_equal(np.asarray(before[k]), np.asarray(after[k])))
        for k, lab in labels.items()
        if lab == TRAIN
    }
    return {
        "frozen_bit_identical": not mismatched,
        "frozen_mismatched": mismatched,
        "frozen_leaves": sorted(k for k, lab in labels.items() if lab == FREEZE),
        "trained_changed": changed,
    }


def train_embeddings(
    prep: Prepared,
    params: Params,
    train_cfg: TrainConfig,
    *,
    key: jax.Array,
    progress: bool = True,
    qk_inputs_fn: QKInputsFn | None = None,
    evaluate_heldout: bool = True,
    before_records: list[dict[str, Any]] | None = None,
    eval_last: bool = True,
) -> tuple[Params, dict[str, Any]]:
    """Trains E (and n-gram leaves if asked) with every other weight frozen.

    Batches are sequences of the COUNT corpus (``prep.corpus``) drawn with ``key`` and built on
    the host; the held-out curve uses ``prep.tokens`` (the evaluation sequences).

    Args:
        prep: the prepared run.
        params: starting parameters (not modified; the step works on a copy).
        train_cfg: training settings.
        key: PRNG key of the training batches.
        progress: show a progress bar.
        qk_inputs_fn: optional ``(params, tokens) -> (q_in, k_in)``, each [B, L, T, D].
        evaluate_heldout: record the held-out alignment every ``eval_every`` steps.
        before_records: held-out records of ``params`` if already computed (the step-0 point).
        eval_last: evaluate after the last step (off when the caller scores the result itself).

    Returns:
        (trained params, curves) where curves holds ``step``, ``loss`` [steps], ``step_time_s``,
        ``eval_step`` and per-eval lists of per-layer ``eval_cosine``, ``eval_argmax_match_tied``,
        ``eval_kl``, ``eval_entropy`` (each [L]), plus ``compile_s``, ``steps_per_sec``,
        ``num_traces`` and the frozen-weight check.
    """
    config = prep.config
    labels = trainable_labels(params, train_cfg.train_ngram)
    optimizer = make_optimizer(train_cfg, params)
    step = make_train_step(config, train_cfg, optimizer, qk_inputs_fn=qk_inputs_fn)
    pairs, _ = layout_pairs(config)
    # The step donates its inputs; the caller's params stay valid for the bit-identity check.
    work = jax.tree.map(jnp.copy, params)
    opt_state = optimizer.init(work)
    curves: dict[str, Any] = {
        "step": [],
        "loss": [],
        "step_time_s": [],
        "eval_step": [],
        "eval_cosine": [],
        "eval_argmax_match_tied": [],
        "eval_kl": [],
        "eval_entropy": [],
    }

    def record_eval(at: int, p: Params | None, recs: list[dict[str, Any]] | None = None) -> None:
        if recs is None:
            recs, _ = heldout_alignment(prep, p, qk_inputs_fn=qk_inputs_fn)
        curves["eval_step"].append(at)
        for name in ("cosine", "argmax_match_tied", "kl", "entropy"):
            curves[f"eval_{name}"].append(_layer_means(recs, name))

    if evaluate_heldout:
        record_eval(0, work, before_records)
    host_s = train_s = first_s = 0.0
    t0 = time.perf_counter()
    train_tokens = sample_training_tokens(prep, train_cfg, key)
    batch = make_batch(prep, train_tokens[0], train_cfg.objective, pairs)
    host_s += time.perf_counter() - t0
    seg = time.perf_counter()
    for i in progress_iter(
        range(train_cfg.steps), desc="option 4: training E", enabled=progress, total=train_cfg.steps
    ):
        work, opt_state, loss = step(work, opt_state, batch)  # dispatched asynchronously
        if i + 1 < train_cfg.steps:
            # Build the next batch on the host while the step runs.
            t0 = time.perf_counter()
            batch = make_batch(prep, train_tokens[i + 1], train_cfg.objective, pairs)
            host_s += time.perf_counter() - t0
        loss_f = float(loss)  # waits for the step: at most one step in flight keeps the bar honest
        now = time.perf_counter()
        if i == 0:
            first_s = now - seg  # trace + compile + one step (+ one host batch)
        else:
            train_s += now - seg
        if not np.isfinite(loss_f):
            raise JaxattnError(
                f"option 4 training diverged at step {i} (loss={loss_f}); lower learning_rate={train_cfg.learning_rate}"
            )
        curves["step"].append(i + 1)
        curves["loss"].append(loss_f)
        curves["step_time_s"].append(now - seg)
        last = i + 1 == train_cfg.steps
        if evaluate_heldout and (((i + 1) % train_cfg.eval_every == 0 and not last) or (last and eval_last)):
            record_eval(i + 1, work)
        seg = time.perf_counter()
    # Steady-state throughput of the training loop (host batching overlapped), evaluations excluded.
    later = np.asarray(curves["step_time_s"][1:])
    median = float(np.median(later)) if later.size else first_s
    curves["compile_s"] = max(first_s - median, 0.0)
    curves["first_step_s"] = first_s
    curves["median_step_s"] = median
    curves["steps_per_sec"] = (later.size / train_s) if train_s > 0 else 1.0 / max(first_s, 1e-12)
    curves["host_batch_s"] = host_s
    curves["num_traces"] = step.traces
    curves.update(frozen_check(params, work, labels))
    curves["trained_leaves"] = sorted(k for k, lab in labels.items() if lab == TRAIN)
    return work, curves


#: Above this many analytic FLOPs per training token the smaller default schedule is used.
_LARGE_MODEL_FLOPS_PER_TOKEN = 2e7


def forward_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Analytic matmul FLOPs of the forward pass per token (projections, causal scores, MLP, logits)."""
    D, K, H, L, V = config.d_model, config.d_head, config.num_heads, config.num_layers, config.vocab_size
    per_layer = H * (3 * 2 * D * K + 2 * K * D) + H * 2 * K * seq_len  # QK^T and PV over the causal half
    if config.mlp:
        per_layer += 2 * 2 * D * 4 * D
    return float(L * per_layer + 2 * D * V)


def default_train_config(prep: Prepared, base: TrainConfig | None = None, **overrides: Any) -> TrainConfig:
    """Training settings for a run: ``base`` (default: sized to the model), then non-None ``overrides``.

    Without ``base``, models up to 2e7 forward FLOPs per token (the "small" preset: ~2e6) train 300
    steps of 8 sequences; larger ones (the seed preset, ~1.7e8) 100 steps of 4, which measured
    as enough for every layer of the seed preset on Shakespeare to improve (about 2 minutes on
    2 idle CPU cores). Sequences are ``prep.run.seq_len`` long and the batch seed is the run seed.

    Raises:
        JaxattnError: an override that is not a :class:`TrainConfig` field, or a bad value.
    """
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    bad = sorted(set(overrides) - fields)
    if bad:
        raise JaxattnError(f"unknown option 4 setting(s) {bad}; TrainConfig has {sorted(fields)}")
    if base is None:
        large = forward_flops_per_token(prep.config, prep.run.seq_len) > _LARGE_MODEL_FLOPS_PER_TOKEN
        steps, batch, every = (100, 4, 25) if large else (300, 8, 50)
        base = TrainConfig(
            steps=steps, batch_size=batch, eval_every=every, seq_len=prep.run.seq_len, seed=prep.run.seed
        )
    return dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})


def run_option4(
    prep: Prepared,
    *,
    progress: bool = True,
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
        train_cfg: training settings (default: :func:`default_train_config`).
        params: starting parameters (default: :func:`jaxattn.pipeline.baseline_params`).
        baseline: an already computed baseline result (reused for the "before" numbers).
        qk_inputs_fn: optional n-gram-aware query/key inputs as a function of params.
        **overrides: TrainConfig fields to override (e.g. ``steps=50``).

    Returns:
        :class:`AnalysisResult` labelled "option4"; ``extra`` holds ``train_config``, ``curves``
        (see :func:`train_embeddings`), ``before`` and ``after`` (per-layer summaries on the
        held-out sequences), ``improved`` (per-layer booleans for cosine, tie-aware argmax and KL)
        and ``improved_every_layer``, ``steps_per_sec``, ``compile_s``, ``num_traces``,
        ``frozen_bit_identical`` and ``frozen_mismatched``, ``trained_leaves``,
        ``train_ngram_note``, ``score_scale`` (:func:`score_scale` before/after) and
        ``embedding`` (:func:`embedding_stats`).
    """
    train_cfg = default_train_config(prep, train_cfg, **overrides)
    has_base = baseline is not None and baseline.params is not None
    if params is None:
        params = baseline.params if has_base else baseline_params(prep)
    # The baseline's numbers are "before" only when training starts from its parameters and inputs.
    if has_base and qk_inputs_fn is None and params is baseline.params:
        before_records, before_attn = baseline.records, baseline.attn
    else:
        before_records, before_attn = heldout_alignment(prep, params, qk_inputs_fn=qk_inputs_fn, progress=progress)
    key = jax.random.fold_in(prep.key("option4"), train_cfg.seed)
    with prep.timer.stage("train"):
        trained, curves = train_embeddings(
            prep,
            params,
            train_cfg,
            key=key,
            progress=progress,
            qk_inputs_fn=qk_inputs_fn,
            before_records=before_records,
        )
    records, attn = heldout_alignment(prep, trained, qk_inputs_fn=qk_inputs_fn, progress=progress)
    before = [dict(r, option="before") for r in layer_summary(before_records)]
    after = [dict(r, option="option4") for r in layer_summary(records)]
    pairs_ab = list(zip(after, before, strict=True))
    improved = {
        "cosine": [a["cosine"] > b["cosine"] for a, b in pairs_ab],
        "argmax_match_tied": [a["argmax_match_tied"] > b["argmax_match_tied"] for a, b in pairs_ab],
        "kl": [a["kl"] < b["kl"] for a, b in pairs_ab],
    }
    scale_before = score_scale(params, prep.config, before_attn)
    scale_after = score_scale(trained, prep.config, attn)
    extra = {
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
    return AnalysisResult("option4", records, attn, trained, extra)
