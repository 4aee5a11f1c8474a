"""The previous-token heads and the MLP n-gram detectors of the standard-GPT-2 Option 3.

Two halves. The planning functions of :mod:`jaxattn.options.detectors` on small synthetic
tables, against dict references (which contexts, how frequent, which units go where, what each
state holds). Then the derived model on real text: the preparation block's previous-token heads
attend to ``i - 1`` and copy its code, and its MLP's hidden units fire (pre-activation
``+fire``) for exactly the token unit of ``t_i`` and the unit of the counted bigram
``(t_{i-1}, t_i)``, never for a bigram at position 0, with every other unit at ``-fire`` or below.
"""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest

from jaxattn.counts import count_tables
from jaxattn.options import GPT2_OPTION3, derive_gpt2
from jaxattn.options.detectors import content_states, place_units, plan_levels, readout_rows
from jaxattn.options.factors import DerivationConfig, table_factors
from jaxattn.options.residual import CapacityError, allocate
from tests.options.test_gpt2 import observed_contexts, prepared_real, probe_tokens, reference_forward

# ----------------------------------------------------------------------------- planning, on synthetic tables

V_SYN = 6


@pytest.fixture(scope="module")
def synthetic():
    """Two documents of a skewed random source over 6 tokens: some bigrams frequent, some rare, some absent."""
    rng = np.random.default_rng(11)
    p = np.array([0.4, 0.25, 0.15, 0.1, 0.07, 0.03])
    tokens = rng.choice(V_SYN, size=600, p=p).astype(np.int32)
    docs = np.repeat([0, 1], 300).astype(np.int32)
    tables = count_tables(tokens, V_SYN, 2, 2, doc_ids=docs)
    grams: dict[tuple[int, int], int] = {}  # bigram -> windows with a next token in the document
    for d in (0, 1):
        t = tokens[docs == d].tolist()
        for i in range(len(t) - 2):
            grams[(t[i], t[i + 1])] = grams.get((t[i], t[i + 1]), 0) + 1
    return tables, grams


def test_plan_levels_lists_every_counted_bigram_with_its_count(synthetic):
    tables, grams = synthetic
    levels = plan_levels(tables, 2, [0, 1, 2], V_SYN)
    assert list(levels) == [2]
    lv = levels[2]
    assert [tuple(g) for g in lv.grams.tolist()] == sorted(grams)  # lexicographic, like the keys
    np.testing.assert_array_equal(lv.keys, [a * V_SYN + b for a, b in sorted(grams)])
    np.testing.assert_array_equal(lv.counts, [grams[g] for g in sorted(grams)])  # s = 0 has the most windows
    assert lv.kept.all()
    assert plan_levels(tables, 1, [0], V_SYN) == {}


def test_place_units_fills_token_units_then_detectors(synthetic):
    tables, grams = synthetic
    levels = plan_levels(tables, 2, [0, 1, 2], V_SYN)
    R = len(grams)
    pl = place_units(levels, V_SYN, 64, {2: 1}, approximate=False)
    assert pl.slot_units == [[(1, t) for t in range(V_SYN)] + [(2, i) for i in range(R)]]
    assert pl.needed == {1: V_SYN, 2: R}
    # Two narrower slots: units spill into the second, in the same order, at most `width` per slot.
    width = -(-(V_SYN + R) // 2)
    pl2 = place_units(levels, V_SYN, width, {2: 2}, approximate=False)
    assert [len(s) for s in pl2.slot_units] == [width, V_SYN + R - width]
    assert sum(pl2.slot_units, []) == pl.slot_units[0]


def test_place_units_refuses_or_keeps_the_most_frequent(synthetic):
    tables, grams = synthetic
    levels = plan_levels(tables, 2, [0, 1, 2], V_SYN)
    R, width = len(grams), 10
    assert V_SYN + R > 2 * width
    with pytest.raises(CapacityError) as err:
        place_units(levels, V_SYN, width, {2: 2}, approximate=False)
    msg = str(err.value)
    assert f"needs {V_SYN + R} MLP units ({V_SYN} token + {R} 2-gram)" in msg, msg
    assert f"2 MLP(s) x {width} = {2 * width}" in msg, msg
    pl = place_units(levels, V_SYN, width, {2: 2}, approximate=True)
    kept = pl.levels[2].kept
    room = 2 * width - V_SYN
    assert kept.sum() == room
    order = sorted(grams, key=lambda g: (-grams[g], g))  # most frequent first, ties in key order
    assert {tuple(g) for g in pl.levels[2].grams[kept].tolist()} == set(order[:room])
    assert [len(s) for s in pl.slot_units] == [width, width]
    # Token units are never dropped: too few units for them is refused even in the approximate mode.
    with pytest.raises(CapacityError):
        place_units(levels, V_SYN, V_SYN - 1, {2: 1}, approximate=True)


def test_readout_rows_are_the_centred_smoothed_log_probabilities(synthetic):
    tables, _ = synthetic
    cm = tables[(2, 0)]
    r = readout_rows(cm, 0.01)
    np.testing.assert_allclose(r.sum(axis=1), 0.0, atol=1e-12)
    c = cm.counts.astype(np.float64)
    want = (c + 0.01) / (c.sum(axis=1, keepdims=True) + 0.01 * V_SYN)
    soft = np.exp(r) / np.exp(r).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(soft, want, rtol=1e-12)


def test_content_states_back_off_and_share_one_norm(synthetic):
    tables, grams = synthetic
    K, s_values = 4, [0, 1, 2]
    dcfg = DerivationConfig(log_target=True, frequency_weighting=True, smoothing=0.01)
    pairs = [(2, 0), (2, 1), (2, 2)]
    factors = {p: table_factors(tables[p], K, dcfg, key=jax.random.PRNGKey(0)) for p in pairs + [(1, 0)]}
    levels = plan_levels(tables, 2, s_values, V_SYN)
    # Keep all but the rarest bigram, so one context backs off.
    rare = min(grams, key=lambda g: (grams[g], g))
    lv = levels[2]
    kept = np.array([tuple(g) != rare for g in lv.grams.tolist()])
    levels = {2: lv._replace(kept=kept)}
    c = content_states(tables, factors, levels, pairs, s_values, dcfg, d_head=K, readout=True)
    assert c.width == len(pairs) * K + V_SYN and c.offsets["read"] == len(pairs) * K
    assert c.states[1].shape == (V_SYN, c.width) and c.states[2].shape == (int(kept.sum()), c.width)
    sq = np.concatenate([(st**2).sum(1) for st in c.states.values()])
    np.testing.assert_allclose(sq.max(), c.norm2, rtol=1e-12)
    for st in c.states.values():  # the pad fills every state up to the same norm
        np.testing.assert_allclose((st**2).sum(1) + c.pad(st) ** 2, c.norm2, rtol=1e-12)
    # A kept bigram's state holds its own factor rows and readout; the dropped one backs off to its last token.
    g = next(tuple(x) for x in lv.grams[kept].tolist())
    prod = c.produced(2, np.array([g, rare]))
    for p in pairs:
        row = tables[p].context_index(np.array([g]))[0]
        o = c.offsets[p]
        np.testing.assert_allclose(prod[0, o : o + K], np.asarray(factors[p].A)[row], rtol=1e-12)
    r2 = readout_rows(tables[(2, 0)], 0.01)
    np.testing.assert_allclose(prod[0, c.offsets["read"] :], r2[tables[(2, 0)].context_index(np.array([g]))[0]])
    np.testing.assert_array_equal(prod[1], c.states[1][rare[1]])
    assert c.kept_index(2, np.array([rare]))[0] == -1


# ----------------------------------------------------------------------------- the derived model on real text


@pytest.fixture(scope="module")
def real(shakespeare_dir):
    return prepared_real(shakespeare_dir)


@pytest.fixture(scope="module")
def derived(real):
    params, info = derive_gpt2(real.tables, real.config, key=real.key("derive"))
    refs = [reference_forward(params, tok) for tok in probe_tokens(real)]
    return params, info, refs


def previous_token_heads(params) -> np.ndarray:
    """The heads of block 0 that write anything (``W_V != 0``)."""
    return np.flatnonzero(np.abs(np.asarray(params["wv"][0])).sum(axis=(1, 2)) > 0)


def test_previous_token_heads_attend_to_the_previous_position(real, derived):
    params, info, refs = derived
    cfg = real.config
    heads = previous_token_heads(params)
    assert info["prep_blocks"] == 1
    assert heads.tolist() == list(range(math.ceil(cfg.vocab_size / cfg.d_head)))  # one per d_head chunk of V
    others = np.setdiff1d(np.arange(cfg.num_heads), heads)
    for name in ("wq", "wk", "wv", "wo"):
        assert not np.asarray(params[name][0, others]).any(), name
    T = real.tokens.shape[1]
    for ref in refs:
        on_prev = ref.attn[0][heads][:, np.arange(1, T), np.arange(T - 1)]
        assert on_prev.min() >= 1 - 1e-6, on_prev.min()
        np.testing.assert_allclose(ref.attn[0][heads][:, 0, 0], 1.0)


def test_previous_token_heads_copy_the_previous_token(real, derived):
    """Block 0's attention writes ``c * onehot(t_{i-1})`` into the ``prev1`` block (``t_0`` at position 0)."""
    params, info, refs = derived
    dims = {k: v for k, v in info["residual_dims"].items() if k not in ("ones", "used", "d_model")}
    sub = allocate(info["residual_dims"]["d_model"], dims)
    np.testing.assert_allclose(
        np.asarray(params["embed"], np.float64) @ sub["tok"].T,
        np.eye(real.config.vocab_size) * info["content_norm"],
        atol=1e-4,
    )
    for tok, ref in zip(probe_tokens(real), refs, strict=True):
        wrote = (ref.sites[1] - ref.sites[0]) @ sub["prev1"].T  # [T, V]
        prev = np.concatenate([tok[:1], tok[:-1]])
        want = np.zeros_like(wrote)
        want[np.arange(len(tok)), prev] = info["content_norm"]
        np.testing.assert_allclose(wrote, want, rtol=0, atol=1e-4 * info["content_norm"])
        # Nothing else changed in block 0's attention.
        rest = (ref.sites[1] - ref.sites[0]) - wrote @ sub["prev1"]
        assert np.abs(rest).max() < 1e-4 * info["content_norm"]


def test_detector_units_fire_for_exactly_the_observed_contexts(real, derived):
    params, info, refs = derived
    V, fire = real.config.vocab_size, GPT2_OPTION3.fire
    bigrams = sorted(observed_contexts(real.corpus, 2))
    unit_of = {g: V + u for u, g in enumerate(bigrams)}  # token units first, then bigrams in key order
    U = V + len(bigrams)
    assert info["mlp_units"]["kept"] == {"1": V, "2": len(bigrams)}
    # Units past the detectors, and every later MLP, are empty.
    for name, sl in (("w1", np.s_[0, :, U:]), ("b1", np.s_[0, U:]), ("w2", np.s_[0, U:]), ("w1", np.s_[1:])):
        assert not np.asarray(params[name][sl]).any(), name
    seen_bigram = 0
    for tok, ref in zip(probe_tokens(real), refs, strict=True):
        pre = ref.pre[0][:, :U]  # [T, U]
        want = np.zeros(pre.shape, bool)
        for i, t in enumerate(tok.tolist()):
            want[i, t] = True
            g = (int(tok[i - 1]), t)
            if i > 0 and g in unit_of:
                want[i, unit_of[g]] = True
                seen_bigram += 1
        np.testing.assert_allclose(pre[want], fire, rtol=0, atol=1e-3)
        assert pre[~want].max() <= -fire + 1e-3, f"a non-matching unit reached {pre[~want].max():.4f}"
    T = real.tokens.shape[1]
    assert seen_bigram >= 0.9 * 2 * (T - 1)  # most held-out bigrams were counted
    assert seen_bigram <= 2 * (T - 1) + (T - 1) // 2  # most random bigrams were not
