"""GPT-2's standard random initialisation for the parameter pytree of a derived model.

:func:`random_init` draws every array of a given pytree (the same keys and shapes, so the same
architecture, preparation blocks, learned positions, biases and untied ``lm_head`` included)
as GPT-2 does (Radford et al. 2019; the openai ``model.py`` and HF ``GPT2PreTrainedModel``):
weights normal with std 0.02, the two residual output projections (``wo`` = ``attn.c_proj``,
``w2`` = ``mlp.c_proj``) with std ``0.02 / sqrt(2 * blocks)``, biases 0, LayerNorm scale 1 and
bias 0, ``wte`` (``embed``) and ``lm_head`` normal 0.02, ``wpe`` normal 0.01 (openai's GPT-2).

Axis vocabulary: NB blocks, H heads, D d_model, K d_head, F MLP width, V vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn.errors import JaxattnError
from jaxattn.model import ModelConfig, Params
from jaxattn.typing import PRNGKey

__all__ = ["INIT_STD", "RESIDUAL_PROJECTIONS", "ZERO_KEYS", "ONE_KEYS", "init_std", "random_init"]

#: Std of the normal draws (before the residual-projection scaling).
INIT_STD: dict[str, float] = {
    "embed": 0.02,
    "wpe": 0.01,
    "lm_head": 0.02,
    "wq": 0.02,
    "wk": 0.02,
    "wv": 0.02,
    "wo": 0.02,
    "w1": 0.02,
    "w2": 0.02,
}
#: Projections that write into the residual stream: std scaled by ``1 / sqrt(2 * blocks)``.
RESIDUAL_PROJECTIONS = ("wo", "w2")
#: Arrays initialised to zeros (biases, LayerNorm biases).
ZERO_KEYS = ("bq", "bk", "bv", "bo", "b1", "b2", "ln1_bias", "ln2_bias", "lnf_bias")
#: Arrays initialised to ones (LayerNorm scales).
ONE_KEYS = ("ln1_scale", "ln2_scale", "lnf_scale")


def init_std(name: str, num_blocks: int) -> float:
    """The std of one normally drawn array.

    Args:
        name: a params key of :data:`INIT_STD`.
        num_blocks: NB, every block (preparation blocks included).

    Returns:
        ``INIT_STD[name]``, divided by ``sqrt(2 * NB)`` for :data:`RESIDUAL_PROJECTIONS`.
    """
    std = INIT_STD[name]
    return std / math.sqrt(2 * num_blocks) if name in RESIDUAL_PROJECTIONS else std


def random_init(like_params: Mapping[str, Any], config: ModelConfig, *, key: PRNGKey) -> Params:
    """GPT-2's random initialisation of every array of ``like_params`` (same keys, shapes, float32).

    Args:
        like_params: a parameter pytree (e.g. the derived Option 3 model); only its keys and
            shapes are read. ``wq`` [NB, H, D, K] gives NB.
        config: the model config (checked against the shapes).
        key: PRNG key; array ``name`` uses ``fold_in(key, i)`` with ``i`` its index in the sorted keys.

    Returns:
        The new params (jax float32 arrays).

    Raises:
        JaxattnError: a key GPT-2 has no initialisation for, or shapes that do not fit ``config``.
    """
    unknown = sorted(set(like_params) - set(INIT_STD) - set(ZERO_KEYS) - set(ONE_KEYS))
    if unknown:
        raise JaxattnError(f"random_init: params key {unknown[0]!r} has no GPT-2 initialisation")
    if "wq" not in like_params or "embed" not in like_params:
        raise JaxattnError("random_init: params need 'wq' and 'embed' (the block count and vocabulary)")
    shape_q = tuple(np.shape(like_params["wq"]))
    want = (config.num_heads, config.d_model, config.d_head)
    if (
        len(shape_q) != 4
        or shape_q[1:] != want
        or np.shape(like_params["embed"]) != (config.vocab_size, config.d_model)
    ):
        raise JaxattnError(
            f"random_init: wq {list(shape_q)} / embed {list(np.shape(like_params['embed']))} do not match the config "
            f"(heads, d_model, d_head) = {want}, vocab_size={config.vocab_size}"
        )
    num_blocks = int(shape_q[0])
    out: Params = {}
    for i, name in enumerate(sorted(like_params)):
        shape = tuple(int(s) for s in np.shape(like_params[name]))
        if name in ZERO_KEYS:
            out[name] = jnp.zeros(shape, jnp.float32)
        elif name in ONE_KEYS:
            out[name] = jnp.ones(shape, jnp.float32)
        else:
            std = init_std(name, num_blocks)
            out[name] = std * jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32)
    return out
