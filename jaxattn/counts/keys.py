"""Packed integer keys: an n-gram (or a context and its target) as one int32 or int64.

Axis vocabulary: R packed keys, Z non-zero counts.

A key is ``sum_k ngram[k] * V**(n-1-k)``: the lexicographic order of the n-grams is the order of
their keys. Keys are int32 while ``V**(n+1)`` fits and int64 otherwise (:func:`key_dtype`).
"""

# ruff: noqa: F722  (jaxtyping shape strings such as "R V" are not Python expressions)
from __future__ import annotations

import numpy as np

from jaxattn.errors import JaxattnError
from jaxattn.typing import ArrayLike, Int, Integer

#: Largest int32: keys, counts and positions up to this stay int32.
INT32_MAX = np.iinfo(np.int32).max
#: Largest int64: packed keys beyond this are refused.
INT64_MAX = np.iinfo(np.int64).max

__all__ = ["INT32_MAX", "INT64_MAX", "key_dtype", "pack_ngrams", "shrink_counts", "unpack_ngrams"]


def key_dtype(vocab_size: int, n: int) -> np.dtype:
    """Integer dtype able to hold packed ``(n+1)``-token keys ``< vocab_size**(n+1)``.

    Keys use int32 when they fit and switch to int64 otherwise.

    Raises:
        JaxattnError: if even int64 overflows (the vocabulary size and n are named).
    """
    top = int(vocab_size) ** (n + 1)
    if top - 1 <= INT32_MAX:
        return np.dtype(np.int32)
    if top - 1 <= INT64_MAX:
        return np.dtype(np.int64)
    raise JaxattnError(
        f"vocab_size={vocab_size} with n={n}: packed keys reach vocab_size**(n+1)={top}, "
        f"which overflows int64; reduce the vocabulary (e.g. --max-vocab) or n"
    )


def pack_ngrams(
    ngrams: Integer[ArrayLike, "*batch n"], vocab_size: int, dtype: np.dtype | None = None
) -> Integer[np.ndarray, "*batch"]:
    """Packs n-grams into integer keys in lexicographic order.

    Args:
        ngrams: int [..., n] token ids.
        vocab_size: V.
        dtype: key dtype; default from :func:`key_dtype`.

    Returns:
        int [...] keys ``sum_k ngrams[..., k] * V**(n-1-k)``.
    """
    ngrams = np.asarray(ngrams)
    n = ngrams.shape[-1]
    dt = dtype or key_dtype(vocab_size, max(n - 1, 0))
    key = np.zeros(ngrams.shape[:-1], dtype=dt)
    for k in range(n):
        key = key * dt.type(vocab_size) + ngrams[..., k].astype(dt)
    return key


def unpack_ngrams(keys: Integer[ArrayLike, " R"], vocab_size: int, n: int) -> Int[np.ndarray, "R _"]:
    """Inverse of :func:`pack_ngrams`: int [R] keys -> int32 [R, n]."""
    out = np.empty((keys.shape[0], n), dtype=np.int32)
    k = keys.copy()
    for pos in range(n - 1, -1, -1):
        out[:, pos] = k % vocab_size
        k //= vocab_size
    return out


def shrink_counts(vals: Integer[np.ndarray, " Z"]) -> Int[np.ndarray, " Z"]:
    """Counts [Z] as int32, or as int64 when one exceeds :data:`INT32_MAX`."""
    if vals.size and int(vals.max()) > INT32_MAX:
        return vals.astype(np.int64)
    return vals.astype(np.int32)
