"""Training checkpoints: the GPT-2 export plus the optimizer state, so that training resumes exactly.

A checkpoint directory holds the four files of :func:`jaxattn.output.save_gpt2_checkpoint`
(``config.json``, ``model.safetensors``, ``vocab.json``, ``jaxattn_layout.json``: HF
``GPT2LMHeadModel.from_pretrained(DIR)`` loads it) and:

* ``optimizer.npz``: the optax state's leaves, in ``jax.tree.flatten`` order (``leaf_00000``, ...);
* ``train_state.json``: ``{"format": "jaxattn.train", "step", "data_key", "train_config",
  "curves", "num_opt_leaves", "info"}``.

Everything round-trips bit for bit (float32 params and moments, int32 counts), so a resumed run
equals an uninterrupted one exactly (tests/training/test_loop.py).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn.errors import JaxattnError
from jaxattn.model import ModelConfig
from jaxattn.output import (
    atomic_open,
    ensure_out_dir,
    layout_heads,
    load_gpt2_checkpoint,
    save_gpt2_checkpoint,
    write_json,
)
from jaxattn.training.loop import LMTrainConfig, TrainState, make_optimizer

__all__ = ["OPT_FILE", "STATE_FILE", "TrainCheckpoint", "load_train_checkpoint", "save_train_checkpoint"]

OPT_FILE = "optimizer.npz"
STATE_FILE = "train_state.json"
_FORMAT = "jaxattn.train"


class TrainCheckpoint(NamedTuple):
    """A checkpoint read back by :func:`load_train_checkpoint`.

    Attributes:
        state: the :class:`~jaxattn.training.TrainState` (params, optax state, step, curves).
        config: the model config.
        train_config: the settings it was trained with.
        data_key: uint32 [2] the data key (the batches it drew and will draw).
        vocab: token string -> id.
        info: the ``"info"`` block (init, seed, ...).
    """

    state: TrainState
    config: ModelConfig
    train_config: LMTrainConfig
    data_key: Any
    vocab: dict[str, int]
    info: dict[str, Any]


def save_train_checkpoint(
    out_dir: str | os.PathLike[str],
    state: TrainState,
    config: ModelConfig,
    train_config: LMTrainConfig,
    *,
    data_key: Any,
    vocab: Mapping[str, int] | None = None,
    info: Mapping[str, Any] | None = None,
) -> list[Path]:
    """Writes the GPT-2 export of ``state.params`` plus the optimizer state and the loop's position.

    Args:
        out_dir: the directory (created if missing).
        state: the training state.
        config: the model config.
        train_config: the settings.
        data_key: uint32 [2] legacy PRNG key of the training batches.
        vocab: token string -> id (default ``{"t0": 0, ...}``).
        info: provenance (JSON-able), also written into ``config.json``'s ``"jaxattn"`` block.

    Returns:
        The paths written.
    """
    out = ensure_out_dir(out_dir)
    info = dict(info or {})
    vocab = dict(vocab) if vocab is not None else {f"t{i}": i for i in range(config.vocab_size)}
    meta = {"training": {"step": int(state.step), **info, "train_config": train_config.to_dict()}}
    paths = save_gpt2_checkpoint(
        out, state.params, config, vocab=vocab, layout=layout_heads(state.params, config), meta=meta
    )
    leaves = jax.tree.leaves(state.opt_state)
    arrays: dict[str, Any] = {f"leaf_{i:05d}": np.asarray(leaf) for i, leaf in enumerate(leaves)}
    with atomic_open(out / OPT_FILE, "wb") as f:
        np.savez(f, **arrays)
    doc = {
        "format": _FORMAT,
        "step": int(state.step),
        "data_key": [int(x) for x in np.asarray(data_key, np.uint32).reshape(-1)],
        "train_config": train_config.to_dict(),
        "curves": state.curves,
        "num_opt_leaves": len(leaves),
        "info": info,
    }
    write_json(out / STATE_FILE, doc)
    return [*paths, out / OPT_FILE, out / STATE_FILE]


def load_train_checkpoint(directory: str | os.PathLike[str]) -> TrainCheckpoint:
    """Reads a checkpoint written by :func:`save_train_checkpoint`.

    Args:
        directory: the checkpoint directory.

    Returns:
        :class:`TrainCheckpoint` (bit-identical to what was saved).

    Raises:
        JaxattnError: missing or foreign files, or an optimizer state that does not fit the params.
    """
    d = Path(directory)
    if not (d / STATE_FILE).is_file() or not (d / OPT_FILE).is_file():
        raise JaxattnError(f"{str(d)!r} is not a jaxattn training checkpoint (missing {STATE_FILE} or {OPT_FILE})")
    try:
        doc = json.loads((d / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise JaxattnError(f"cannot read {d / STATE_FILE}: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != _FORMAT:
        raise JaxattnError(f"{d / STATE_FILE} is not a jaxattn training state")
    ck = load_gpt2_checkpoint(d)
    train_config = LMTrainConfig(**doc["train_config"])
    template = make_optimizer(train_config, ck.params).init(ck.params)
    leaves, treedef = jax.tree.flatten(template)
    with np.load(d / OPT_FILE) as z:
        saved = [z[f"leaf_{i:05d}"] for i in range(len(z.files))]
    if len(saved) != len(leaves) or any(np.shape(a) != np.shape(b) for a, b in zip(saved, leaves, strict=False)):
        raise JaxattnError(
            f"{d / OPT_FILE} holds {len(saved)} optimizer arrays that do not fit this model's "
            f"{len(leaves)} (another model or optimizer?)"
        )
    opt_state = jax.tree.unflatten(treedef, [jnp.asarray(a, dtype=b.dtype) for a, b in zip(saved, leaves, strict=True)])
    params = {k: jnp.asarray(v, jnp.float32) for k, v in ck.params.items()}
    state = TrainState(params, opt_state, int(doc["step"]), doc["curves"])
    data_key = jnp.asarray(np.asarray(doc["data_key"], np.uint32))
    return TrainCheckpoint(state, ck.config, train_config, data_key, ck.vocab, dict(doc.get("info", {})))
