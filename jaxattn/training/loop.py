"""Training every weight of a GPT-2-shaped model with optax: next-token cross-entropy on the count corpus.

* :class:`LMTrainConfig`: AdamW (decoupled weight decay on the weight matrices and embeddings,
  not on biases or LayerNorms), linear warm-up then cosine decay
  (``optax.warmup_cosine_decay_schedule``), ``optax.clip_by_global_norm``.
* :class:`TrainData`: the training windows, drawn from the COUNT corpus only, never crossing a
  document. Step ``i``'s batch depends on the data key and ``i`` alone (``fold_in(key, i)``), so
  every init sees the same data order, and a resumed run the same batches as an uninterrupted one.
* :class:`CountedStep`: ONE jitted step ``(params, opt_state, tokens) -> (params, opt_state, loss)``
  that counts its traces and refuses a second one.
* :class:`EvalSet` / :func:`evaluate_model`: held-out bits/token and the per-layer alignment of the
  layout layers' attention with the counts' expected attention, on fixed evaluation sequences.
* :func:`train`: the loop, from a :class:`TrainState` (fresh, :func:`init_state`, or resumed).

Axis vocabulary: B sequences, T positions, N corpus tokens, P distinct (n, s) tables, L layers, H heads.
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

from jaxattn.errors import JaxattnError
from jaxattn.lm import bits_per_token
from jaxattn.model import ModelConfig, Params
from jaxattn.options.training import Batch, ce_loss
from jaxattn.pipeline import Prepared, evaluate, layer_summary, run_model
from jaxattn.progress import progress_iter
from jaxattn.typing import ArrayLike, Bool, Float, Int, Integer

__all__ = [
    "DECAY_KEYS",
    "CountedStep",
    "EvalSet",
    "LMTrainConfig",
    "TrainData",
    "TrainState",
    "decay_mask",
    "empty_curves",
    "evaluate_model",
    "init_state",
    "lm_loss",
    "make_optimizer",
    "make_step",
    "train",
]

#: Leaves that get AdamW's weight decay (matrices and embeddings; never biases or LayerNorms).
DECAY_KEYS = frozenset(("embed", "wpe", "lm_head", "wq", "wk", "wv", "wo", "w1", "w2"))


@dataclasses.dataclass(frozen=True)
class LMTrainConfig:
    """Settings of :func:`train`.

    Attributes:
        steps: total optimiser steps (the cosine schedule decays over them).
        learning_rate: AdamW peak learning rate.
        warmup_steps: linear warm-up from 0 to the peak.
        batch_size: training sequences per step (B).
        seq_len: tokens per training sequence (T).
        eval_every: evaluate every this many steps (and at step 0 and at the last step).
        weight_decay: AdamW decoupled weight decay on :data:`DECAY_KEYS`.
        grad_clip: global-norm clipping threshold.
        lr_final_frac: final learning rate as a fraction of the peak.
        b1: Adam beta1.
        b2: Adam beta2 (GPT-2 / nanoGPT: 0.95).
    """

    steps: int = 300
    learning_rate: float = 1e-3
    warmup_steps: int = 30
    batch_size: int = 8
    seq_len: int = 64
    eval_every: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    lr_final_frac: float = 0.1
    b1: float = 0.9
    b2: float = 0.95

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "eval_every"):
            if int(getattr(self, name)) < 1:
                raise JaxattnError(f"{name}={getattr(self, name)} must be >= 1")
        if self.seq_len < 2:
            raise JaxattnError(f"seq_len={self.seq_len} must be >= 2 (next-token prediction)")
        if not (self.learning_rate > 0 and np.isfinite(self.learning_rate)):
            raise JaxattnError(f"learning_rate={self.learning_rate} must be a positive finite number")
        if self.warmup_steps < 0:
            raise JaxattnError(f"warmup_steps={self.warmup_steps} must be >= 0")
        if not (self.weight_decay >= 0 and self.grad_clip > 0 and 0.0 <= self.lr_final_frac <= 1.0):
            raise JaxattnError(
                f"weight_decay={self.weight_decay} must be >= 0, grad_clip={self.grad_clip} > 0, "
                f"lr_final_frac={self.lr_final_frac} in [0, 1]"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict."""
        return dataclasses.asdict(self)


def decay_mask(params: Params) -> dict[str, bool]:
    """True for the leaves AdamW decays (:data:`DECAY_KEYS`)."""
    return {k: k in DECAY_KEYS for k in params}


def make_optimizer(cfg: LMTrainConfig, params: Params) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW with warm-up and cosine decay.

    Args:
        cfg: the settings.
        params: the pytree (its keys give the weight-decay mask).

    Returns:
        The optax transformation.
    """
    warmup = min(cfg.warmup_steps, max(cfg.steps - 1, 0))
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup else cfg.learning_rate,
        peak_value=cfg.learning_rate,
        warmup_steps=warmup,
        decay_steps=cfg.steps,
        end_value=cfg.learning_rate * cfg.lr_final_frac,
    )
    adamw = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=decay_mask(params))
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw)


def lm_loss(params: Params, tokens: Integer[ArrayLike, "B T"], config: ModelConfig) -> Float[jax.Array, ""]:
    """Mean next-token cross-entropy in nats (the model's own logits: ``lm_head`` when untied).

    Args:
        params: the parameters.
        tokens: int [B, T].
        config: the model config.

    Returns:
        float32 scalar.
    """
    return ce_loss(params, Batch(jnp.asarray(tokens)), config)


class CountedStep:
    """The jitted step ``(params, opt_state, tokens [B, T]) -> (params, opt_state, loss)``; counts its traces.

    ``params`` and ``opt_state`` are donated. Attributes: ``traces`` (how often it was traced).
    """

    def __init__(self, fn: Callable[..., Any], max_traces: int | None = 1):
        self.traces = 0
        self.max_traces = max_traces

        def counted(*args: Any) -> Any:
            self.traces += 1  # a Python side effect: runs once per trace, never per call
            if self.max_traces is not None and self.traces > self.max_traces:
                raise JaxattnError(
                    f"the train step was traced {self.traces} times (max_traces={self.max_traces}); "
                    "batch shapes or dtypes changed between steps"
                )
            return fn(*args)

        self.jitted = jax.jit(counted, donate_argnums=(0, 1))

    def __call__(self, params: Params, opt_state: Any, tokens: Any) -> tuple[Params, Any, jax.Array]:
        return self.jitted(params, opt_state, tokens)


def make_step(config: ModelConfig, optimizer: optax.GradientTransformation, max_traces: int | None = 1) -> CountedStep:
    """The training step over every weight, jitted once for fixed batch shapes.

    Args:
        config: static model config.
        optimizer: from :func:`make_optimizer`.
        max_traces: raise if traced more often than this (None: no guard).

    Returns:
        :class:`CountedStep`.
    """

    def step(params: Params, opt_state: Any, tokens: jax.Array) -> tuple[Params, Any, jax.Array]:
        loss, grads = jax.value_and_grad(lm_loss)(params, tokens, config)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return CountedStep(step, max_traces)


class TrainData:
    """Training windows of the count corpus: step ``i`` draws B starts with ``fold_in(key, i)``.

    Args:
        tokens: int [N] count-corpus tokens.
        doc_ids: int [N] their documents (None: one document).
        cfg: ``batch_size`` and ``seq_len``.
        key: the data key (the same key gives the same batches for any init).

    Raises:
        JaxattnError: no document holds ``seq_len`` tokens.
    """

    def __init__(
        self, tokens: Integer[ArrayLike, " N"], doc_ids: Integer[ArrayLike, " N"] | None, cfg: LMTrainConfig, key: Any
    ):
        self.tokens = np.asarray(tokens, np.int32)
        n, T = self.tokens.shape[0], cfg.seq_len
        d = np.zeros(n, np.int64) if doc_ids is None else np.asarray(doc_ids)
        seg = np.concatenate([[0], np.cumsum(d[1:] != d[:-1])]) if n else np.zeros(0, np.int64)
        m = n - T + 1
        self.starts = np.flatnonzero(seg[:m] == seg[T - 1 : T - 1 + m]) if m > 0 else np.zeros(0, np.int64)
        if self.starts.size == 0:
            longest = int(np.bincount(seg).max()) if n else 0
            raise JaxattnError(f"seq_len={T} is longer than every document (the longest has {longest} tokens)")
        self.batch_size, self.seq_len, self.key = cfg.batch_size, T, key

    def batch(self, step: int) -> Int[np.ndarray, "B T"]:
        """int32 [B, T] training sequences of step ``step`` (0-based)."""
        k = jax.random.fold_in(self.key, int(step))
        pick = np.asarray(jax.random.randint(k, (self.batch_size,), 0, self.starts.size))
        return self.tokens[self.starts[pick][:, None] + np.arange(self.seq_len)[None, :]]


class EvalSet(NamedTuple):
    """Fixed evaluation sequences and, for the alignment, their expected attention.

    Attributes:
        tokens: int32 [B, T] held-out sequences.
        expected: float32 [P, B, T, T] expected attention (None: bits only).
        mask: bool [P, B, T, T] valid query-key pairs (None with ``expected``).
        pair_index: int32 [L, H] each layout head's table (None with ``expected``).
        batch_size: sequences per forward call.
    """

    tokens: Any
    expected: Any = None
    mask: Any = None
    pair_index: Any = None
    batch_size: int = 16

    @classmethod
    def from_prepared(cls, prep: Prepared) -> EvalSet:
        """The prepared run's own evaluation sequences and expected attention."""
        return cls(prep.tokens, prep.expected, prep.mask, prep.pair_index, prep.run.batch_size)


def evaluate_model(params: Params, config: ModelConfig, evalset: EvalSet) -> dict[str, Any]:
    """Held-out bits/token and, when the eval set has expected attention, the per-layer alignment.

    Args:
        params: the parameters.
        config: the model config.
        evalset: the evaluation sequences.

    Returns:
        ``{"bits_per_token": float, "layers": [{"layer", "cosine", "argmax_match_tied"}, ...]}``
        (per layout layer, means over heads; ``layers`` empty without expected attention).
    """
    out = run_model(params, evalset.tokens, config, batch_size=evalset.batch_size, progress=False)
    layers: list[dict[str, Any]] = []
    if evalset.expected is not None:
        records = evaluate(evalset.expected, evalset.mask, evalset.pair_index, out.attn, config, option="train")
        layers = [
            {"layer": int(r["layer"]), "cosine": r["cosine"], "argmax_match_tied": r["argmax_match_tied"]}
            for r in layer_summary(records)
        ]
    return {"bits_per_token": bits_per_token(out.next_logprob), "layers": layers}


def _check_eval(evalset: EvalSet, expected: Float[ArrayLike, "P B T T"], mask: Bool[ArrayLike, "P B T T"]) -> None:
    if np.shape(expected)[1:3] != np.shape(evalset.tokens) or np.shape(mask) != np.shape(expected):
        raise JaxattnError(
            f"expected {np.shape(expected)} / mask {np.shape(mask)} do not fit eval tokens {np.shape(evalset.tokens)}"
        )


class TrainState(NamedTuple):
    """Where training stands: everything :func:`train` needs to continue exactly.

    Attributes:
        params: the parameters.
        opt_state: the optax state.
        step: optimiser steps taken.
        curves: the curves so far (:func:`empty_curves`).
    """

    params: Params
    opt_state: Any
    step: int
    curves: dict[str, Any]


def empty_curves() -> dict[str, Any]:
    """``{"steps", "eval_bits_per_token", "layer_alignment", "train_loss", "step_time_s"}``, all empty."""
    return {"steps": [], "eval_bits_per_token": [], "layer_alignment": [], "train_loss": [], "step_time_s": []}


def init_state(params: Params, cfg: LMTrainConfig) -> TrainState:
    """A fresh state at step 0 (params copied: the step donates its inputs)."""
    work = jax.tree.map(lambda a: jnp.array(a, jnp.float32), params)
    return TrainState(work, make_optimizer(cfg, work).init(work), 0, empty_curves())


def _record(curves: dict[str, Any], step: int, ev: dict[str, Any]) -> None:
    curves["steps"].append(int(step))
    curves["eval_bits_per_token"].append(float(ev["bits_per_token"]))
    curves["layer_alignment"].append(ev["layers"])


def train(
    state: TrainState,
    config: ModelConfig,
    cfg: LMTrainConfig,
    data: TrainData,
    *,
    evalset: EvalSet | None = None,
    stop_after: int | None = None,
    progress: bool = True,
    on_save: Callable[[TrainState], None] | None = None,
    save_every: int | None = None,
) -> tuple[TrainState, CountedStep]:
    """Trains every weight from ``state`` up to ``cfg.steps`` (or ``stop_after``) optimiser steps.

    Evaluations (when ``evalset`` is given) at step 0, every ``cfg.eval_every`` steps and at
    ``cfg.steps``; a run stopped early and resumed records exactly the curves of an
    uninterrupted one.

    Args:
        state: where to start (:func:`init_state`, or a loaded checkpoint).
        config: the model config.
        cfg: the settings (the same ones for a resumed run, or its schedule differs).
        data: the training batches (count corpus only).
        evalset: held-out sequences (None: no evaluation).
        stop_after: stop once this many steps in total are done (< ``cfg.steps``; None: all).
        progress: a tqdm bar.
        on_save: called with the state every ``save_every`` steps and at the end.
        save_every: see ``on_save``.

    Returns:
        (the final state, the step, whose ``traces`` is the number of compilations).

    Raises:
        JaxattnError: a non-finite loss (lower the learning rate), or eval arrays that do not fit.
    """
    if evalset is not None and evalset.expected is not None:
        _check_eval(evalset, evalset.expected, evalset.mask)
    end = cfg.steps if stop_after is None else min(int(stop_after), cfg.steps)
    params, opt_state, start = state.params, state.opt_state, int(state.step)
    curves = {k: list(v) for k, v in state.curves.items()}
    step = make_step(config, make_optimizer(cfg, params))
    if evalset is not None and start == 0 and not curves["steps"]:
        _record(curves, 0, evaluate_model(params, config, evalset))
    bar = progress_iter(range(start, end), desc="train", enabled=progress, total=max(end - start, 0))
    for i in bar:
        t0 = time.perf_counter()
        params, opt_state, loss = step(params, opt_state, jnp.asarray(data.batch(i)))
        loss_f = float(loss)
        curves["step_time_s"].append(time.perf_counter() - t0)
        if not np.isfinite(loss_f):
            raise JaxattnError(f"training diverged at step {i + 1} (loss={loss_f}); lower lr={cfg.learning_rate}")
        curves["train_loss"].append(loss_f)
        done = i + 1
        if evalset is not None and (done % cfg.eval_every == 0 or done == cfg.steps):
            _record(curves, done, evaluate_model(params, config, evalset))
        if on_save is not None and save_every and done % save_every == 0 and done != end:
            on_save(TrainState(params, opt_state, done, curves))
    final = TrainState(params, opt_state, max(end, start), curves)
    if on_save is not None:
        on_save(final)
    return final, step
