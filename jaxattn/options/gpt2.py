"""Option 3 (SPEC §3.3) as a standard GPT-2: every weight from the counts, attention reads ``LN(x)``.

The model is an unmodified pre-LN GPT-2 (learned positions, biases, an untied unembedding, one
preparation block ahead of the layout); :func:`jaxattn.model.forward` runs it with no hook, and
:mod:`jaxattn.output.hf` exports it for HuggingFace transformers. The construction:

* **Residual subspaces** (:mod:`.residual`): token, position, previous-token codes, query factors,
  readout and a pad dimension, orthonormal and orthogonal to the all-ones vector, so LayerNorm
  is ``LN(x) = kappa x`` with a known ``kappa`` wherever ``||x||`` is constant; the reading
  weights carry ``1 / kappa``.
* **Preparation block.** Previous-token heads attend by position to ``i - k`` (a quadratic score
  in the learned positions, ``position_gap`` nats sharper than any neighbour) and copy the code of
  ``t_{i-k}`` into ``prev_k``. Its MLP, and the MLPs of the layers before the first layer that
  reads them, hold the n-gram detectors (:mod:`.detectors`): exact ReLUs through GELU's saturation
  (pre-activations ``±fire``), writing each context's query factors, readout and pad.
* **Layout layers.** n = 1 heads read the token block: ``W_Q = U_tok A / kappa``, ``W_K = U_tok B
  / kappa`` with ``A B^T`` the rank-K, frequency-weighted factorisation of the row-centred
  ``log P~^{1,s}`` (:func:`~jaxattn.options.factors.table_factors`), scaled so tau = 1. n >= 2
  heads read their query-factor block with ``W_Q`` and the token block with ``W_K``. Their
  ``W_V = W_O = 0`` and their MLPs are zero, so every layer from 1 on sees the same stream.
* **Readout.** ``lm_head`` reads the readout block: the logits are the centred smoothed
  log-probabilities of the longest detected context, i.e. the model *is* the back-off n-gram
  model of order max_n + 1 (:func:`jaxattn.lm.ngram_logprobs`).

Capacity: ``d_model >= V + pos + (max_n-1) d_prev + sum_n S_n K + V + 1 + 1`` and MLP units
``>= V + contexts`` before each level's first reader; otherwise :class:`.residual.CapacityError`,
or with ``approximate=True`` the most frequent contexts that fit.

Everything comes from the count corpus (``prep.tables``); nothing from the evaluation text.

Axis vocabulary: V vocabulary, D d_model, K d_head, H heads, L layout layers, NB blocks, F MLP width.
"""

# ruff: noqa: F722  (jaxtyping shape strings such as "R V" are not Python expressions)
from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import numpy as np

from jaxattn.counts import CountMatrix
from jaxattn.errors import JaxattnError
from jaxattn.model import ModelConfig, Params
from jaxattn.options.circuits import (
    Sites,
    head_arrays,
    layout_head_weights,
    mlp_arrays,
    num_frequencies,
    position_features,
    prev_codes,
    prev_head_weights,
    prev_heads,
)
from jaxattn.options.detectors import Contents, content_states, place_units, plan_levels, readout_rows
from jaxattn.options.factors import DerivationConfig, TableFactors, table_factors
from jaxattn.options.residual import Subspaces, allocate
from jaxattn.pipeline import AnalysisResult, Prepared, measure
from jaxattn.progress import Timer, stage
from jaxattn.typing import PRNGKey

__all__ = ["GPT2_OPTION3", "GPT2Config", "check_fits", "derive_gpt2", "run_gpt2", "run_option3"]


#: The most preparation blocks the automatic choice (``prep_blocks=None``) adds.
MAX_PREP_BLOCKS = 8


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """Ingredients of the standard-GPT-2 construction (defaults: Option 3).

    Attributes:
        n_ctx: learned positions (GPT-2's ``n_positions``).
        smoothing: add-alpha constant of ``P~`` (query factors and readout).
        positions: learned positions and previous-token heads in a preparation block (needed by
            the detectors).
        detectors: MLP n-gram detectors write each context's query factors and readout; without
            them n >= 2 queries read the token block (the unigram back-off rows) and the readout is
            the bigram model read from the token block.
        norm_pad: the pad dimension keeps ``||x||`` equal at every position.
        prep_blocks: preparation blocks ahead of the layout. The first holds the previous-token
            heads; the MLPs of all of them (and of the layout layers before a level's first
            reader) hold the detectors. None: as few as the detectors need (at least 1, at most
            :data:`MAX_PREP_BLOCKS`). 0: no preparation block; the previous-token heads take the
            last heads of layout layer 0, which are then scored as layout heads.
        head_writes: scale of an O(1) write by every layout head into an unread scratch block
            (0: none; an ablation of "small writes").
        approximate: when the MLPs are too narrow, keep the most frequent contexts instead of
            refusing (the rest back off to their longest detected suffix).
        fire: pre-activation of a firing detector unit (GELU is exact ReLU beyond about ±10).
        position_gap: score gap, in nats, of a previous-token head's target over any other key.
    """

    n_ctx: int = 1024
    smoothing: float = 0.01
    positions: bool = True
    detectors: bool = True
    norm_pad: bool = True
    prep_blocks: int | None = None
    head_writes: float = 0.0
    approximate: bool = False
    fire: float = 40.0
    position_gap: float = 60.0

    def __post_init__(self) -> None:
        if self.detectors and not self.positions:
            raise JaxattnError("GPT2Config: detectors=True needs positions=True (they read the previous tokens)")
        if self.prep_blocks is not None and not 0 <= int(self.prep_blocks) <= MAX_PREP_BLOCKS:
            raise JaxattnError(f"GPT2Config.prep_blocks={self.prep_blocks} must be in [0, {MAX_PREP_BLOCKS}] or None")
        if int(self.n_ctx) < 2:
            raise JaxattnError(f"GPT2Config.n_ctx={self.n_ctx} must be >= 2")
        if not float(self.smoothing) > 0:
            raise JaxattnError(f"GPT2Config.smoothing={self.smoothing} must be > 0")
        if not float(self.fire) >= 10 or not float(self.position_gap) >= 10:
            raise JaxattnError(f"GPT2Config: fire={self.fire} and position_gap={self.position_gap} must be >= 10")


#: Option 3: every ingredient of the standard-GPT-2 construction on.
GPT2_OPTION3 = GPT2Config()


def _layout(config: ModelConfig) -> tuple[list[tuple[int, int]], list[int], int]:
    pairs = sorted({config.layout(l, h) for l in range(config.num_layers) for h in range(config.num_heads)})
    s_values = sorted({s for _, s in pairs})
    return pairs, s_values, max(n for n, _ in pairs)


def _factors(
    tables: dict[tuple[int, int], CountMatrix],
    pairs: list[tuple[int, int]],
    K: int,
    dcfg: DerivationConfig,
    key: PRNGKey,
) -> dict[tuple[int, int], TableFactors]:
    return {p: table_factors(tables[p], K, dcfg, key=jax.random.fold_in(key, i)) for i, p in enumerate(pairs)}


def _sizes(config: ModelConfig, gcfg: GPT2Config, top: int, qf_pairs: list[tuple[int, int]], d_prev: int) -> dict:
    V, K = config.vocab_size, config.d_head
    det = gcfg.detectors and top >= 2
    sizes = {"tok": V}
    if gcfg.positions and top >= 2:
        sizes["pos"] = (top - 1) + 1 + 2 * num_frequencies(gcfg.n_ctx)
        for k in range(1, top):
            sizes[f"prev{k}"] = d_prev
    if det:
        sizes["qf"] = len(qf_pairs) * K
        sizes["read"] = V
        if gcfg.norm_pad:
            sizes["pad"] = 1
    if gcfg.head_writes:
        sizes["scratch"] = K
    return sizes


def _subspaces(config: ModelConfig, gcfg: GPT2Config, top: int, qf_pairs: list[tuple[int, int]]) -> Subspaces:
    """Allocates the blocks; previous-token codes get V dims (one-hot) or what is left."""
    V, D = config.vocab_size, config.d_model
    sizes = _sizes(config, gcfg, top, qf_pairs, V)
    if "prev1" not in sizes or sum(sizes.values()) + 1 <= D:
        return allocate(D, sizes)
    rest = sum(v for k, v in sizes.items() if not k.startswith("prev")) + 1
    d_prev = min(V, (D - rest) // (top - 1))
    if d_prev < 8:
        allocate(D, _sizes(config, gcfg, top, qf_pairs, 8))  # raises, naming the requirement
    return allocate(D, _sizes(config, gcfg, top, qf_pairs, d_prev))


def _slots(config: ModelConfig, gcfg: GPT2Config, top: int, levels: dict[int, Any]) -> tuple[int, dict[int, int]]:
    """(preparation blocks, level -> MLP slots it may use); slot i is block i's MLP.

    Level m must be written before layout layer m - 1, the first with n = m, so it may use the
    MLPs of the P preparation blocks and of layout layers 0 .. m - 2. With ``prep_blocks=None``
    P is the smallest number (>= 1) whose MLPs hold V token units plus every detector.
    """
    if not gcfg.positions or top < 2:
        return 0, {}
    prep = gcfg.prep_blocks
    if prep is None:
        F, need, prep = 4 * config.d_model, config.vocab_size, 1
        for m in sorted(levels):
            need += len(levels[m].keys)
            prep = max(prep, -(-need // F) - (m - 1))
        prep = min(prep, MAX_PREP_BLOCKS)
    return prep, {m: prep + (m - 1) for m in range(2, top + 1)}


class _Plan(NamedTuple):
    """Everything decided before any SVD: the layout, the subspaces, the units and the codes."""

    pairs: list[tuple[int, int]]
    s_values: list[int]
    top: int
    row_pairs: list[tuple[int, int]]
    sub: Subspaces
    prep: int
    placement: Any
    codes: np.ndarray
    mu: float


def _plan(tables: dict[tuple[int, int], CountMatrix], config: ModelConfig, gcfg: GPT2Config, key: PRNGKey) -> _Plan:
    """Checks every capacity limit (residual, MLP units, previous-token heads, codes); cheap."""
    missing = [p for p in config.pairs if p not in tables]
    if missing:
        raise JaxattnError(f"missing count tables {missing} for this config")
    if not config.layernorm or not config.mlp:
        raise JaxattnError("the standard-GPT-2 Option 3 needs layernorm=True and mlp=True (GPT-2 has both)")
    pairs, s_values, top = _layout(config)
    det = gcfg.detectors and top >= 2
    row_pairs = [p for p in pairs if p[0] >= 2]
    sub = _subspaces(config, gcfg, top, row_pairs if det else [])
    levels = plan_levels(tables, top, s_values, config.vocab_size) if det else {}
    prep, deadlines = _slots(config, gcfg, top, levels)
    F = 4 * config.d_model
    placement = place_units(levels, config.vocab_size, F, deadlines or {1: 1}, approximate=gcfg.approximate)
    if "prev1" in sub.sizes:
        prev_heads(sub, config, gcfg.n_ctx, prep)  # raises when block 0 has too few heads
    codes, mu = prev_codes(config.vocab_size, sub.sizes.get("prev1", 0), key)
    return _Plan(pairs, s_values, top, row_pairs, sub, prep, placement, codes, mu)


def check_fits(
    tables: dict[tuple[int, int], CountMatrix],
    config: ModelConfig,
    gcfg: GPT2Config = GPT2_OPTION3,
    *,
    key: PRNGKey | None = None,
) -> None:
    """Raises :class:`~jaxattn.options.residual.CapacityError` when the construction cannot fit; runs no SVD.

    Args:
        tables: the count tables.
        config: the layout.
        gcfg: the ingredients.
        key: the derivation key (the near-orthogonal previous-token codes depend on it; default
            ``jax.random.key(0)``).
    """
    _plan(tables, config, gcfg, jax.random.split(key if key is not None else jax.random.key(0))[1])


def derive_gpt2(
    tables: dict[tuple[int, int], CountMatrix], config: ModelConfig, gcfg: GPT2Config = GPT2_OPTION3, *, key: PRNGKey
) -> tuple[Params, dict[str, Any]]:
    """Every weight of the standard-GPT-2 Option 3 model, in closed form from the count tables.

    Every capacity limit is checked first (:func:`check_fits`), before any factorisation.

    Args:
        tables: ``{(n, s): CountMatrix}`` of the count corpus (at least ``config.pairs``).
        config: the layout (``d_model = heads x d_head`` for a GPT-2 export).
        gcfg: the ingredients.
        key: PRNG key (SVDs, near-orthogonal codes).

    Returns:
        (the params pytree of :func:`jaxattn.model.forward`, with P + L blocks (P preparation
        blocks), ``wpe``, biases and ``lm_head``; diagnostics: dims and units used, detectors
        kept, LayerNorm gains).

    Raises:
        CapacityError: the residual, the MLPs or block 0's heads are too small (see the module
            docstring).
    """
    k_svd, k_code = jax.random.split(key)
    plan = _plan(tables, config, gcfg, k_code)
    dcfg = DerivationConfig(log_target=True, frequency_weighting=True, smoothing=gcfg.smoothing)
    factors = _factors(tables, plan.pairs, config.d_head, dcfg, k_svd)
    levels = plan.placement.levels
    contents = content_states(
        tables,
        factors,
        levels,
        plan.row_pairs,
        plan.s_values,
        dcfg,
        d_head=config.d_head,
        readout="read" in plan.sub.sizes,
    )
    sites = Sites.build(config, gcfg.n_ctx, plan.sub, contents, plan.top, norm_pad=gcfg.norm_pad)
    params = _assemble(tables, config, gcfg, factors, plan, contents, sites)
    info = _info(config, plan.sub, plan.placement, contents, sites, plan.prep, plan.mu, factors)
    return params, info


def _assemble(
    tables: dict[tuple[int, int], CountMatrix],
    config: ModelConfig,
    gcfg: GPT2Config,
    factors: dict[tuple[int, int], TableFactors],
    plan: _Plan,
    contents: Contents,
    sites: Sites,
) -> Params:
    """Stacks embeddings, heads, MLPs, LayerNorms and the unembedding into the params pytree."""
    L, H, D = config.num_layers, config.num_heads, config.d_model
    sub, prep, codes = plan.sub, plan.prep, plan.codes
    NB = prep + L
    heads = head_arrays(NB, H, D, config.d_head)
    for l in range(L):
        for h in range(H):
            layout_head_weights(
                heads, prep + l, h, config, tables, factors, sub, contents, sites, gcfg.head_writes, prep
            )
    if "prev1" in sub.sizes:
        prev_head_weights(heads, config, sub, codes, sites, gcfg.n_ctx, gcfg.position_gap, prep)
    params: Params = {k: jax.numpy.asarray(v, jax.numpy.float32) for k, v in heads.items()}
    mlp = mlp_arrays(NB, config, sub, contents, plan.placement.slot_units, codes, plan.mu, sites, gcfg.fire)
    params.update({k: jax.numpy.asarray(v, jax.numpy.float32) for k, v in mlp.items()})
    embed = sites.c_tok * sub["tok"]
    params["embed"] = jax.numpy.asarray(embed, jax.numpy.float32)
    if "pos" in sub.sizes:
        params["wpe"] = jax.numpy.asarray(position_features(gcfg.n_ctx, sub, sites), jax.numpy.float32)
    ones = np.ones((NB, D))
    for name in ("ln1_scale", "ln2_scale"):
        params[name] = jax.numpy.asarray(ones, jax.numpy.float32)
    for name in ("ln1_bias", "ln2_bias"):
        params[name] = jax.numpy.zeros((NB, D), jax.numpy.float32)
    params["lnf_scale"] = jax.numpy.ones((D,), jax.numpy.float32)
    params["lnf_bias"] = jax.numpy.zeros((D,), jax.numpy.float32)
    params["lm_head"] = jax.numpy.asarray(_unembedding(tables, config, gcfg, sub, sites), jax.numpy.float32)
    return params


def _unembedding(
    tables: dict[tuple[int, int], CountMatrix], config: ModelConfig, gcfg: GPT2Config, sub: Subspaces, sites: Sites
) -> np.ndarray:
    """``lm_head`` [V, D]: the readout block, or without detectors the bigram model read from the tokens."""
    if "read" in sub.sizes:
        return sub["read"] / sites.kappa_final
    cm = tables[(1, 0)]
    r1 = np.zeros((config.vocab_size, config.vocab_size))
    idx = cm.context_index(np.arange(config.vocab_size)[:, None])
    r1[idx >= 0] = readout_rows(cm, gcfg.smoothing)[idx[idx >= 0]]
    return (r1.T @ sub["tok"]) / (sites.kappa_final * sites.c_tok)


def _info(
    config: ModelConfig,
    sub: Subspaces,
    placement: Any,
    contents: Contents,
    sites: Sites,
    prep: int,
    mu: float,
    factors: dict[tuple[int, int], TableFactors],
) -> dict[str, Any]:
    kept = {str(m): int(lv.kept.sum()) for m, lv in placement.levels.items()}
    return {
        "architecture": "gpt2",
        "prep_blocks": prep,
        "residual_dims": {**sub.sizes, "ones": 1, "used": sub.used, "d_model": config.d_model},
        "mlp_units": {
            "needed": {str(k): int(v) for k, v in placement.needed.items()},
            "kept": {"1": config.vocab_size, **kept},
            "per_mlp": 4 * config.d_model,
            "slots_used": sum(1 for s in placement.slot_units if s),
        },
        "prev_code_coherence": float(mu),
        "content_norm": math.sqrt(contents.norm2),
        "layernorm_gain": {"embed": sites.kappa_embed, "prep_mlp": sites.kappa_prev, "stream": sites.kappa_final},
        "energy_kept": {f"{n},{s}": float(f.energy_kept) for (n, s), f in factors.items()},
    }


def run_gpt2(
    prep: Prepared,
    gcfg: GPT2Config = GPT2_OPTION3,
    *,
    label: str = "option3",
    progress: bool = True,
    timer: Timer | None = None,
) -> AnalysisResult:
    """Derives the standard-GPT-2 model from the run's count tables, runs it with no hook, measures it.

    Args:
        prep: the prepared run.
        gcfg: the ingredients.
        label: the option label of the records.
        progress: progress bars.
        timer: stage timer (stages "derive", "forward", "metrics").

    Returns:
        :class:`~jaxattn.pipeline.AnalysisResult` with the params, the language-model scores and,
        in ``extra``, the construction and its capacity figures.
    """
    T = int(prep.tokens.shape[1])
    if T > gcfg.n_ctx:
        raise JaxattnError(f"seq_len={T} is longer than the model's n_ctx={gcfg.n_ctx}")
    with stage(timer, "derive"):
        params, info = derive_gpt2(prep.tables, prep.config, gcfg, key=prep.key("derive"))
        jax.block_until_ready(params)
    extra = {"construction": dataclasses.asdict(gcfg), **info}
    return measure(prep, params, label, extra=extra, progress=progress, timer=timer)


def run_option3(
    prep: Prepared, *, progress: bool = True, timer: Timer | None = None, derivation: GPT2Config = GPT2_OPTION3
) -> AnalysisResult:
    """Option 3: the standard-GPT-2 construction with every ingredient (:data:`GPT2_OPTION3`).

    Args:
        prep: the prepared run.
        progress: progress bars.
        timer: stage timer.
        derivation: the ingredients (``approximate=True`` keeps what fits a too-narrow MLP).

    Returns:
        :class:`~jaxattn.pipeline.AnalysisResult` labelled "option3".
    """
    return run_gpt2(prep, derivation, label="option3", progress=progress, timer=timer)
