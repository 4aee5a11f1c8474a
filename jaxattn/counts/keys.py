"""Packed integer keys: an n-gram (or a context and its target) as one int32 or int64.

Axis vocabulary: R packed keys, Z non-zero counts.

A key is ``sum_k ngram[k] * V**(n-1-k)``: the lexicographic order of the n-grams is the order of
their keys. Keys are int32 while ``V**(n+1)`` fits and int64 otherwise (:func:`key_dtype`).
"""

# ruff: noqa: F722  (jaxtyping shape strings such as "R V" are not Python expressions)
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jaxattn.errors import JaxattnError
from jaxattn.typing import ArrayLike, Int, Integer

#: Largest int32: keys, counts and positions up to this stay int32.
INT32_MAX = np.iinfo(np.int32).max
#: Largest int64: packed keys beyond this are refused.
INT64_MAX = np.iinfo(np.int64).max

__all__ = ["INT32_MAX", "INT64_MAX", "key_dtype", "merge_keyed_runs", "pack_ngrams", "shrink_counts", "unpack_ngrams"]


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


def merge_keyed_runs(
    runs: Sequence[tuple[np.ndarray, np.ndarray]], *, presorted: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Exact sum of keyed runs: the sorted unique keys of all runs with their summed counts.

    Keys whose counts sum to zero are dropped (a run may hold negative counts).

    Args:
        runs: ``(keys [Z_i], counts [Z_i])`` pairs; keys of one dtype, each run's keys unique.
        presorted: each run's keys are sorted and unique, so that a single run is returned as it is;
            False sorts and sums a single run too (e.g. the per-device parts of a sharded count).

    Returns:
        keys [Z] sorted ascending (the runs' key dtype); counts int64 [Z], non-zero.

    Used by the streamed, the sharded and the multi-process counts alike.
    """
    empty_dtype = np.asarray(runs[0][0]).dtype if runs else np.dtype(np.int64)
    runs = [r for r in runs if len(r[0])]
    if not runs:
        return np.zeros(0, empty_dtype), np.zeros(0, np.int64)
    if len(runs) == 1 and presorted:
        k, v = runs[0]
        keep = np.asarray(v) != 0
        return np.asarray(k)[keep], np.asarray(v, dtype=np.int64)[keep]
    keys = np.concatenate([np.asarray(r[0]) for r in runs])
    vals = np.concatenate([np.asarray(r[1], dtype=np.int64) for r in runs])
    order = np.argsort(keys, kind="stable")  # timsort finds the sorted runs: a k-way merge
    keys = keys[order]
    vals = vals[order]
    del order
    new = np.empty(keys.shape[0], bool)
    new[0] = True
    np.not_equal(keys[1:], keys[:-1], out=new[1:])
    first = np.flatnonzero(new)
    del new
    sums = np.add.reduceat(vals, first)
    keep = sums != 0
    return keys[first[keep]], sums[keep]
