"""``jaxattn train``: train every weight of the Option 3 GPT-2, from its derived init or from GPT-2's random one.

The run is prepared as under ``jaxattn analyze`` (same corpus, preset and flags); the option
(default 3) gives the derived params, and ``--init random`` redraws every array with GPT-2's
initialisation (:func:`jaxattn.training.random_init`), same shapes. Training batches come from
the COUNT corpus only (``--seed`` fixes their order, the same for every init); the held-out
bits/token and per-layer alignment are measured on the run's evaluation sequences every
``--eval-every`` steps.

Outputs in ``--out``: ``curves.json`` (``{"steps", "eval_bits_per_token", "layer_alignment",
"train_loss", ...}`` plus ``lr``, ``init``, ``seed``, ``init_seed``), ``curves.png`` and
``checkpoint/`` (the GPT-2 export plus the optimizer state; ``--resume DIR/checkpoint``
continues it exactly when the training flags are the same).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxattn import options
from jaxattn.cli.common import (
    add_common_arguments,
    cli_timer,
    load_and_prepare,
    non_negative_int,
    option_knobs,
    positive_int,
    run_config_from_args,
)
from jaxattn.cli.export import check_plain_forward, exportable_options
from jaxattn.errors import JaxattnError
from jaxattn.model import preset
from jaxattn.output import check_gpt2_config, ensure_out_dir, vocab_from_tokenizer, write_json
from jaxattn.pipeline import run_key
from jaxattn.progress import Timer
from jaxattn.training import (
    EvalSet,
    LMTrainConfig,
    TrainData,
    init_state,
    load_train_checkpoint,
    plot_curves,
    random_init,
    save_train_checkpoint,
    train,
)

__all__ = ["INITS", "add_parser", "cmd_train", "train_config_from_args"]

INITS = ("derived", "random")
_DEFAULTS = LMTrainConfig()


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Adds the ``train`` subcommand to ``sub`` (an argparse subparsers action)."""
    t = sub.add_parser(
        "train",
        help="train every weight of the derived GPT-2 (or of GPT-2's random init, same shapes) on the count corpus",
        description="Trains the Option 3 GPT-2 with AdamW (warm-up + cosine decay, clipping) on next-token "
        "cross-entropy over the count corpus, from the derived weights or GPT-2's random init, and records "
        "held-out bits/token and per-layer alignment. Example: jaxattn train --init random --corpus plays/ "
        "--eval-corpus lear.txt --preset small --steps 300 --out train_random",
    )
    add_common_arguments(t)
    t.add_argument("--init", choices=INITS, default="derived", help="derived weights or GPT-2's random init")
    t.add_argument("--option", choices=options.OPTIONS, default="3", help="the option giving the architecture (3)")
    t.add_argument("--steps", type=positive_int("--steps"), default=None, help=f"steps (default {_DEFAULTS.steps})")
    t.add_argument("--lr", type=float, default=None, help=f"peak learning rate (default {_DEFAULTS.learning_rate})")
    t.add_argument("--warmup", type=non_negative_int("--warmup"), default=None, help="warm-up steps (default 30)")
    t.add_argument("--eval-every", type=positive_int("--eval-every"), default=None, help="default 50")
    t.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay (default 0.1)")
    t.add_argument(
        "--train-seq-len", type=positive_int("--train-seq-len"), default=None, help="training window (default 64)"
    )
    t.add_argument("--init-seed", type=int, default=0, help="seed of the random init (default 0)")
    t.add_argument("--save-every", type=positive_int("--save-every"), default=None, help="checkpoint every K steps")
    t.add_argument("--resume", default=None, help="continue from this checkpoint directory (DIR/checkpoint)")
    return t


def train_config_from_args(args: argparse.Namespace, base: LMTrainConfig | None = None) -> LMTrainConfig:
    """The training settings: the flags given, else ``base`` (a resumed checkpoint's), else the defaults.

    ``--batch-size`` (the common flag) is the training batch when given explicitly with a resume,
    and always otherwise.
    """
    base = base or LMTrainConfig(batch_size=int(args.batch_size))
    given = {
        "steps": args.steps,
        "learning_rate": args.lr,
        "warmup_steps": args.warmup,
        "eval_every": args.eval_every,
        "weight_decay": args.weight_decay,
        "seq_len": args.train_seq_len,
    }
    kw = {**base.to_dict(), **{k: v for k, v in given.items() if v is not None}}
    return LMTrainConfig(**kw)


def _start(args: argparse.Namespace, prep: Any, timer: Timer, progress: bool) -> tuple[Any, dict[str, Any]]:
    """The initial params (derived or random) and what the curves record about them."""
    name = str(args.option)
    if not options.REGISTRY[name].exportable:
        raise JaxattnError(
            f"option {name} needs a hook and cannot be trained as a GPT-2; use one of {', '.join(exportable_options())}"
        )
    result = options.run_option(prep, name, progress=progress, timer=timer, **option_knobs(args, name))
    check_plain_forward(prep, result, name)
    params = result.params
    assert params is not None  # check_plain_forward refuses a result without params
    if args.init == "random":
        params = random_init(params, prep.config, key=jax.random.PRNGKey(int(args.init_seed)))
    return params, {"derived_language_model": result.language_model}


def cmd_train(args: argparse.Namespace) -> int:
    """``jaxattn train``."""
    run = run_config_from_args(args)
    check_gpt2_config(preset(run.preset, 2, **dict(run.model_overrides)))
    if args.lr is not None and not (args.lr > 0 and np.isfinite(args.lr)):
        raise JaxattnError(f"--lr={args.lr} must be a positive finite number")
    resumed = load_train_checkpoint(args.resume) if args.resume else None
    cfg = train_config_from_args(args, resumed.train_config if resumed else None)
    out = ensure_out_dir(args.out)
    progress = not args.no_progress
    timer = cli_timer(args)
    prep, _ = load_and_prepare(args, run, timer=timer, progress=progress)
    data_key = run_key(run.seed, "train-data")
    info: dict[str, Any] = {
        "init": args.init,
        "option": str(args.option),
        "seed": run.seed,
        "init_seed": int(args.init_seed),
        "lr": cfg.learning_rate,
    }
    if resumed is not None:
        if resumed.config != prep.config:
            raise JaxattnError(
                f"--resume {args.resume}: its model config {resumed.config} is not this run's {prep.config}"
            )
        state, data_key = resumed.state, resumed.data_key
        info = {**resumed.info, "lr": cfg.learning_rate, "resumed_from": str(args.resume)}
    else:
        params, extra = _start(args, prep, timer, progress)
        state = init_state(params, cfg)
        info.update(extra)
    data = TrainData(prep.corpus.tokens, prep.corpus.doc_ids, cfg, data_key)
    vocab = vocab_from_tokenizer(prep.corpus.tokenizer)
    ck_dir = out / "checkpoint"

    def save(st: Any) -> None:
        save_train_checkpoint(ck_dir, st, prep.config, cfg, data_key=data_key, vocab=vocab, info=info)

    with timer.stage("train"):
        state, step = train(
            state,
            prep.config,
            cfg,
            data,
            evalset=EvalSet.from_prepared(prep),
            progress=progress,
            on_save=save,
            save_every=args.save_every,
        )
    _write(out, state.curves, cfg, info, step.traces, timer)
    return 0


def _write(
    out: Path, curves: dict[str, Any], cfg: LMTrainConfig, info: dict[str, Any], traces: int, timer: Timer
) -> None:
    """curves.json, curves.png and the printed summary."""
    times = np.asarray(curves["step_time_s"][1:])
    doc = {
        **curves,
        **info,
        "train_config": cfg.to_dict(),
        "num_traces": traces,
        "median_step_ms": float(np.median(times) * 1e3) if times.size else None,
        "timings_s": dict(timer.seconds),
    }
    write_json(out / "curves.json", doc)
    plot_curves(out / "curves.png", {f"{info['init']} lr={cfg.learning_rate:g}": curves})
    print(f"{'step':>6}  {'bits/token':>10}  per-layer cosine")
    for s, b, layers in zip(curves["steps"], curves["eval_bits_per_token"], curves["layer_alignment"], strict=True):
        print(f"{s:>6}  {b:>10.4f}  " + " ".join(f"{r['cosine']:.3f}" for r in layers))
    print(f"\ncompiled the step {traces} time(s); median step {doc['median_step_ms'] or 0:.1f} ms")
    print(f"wrote: {out / 'curves.json'}, {out / 'curves.png'}, {out / 'checkpoint'}")
