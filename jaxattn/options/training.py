"""Option 4's training loop: optax Adam on the token embeddings, every other weight frozen.

Only ``params["embed"]`` (E, [V, D]) is trained (and n-gram query leaves when asked); W_Q, W_K,
W_V, W_O, the MLP and the LayerNorms are frozen with ``optax.multi_transform`` and
``optax.set_to_zero()`` and checked bit-identical after training (:func:`frozen_check`).

Objectives:
    "kl": KL(expected || actual) averaged over the valid queries of every layer and head, where
        the expected attention comes from the count tables on sequences drawn from the COUNT
        corpus (never the evaluation corpus). The per-query KL is
        :func:`jaxattn.alignment.query_metrics`. Heads are weighted per ``TrainConfig.balance``:
        by default each distinct (n, s) table counts once (see :func:`head_weights`).
    "ce": next-token cross-entropy of the model's (tied) logits on the same sequences.

:mod:`jaxattn.options.trained` runs this on a prepared run (Option 4 end to end).

Axis vocabulary: S steps, B sequences, L layers, H heads, T/S positions, D d_model, K d_head,
V vocabulary, P distinct (n, s) tables, N corpus tokens.
"""

# ruff: noqa: F722  (jaxtyping shape strings such as "R V" are not Python expressions)
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
from jaxattn.counts import CountMatrix
from jaxattn.errors import JaxattnError
from jaxattn.model import ModelConfig, Params, forward_batch
from jaxattn.pipeline import layer_summary
from jaxattn.progress import progress_iter
from jaxattn.typing import Array, ArrayLike, Float, Int, Integer, PRNGKey

__all__ = [
    "BALANCES",
    "FREEZE",
    "NGRAM_PREFIX",
    "OBJECTIVES",
    "TRAIN",
    "Batch",
    "QKInputsFn",
    "TrainConfig",
    "TrainStep",
    "ce_loss",
    "frozen_check",
    "head_weights",
    "kl_loss",
    "layout_pairs",
    "make_batch",
    "make_optimizer",
    "make_train_step",
    "sample_training_tokens",
    "step_fn",
    "train_embeddings",
    "trainable_labels",
]

OBJECTIVES = ("kl", "ce")
BALANCES = ("tables", "queries")
#: Leaves a derivation may add for trainable n-gram query embeddings (trained when ``train_ngram``).
NGRAM_PREFIX = "ngram"
TRAIN, FREEZE = "train", "freeze"

#: ``qk_inputs_fn(params, tokens [B, T]) -> (q_in, k_in)`` each [B, L, T, D], traced inside the step.
QKInputsFn = Callable[[Params, jax.Array], tuple[jax.Array, jax.Array]]

#: The held-out alignment records of a parameter set (see :func:`train_embeddings`).
HeldoutFn = Callable[[Params], list[dict[str, Any]]]


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
        seed: folded into the training PRNG key of :func:`~jaxattn.options.trained.run_option4`
            (which batches are drawn).
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


def layout_pairs(config: ModelConfig) -> tuple[list[tuple[int, int]], Int[np.ndarray, "L H"]]:
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


def head_weights(pair_index: Int[ArrayLike, "L H"], balance: str = "tables") -> Float[np.ndarray, "L H"]:
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
    pair_index: Int[np.ndarray, "L H"],
    qk_inputs_fn: QKInputsFn | None = None,
    weights: Float[ArrayLike, "L H"] | None = None,
) -> Float[Array, ""]:
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


def ce_loss(
    params: Params, batch: Batch, config: ModelConfig, qk_inputs_fn: QKInputsFn | None = None
) -> Float[Array, ""]:
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


def step_fn(
    config: ModelConfig,
    train_cfg: TrainConfig,
    optimizer: optax.GradientTransformation,
    qk_inputs_fn: QKInputsFn | None,
) -> Callable[[Params, Any, Batch], tuple[Params, Any, jax.Array]]:
    """The un-jitted step ``(params, opt_state, batch) -> (params, opt_state, loss)``.

    :func:`make_train_step` jits it; the training benchmark also runs it op by op.

    Args:
        config: static model config.
        train_cfg: training settings (objective and head balance).
        optimizer: from :func:`make_optimizer`.
        qk_inputs_fn: optional ``(params, tokens [B, T]) -> (q_in, k_in)``.

    Returns:
        The step function.
    """
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
    return TrainStep(step_fn(config, train_cfg, optimizer, qk_inputs_fn), max_traces)


def sample_training_tokens(
    tokens: Integer[ArrayLike, " N"], doc_ids: Integer[ArrayLike, " N"], train_cfg: TrainConfig, key: PRNGKey
) -> Int[np.ndarray, "S B T"]:
    """Every step's training sequences, drawn from the COUNT corpus (never the evaluation corpus).

    One :func:`~jaxattn.alignment.sample_sequences` call for all steps: its document scan is
    over the whole corpus, so it is done once rather than per step.

    Args:
        tokens: int [N] count-corpus tokens.
        doc_ids: int [N] their documents.
        train_cfg: ``steps``, ``batch_size`` and ``seq_len``.
        key: PRNG key of the draw.

    Returns:
        int32 [steps, B, T].
    """
    S, B, T = train_cfg.steps, train_cfg.batch_size, train_cfg.seq_len
    seqs = sample_sequences(tokens, doc_ids, T, S * B, key)
    return seqs.reshape(S, B, T)


def make_batch(
    tokens: Integer[ArrayLike, "B T"],
    tables: dict[tuple[int, int], CountMatrix],
    pairs: list[tuple[int, int]],
    objective: str = "kl",
) -> Batch:
    """A training batch with its expected attention built on the host from the count tables.

    Args:
        tokens: int [B, T] count-corpus sequences (from :func:`sample_training_tokens`).
        tables: ``{(n, s): CountMatrix}`` of the count corpus (they give the expected attention).
        pairs: the layout's (n, s) pairs (:func:`layout_pairs`).
        objective: "kl" builds expected/mask; "ce" needs only the tokens.

    Returns:
        :class:`Batch` of numpy arrays.
    """
    tokens = np.asarray(tokens, np.int32)
    if objective == "ce":
        return Batch(tokens)
    expected, mask = expected_for_layout(tables, tokens, pairs)
    return Batch(tokens, expected, mask)


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


#: The per-step and per-evaluation lists of the training curves, in their order.
_CURVE_LISTS = (
    "step",
    "loss",
    "step_time_s",
    "eval_step",
    "eval_cosine",
    "eval_argmax_match_tied",
    "eval_kl",
    "eval_entropy",
)


def _record_eval(curves: dict[str, Any], at: int, records: list[dict[str, Any]]) -> None:
    """Appends one held-out evaluation (per-layer means over heads) to the curves."""
    curves["eval_step"].append(at)
    for name in ("cosine", "argmax_match_tied", "kl", "entropy"):
        # A layer with no valid queries has None (n/a): NaN keeps the curve's shape.
        curves[f"eval_{name}"].append(
            [float("nan") if r[name] is None else float(r[name]) for r in layer_summary(records)]
        )


def _run_steps(
    step: TrainStep,
    state: tuple[Params, Any],
    train_tokens: np.ndarray,
    batch: Batch,
    make_next: Callable[[np.ndarray], Batch],
    train_cfg: TrainConfig,
    curves: dict[str, Any],
    on_step: Callable[[int, Params], None],
    progress: bool,
    host_s: float,
) -> tuple[Params, dict[str, float]]:
    """The training loop: one step in flight, the next batch built on the host meanwhile.

    Returns:
        (trained params, seconds ``host`` (batch building, from ``host_s`` on), ``train`` (steps
        after the first), ``first``).
    """
    work, opt_state = state
    secs = {"host": host_s, "train": 0.0, "first": 0.0}
    seg = time.perf_counter()
    for i in progress_iter(
        range(train_cfg.steps), desc="option 4: training E", enabled=progress, total=train_cfg.steps
    ):
        work, opt_state, loss = step(work, opt_state, batch)  # dispatched asynchronously
        if i + 1 < train_cfg.steps:
            # Build the next batch on the host while the step runs.
            t0 = time.perf_counter()
            batch = make_next(train_tokens[i + 1])
            secs["host"] += time.perf_counter() - t0
        loss_f = float(loss)  # waits for the step: at most one step in flight keeps the bar honest
        now = time.perf_counter()
        if i == 0:
            secs["first"] = now - seg  # trace + compile + one step (+ one host batch)
        else:
            secs["train"] += now - seg
        if not np.isfinite(loss_f):
            raise JaxattnError(
                f"option 4 training diverged at step {i} (loss={loss_f}); lower learning_rate={train_cfg.learning_rate}"
            )
        curves["step"].append(i + 1)
        curves["loss"].append(loss_f)
        curves["step_time_s"].append(now - seg)
        on_step(i + 1, work)
        seg = time.perf_counter()
    return work, secs


def _add_timings(curves: dict[str, Any], secs: dict[str, float]) -> None:
    """Steady-state throughput of the training loop (host batching overlapped), evaluations excluded."""
    first_s, train_s = secs["first"], secs["train"]
    later = np.asarray(curves["step_time_s"][1:])
    median = float(np.median(later)) if later.size else first_s
    curves["compile_s"] = max(first_s - median, 0.0)
    curves["first_step_s"] = first_s
    curves["median_step_s"] = median
    curves["steps_per_sec"] = (later.size / train_s) if train_s > 0 else 1.0 / max(first_s, 1e-12)
    curves["host_batch_s"] = secs["host"]


def train_embeddings(
    params: Params,
    train_cfg: TrainConfig,
    *,
    key: PRNGKey,
    tables: dict[tuple[int, int], CountMatrix],
    config: ModelConfig,
    tokens: Integer[ArrayLike, " N"],
    doc_ids: Integer[ArrayLike, " N"],
    progress: bool = True,
    qk_inputs_fn: QKInputsFn | None = None,
    heldout: HeldoutFn | None = None,
    before_records: list[dict[str, Any]] | None = None,
    eval_last: bool = True,
) -> tuple[Params, dict[str, Any]]:
    """Trains E (and n-gram leaves if asked) with every other weight frozen.

    Batches are sequences of the COUNT corpus (``tokens``, ``doc_ids``) drawn with ``key`` and
    built on the host from ``tables``; the held-out curve is whatever ``heldout`` measures (a
    run uses :func:`~jaxattn.options.trained.heldout_alignment` on its evaluation sequences).

    Args:
        params: starting parameters (not modified; the step works on a copy).
        train_cfg: training settings.
        key: PRNG key of the training batches.
        tables: ``{(n, s): CountMatrix}`` of the count corpus.
        config: the model config.
        tokens: int [N] count-corpus tokens.
        doc_ids: int [N] their documents.
        progress: show a progress bar.
        qk_inputs_fn: optional ``(params, tokens) -> (q_in, k_in)``, each [B, L, T, D].
        heldout: ``params -> records``, the held-out alignment recorded every ``eval_every``
            steps (None: no held-out curve).
        before_records: held-out records of ``params`` if already computed (the step-0 point).
        eval_last: evaluate after the last step (off when the caller scores the result itself).

    Returns:
        (trained params, curves) where curves holds ``step``, ``loss`` [steps], ``step_time_s``,
        ``eval_step`` and per-eval lists of per-layer ``eval_cosine``, ``eval_argmax_match_tied``,
        ``eval_kl``, ``eval_entropy`` (each [L]), plus ``compile_s``, ``steps_per_sec``,
        ``num_traces`` and the frozen-weight check.
    """
    labels = trainable_labels(params, train_cfg.train_ngram)
    optimizer = make_optimizer(train_cfg, params)
    step = make_train_step(config, train_cfg, optimizer, qk_inputs_fn=qk_inputs_fn)
    pairs, _ = layout_pairs(config)
    # The step donates its inputs; the caller's params stay valid for the bit-identity check.
    work = jax.tree.map(jnp.copy, params)
    opt_state = optimizer.init(work)
    curves: dict[str, Any] = {name: [] for name in _CURVE_LISTS}

    def on_step(at: int, p: Params) -> None:
        last = at == train_cfg.steps
        if heldout is not None and ((at % train_cfg.eval_every == 0 and not last) or (last and eval_last)):
            _record_eval(curves, at, heldout(p))

    if heldout is not None:
        _record_eval(curves, 0, before_records if before_records is not None else heldout(work))
    t0 = time.perf_counter()
    train_tokens = sample_training_tokens(tokens, doc_ids, train_cfg, key)
    batch = make_batch(train_tokens[0], tables, pairs, train_cfg.objective)
    host_s = time.perf_counter() - t0

    def make_next(tok: np.ndarray) -> Batch:
        return make_batch(tok, tables, pairs, train_cfg.objective)

    state = (work, opt_state)
    work, secs = _run_steps(step, state, train_tokens, batch, make_next, train_cfg, curves, on_step, progress, host_s)
    _add_timings(curves, secs)
    curves["num_traces"] = step.traces
    curves.update(frozen_check(params, work, labels))
    curves["trained_leaves"] = sorted(k for k, lab in labels.items() if lab == TRAIN)
    return work, curves
