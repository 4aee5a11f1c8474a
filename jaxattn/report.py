"""One call from a text (or token ids) to its actual and expected attention and their alignment.

:func:`attention_report` runs a model's own forward pass on one sequence (no hook: the seed
baseline, Option 1 and the standard-GPT-2 Option 3 all run this way; the hooked derivations of
Option 2 and the oracle-inputs ablation do not), builds the expected attention of every layout
head from the count tables with the head's (n, s), and scores each head with
:func:`jaxattn.alignment.alignment_metrics`. The numbers equal those
:func:`jaxattn.pipeline.evaluate` writes for the same sequence.

The figures of one head or a chosen set of heads live in :mod:`jaxattn.output.plots`.

Axis vocabulary: L layout layers, H heads, T positions.
"""

# ruff: noqa: F722  (jaxtyping shape strings such as "L H T T" are not Python expressions)
from __future__ import annotations

from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from jaxattn.alignment import DeviceTable, alignment_metrics, expected_attention, expected_attention_jax
from jaxattn.corpus import Tokenizer
from jaxattn.counts import CountMatrix
from jaxattn.errors import JaxattnError
from jaxattn.model import ModelConfig, Params, check_token_ids, forward

__all__ = ["AttentionReport", "attention_report"]


class AttentionReport(NamedTuple):
    """The attention of one sequence, what the counts predict, and how well they align.

    Attributes:
        actual: float32 [L, H, T, T] the model's attention in the layout layers.
        expected: float32 [L, H, T, T] the expected attention of each head's (n, s) table.
        mask: bool [L, H, T, T] valid (query, key) pairs.
        metrics: ``{name: float64 [L, H]}`` for ``kl``, ``cosine``, ``argmax_match``,
            ``argmax_match_tied``, ``entropy`` (NaN for a head with no valid query), and int
            [L, H] ``num_queries``.
        tokens: int32 [T] the sequence's token ids.
        layout: int [L, H, 2] each head's (n, s).
    """

    actual: np.ndarray
    expected: np.ndarray
    mask: np.ndarray
    metrics: dict[str, np.ndarray]
    tokens: np.ndarray
    layout: np.ndarray


def _ids(text_or_ids: Any, vocab_size: int, tokenizer: Tokenizer | None) -> np.ndarray:
    """A string through the tokenizer, or ids as they are: int32 [T], checked against V."""
    if isinstance(text_or_ids, str):
        if tokenizer is None:
            raise JaxattnError("attention_report got a string but no tokenizer= to encode it (pass corpus.tokenizer)")
        ids = np.asarray(tokenizer.encode(text_or_ids))
    else:
        ids = np.asarray(text_or_ids)
    if ids.ndim != 1 or ids.size == 0:
        raise JaxattnError(f"attention_report needs one non-empty sequence of token ids, got shape {ids.shape}")
    check_token_ids(ids, vocab_size)
    return ids.astype(np.int32)


def attention_report(
    text_or_ids: Any,
    params: Params,
    config: ModelConfig,
    tables: dict[tuple[int, int], CountMatrix] | dict[tuple[int, int], DeviceTable],
    *,
    tokenizer: Tokenizer | None = None,
) -> AttentionReport:
    """Actual and expected attention of one sequence, every layout head, with the alignment metrics.

    Args:
        text_or_ids: a string (encoded with ``tokenizer``) or int [T] token ids.
        params: the model's parameters (:func:`jaxattn.model.forward`; preparation blocks allowed).
        config: its config; head (l, h) is scored against the table ``config.layout(l, h)``.
        tables: ``{(n, s): CountMatrix}`` (numpy path) or ``{(n, s): DeviceTable}``
            (:func:`jaxattn.alignment.device_tables`, the JAX path); at least the layout's pairs.
        tokenizer: the corpus tokenizer, needed for a string.

    Returns:
        :class:`AttentionReport`.

    Raises:
        JaxattnError: a string without a tokenizer, ids that are not one non-empty 1-D sequence
            or lie outside ``[0, V)``, a missing table, or a table of another vocabulary.
    """
    V = int(config.vocab_size)
    ids = _ids(text_or_ids, V, tokenizer)
    L, H = config.num_layers, config.num_heads
    layout = np.array([[config.layout(l, h) for h in range(H)] for l in range(L)], np.int64)
    pairs = sorted({(int(n), int(s)) for n, s in layout.reshape(-1, 2)})
    missing = [p for p in pairs if p not in tables]
    if missing:
        raise JaxattnError(f"tables lack (n, s) = {missing} used by the layout")
    wrong = sorted({int(tables[p].vocab_size) for p in pairs} - {V})
    if wrong:
        raise JaxattnError(f"tables have vocab_size {wrong[0]}, but the model has vocab_size={V}")
    per_pair = {}
    for p in pairs:
        t = tables[p]
        e, m = expected_attention_jax(t, ids) if isinstance(t, DeviceTable) else expected_attention(t, ids)
        per_pair[p] = (np.asarray(e, np.float32), np.asarray(m, bool))
    expected = np.stack([np.stack([per_pair[config.layout(l, h)][0] for h in range(H)]) for l in range(L)])
    mask = np.stack([np.stack([per_pair[config.layout(l, h)][1] for h in range(H)]) for l in range(L)])
    actual = np.asarray(forward(params, jnp.asarray(ids), config).attn)
    raw = {k: np.asarray(v) for k, v in alignment_metrics(expected, actual, mask).items()}
    nq = raw["num_queries"].astype(np.int64)
    metrics: dict[str, np.ndarray] = {
        k: np.where(nq > 0, v.astype(np.float64), np.nan) for k, v in raw.items() if k != "num_queries"
    }
    metrics["num_queries"] = nq
    return AttentionReport(actual, expected, mask, metrics, ids, layout)
