"""The Flax NNX view of a derived model: :class:`DerivedTransformer` over the weights of :func:`~jaxattn.model.forward`.

Kept apart from :mod:`jaxattn.model` so that the pure forward (and the CLI) does not import flax;
``jaxattn.DerivedTransformer`` imports this module on first use.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import nnx

from jaxattn.model import ForwardOutput, Params, forward, forward_batch
from jaxattn.typing import ArrayLike, Integer

__all__ = ["DerivedTransformer", "FrozenWeight"]


class FrozenWeight(nnx.Variable):
    """A derived, frozen weight: not an ``nnx.Param``, so optimisers filtering on Param skip it."""


class DerivedTransformer(nnx.Module):
    """Flax NNX module wrapping the same weights as the pure :func:`forward`.

    The token embedding is an ``nnx.Param`` (trainable in Option 4); every derived
    attention weight, the MLP and the LayerNorms are :class:`FrozenWeight`.
    """

    def __init__(self, params: Params, config: Any):  # ModelConfig; Any keeps NNX graph rebuilds unchecked
        self.config = config
        self.embed = nnx.Param(jnp.asarray(params["embed"]))
        self.frozen = nnx.data({k: FrozenWeight(jnp.asarray(v)) for k, v in params.items() if k != "embed"})

    def params(self) -> Params:
        """The weights as the plain pytree :func:`forward` takes."""
        out = {k: v[...] for k, v in self.frozen.items()}
        out["embed"] = self.embed[...]
        return out

    def __call__(self, tokens: Integer[ArrayLike, "*B T"], **kwargs: Any) -> ForwardOutput:
        """Forward on int [T] or [B, T] tokens.

        Args:
            tokens: int [T] (one sequence) or [B, T] (a batch).
            **kwargs: ``qk_inputs``, ``attn_logits``, ``return_inputs``, as for :func:`forward`.

        Returns:
            :class:`ForwardOutput` (with a leading B axis for a batch).
        """
        tokens = jnp.asarray(tokens)
        if tokens.ndim == 1:
            return forward(self.params(), tokens, self.config, **kwargs)
        return forward_batch(self.params(), tokens, self.config, **kwargs)
