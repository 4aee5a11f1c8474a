"""The weights of the standard-GPT-2 Option 3, circuit by circuit (used by :mod:`jaxattn.options.gpt2`).

* :class:`Sites`: the scale of every block and the LayerNorm gain ``kappa`` at every LN site
  (``LN(x) = kappa x`` because every position's residual has the same norm and zero mean);
* :func:`position_features`: learned positions ``wpe``;
* :func:`prev_codes` and :func:`prev_head_weights`: the previous-token heads;
* :func:`layout_head_weights`: the scored heads;
* :func:`mlp_arrays`: the n-gram detector units.

All arrays are float64 numpy here; :mod:`.gpt2` casts to float32.

Axis vocabulary: V vocabulary, D d_model, K d_head, H heads, NB blocks, F MLP width, C content.
"""

# ruff: noqa: F722  (jaxtyping shape strings such as "R V" are not Python expressions)
from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np

from jaxattn.counts import CountMatrix
from jaxattn.model import ModelConfig
from jaxattn.options.detectors import Contents
from jaxattn.options.factors import TableFactors
from jaxattn.options.residual import CapacityError, Subspaces
from jaxattn.typing import Float, PRNGKey

__all__ = [
    "LN_EPS",
    "Sites",
    "head_arrays",
    "layout_head_weights",
    "mlp_arrays",
    "num_frequencies",
    "position_features",
    "prev_codes",
    "prev_head_weights",
    "prev_heads",
]

#: LayerNorm epsilon of the model (and of GPT-2).
LN_EPS = 1e-5


def _kappa(norm2: float, d_model: int) -> float:
    return 1.0 / math.sqrt(norm2 / d_model + LN_EPS)


@dataclasses.dataclass(frozen=True)
class Sites:
    """Block scales and LayerNorm gains.

    Attributes:
        c_tok: norm of a token's write (``wte`` rows).
        c_pos: norm of ``wpe[i]``.
        c_prev: norm of a previous-token code's write.
        kappa_embed: gain of block 0's first LayerNorm (tokens and positions only).
        kappa_prev: gain of block 0's second LayerNorm (plus the previous-token codes).
        kappa_final: gain at every later LayerNorm and at ``ln_f`` (plus the detectors' content).
        d_model: D.
        n_ctx: learned positions.
    """

    c_tok: float
    c_pos: float
    c_prev: float
    kappa_embed: float
    kappa_prev: float
    kappa_final: float
    d_model: int

    n_ctx: int

    @property
    def s_pos(self) -> float:
        """Scale of the position features (``wpe[i] = s_pos * features_i``, squared norm F + 1)."""
        return self.c_pos / math.sqrt(num_frequencies(self.n_ctx) + 1)

    def kappa_ln1(self, block: int) -> float:
        """Gain of block ``block``'s attention LayerNorm."""
        return self.kappa_embed if block == 0 else self.kappa_final

    def kappa_ln2(self, block: int) -> float:
        """Gain of block ``block``'s MLP LayerNorm."""
        return self.kappa_prev if block == 0 else self.kappa_final

    @classmethod
    def build(
        cls, config: ModelConfig, n_ctx: int, sub: Subspaces, contents: Contents, top: int, *, norm_pad: bool
    ) -> Sites:
        """Scales every block like the content (norm N) and derives each site's gain.

        Without the pad the content norm varies; the gains then use its mean square (the
        ablation measures what that costs).
        """
        D = config.d_model
        content_sq = np.concatenate([(s**2).sum(axis=1) for s in contents.states.values()])
        N = math.sqrt(contents.norm2) if contents.norm2 > 0 else 1.0
        c_tok = c_pos = c_prev = N
        n_prev = top - 1 if "prev1" in sub.sizes else 0
        s0a = c_tok**2 + (c_pos**2 if "pos" in sub.sizes else 0.0)
        s0 = s0a + n_prev * c_prev**2
        if "read" in sub.sizes:
            sf = s0 + (contents.norm2 if norm_pad else float(content_sq.mean()))
        else:
            sf = s0
        return cls(c_tok, c_pos, c_prev, _kappa(s0a, D), _kappa(s0, D), _kappa(sf, D), D, int(n_ctx))


def num_frequencies(n_ctx: int) -> int:
    """Frequencies of the position code: periods 4, 8, ..., 2^(F+1) >= 2 n_ctx."""
    return max(1, math.ceil(math.log2(max(int(n_ctx), 2))))


def position_features(n_ctx: int, sub: Subspaces, sites: Sites) -> Float[np.ndarray, "P D"]:
    """``wpe`` [n_ctx, D]: "is position q" flags, a pad, and (cos, sin) of ``2 pi i / p`` for p = 4, 8, ...

    Block ``pos`` rows: 0 .. Q-1 the flags of positions q < Q (Q = max_n - 1), Q the pad, then
    one (cos, sin) pair per period. Every row has squared norm ``F + 1`` before scaling, so
    ``||wpe[i]||`` is the same at every position. The periods double from 4 to at least
    ``2 n_ctx``: any two positions differ by at least a quarter turn at some period, which
    makes the previous-token score sharp with no precision demand.
    """
    i = np.arange(n_ctx)
    F = num_frequencies(n_ctx)
    Q = sub.sizes["pos"] - 2 * F - 1
    feats = np.zeros((n_ctx, sub.sizes["pos"]))
    for q in range(Q):
        feats[q, q] = 1.0
    for f in range(F):
        theta = 2 * np.pi * i / 2 ** (f + 2)
        feats[:, Q + 1 + 2 * f], feats[:, Q + 2 + 2 * f] = np.cos(theta), np.sin(theta)
    feats[:, Q] = np.sqrt(np.maximum(F + 1 - (feats**2).sum(axis=1), 0.0))
    return sites.s_pos * feats @ sub["pos"]


def prev_codes(vocab_size: int, d_prev: int, key: PRNGKey) -> tuple[Float[np.ndarray, "V d"], float]:
    """Unit codes of the tokens in ``d_prev`` dims: one-hot when ``d_prev >= V``, else random.

    Args:
        vocab_size: V.
        d_prev: code width (0: none).
        key: PRNG key of the random codes.

    Returns:
        (float64 [V, d_prev], the largest |cosine| between two codes).

    Raises:
        CapacityError: the codes are too crowded to tell apart (coherence >= 0.95).
    """
    if d_prev == 0:
        return np.zeros((vocab_size, 0)), 0.0
    if d_prev >= vocab_size:
        return np.eye(vocab_size, d_prev), 0.0
    c = np.asarray(jax.random.normal(key, (vocab_size, d_prev)), np.float64)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    g = np.abs(c @ c.T - np.eye(vocab_size))
    mu = float(g.max())
    if mu >= 0.95:
        raise CapacityError(
            f"previous-token codes of {vocab_size} tokens in {d_prev} dims are too crowded (mu={mu:.3f})"
        )
    return c, mu


def head_arrays(num_blocks: int, num_heads: int, d_model: int, d_head: int) -> dict[str, np.ndarray]:
    """Zero attention weights and biases for ``num_blocks`` blocks."""
    B, H, D, K = num_blocks, num_heads, d_model, d_head
    return {
        "wq": np.zeros((B, H, D, K)),
        "wk": np.zeros((B, H, D, K)),
        "wv": np.zeros((B, H, D, K)),
        "wo": np.zeros((B, H, K, D)),
        "bq": np.zeros((B, H, K)),
        "bk": np.zeros((B, H, K)),
        "bv": np.zeros((B, H, K)),
        "bo": np.zeros((B, D)),
    }


def prev_heads(sub: Subspaces, config: ModelConfig, n_ctx: int, prep: int) -> int:
    """The first head of block 0 the previous-token heads take (they take it and the ones after).

    Each of the max_n - 1 copies needs ``ceil(d_prev / K)`` heads; they fit in H heads with a
    preparation block, in H - 1 without one (layout layer 0 keeps at least one of its own), and
    the position code needs ``2 ceil(log2 n_ctx) <= K`` query dims.

    Raises:
        CapacityError: too few heads, or a d_head too small for the position code.
    """
    K, H = config.d_head, config.num_heads
    top = sum(1 for k in sub.sizes if k.startswith("prev")) + 1
    F = num_frequencies(n_ctx)
    n_heads = (top - 1) * -(-sub.sizes["prev1"] // K)
    if n_heads > (H if prep else H - 1) or 2 * F > K:
        raise CapacityError(
            f"Option 3 as a GPT-2 needs {n_heads} previous-token heads with {2 * F} position dims (n_ctx={n_ctx}); "
            f"block 0 has {H} heads of d_head={K}{'' if prep else ', one kept for the layout'}"
        )
    return 0 if prep else H - n_heads


def prev_head_weights(
    heads: dict[str, np.ndarray],
    config: ModelConfig,
    sub: Subspaces,
    codes: np.ndarray,
    sites: Sites,
    n_ctx: int,
    gap: float,
    prep: int,
) -> None:
    """Writes the previous-token heads into block 0 (in place).

    Head (k, chunk) attends from i to i - k: its query is the position code of i rotated back by
    k at every period, its key the position code of j, so the score is ``g sum_p cos(2 pi (j - i
    + k) / p)``, at least ``gap`` nats above any other key. It copies K dims of the code of the
    token there into ``prev_k``. With a preparation block they are heads 0, 1, ...; without one,
    the last heads of layout layer 0.
    """
    K = config.d_head
    top = sum(1 for k in sub.sizes if k.startswith("prev")) + 1
    F = num_frequencies(n_ctx)
    d_prev = sub.sizes["prev1"]
    chunks = -(-d_prev // K)
    first = prev_heads(sub, config, n_ctx, prep)
    g = gap * math.sqrt(K)
    pos = sub["pos"][top:]  # the (cos, sin) pairs, after the flags and the pad
    k0 = sites.kappa_embed * sites.s_pos
    tok_read = sub["tok"].T / (sites.kappa_embed * sites.c_tok)  # [D, V]
    h = first
    for k in range(1, top):
        wq = np.zeros((sub.d_model, K))
        for f in range(F):
            phi = 2 * np.pi * k / 2 ** (f + 2)
            u_c, u_s = pos[2 * f], pos[2 * f + 1]
            wq[:, 2 * f] = g / k0 * (np.cos(phi) * u_c + np.sin(phi) * u_s)
            wq[:, 2 * f + 1] = g / k0 * (-np.sin(phi) * u_c + np.cos(phi) * u_s)
        wk = np.zeros((sub.d_model, K))
        wk[:, : 2 * F] = pos.T / k0
        for c in range(chunks):
            dims = slice(c * K, min((c + 1) * K, d_prev))
            w = dims.stop - dims.start
            heads["wq"][0, h], heads["wk"][0, h] = wq, wk
            heads["bq"][0, h] = 0.0
            heads["wv"][0, h] = 0.0
            heads["wv"][0, h][:, :w] = tok_read @ codes[:, dims]
            heads["wo"][0, h] = 0.0
            heads["wo"][0, h][:w] = sites.c_prev * sub[f"prev{k}"][dims]
            h += 1


def layout_head_weights(
    heads: dict[str, np.ndarray],
    block: int,
    h: int,
    config: ModelConfig,
    tables: dict[tuple[int, int], CountMatrix],
    factors: dict[tuple[int, int], TableFactors],
    sub: Subspaces,
    contents: Contents,
    sites: Sites,
    head_writes: float,
    prep: int,
) -> None:
    """Q/K of one scored head (in place): ``q_i . k_j / sqrt(K) = (A B^T)[g_i, t_j]`` exactly.

    Keys read the token block; queries read the token block (n = 1, or n >= 2 without
    detectors: the unigram back-off rows) or the head's query-factor block.
    """
    K, V = config.d_head, config.vocab_size
    n, s = config.layout(block - prep, h)
    kappa = sites.kappa_ln1(block)
    r4 = K**0.25
    fac = factors[(n, s)]
    tok = sub["tok"].T  # [D, V]
    heads["wk"][block, h] = r4 / (kappa * sites.c_tok) * tok @ np.asarray(fac.B, np.float64)
    if n == 1:
        a1 = np.zeros((V, K))
        idx = tables[(1, s)].context_index(np.arange(V)[:, None])
        a1[idx >= 0] = np.asarray(fac.A, np.float64)[idx[idx >= 0]]
        heads["wq"][block, h] = r4 / (kappa * sites.c_tok) * tok @ a1
    else:
        off = contents.offsets[(n, s)]
        if "qf" in sub.sizes:
            heads["wq"][block, h] = r4 / kappa * sub["qf"][off : off + K].T
        else:
            heads["wq"][block, h] = r4 / (kappa * sites.c_tok) * tok @ contents.states[1][:, off : off + K]
    if head_writes:
        b = np.asarray(fac.B, np.float64)
        code = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-30)
        heads["wv"][block, h] = tok @ code / (kappa * sites.c_tok)
        heads["wo"][block, h] = head_writes * sites.c_tok * sub["scratch"]


def mlp_arrays(
    num_blocks: int,
    config: ModelConfig,
    sub: Subspaces,
    contents: Contents,
    slot_units: list[list[tuple[int, int]]],
    codes: np.ndarray,
    mu: float,
    sites: Sites,
    fire: float,
) -> dict[str, np.ndarray]:
    """The detector MLPs: slot i is block i's MLP; blocks past the slots get zero MLPs.

    A unit's pre-activation is ``+fire`` exactly when it should fire and at most ``-fire``
    otherwise (token match ``alpha = 2 fire``, each previous-token match ``beta = 2 fire / (1 -
    mu)``, "is position q" flags inhibit contexts that would reach before the sequence), so
    GELU passes ``fire`` or 0 and ``w2 = delta / fire`` writes the unit's content change.
    """
    D, F = config.d_model, 4 * config.d_model
    # float32 from the start: the stacks are [blocks, D, 4 D] (float64 would double the peak memory).
    out = {
        "w1": np.zeros((num_blocks, D, F), np.float32),
        "b1": np.zeros((num_blocks, F), np.float32),
        "w2": np.zeros((num_blocks, F, D), np.float32),
        "b2": np.zeros((num_blocks, D), np.float32),
    }
    if "read" not in sub.sizes:
        return out
    emit = np.concatenate([sub["qf"], sub["read"]])  # [C, D]
    alpha, beta = 2 * fire, 2 * fire / (1 - mu)
    for slot, units in enumerate(slot_units):
        kappa = sites.kappa_ln2(slot)
        levels = np.array([m for m, _ in units], int)
        index = np.array([i for _, i in units], int)
        for m in np.unique(levels):
            cols = np.flatnonzero(levels == m)
            w1, b1, content, pre = _units(int(m), index[cols], contents, sub, codes, sites, kappa, alpha, beta, fire)
            out["w1"][slot][:, cols] = w1
            out["b1"][slot][cols] = b1
            w2 = (content - pre) @ emit
            if "pad" in sub.sizes:
                # A token unit writes the whole pad; a detector the change from its suffix's state.
                before = contents.pad(pre) if m > 1 else 0.0
                w2 += np.outer(contents.pad(content) - before, sub["pad"][0])
            out["w2"][slot][cols] = w2 / fire
    return out


def _units(
    m: int,
    idx: np.ndarray,
    contents: Contents,
    sub: Subspaces,
    codes: np.ndarray,
    sites: Sites,
    kappa: float,
    alpha: float,
    beta: float,
    fire: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(w1 [D, U], b1 [U], content after [U, C], content before [U, C]) of U level-m units."""
    if m == 1:
        w1 = alpha / (kappa * sites.c_tok) * sub["tok"][idx].T
        content = contents.states[1][idx]
        return w1, np.full(len(idx), fire - alpha), content, np.zeros_like(content)
    lv = contents.levels[m]
    grams = lv.grams[lv.kept][idx]
    w1 = alpha / (kappa * sites.c_tok) * sub["tok"][grams[:, -1]].T
    for k in range(1, m):
        # prev_k holds the code of t_{i-k}, the gram's entry m-1-k.
        code = codes[grams[:, m - 1 - k]] @ sub[f"prev{k}"]  # [U, D]
        w1 += beta / (kappa * sites.c_prev) * code.T
    theta = alpha + (m - 1) * beta - fire
    for q in range(m - 1):
        w1 -= (theta + fire) / (kappa * sites.s_pos) * sub["pos"][q][:, None]
    return w1, np.full(len(idx), -theta), contents.states[m][idx], contents.produced(m - 1, grams[:, 1:])
