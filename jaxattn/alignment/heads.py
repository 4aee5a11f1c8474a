"""Scores every head of any model against every (n, s) table: which skip-n-gram each head follows.

The head-detector question (TransformerLens asks it of hand-written patterns), asked of the
count tables: for every block and head of a plain forward pass, and every table ``C^{n,s}``
with ``n <= max_n`` and ``s <= max_s``, the pooled alignment of the head's attention with the
table's expected attention; then, per head, the best-matching (n, s).

Axis vocabulary: B sequences, NB blocks (preparation blocks, then layout layers), H heads,
P tables (the (n, s) pairs), T query positions.
"""

# ruff: noqa: F722  (jaxtyping shape strings such as "R V" are not Python expressions)
from __future__ import annotations

from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from jaxattn.alignment.metrics import expected_for_layout, layer_head_metrics, pool
from jaxattn.counts import CountMatrix
from jaxattn.errors import JaxattnError
from jaxattn.model import ModelConfig, Params, forward_batch
from jaxattn.typing import ArrayLike, Bool, Float, Int, Integer

__all__ = ["COSINE_TIE", "SCORED_METRICS", "HeadScores", "best_pairs", "block_attention", "score_heads", "score_pairs"]

#: Mean cosines within this of a head's highest count as tied (then the tied argmax, then the KL decide).
COSINE_TIE = 1e-6

#: The pooled metrics of the score matrix, in :meth:`HeadScores.to_json` order.
SCORED_METRICS = ("cosine", "argmax_match_tied", "kl")


class HeadScores(NamedTuple):
    """Every head of every block scored against every (n, s) table (:func:`score_heads`).

    Attributes:
        pairs: the P tables' (n, s), in order (the last axis of every matrix).
        cosine: float64 [NB, H, P] mean cosine over the valid queries of every sequence.
        argmax_match_tied: float64 [NB, H, P] the head's argmax lands on a key of the expected maximum.
        kl: float64 [NB, H, P] mean KL(expected || actual).
        num_queries: int64 [NB, H, P] the valid queries pooled.
        best: int64 [NB, H] index into ``pairs`` of each head's best table (:func:`best_pairs`).
        num_prep_blocks: how many of the NB blocks precede the layout layers.
    """

    pairs: list[tuple[int, int]]
    cosine: np.ndarray
    argmax_match_tied: np.ndarray
    kl: np.ndarray
    num_queries: np.ndarray
    best: np.ndarray
    num_prep_blocks: int

    def head_entry(self, block: int, head: int) -> dict[str, Any]:
        """``{"block", "head", "best": {"n", "s", "cosine", "argmax_match_tied", "kl"}}`` of one head."""
        p = int(self.best[block, head])
        n, s = self.pairs[p]
        best: dict[str, Any] = {"n": n, "s": s}
        best.update({m: float(getattr(self, m)[block, head, p]) for m in SCORED_METRICS})
        return {"block": int(block), "head": int(head), "best": best}

    def to_json(self) -> dict[str, Any]:
        """The JSON document: ``{"heads": [...], "pairs": [[n, s], ...], "matrix": {metric: [NB][H][P]}}``.

        ``heads`` holds one :meth:`head_entry` per head, in block then head order; ``matrix`` has
        the cosine, tied argmax, KL and num_queries matrices as nested lists.
        """
        NB, H, _ = self.cosine.shape
        matrix = {m: np.asarray(getattr(self, m)).tolist() for m in (*SCORED_METRICS, "num_queries")}
        return {
            "heads": [self.head_entry(b, h) for b in range(NB) for h in range(H)],
            "pairs": [[int(n), int(s)] for n, s in self.pairs],
            "num_prep_blocks": int(self.num_prep_blocks),
            "matrix": matrix,
        }


def block_attention(
    params: Params, config: ModelConfig, tokens: Integer[ArrayLike, "B T"], *, batch_size: int = 16
) -> Float[np.ndarray, "B NB H T T"]:
    """The attention of every block of a plain forward pass (no hook), ``batch_size`` sequences at a time.

    Args:
        params: the parameter pytree (:func:`jaxattn.model.forward`).
        config: the model config.
        tokens: int [B, T].
        batch_size: sequences per forward call; the last call is padded to it (one compile).

    Returns:
        float32 [B, NB, H, T, T]: the preparation blocks (``ForwardOutput.prep_attn``), then the
        layout layers (``.attn``), in block order.
    """
    tokens = np.asarray(tokens, np.int32)
    B = tokens.shape[0]
    bs = max(1, min(int(batch_size), B))
    out = []
    for i in range(0, B, bs):
        chunk = tokens[i : i + bs]
        pad = bs - chunk.shape[0]
        if pad:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
        res = forward_batch(params, jnp.asarray(chunk), config)
        attn = res.attn if res.prep_attn is None else jnp.concatenate([res.prep_attn, res.attn], axis=1)
        out.append(np.asarray(attn, np.float32)[: bs - pad])
    return np.concatenate(out)


def score_pairs(
    expected: Float[ArrayLike, "P B T T"], mask: Bool[ArrayLike, "P B T T"], attn: Float[ArrayLike, "B NB H T T"]
) -> dict[str, np.ndarray]:
    """Every head against every table: one :func:`~jaxattn.alignment.layer_head_metrics` call per table.

    Args:
        expected: float [P, B, T, T] expected attention per table.
        mask: bool [P, B, T, T] valid query-key pairs.
        attn: float [B, NB, H, T, T] actual attention.

    Returns:
        dict of pooled metrics (:func:`~jaxattn.alignment.pool` over the B sequences), each [NB, H, P]:
        ``kl``, ``cosine``, ``argmax_match``, ``argmax_match_tied``, ``entropy`` (float64) and
        ``num_queries`` (int64).
    """
    expected, mask, attn = np.asarray(expected, np.float32), np.asarray(mask, bool), jnp.asarray(attn, jnp.float32)
    _, NB, H = attn.shape[:3]
    pair_index = jnp.zeros((NB, H), jnp.int32)  # the one table of each call, for every head
    per_table = []
    for p in range(expected.shape[0]):
        m = layer_head_metrics(jnp.asarray(expected[p : p + 1]), jnp.asarray(mask[p : p + 1]), pair_index, attn)
        per_table.append(pool({k: np.asarray(v) for k, v in m.items()}, axis=2))
    keys = ("kl", "cosine", "argmax_match", "argmax_match_tied", "entropy", "num_queries")
    return {k: np.stack([t[k] for t in per_table], axis=-1) for k in keys}


def best_pairs(
    cosine: Float[ArrayLike, "NB H P"], tied: Float[ArrayLike, "NB H P"], kl: Float[ArrayLike, "NB H P"]
) -> Int[np.ndarray, "NB H"]:
    """Each head's best table: the highest mean cosine; within :data:`COSINE_TIE` of it, the highest
    tied argmax, then the lowest KL, then the first pair.

    Args:
        cosine: [NB, H, P].
        tied: [NB, H, P] tied argmax match.
        kl: [NB, H, P].

    Returns:
        int64 [NB, H], indices into the pairs.
    """
    cos, tie, kl = (np.asarray(x, np.float64) for x in (cosine, tied, kl))
    near = cos >= cos.max(-1, keepdims=True) - COSINE_TIE
    tie = np.where(near, tie, -np.inf)
    near &= tie >= tie.max(-1, keepdims=True)
    return np.argmin(np.where(near, kl, np.inf), axis=-1).astype(np.int64)


def score_heads(
    params: Params,
    config: ModelConfig,
    tables: dict[tuple[int, int], CountMatrix],
    tokens: Integer[ArrayLike, "B T"],
    *,
    max_n: int = 3,
    max_s: int = 3,
    batch_size: int = 16,
    model_tokens: Integer[ArrayLike, "B T"] | None = None,
) -> HeadScores:
    """Scores every head of every block against every (n, s) table with ``n <= max_n``, ``s <= max_s``.

    Args:
        params: the parameter pytree (any model :func:`jaxattn.model.forward` runs without a hook).
        config: its config.
        tables: ``{(n, s): CountMatrix}``, in the same token ids as ``tokens``; every pair must be there.
        tokens: int [B, T] evaluation sequences, in the tables' ids.
        max_n: longest context scored.
        max_s: largest skip scored.
        batch_size: sequences per forward call.
        model_tokens: int [B, T] the same sequences in the ids the model reads, when its
            vocabulary differs from the tables' (None: ``tokens``).

    Returns:
        :class:`HeadScores` with [NB, H, P] matrices, P = ``max_n * (max_s + 1)``.

    Raises:
        JaxattnError: bad ``max_n``/``max_s``, or a table missing from ``tables``.
    """
    if int(max_n) < 1 or int(max_s) < 0:
        raise JaxattnError(f"max_n={max_n} must be >= 1 and max_s={max_s} >= 0")
    pairs = [(n, s) for n in range(1, int(max_n) + 1) for s in range(int(max_s) + 1)]
    missing = [p for p in pairs if p not in tables]
    if missing:
        raise JaxattnError(f"tables lack (n, s) = {missing[0]} (scoring needs every n <= {max_n}, s <= {max_s})")
    fed = tokens if model_tokens is None else model_tokens
    if np.shape(fed) != np.shape(tokens):
        raise JaxattnError(f"model_tokens shape {np.shape(fed)} differs from tokens shape {np.shape(tokens)}")
    attn = block_attention(params, config, fed, batch_size=batch_size)
    expected, mask = expected_for_layout(tables, np.asarray(tokens), pairs)
    m = score_pairs(expected, mask, attn)
    best = best_pairs(m["cosine"], m["argmax_match_tied"], m["kl"])
    prep = attn.shape[1] - config.num_layers
    return HeadScores(pairs, m["cosine"], m["argmax_match_tied"], m["kl"], m["num_queries"], best, prep)
