"""Training a GPT-2-shaped model: from the derived (Option 3) initialisation or from GPT-2's random one.

* :mod:`~jaxattn.training.init`: :func:`random_init`, GPT-2's initialisation for the same pytree;
* :mod:`~jaxattn.training.loop`: the optax loop (AdamW, warm-up + cosine, clipping, one jitted
  step), the count-corpus batches and the held-out evaluation (bits/token and per-layer alignment);
* :mod:`~jaxattn.training.checkpoint`: the GPT-2 export plus the optimizer state, for exact resume;
* :mod:`~jaxattn.training.sweep`: the learning-rate sweep over inits and its table and figure.

``jaxattn train`` (:mod:`jaxattn.cli.train`) runs it on a prepared run.
"""

from jaxattn.training.checkpoint import (
    OPT_FILE,
    STATE_FILE,
    TrainCheckpoint,
    load_train_checkpoint,
    save_train_checkpoint,
)
from jaxattn.training.init import INIT_STD, ONE_KEYS, RESIDUAL_PROJECTIONS, ZERO_KEYS, init_std, random_init
from jaxattn.training.loop import (
    DECAY_KEYS,
    CountedStep,
    EvalSet,
    LMTrainConfig,
    TrainData,
    TrainState,
    decay_mask,
    empty_curves,
    evaluate_model,
    init_state,
    lm_loss,
    make_optimizer,
    make_step,
    train,
)
from jaxattn.training.sweep import best_per_init, format_sweep, plot_curves, steps_to_reach, sweep

__all__ = [
    "DECAY_KEYS",
    "INIT_STD",
    "ONE_KEYS",
    "OPT_FILE",
    "RESIDUAL_PROJECTIONS",
    "STATE_FILE",
    "ZERO_KEYS",
    "CountedStep",
    "EvalSet",
    "LMTrainConfig",
    "TrainCheckpoint",
    "TrainData",
    "TrainState",
    "decay_mask",
    "empty_curves",
    "evaluate_model",
    "init_state",
    "init_std",
    "lm_loss",
    "load_train_checkpoint",
    "make_optimizer",
    "make_step",
    "random_init",
    "best_per_init",
    "format_sweep",
    "plot_curves",
    "steps_to_reach",
    "sweep",
    "save_train_checkpoint",
    "train",
]
