"""Residual subspaces of the standard-GPT-2 Option 3, and its capacity rule.

The construction (:mod:`jaxattn.options.gpt2`) writes every feature of a position into its own
block of orthonormal directions of ``d_model``, all orthogonal to the all-ones vector, so that
LayerNorm's mean subtraction is a no-op and ``LN(x) = kappa x`` whenever ``||x||`` is known:

======== ============================== ==============================================
block    size                           holds
======== ============================== ==============================================
tok      V                              the token's identity (``wte``), read by keys
pos      (max_n - 1) + 1 + 2 F          learned positions (``wpe``): "is position q" flags
                                        for q < max_n - 1, a pad that keeps ``||wpe[i]||``
                                        constant, (cos, sin) at F = ceil(log2 n_ctx) periods
prev_k   d_prev each, k < max_n         the code of ``t_{i-k}``, copied by preparation heads
qf       sum over n >= 2 of S_n * K     the query factors of every (n, s) table, written by
                                        the MLP n-gram detectors (S_n skips of layers with n)
read     V                              the next-token log-probabilities (the LM readout)
pad      1                              keeps ``||x||`` equal at every position
scratch  K                              only for the "O(1) head writes" ablation
======== ============================== ==============================================

plus the all-ones direction, which no block may use. The capacity rule is that these sizes sum
to at most ``d_model`` (:func:`allocate`). ``d_prev`` is V (one-hot codes) when it fits, else
what is left, with near-orthogonal codes, but at least 8 (the requirement a refusal states
counts ``d_prev = 8`` when not even that fits).

Axis vocabulary: D d_model, V vocabulary, K d_head.
"""

# ruff: noqa: F722  (jaxtyping shape strings such as "R V" are not Python expressions)
from __future__ import annotations

import dataclasses

import numpy as np

from jaxattn.errors import JaxattnError
from jaxattn.typing import Float

__all__ = ["CapacityError", "Subspaces", "allocate", "ones_complement"]


class CapacityError(JaxattnError):
    """A configuration does not fit the standard-GPT-2 construction (residual width or MLP units)."""


def ones_complement(d_model: int) -> Float[np.ndarray, "Dm1 D"]:
    """An orthonormal basis of the subspace of R^D orthogonal to the all-ones vector: Haar wavelets.

    Each row is ``+a`` on one half of an interval of coordinates and ``-b`` on the other
    (recursively halving ``[0, D)``), so every row sums to zero. Rows are sorted by support,
    sparsest first. Why sparse: the construction reads features through large gains (scores
    up to hundreds of nats, MLP pre-activations of +-40), and a dense basis makes every read
    a sum of D cancelling float32 terms, which costs about 1e-4 in the logits; with 2- to
    4-coordinate directions the float32 forward agrees with float64 to about 1e-6.

    Args:
        d_model: D.

    Returns:
        float64 [D - 1, D], orthonormal rows, each summing to zero.
    """
    D = int(d_model)
    rows, todo = [], [(0, D)]
    while todo:
        lo, hi = todo.pop()
        if hi - lo < 2:
            continue
        mid = lo + (hi - lo) // 2
        v = np.zeros(D)
        v[lo:mid], v[mid:hi] = 1.0 / (mid - lo), -1.0 / (hi - mid)
        rows.append(v / np.linalg.norm(v))
        todo += [(lo, mid), (mid, hi)]
    rows.sort(key=lambda r: (int(np.count_nonzero(r)), int(np.flatnonzero(r)[0])))
    return np.ascontiguousarray(np.array(rows).reshape(len(rows), D))


@dataclasses.dataclass(frozen=True, eq=False)
class Subspaces:
    """Named blocks of orthonormal residual directions.

    Attributes:
        d_model: D.
        sizes: block name -> number of directions, in allocation order.
        basis: float64 [sum(sizes), D] the directions, block after block.
    """

    d_model: int
    sizes: dict[str, int]
    basis: np.ndarray

    def offset(self, name: str) -> int:
        """First row of block ``name`` in :attr:`basis`."""
        off = 0
        for k, v in self.sizes.items():
            if k == name:
                return off
            off += v
        raise KeyError(name)

    def __getitem__(self, name: str) -> Float[np.ndarray, "n D"]:
        """float64 [size, D] the directions of block ``name`` (size 0 when absent)."""
        if name not in self.sizes:
            return np.zeros((0, self.d_model))
        o = self.offset(name)
        return self.basis[o : o + self.sizes[name]]

    @property
    def used(self) -> int:
        """Directions used, including the all-ones one LayerNorm removes."""
        return sum(self.sizes.values()) + 1


def allocate(d_model: int, sizes: dict[str, int]) -> Subspaces:
    """Gives each block its directions, or refuses with the requirement and the size.

    Args:
        d_model: D.
        sizes: block name -> size (zero-size blocks are dropped).

    Returns:
        :class:`Subspaces`.

    Raises:
        CapacityError: ``sum(sizes) + 1 > d_model``.
    """
    sizes = {k: int(v) for k, v in sizes.items() if int(v) > 0}
    need = sum(sizes.values()) + 1
    if need > d_model:
        parts = " + ".join(f"{k} {v}" for k, v in sizes.items())
        raise CapacityError(
            f"Option 3 as a GPT-2 needs a residual of {need} dims ({parts} + the all-ones direction 1) "
            f"but d_model={d_model}; raise --d-model to at least {need} (and keep d_model = heads x d_head)"
        )
    basis = ones_complement(d_model)[: need - 1]
    return Subspaces(int(d_model), sizes, basis)
