"""Diagnostics 1 and 4, embedding geometry: Gram matrices of E, LN(E) and E^n, and the rank of E^n.

Checks the seed's "embeddings are nearly orthogonal" and "E^n = P·E only rescales E".

Axis vocabulary: N rows, D d_model, V vocabulary, R observed contexts (n-grams).
"""

# ruff: noqa: F722  (jaxtyping shape strings such as "R V" are not Python expressions)
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxattn.counts import CountMatrix
from jaxattn.diagnostics.inputs import ln_rows
from jaxattn.embeddings import ngram_embeddings
from jaxattn.errors import JaxattnError
from jaxattn.model import ModelConfig, Params
from jaxattn.typing import ArrayLike, Float, Integer

#: Rows of a Gram matrix beyond which a deterministic subsample is used.
MAX_GRAM_ROWS = 2048
#: |cos| above which two vectors count as parallel.
PARALLEL_COS = 0.999


def _pair_name(n: int, s: int) -> str:
    return f"n={n},s={s}"


def random_unit_abs_cosine(d: int) -> float:
    """``E|cos|`` between two independent uniformly random unit vectors in ``d`` dimensions.

    ``Γ(d/2) / (√π Γ((d+1)/2))``, about ``sqrt(2 / (π d))`` for large d.
    """
    return float(math.exp(math.lgamma(d / 2) - math.lgamma((d + 1) / 2)) / math.sqrt(math.pi))


def gram_statistics(
    vectors: Float[ArrayLike, "*shape"], *, max_rows: int = MAX_GRAM_ROWS, seed: int = 0
) -> dict[str, Any]:
    """Off-diagonal statistics of the cosine Gram matrix of some row vectors.

    Args:
        vectors: float [N, D] (any other shape is refused with a :class:`JaxattnError`).
            All-zero rows are left out (and counted).
        max_rows: above this many rows a deterministic random subset is used.
        seed: seed of that subset.

    Returns:
        ``offdiag_mean``, ``offdiag_abs_mean``, ``offdiag_abs_max``, ``offdiag_std``,
        ``parallel_fraction`` (pairs with |cos| > 0.999), ``random_abs_mean``, ``random_std``
        and ``random_abs_max`` (the same statistics expected for independent random unit
        vectors in D dimensions), ``abs_mean_vs_random`` (ratio), ``orthonormal_deviation``
        (``||G - I||_F / sqrt(N)``: how far the rows are from orthonormal *collectively*),
        ``num_rows``, ``num_zero_rows``, ``rows_used``.
    """
    x = np.asarray(vectors, np.float64)
    if x.ndim != 2:
        raise JaxattnError(f"gram_statistics needs [N, D] vectors, got shape {x.shape}")
    norms = np.linalg.norm(x, axis=1)
    nz = norms > 0
    x = x[nz] / norms[nz, None]
    if x.shape[0] > max_rows:
        x = x[np.sort(np.random.default_rng(seed).choice(x.shape[0], max_rows, replace=False))]
    d = x.shape[1]
    out: dict[str, Any] = {
        "num_rows": int(norms.shape[0]),
        "num_zero_rows": int((~nz).sum()),
        "rows_used": int(x.shape[0]),
        "d": int(d),
        "random_abs_mean": random_unit_abs_cosine(d),
        "random_std": 1.0 / math.sqrt(d),
    }
    if x.shape[0] < 2:
        zero = ("offdiag_mean", "offdiag_abs_mean", "offdiag_abs_max", "offdiag_std", "parallel_fraction")
        return (
            out
            | dict.fromkeys(zero, 0.0)
            | {
                "abs_mean_vs_random": 0.0,
                "random_abs_max": 0.0,
                "orthonormal_deviation": 0.0,
            }
        )
    sim = x @ x.T
    off = sim[~np.eye(sim.shape[0], dtype=bool)]
    num_pairs = x.shape[0] * (x.shape[0] - 1) // 2
    out.update(
        # Extreme-value scale of the max |cos| over that many random pairs.
        random_abs_max=math.sqrt(2.0 * math.log(max(num_pairs, 2)) / d),
        # ||G - I||_F / ||I||_F: pairwise-small cosines still add up (about sqrt((N-1)/d)).
        orthonormal_deviation=float(np.linalg.norm(sim - np.eye(sim.shape[0])) / math.sqrt(sim.shape[0])),
        offdiag_mean=float(off.mean()),
        offdiag_abs_mean=float(np.abs(off).mean()),
        offdiag_abs_max=float(np.abs(off).max()),
        offdiag_std=float(off.std()),
        parallel_fraction=float((np.abs(off) > PARALLEL_COS).mean()),
    )
    out["abs_mean_vs_random"] = out["offdiag_abs_mean"] / out["random_abs_mean"]
    return out


def ngram_rank(e_n: Float[ArrayLike, "R D"], contexts: Integer[ArrayLike, "R n"]) -> dict[str, Any]:
    """How many independent directions the seed's n-gram embeddings span.

    ``E^n[g] = P(t_n | prefix) E[t_n]``: every n-gram ending in token t lies on E[t]'s line,
    so the rank is at most the number of distinct last tokens (<= V), however many n-grams R
    were observed.

    Args:
        e_n: float [R, D] n-gram embeddings.
        contexts: int [R, n] the n-grams.

    Returns:
        ``num_ngrams`` (R), ``num_zero_rows``, ``numerical_rank`` (via the [D, D] Gram,
        so it scales to large R), ``distinct_last_tokens`` (among non-zero rows),
        ``ngrams_per_direction_mean`` / ``_max``, ``same_direction_pair_fraction`` (share of
        n-gram pairs that are exactly parallel because they end in the same token).
    """
    e = np.asarray(e_n, np.float64)
    contexts = np.asarray(contexts)
    nz = np.linalg.norm(e, axis=1) > 0
    g = e[nz].T @ e[nz]
    ev = np.linalg.eigvalsh(g)
    # Singular values are sqrt(eigenvalues); the usual matrix_rank tolerance in float32 (E's dtype).
    sv = np.sqrt(np.maximum(ev, 0.0))
    tol = sv.max(initial=0.0) * max(e.shape) * np.finfo(np.float32).eps
    last = contexts[nz, -1]
    _, group = np.unique(last, return_counts=True)
    r = int(nz.sum())
    pairs = r * (r - 1)
    return {
        "num_ngrams": int(e.shape[0]),
        "num_zero_rows": int((~nz).sum()),
        "numerical_rank": int((sv > tol).sum()),
        "distinct_last_tokens": int(group.size),
        "ngrams_per_direction_mean": float(group.mean()) if group.size else 0.0,
        "ngrams_per_direction_max": int(group.max()) if group.size else 0,
        "same_direction_pair_fraction": float((group * (group - 1)).sum() / pairs) if pairs else 0.0,
        "d_model": int(e.shape[1]),
    }


def embedding_geometry(
    tables: dict[tuple[int, int], CountMatrix],
    pairs: Sequence[tuple[int, int]],
    params: Params,
    config: ModelConfig,
) -> dict[str, Any]:
    """Diagnostics 1 and 4: Gram statistics of E, LN(E) and E^n, and the rank of E^n.

    Args:
        tables: ``{(n, s): CountMatrix}``.
        pairs: the distinct (n, s) of the layout, in order.
        params: the seed-derived parameters (their embedding E and layer 0's LN1).
        config: the model config.

    Returns:
        ``{"token": gram(E), "token_ln": gram(LN(E)), "ngram": [{n, table, gram, rank}...]}``;
        the n-gram entries use the observed contexts of ``C^{n,0}`` (else the first table with
        that n) for each n >= 2 the model uses.
    """
    embed = params["embed"]
    out: dict[str, Any] = {
        "token": gram_statistics(embed),
        "token_ln": gram_statistics(ln_rows(embed, params, 0, config)),
        "ngram": [],
    }
    for n in sorted({n for n, _ in pairs if n >= 2}):
        cm = tables[(n, 0)] if (n, 0) in tables else tables[next(p for p in pairs if p[0] == n)]
        e_n = ngram_embeddings(embed, cm.contexts, tables.get((n - 1, 0)))
        out["ngram"].append(
            {
                "n": n,
                "table": _pair_name(cm.n, cm.s),
                "gram": gram_statistics(e_n),
                "rank": ngram_rank(e_n, cm.contexts),
            }
        )
    return out
