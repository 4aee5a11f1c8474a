"""The MLP n-gram detectors of the standard-GPT-2 Option 3: which contexts, what they write, where.

A position's *content* is what the detectors write for it: for every (n, s) table of a layer
with n >= 2 the K query factors of its context (the ``qf`` block), and the centred smoothed
next-token log-probabilities (the ``read`` block). Content is decided by the longest suffix of
the position's context that has a detector, with the back-off of
:func:`jaxattn.options.factors.query_factor_rows` (the rows of the "oracle inputs" n-gram
query table):

* a *token unit* per token b fires at every position whose token is b and writes the level-1
  content of b (unigram query factors, the bigram model's readout);
* a *level-m unit* per observed m-gram g (m >= 2) fires only where the last m tokens are g
  and writes the difference between g's content and the content already written by the units
  of g's suffixes.

Every unit also writes a *pad* so that ``||content||^2 + pad^2`` is the same constant N^2 for
every state, which keeps every LayerNorm an exact rescaling. Units are placed in the MLPs
that come before the first layer reading their level (:func:`place_units`); when there are
more contexts than units the plan is refused, or, in the approximate mode, keeps the most
frequent contexts and lets the rest back off.

Axis vocabulary: V vocabulary, K d_head, R_m detectors of level m, C content width.
"""

# ruff: noqa: F722  (jaxtyping shape strings such as "R V" are not Python expressions)
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np

from jaxattn.counts import CountMatrix, pack_ngrams
from jaxattn.options.factors import DerivationConfig, TableFactors, level_grams, query_factor_rows, smoothed_log_probs
from jaxattn.options.residual import CapacityError
from jaxattn.typing import Float, Int

__all__ = ["Contents", "Level", "UnitPlacement", "content_states", "plan_levels", "place_units", "readout_rows"]


class Level(NamedTuple):
    """The m-gram contexts of one detector level.

    Attributes:
        m: context length (>= 2).
        keys: int64 [R] sorted packed keys of every m-gram observed in a layout table.
        grams: int [R, m] the m-grams.
        counts: float64 [R] how often each occurs as a context (its largest row sum over tables).
        kept: bool [R] which m-grams get a detector unit.
    """

    m: int
    keys: np.ndarray
    grams: np.ndarray
    counts: np.ndarray
    kept: np.ndarray


def plan_levels(
    tables: dict[tuple[int, int], CountMatrix], top: int, s_values: list[int], vocab_size: int
) -> dict[int, Level]:
    """The contexts of levels 2 .. ``top`` (every one kept; :func:`place_units` may prune).

    Args:
        tables: ``{(n, s): CountMatrix}``.
        top: the longest context a layout layer uses.
        s_values: the skips of the layout's heads.
        vocab_size: V.

    Returns:
        ``{m: Level}``.
    """
    if top < 2:
        return {}
    keys, grams = level_grams(tables, top, s_values, vocab_size)
    out = {}
    for m in range(2, top + 1):
        counts = np.zeros(len(keys[m]))
        for s in s_values:
            cm = tables.get((m, s))
            if cm is not None:
                idx = cm.context_index(grams[m])
                counts = np.maximum(counts, np.where(idx >= 0, cm.row_sums[np.maximum(idx, 0)], 0))
        out[m] = Level(m, keys[m], grams[m], counts, np.ones(len(keys[m]), bool))
    return out


class UnitPlacement(NamedTuple):
    """Where every detector unit lives.

    Attributes:
        slot_units: per MLP slot, the list of (level, index) units (level 1: token units,
            index = token id; level m: index into that level's kept detectors).
        levels: the levels with ``kept`` updated (pruned in the approximate mode).
        needed: level -> contexts that wanted a unit.
    """

    slot_units: list[list[tuple[int, int]]]
    levels: dict[int, Level]
    needed: dict[int, int]


def place_units(
    levels: dict[int, Level], vocab_size: int, width: int, deadlines: dict[int, int], *, approximate: bool
) -> UnitPlacement:
    """Fills the MLP slots in order: token units, then level 2, 3, ... (most frequent first).

    Args:
        levels: :func:`plan_levels`.
        vocab_size: V (token units).
        width: F units per MLP.
        deadlines: level m -> number of leading slots its units may use (level 1 uses level 2's,
            or one slot when there are no levels).
        approximate: keep what fits (most frequent contexts) instead of refusing.

    Returns:
        :class:`UnitPlacement`.

    Raises:
        CapacityError: a level does not fit its slots and ``approximate`` is off.
    """
    order = [1] + sorted(levels)
    n_slots = max(deadlines.values()) if deadlines else 1
    slot_units: list[list[tuple[int, int]]] = [[] for _ in range(n_slots)]
    used, out, needed = 0, dict(levels), {1: vocab_size}
    for m in order:
        cap = width * deadlines.get(m, deadlines.get(2, 1)) - used
        if m == 1:
            want = np.arange(vocab_size)
        else:
            lv = levels[m]
            want = np.argsort(-lv.counts, kind="stable")
            needed[m] = len(want)
        if len(want) > cap:
            if not approximate or m == 1:
                raise CapacityError(_units_message(m, needed, cap + used, width, deadlines, vocab_size))
            want = want[: max(cap, 0)]
        if m > 1:
            kept = np.zeros(len(levels[m].keys), bool)
            kept[want] = True
            out[m] = levels[m]._replace(kept=kept)
            # Units index the kept detectors in key order.
            want = np.arange(int(kept.sum()))
        for i in want:
            slot_units[used // width].append((m, int(i)))
            used += 1
    return UnitPlacement(slot_units, out, needed)


def _units_message(m: int, needed: dict[int, int], cap: int, width: int, deadlines: dict[int, int], V: int) -> str:
    parts = " + ".join(f"{needed[k]} {'token' if k == 1 else f'{k}-gram'}" for k in sorted(needed))
    slots = deadlines.get(m, 1)
    prep = slots - (max(m, 2) - 1)
    return (
        f"Option 3 as a GPT-2 needs {sum(needed.values())} MLP units ({parts}) before the first layer with "
        f"n={max(m, 2)}, but {prep} preparation block(s) and {slots - prep} layout layer(s) give {slots} MLP(s) x "
        f"{width} = {cap}; add preparation blocks (--prep-blocks), keep the most frequent contexts "
        f"(--approximate), or widen the model (--d-model)"
    )


def readout_rows(cm: CountMatrix, smoothing: float) -> Float[np.ndarray, "R V"]:
    """Centred smoothed next-token log-probabilities of every observed context of ``C^{m,0}``.

    Args:
        cm: the table ``C^{m,0}``.
        smoothing: add-alpha constant.

    Returns:
        float64 [R, V]; softmax of a row is the smoothed n-gram model ``P~(. | g)``.
    """
    t = smoothed_log_probs(cm, smoothing)
    return t - t.mean(axis=1, keepdims=True)


@dataclasses.dataclass(frozen=True, eq=False)
class Contents:
    """What every unit state holds.

    Attributes:
        offsets: (n, s) -> first column of its query factors in the content vector; ``"read"``
            -> first column of the readout (absent without it).
        width: C.
        states: level -> float64 [R_m, C] the content of each kept detector (level 1: [V, C]).
        norm2: N^2, the largest squared content norm (the pad fills every state up to it).
        levels: the levels (with ``kept``).
        vocab_size: V.
    """

    offsets: dict[object, int]
    width: int
    states: dict[int, np.ndarray]
    norm2: float
    levels: dict[int, Level]
    vocab_size: int

    def kept_index(self, m: int, grams: Int[np.ndarray, "R m"]) -> Int[np.ndarray, " R"]:
        """Index among level m's kept detectors of each m-gram, or -1."""
        lv = self.levels[m]
        keys = lv.keys[lv.kept]
        q = pack_ngrams(grams, self.vocab_size, keys.dtype)
        idx = np.searchsorted(keys, q)
        idx_c = np.minimum(idx, max(len(keys) - 1, 0))
        found = (idx < len(keys)) & (keys[idx_c] == q) if len(keys) else np.zeros(len(q), bool)
        return np.where(found, idx_c, -1)

    def produced(self, m: int, grams: Int[np.ndarray, "R m"]) -> Float[np.ndarray, "R C"]:
        """The content the units write at a position whose last m tokens are ``grams`` (its longest kept suffix)."""
        if m == 1:
            return self.states[1][grams[:, 0]].copy()
        out = self.produced(m - 1, grams[:, 1:])
        if m in self.levels:
            idx = self.kept_index(m, grams)
            out[idx >= 0] = self.states[m][idx[idx >= 0]]
        return out

    def pad(self, content: Float[np.ndarray, "R C"]) -> Float[np.ndarray, " R"]:
        """The pad that brings each content row's squared norm up to N^2 (zero when already there)."""
        return np.sqrt(np.maximum(self.norm2 - (content**2).sum(axis=1), 0.0))


def content_states(
    tables: dict[tuple[int, int], CountMatrix],
    factors: dict[tuple[int, int], TableFactors],
    levels: dict[int, Level],
    qf_pairs: list[tuple[int, int]],
    s_values: list[int],
    dcfg: DerivationConfig,
    *,
    d_head: int,
    readout: bool,
) -> Contents:
    """The content of every token unit and every kept detector.

    Args:
        tables: ``{(n, s): CountMatrix}``.
        factors: :func:`~jaxattn.options.factors.table_factors` of every layout table.
        levels: the (placed) detector levels.
        qf_pairs: the (n, s) tables (n >= 2) whose query factors the content carries (without
            detectors only level 1 is built: the unigram back-off rows).
        s_values: the skips of the layout.
        dcfg: ``smoothing`` and the weighting of the back-off fits.
        d_head: K.
        readout: carry the LM readout block.

    Returns:
        :class:`Contents`.
    """
    V = next(iter(tables.values())).vocab_size
    top = max([1] + list(levels))
    offsets: dict[object, int] = {}
    for p in qf_pairs:
        offsets[p] = len(offsets) * d_head
    width = len(qf_pairs) * d_head + (V if readout else 0)
    if readout:
        offsets["read"] = len(qf_pairs) * d_head
    top_rows = max([top] + [n for n, _ in qf_pairs])
    keys, grams = level_grams(tables, top_rows, s_values, V) if top_rows >= 2 else ({}, {})
    rows = {p: query_factor_rows(tables, factors[p], keys, grams, p[0], p[1], V, dcfg) for p in qf_pairs}
    reads = {m: readout_rows(tables[(m, 0)], dcfg.smoothing) for m in range(1, top + 1)} if readout else {}
    states: dict[int, np.ndarray] = {}
    cont = Contents(offsets, width, states, 0.0, levels, V)
    for m in range(1, top + 1):
        if m == 1:
            sel = np.arange(V)
            c = np.zeros((V, width))
            gr = np.arange(V)[:, None]
        else:
            sel = np.flatnonzero(levels[m].kept)
            gr = levels[m].grams[sel]
            c = cont.produced(m - 1, gr[:, 1:])
        for p in qf_pairs:
            if p[0] >= m:
                c[:, offsets[p] : offsets[p] + d_head] = rows[p][m - 1][sel]
        if readout:
            idx = tables[(m, 0)].context_index(gr)
            o = offsets["read"]
            c[idx >= 0, o : o + V] = reads[m][idx[idx >= 0]]
        states[m] = c
    norm2 = max(float((s**2).sum(axis=1).max()) if len(s) else 0.0 for s in states.values())
    return dataclasses.replace(cont, norm2=norm2)
