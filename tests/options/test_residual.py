"""The residual subspaces of the standard-GPT-2 Option 3 (jaxattn.options.residual): bases and the capacity rule."""

from __future__ import annotations

import re

import numpy as np
import pytest

from jaxattn.errors import JaxattnError
from jaxattn.options.residual import CapacityError, Subspaces, allocate, ones_complement


@pytest.mark.parametrize("D", [2, 3, 7, 64, 385])
def test_ones_complement_is_an_orthonormal_basis_of_the_zero_mean_subspace(D):
    B = ones_complement(D)
    assert B.shape == (D - 1, D) and B.dtype == np.float64
    np.testing.assert_allclose(B @ B.T, np.eye(D - 1), rtol=0, atol=1e-12)
    np.testing.assert_allclose(B.sum(axis=1), 0.0, rtol=0, atol=1e-12)
    # Together with the all-ones direction it spans R^D: a full orthogonal matrix.
    full = np.vstack([np.ones((1, D)) / np.sqrt(D), B])
    np.testing.assert_allclose(full @ full.T, np.eye(D), rtol=0, atol=1e-12)
    # LayerNorm's mean subtraction is the identity on every combination of the rows.
    x = np.random.default_rng(D).normal(size=(5, D - 1)) @ B
    np.testing.assert_allclose(x - x.mean(axis=1, keepdims=True), x, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(ones_complement(D), B)  # deterministic, bit for bit


def test_ones_complement_of_one_dimension_is_empty():
    assert ones_complement(1).shape == (0, 1)


SIZES = {"tok": 5, "pos": 3, "unused": 0, "read": 4, "pad": 1}


def test_allocate_gives_disjoint_orthogonal_blocks():
    sub = allocate(20, SIZES)
    assert isinstance(sub, Subspaces) and sub.d_model == 20
    assert sub.sizes == {"tok": 5, "pos": 3, "read": 4, "pad": 1}  # zero-size blocks are dropped
    assert sub.used == 5 + 3 + 4 + 1 + 1  # plus the all-ones direction
    assert [sub.offset(k) for k in sub.sizes] == [0, 5, 8, 12]
    blocks = [sub[k] for k in sub.sizes]
    assert [b.shape for b in blocks] == [(5, 20), (3, 20), (4, 20), (1, 20)]
    for i, a in enumerate(blocks):
        np.testing.assert_allclose(a @ a.T, np.eye(len(a)), rtol=0, atol=1e-12)
        np.testing.assert_allclose(a.sum(axis=1), 0.0, rtol=0, atol=1e-12)
        for b in blocks[i + 1 :]:
            np.testing.assert_allclose(a @ b.T, 0.0, rtol=0, atol=1e-12)
    # The blocks are the leading rows of the ones-complement basis, block after block.
    np.testing.assert_array_equal(np.vstack(blocks), ones_complement(20)[:13])
    assert sub["unused"].shape == (0, 20) and sub["nothing"].shape == (0, 20)
    with pytest.raises(KeyError):
        sub.offset("nothing")


def test_allocate_fills_the_residual_exactly():
    sub = allocate(14, SIZES)  # 13 directions + the all-ones one = 14
    assert sub.used == 14 and sub.basis.shape == (13, 14)
    np.testing.assert_allclose(sub.basis @ sub.basis.T, np.eye(13), rtol=0, atol=1e-12)


def test_allocate_refuses_naming_the_requirement_and_d_model():
    with pytest.raises(CapacityError) as err:
        allocate(13, SIZES)
    msg = str(err.value)
    assert isinstance(err.value, JaxattnError)
    assert re.search(r"needs a residual of 14 dims", msg), msg
    assert "d_model=13" in msg, msg
    for part in ("tok 5", "pos 3", "read 4", "pad 1"):
        assert part in msg, msg
    assert "unused" not in msg, msg
