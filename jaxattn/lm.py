"""Next-token scoring: a model as a language model, beside the n-gram model of its own count tables.

Every option's derived transformer predicts the next token (its ``logits``); the same count
tables it was derived from define a smoothed back-off n-gram model; uniform is ``log2 V``.
This module scores all three on the same evaluation sequences, in bits per token:

* :func:`ngram_logprobs`: the add-alpha back-off n-gram model read straight from the tables
  ``C^{m,0}`` (vectorised lookups, no dense ``V^m x V`` array);
* :func:`model_logprobs`: a model's next-token log-probabilities from its logits;
* :func:`bits_per_token` and :class:`LMScores`: the summary numbers.

The n-gram model. At position ``i`` of a sequence, the context is the longest suffix ``g`` of
``tokens[max(0, i - max_n + 1) .. i]`` (length ``m <= max_n``; it never reaches before the
start of the sequence) that is an observed context of ``C^{m,0}``; then

    P~(b | g) = (C^{m,0}[g, b] + alpha) / (rowsum[g] + alpha V),

and ``P~ = 1/V`` when not even the 1-gram context ``t_i`` was observed. Its order (the
n of "n-gram": context plus predicted token) is ``max_n + 1``. This is the model Option 3's
derivation targets (``DerivationConfig.smoothing`` is :data:`NGRAM_SMOOTHING` too).

Axis vocabulary: B sequences, T positions, V vocabulary; position i predicts token i+1, so
each sequence gives T-1 predictions.
"""

# ruff: noqa: F722  (jaxtyping shape strings such as "B T-1" are not Python expressions)
from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn.counts import CountMatrix
from jaxattn.errors import JaxattnError
from jaxattn.typing import ArrayLike, Float, Integer

__all__ = [
    "NGRAM_SMOOTHING",
    "LMScores",
    "bits_per_token",
    "lm_scores",
    "model_logprobs",
    "ngram_logprobs",
    "ngram_max_n",
]

#: The add-alpha constant of the n-gram model (Option 3's ``DerivationConfig.smoothing`` is 0.01 too).
NGRAM_SMOOTHING = 0.01


def _check_tokens(tokens: Any, vocab_size: int) -> np.ndarray:
    tok = np.asarray(tokens)
    if tok.ndim != 2:
        raise JaxattnError(f"tokens must be a 2-D [B, T] int array, got shape {tok.shape}")
    if not np.issubdtype(tok.dtype, np.integer):
        raise JaxattnError(f"tokens must be integers, got dtype {tok.dtype}")
    if tok.size and (int(tok.min()) < 0 or int(tok.max()) >= vocab_size):
        bad = int(tok.min()) if int(tok.min()) < 0 else int(tok.max())
        raise JaxattnError(f"token id {bad} is outside [0, vocab_size={vocab_size})")
    return tok


def ngram_max_n(tables: dict[tuple[int, int], CountMatrix], max_n: int) -> int:
    """The longest context the tables support: the largest ``m <= max_n`` with every ``C^{1..m,0}`` present.

    Args:
        tables: ``{(n, s): CountMatrix}``.
        max_n: the longest context wanted.

    Returns:
        m >= 1.

    Raises:
        JaxattnError: ``C^{1,0}`` is missing (there is no n-gram model at all).
    """
    m = 0
    while m < int(max_n) and (m + 1, 0) in tables:
        m += 1
    if m == 0:
        raise JaxattnError(f"the n-gram model needs the table C^(1,0); the tables hold {sorted(tables)}")
    return m


def ngram_logprobs(
    tables: dict[tuple[int, int], CountMatrix],
    tokens: Integer[ArrayLike, "B T"],
    max_n: int,
    *,
    smoothing: float = NGRAM_SMOOTHING,
) -> Float[np.ndarray, "B T-1"]:
    """Natural-log probability of every next token under the smoothed back-off n-gram model.

    See the module docstring for the model. Vectorised: one packed-key ``searchsorted`` per
    context length (:meth:`CountMatrix.context_index`, :meth:`CountMatrix.lookup`).

    Args:
        tables: ``{(n, s): CountMatrix}``; ``C^{m,0}`` for ``m = 1 .. max_n`` are read.
        tokens: int [B, T] sequences; position i predicts ``tokens[:, i + 1]``.
        max_n: the longest context (the model's order is ``max_n + 1``).
        smoothing: the add-alpha constant (> 0, so every probability is positive).

    Returns:
        float64 [B, T-1], ``log P~(tokens[b, i+1] | context at i)``; finite.

    Raises:
        JaxattnError: ``max_n < 1``, ``smoothing <= 0``, a missing table ``C^{m,0}``, tables of
            different vocabularies, or bad tokens (not 2-D integers in ``[0, V)``).
    """
    if int(max_n) < 1:
        raise JaxattnError(f"max_n={max_n} must be >= 1")
    if not float(smoothing) > 0:
        raise JaxattnError(f"smoothing={smoothing} must be > 0")
    missing = [(m, 0) for m in range(1, int(max_n) + 1) if (m, 0) not in tables]
    if missing:
        raise JaxattnError(
            f"the n-gram model with max_n={max_n} needs tables {missing}; the tables hold {sorted(tables)}"
        )
    V = int(tables[(1, 0)].vocab_size)
    if any(int(tables[(m, 0)].vocab_size) != V for m in range(1, int(max_n) + 1)):
        raise JaxattnError("the tables C^(m,0) have different vocab_size")
    tok = _check_tokens(tokens, V)
    B, T = tok.shape
    alpha = float(smoothing)
    out = np.full((B, max(T - 1, 0)), -math.log(V), np.float64)
    done = np.zeros(out.shape, bool)
    for m in range(min(int(max_n), T - 1), 0, -1):  # longest context first; shorter ones fill the gaps
        cm = tables[(m, 0)]
        # Window j covers positions j .. j+m-1 and predicts token j+m (prediction index j+m-1).
        windows = np.lib.stride_tricks.sliding_window_view(tok[:, : T - 1], m, axis=1)  # [B, T-m, m]
        rows = cm.context_index(windows)
        target = tok[:, m:]
        counts = cm.lookup(rows, target).astype(np.float64)
        row_sums = cm.row_sums.astype(np.float64)[np.maximum(rows, 0)]
        logp = np.log(counts + alpha) - np.log(row_sums + alpha * V)
        take = (rows >= 0) & ~done[:, m - 1 :]
        out[:, m - 1 :] = np.where(take, logp, out[:, m - 1 :])
        done[:, m - 1 :] |= take
    return out


@jax.jit
def _gather_log_softmax(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """``log_softmax(logits[:, :-1])`` at ``tokens[:, 1:]``, in the logits' dtype; [B, T-1]."""
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    return jnp.take_along_axis(logp, tokens[:, 1:, None].astype(jnp.int32), axis=-1)[..., 0]


def model_logprobs(logits: Float[ArrayLike, "B T V"], tokens: Integer[ArrayLike, "B T"]) -> Float[np.ndarray, "B T-1"]:
    """A model's natural-log probability of every next token: ``log_softmax(logits[:, i])[tokens[:, i+1]]``.

    The log-softmax runs in JAX in the logits' own dtype (float32 from the model: about 1e-6
    absolute error per prediction, below the float32 forward's own), on the device, so only
    the [B, T-1] result crosses to the host; the result is then widened to float64.

    Args:
        logits: float [B, T, V] next-token logits (``ForwardOutput.logits``).
        tokens: int [B, T] the sequences the logits were computed on.

    Returns:
        float64 [B, T-1].

    Raises:
        JaxattnError: tokens outside ``[0, V)``.
    """
    tok = _check_tokens(tokens, int(np.shape(logits)[-1]))
    if tok.shape[1] < 2:
        return np.zeros((tok.shape[0], 0), np.float64)
    lp = _gather_log_softmax(jnp.asarray(logits), jnp.asarray(tok))
    return np.asarray(lp, np.float64)


def bits_per_token(logprobs: Float[ArrayLike, "*shape"]) -> float:
    """Mean cross-entropy in bits: ``mean(-logprob) / ln 2`` over every prediction.

    Args:
        logprobs: float [...] natural-log probabilities (any shape).

    Returns:
        Bits per token (``inf`` if a probability was 0; never NaN).

    Raises:
        JaxattnError: no predictions, or a NaN log-probability.
    """
    lp = np.asarray(logprobs, np.float64)
    if lp.size == 0:
        raise JaxattnError(
            "bits_per_token needs at least one prediction; got an empty array (sequences of length < 2?)"
        )
    bad = int(np.isnan(lp).sum())
    if bad:
        raise JaxattnError(f"bits_per_token got {bad} NaN log-probabilities of {lp.size}")
    return float(-lp.mean() / math.log(2.0))


class LMScores(NamedTuple):
    """Next-token bits per token of the derived model, its n-gram model and uniform, on the same predictions.

    Attributes:
        derived: the derived transformer's bits per token.
        ngram: the smoothed back-off n-gram model's (:func:`ngram_logprobs`).
        uniform: ``log2 V``.
        num_predictions: B x (T-1), the predictions averaged over.
        ngram_order: the n-gram model's order (its longest context plus one).
        smoothing: the n-gram model's add-alpha constant.
    """

    derived: float
    ngram: float
    uniform: float
    num_predictions: int
    ngram_order: int | None = None
    smoothing: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """The ``metrics.json`` form: ``derived_bits_per_token``, ``ngram_bits_per_token``,
        ``uniform_bits_per_token``, ``num_predictions``, ``ngram_order``, ``smoothing``."""
        return {
            "derived_bits_per_token": float(self.derived),
            "ngram_bits_per_token": float(self.ngram),
            "uniform_bits_per_token": float(self.uniform),
            "num_predictions": int(self.num_predictions),
            "ngram_order": None if self.ngram_order is None else int(self.ngram_order),
            "smoothing": None if self.smoothing is None else float(self.smoothing),
        }


def lm_scores(
    derived_logprob: Float[ArrayLike, "*preds"],
    ngram_logprob: Float[ArrayLike, "*preds"],
    vocab_size: int,
    *,
    ngram_order: int | None = None,
    smoothing: float | None = NGRAM_SMOOTHING,
) -> LMScores:
    """:class:`LMScores` from the two models' log-probabilities of the same next tokens.

    Args:
        derived_logprob: float [B, T-1] the derived model's (:func:`model_logprobs`).
        ngram_logprob: float [B, T-1] the n-gram model's (:func:`ngram_logprobs`), same shape.
        vocab_size: V (uniform is ``log2 V``).
        ngram_order: recorded as is.
        smoothing: recorded as is.

    Returns:
        :class:`LMScores`.

    Raises:
        JaxattnError: the two arrays differ in shape, or as for :func:`bits_per_token`.
    """
    if np.shape(derived_logprob) != np.shape(ngram_logprob):
        raise JaxattnError(
            f"derived log-probabilities {np.shape(derived_logprob)} and n-gram ones {np.shape(ngram_logprob)} "
            "must score the same predictions"
        )
    return LMScores(
        derived=bits_per_token(derived_logprob),
        ngram=bits_per_token(ngram_logprob),
        uniform=math.log2(int(vocab_size)),
        num_predictions=int(np.size(derived_logprob)),
        ngram_order=ngram_order,
        smoothing=smoothing,
    )
