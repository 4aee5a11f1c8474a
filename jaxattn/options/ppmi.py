"""Option 1 (SPEC §3.1): token embeddings from the corpus itself, under the unchanged seed derivation.

PPMI with context-distribution smoothing, truncated SVD, eigenvalue weighting ``U Σ^p`` (Levy,
Goldberg & Dagan 2015), placed into ``d_model`` by a fixed orthogonal map; then the seed
derivation (:func:`jaxattn.derive.derive_params`) on top. Everything comes from the count
corpus (``prep.tables`` and ``prep.corpus``), never from the evaluation corpus.

Axis vocabulary: B sequences, L layers, H heads, T positions, D d_model, K d_head,
V vocabulary, N corpus tokens, R observed contexts of one table.
"""

# ruff: noqa: F722  (jaxtyping shape strings such as "R V" are not Python expressions)
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn.counts import CountMatrix, check_dense_size, count_matrix, manifold_matrix
from jaxattn.derive import derive_params, padded_svd
from jaxattn.embeddings import orthonormal_embeddings
from jaxattn.errors import JaxattnError
from jaxattn.model import ModelConfig, Params
from jaxattn.options.derivation import stream_rows
from jaxattn.pipeline import AnalysisResult, Prepared, measure
from jaxattn.progress import Timer, stage
from jaxattn.typing import Array, ArrayLike, Float, Integer, PRNGKey

__all__ = [
    "PPMIConfig",
    "cooccurrence_matrix",
    "layer0_circuit_error",
    "place_embeddings",
    "ppmi_embeddings",
    "ppmi_matrix",
    "ppmi_vectors",
    "run_option1",
]


@dataclasses.dataclass(frozen=True)
class PPMIConfig:
    """Knobs of the PPMI + SVD token embeddings (Levy, Goldberg & Dagan 2015).

    Co-occurrence of tokens ``a`` and ``b`` at distance ``d`` (``b`` follows ``a`` by
    ``d = s + 1`` positions, inside one document) is read from the skip-bigram tables
    ``C^{1,s}``, ``s = 0 .. window-1``, each distance weighted equally. ``symmetric`` adds
    the transpose, so "b follows a" and "a follows b" count alike (the usual symmetric
    word2vec/GloVe window); without it, rows are left tokens and columns right tokens.

    Attributes:
        window: maximum distance d counted (>= 1).
        alpha: context-distribution smoothing exponent (``P_alpha(b) ∝ count(b)^alpha``).
        shift: subtracted from PMI before clipping at 0 (``log k`` of SGNS with k negatives).
        power: eigenvalue weighting ``p`` of ``U Σ^p`` (0.5 is the recommended symmetric split).
        normalize: scale every embedding row to unit length (like the seed's base embeddings).
        dim: SVD rank (None: ``min(V, d_model)``).
        symmetric: count both directions (see above).
    """

    window: int = 4
    alpha: float = 0.75
    shift: float = 0.0
    power: float = 0.5
    normalize: bool = True
    dim: int | None = None
    symmetric: bool = True

    def __post_init__(self) -> None:
        if int(self.window) < 1:
            raise JaxattnError(f"PPMIConfig.window={self.window} must be >= 1")
        if not 0.0 < float(self.alpha) <= 1.0:
            raise JaxattnError(f"PPMIConfig.alpha={self.alpha} must be in (0, 1]")
        if float(self.shift) < 0:
            raise JaxattnError(f"PPMIConfig.shift={self.shift} must be >= 0")
        if self.dim is not None and int(self.dim) < 1:
            raise JaxattnError(f"PPMIConfig.dim={self.dim} must be >= 1")


def cooccurrence_matrix(
    tables: dict[tuple[int, int], CountMatrix],
    vocab_size: int,
    window: int,
    *,
    symmetric: bool = True,
    tokens: Integer[ArrayLike, " N"] | None = None,
    doc_ids: Integer[ArrayLike, " N"] | None = None,
) -> Float[np.ndarray, "V V"]:
    """Token co-occurrence counts within ``window`` from the ``C^{1,s}`` tables.

    Args:
        tables: ``{(n, s): CountMatrix}``; ``C^{1,s}`` is used when present.
        vocab_size: V.
        window: distances ``1 .. window`` (tables ``s = 0 .. window-1``).
        symmetric: add the transpose.
        tokens: int [N] count corpus, to count ``C^{1,s}`` tables that are missing.
        doc_ids: int [N] documents of ``tokens``.

    Returns:
        float64 [V, V]; ``[a, b]`` counts ``b`` at distance ``1..window`` after ``a``.

    Raises:
        JaxattnError: a table is missing and no ``tokens`` were given.
        MemoryBudgetError: the dense [V, V] matrix exceeds the memory budget.
    """
    V = int(vocab_size)
    budget = next((cm.max_dense_bytes for cm in tables.values()), None)
    check_dense_size((V, V), 8, "co-occurrence matrix", budget)
    out = np.zeros((V, V), np.float64)
    for s in range(int(window)):
        cm = tables.get((1, s))
        if cm is None:
            if tokens is None:
                raise JaxattnError(f"co-occurrence window={window} needs table C^(1,{s}); pass the corpus tokens")
            cm = count_matrix(tokens, 1, s, V, doc_ids=doc_ids)
        np.add.at(out, (cm.contexts[cm.rows, 0], cm.cols), cm.values.astype(np.float64))
    return out + out.T if symmetric else out


def ppmi_matrix(cooc: Float[ArrayLike, "V V"], alpha: float = 0.75, shift: float = 0.0) -> Float[np.ndarray, "V V"]:
    """Positive PMI with context-distribution smoothing.

    ``PMI(a, b) = log(P(a, b) / (P(a) P_alpha(b)))`` with ``P_alpha(b) = c(b)^alpha / Σ c^alpha``;
    ``PPMI = max(PMI - shift, 0)``, and 0 wherever ``cooc`` is 0.

    Args:
        cooc: float [V, V] co-occurrence counts (rows: words, columns: contexts).
        alpha: smoothing exponent.
        shift: subtracted before clipping (``log k``).

    Returns:
        float64 [V, V].
    """
    c = np.asarray(cooc, np.float64)
    total = c.sum()
    if total <= 0:
        raise JaxattnError("co-occurrence matrix is all zero: the corpus has no token pairs in the window")
    row = c.sum(1)
    col_a = c.sum(0) ** alpha
    p_ab = c / total
    p_a = row / total
    p_b = col_a / col_a.sum()
    denom = p_a[:, None] * p_b[None, :]
    pos = (c > 0) & (denom > 0)
    pmi = np.log(np.where(pos, p_ab, 1.0) / np.where(pos, denom, 1.0))
    return np.where(pos, np.maximum(pmi - shift, 0.0), 0.0)


def ppmi_vectors(
    ppmi: Float[ArrayLike, "V V"], cfg: PPMIConfig, *, key: PRNGKey | None = None
) -> Float[np.ndarray, "V r"]:
    """``U_r Σ_r^p`` of the truncated SVD of a PPMI matrix (rows optionally unit length).

    Uses :func:`jaxattn.truncated_svd` and its sign convention (the largest-|.| entry of each
    U column is positive).

    Args:
        ppmi: float [V, V].
        cfg: the knobs (``dim``, ``power``, ``normalize``).
        key: PRNG key for the randomized SVD.

    Returns:
        float32 [V, r], r = ``cfg.dim`` (or V), zero-padded past the matrix rank.
    """
    V = ppmi.shape[0]
    r = int(cfg.dim) if cfg.dim is not None else V
    U, S, _ = padded_svd(np.asarray(ppmi, np.float32), r, key=key)
    w = np.asarray(U, np.float64) * np.asarray(S, np.float64) ** cfg.power
    if cfg.normalize:
        norm = np.linalg.norm(w, axis=1, keepdims=True)
        w = w / np.where(norm > 0, norm, 1.0)  # a token that never co-occurs keeps a zero row
    return w.astype(np.float32)


def place_embeddings(vectors: Float[ArrayLike, "V r"], d_model: int, key: PRNGKey) -> Float[Array, "V D"]:
    """Places r-dimensional vectors into ``d_model`` with a fixed random orthogonal map.

    ``E = W Π`` with Π [r, D] orthonormal rows drawn from ``key``, so every inner product
    and norm of the rows of ``W`` is kept exactly (``E E^T = W W^T``); a random map rather
    than zero padding, so no coordinate of the residual stream is special.

    Args:
        vectors: float [V, r], r <= D.
        d_model: D.
        key: PRNG key of Π.

    Returns:
        float32 [V, D].
    """
    r = vectors.shape[1]
    if r > d_model:
        raise JaxattnError(f"embedding dim={r} > d_model={d_model}; lower PPMIConfig.dim")
    pi = orthonormal_embeddings(key, r, d_model)
    return jnp.asarray(vectors, jnp.float32) @ pi


def ppmi_embeddings(
    tables: dict[tuple[int, int], CountMatrix],
    config: ModelConfig,
    cfg: PPMIConfig = PPMIConfig(),
    *,
    key: PRNGKey,
    tokens: Integer[ArrayLike, " N"] | None = None,
    doc_ids: Integer[ArrayLike, " N"] | None = None,
) -> tuple[Float[Array, "V D"], dict[str, Any]]:
    """Option 1 embeddings, from the count corpus only.

    Args:
        tables: ``{(n, s): CountMatrix}`` of the count corpus.
        config: the model config (V and D).
        cfg: PPMI knobs.
        key: PRNG key (SVD and the orthogonal placement).
        tokens: int [N] count-corpus tokens, to count ``C^{1,s}`` tables the layout lacks.
        doc_ids: int [N] documents of ``tokens``.

    Returns:
        (E float32 [V, D], info dict with the window, the PPMI density and the spectrum kept).
    """
    V, D = config.vocab_size, config.d_model
    k_svd, k_place = jax.random.split(key)
    cooc = cooccurrence_matrix(tables, V, cfg.window, symmetric=cfg.symmetric, tokens=tokens, doc_ids=doc_ids)
    ppmi = ppmi_matrix(cooc, cfg.alpha, cfg.shift)
    if cfg.dim is None:
        cfg = dataclasses.replace(cfg, dim=min(V, D))
    vec = ppmi_vectors(ppmi, cfg, key=k_svd)
    E = place_embeddings(vec, D, k_place)
    sim = np.asarray(vec, np.float64) @ np.asarray(vec, np.float64).T
    off = sim[~np.eye(V, dtype=bool)]
    info = {
        "config": dataclasses.asdict(cfg),
        "ppmi_density": float((ppmi > 0).mean()),
        "embedding_offdiag_abs_cos_mean": float(np.abs(off).mean()) if off.size else 0.0,
    }
    return E, info


def layer0_circuit_error(
    tables: dict[tuple[int, int], CountMatrix], config: ModelConfig, params: Params
) -> dict[str, float]:
    """How far layer 0's Q/K circuit is from the rank-K manifold the seed derivation targets.

    The circuit is ``C = (LN(E) W_Q)(LN(E) W_K)^T`` over token pairs (what layer 0 computes
    before the 1/sqrt(K) and the softmax); the target is ``M_K``, the rank-K truncation of
    ``M^{1,s}``. The error is ``min_c ||c C - M_K|| / ||M_K||`` (the best overall scale, since
    the std rescaling sets the scale separately): 0 when the seed's transposes act as
    pseudo-inverses, i.e. when ``E E^T`` is close to the identity.

    Args:
        tables: ``{(n, s): CountMatrix}``; layer 0's ``C^{1,s}`` are read.
        config: the model config.
        params: the derived parameters (``embed`` [V, D], ``wq``/``wk`` [L, H, D, K]).

    Returns:
        ``{"1,s": relative error}`` for each distinct table of layer 0.
    """
    x = np.asarray(stream_rows(params["embed"], config), np.float64)
    out: dict[str, float] = {}
    for h in range(config.num_heads):
        n, s = config.layout(0, h)
        if n != 1 or f"1,{s}" in out:
            continue
        cm = tables[(1, s)]
        M = np.asarray(manifold_matrix(cm), np.float64)
        U, S, Vt = np.linalg.svd(M, full_matrices=False)
        K = min(config.d_head, S.size)
        MK = (U[:, :K] * S[:K]) @ Vt[:K]
        q = x[cm.contexts[:, 0]] @ np.asarray(params["wq"][0, h], np.float64)
        k = x @ np.asarray(params["wk"][0, h], np.float64)
        C = q @ k.T
        c = float((C * MK).sum() / max(float((C * C).sum()), 1e-300))
        out[f"1,{s}"] = float(np.linalg.norm(c * C - MK) / max(float(np.linalg.norm(MK)), 1e-300))
    return out


def run_option1(
    prep: Prepared, *, progress: bool = True, timer: Timer | None = None, ppmi: PPMIConfig = PPMIConfig()
) -> AnalysisResult:
    """Option 1: PPMI embeddings, then the unchanged seed derivation and model.

    The MLP, SVD keys and everything else are those of the baseline (same ``derive`` key).
    ``extra["layer0_circuit_error"]`` compares how well layer 0 realises the seed's target
    with these embeddings and with the seed's random ones (:func:`layer0_circuit_error`).

    Args:
        prep: the prepared run.
        progress: progress bars.
        timer: stage timer (stages "derive", "forward", "metrics").
        ppmi: the PPMI knobs.

    Returns:
        :class:`~jaxattn.pipeline.AnalysisResult` labelled "option1", with its next-token scores
        (:func:`~jaxattn.pipeline.language_model_scores`).
    """
    corpus = prep.corpus
    with stage(timer, "derive"):
        E, info = ppmi_embeddings(
            prep.tables, prep.config, ppmi, key=prep.key("option1"), tokens=corpus.tokens, doc_ids=corpus.doc_ids
        )
        params = derive_params(prep.tables, prep.config, key=prep.key("derive"), embed=E)
        seed_params = derive_params(prep.tables, prep.config, key=prep.key("derive"))
        jax.block_until_ready(params)
    errors = {
        "ppmi": layer0_circuit_error(prep.tables, prep.config, params),
        "random": layer0_circuit_error(prep.tables, prep.config, seed_params),
    }
    extra = {"ppmi": info, "layer0_circuit_error": errors}
    return measure(prep, params, "option1", extra=extra, progress=progress, timer=timer)
