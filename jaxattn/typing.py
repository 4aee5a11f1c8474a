"""Array type aliases for shape annotations (jaxtyping), and the test-time type checker.

Public functions annotate arrays as ``Float[ArrayLike, "R V"]`` and the like: the dtype
kind, and the axes by the letters each module's docstring defines (B batch, L layers,
H heads, T/S positions, D d_model, K d_head, V vocabulary, R contexts, N corpus tokens,
Z non-zeros). Within one call, equal letters must have equal sizes.

:data:`ArrayLike` is a numpy *or* a jax array: the functions that convert their inputs
with ``np.asarray``/``jnp.asarray`` accept both, and say so this way.

The annotations cost nothing at run time. The test suite turns them into checks with
``jaxtyping.install_import_hook(modules, "jaxattn.typing.typechecker")`` (see
``tests/conftest.py``): every call into an annotated module then checks dtypes and shapes
with beartype. beartype is a test dependency only; nothing here imports it unless
:func:`typechecker` is called.
"""

# ruff: noqa: F722  (jaxtyping shape strings such as "R V" are not Python expressions)
from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jaxtyping import Array, Bool, Float, Int, Integer, Key, Num, PRNGKeyArray, Real, Shaped

__all__ = [
    "Array",
    "ArrayLike",
    "Bool",
    "Float",
    "Int",
    "Integer",
    "Key",
    "Num",
    "PRNGKey",
    "PRNGKeyArray",
    "Real",
    "Shaped",
    "typechecker",
]

ArrayLike = np.ndarray | jax.Array
"""A numpy or a jax array (not a list or a scalar)."""

PRNGKey = Key[Array, ""] | Shaped[Array, "2"]
"""A single PRNG key: new-style typed (``jax.random.key``) or legacy uint32 [2] (``PRNGKey``)."""


def typechecker(fn: Any) -> Any:
    """beartype with the PEP 484 numeric tower (an ``int`` is a valid ``float``), for tests.

    Args:
        fn: the function or dataclass to check.

    Returns:
        ``fn`` wrapped by ``beartype.beartype``.
    """
    import beartype

    return beartype.beartype(conf=beartype.BeartypeConf(is_pep484_tower=True))(fn)
