"""The Option 3 ablation, the oracle derivation's own ablation, greedy order, leave-one-out, the formatter."""

from __future__ import annotations

import dataclasses

import pytest

from jaxattn import options


@pytest.mark.slow  # seven derivations; the ceiling itself is a row of the default ablation test
def test_oracle_ablation_has_one_row_per_ingredient_and_ends_at_the_ceiling(markov, markov_results):
    prep, _ = markov
    rows = options.oracle_ablation(prep, progress=False)
    assert len(rows) == len(options.ABLATION_STEPS) + 1
    assert [r["step"] for r in rows] == list(range(len(rows)))
    assert rows[0]["config"] == dataclasses.asdict(options.SEED_DERIVATION)
    assert rows[-1]["config"] == dataclasses.asdict(options.ORACLE_INPUTS)
    L = prep.config.num_layers
    ceiling = options.run_derivation(prep, options.ORACLE_INPUTS, progress=False)
    for row, res in ((rows[0], markov_results["baseline"]), (rows[-1], ceiling)):
        want = options.summarize(res.records, L)
        for m in options.ABLATION_METRICS:
            assert row[m] == want[m] and row[f"{m}_mean"] == want[f"{m}_mean"], (res.option, m)
    assert rows[-1]["cosine_mean"] > rows[0]["cosine_mean"] + 0.1
    text = options.format_ablation(rows)
    assert "frequency weighting" in text and len(text.splitlines()) == 2 * len(rows) + 5


def test_ablation_walks_from_the_seed_to_the_gpt2_option3_beside_the_ceiling(markov, markov_results):
    prep, _ = markov
    rows = options.ablation(prep, progress=False)
    steps, variants = len(options.GPT2_STEPS), len(options.GPT2_VARIANTS)
    assert len(rows) == 1 + steps + variants + 1
    assert [r["kind"] for r in rows] == ["step"] * (1 + steps) + ["variant"] * variants + ["ceiling"]
    assert not [r for r in rows if "error" in r]
    L = prep.config.num_layers
    for row, opt in ((rows[0], "baseline"), (rows[steps], "3")):  # the last step is Option 3 itself
        want = options.summarize(markov_results[opt].records, L)
        for m in options.ABLATION_METRICS:
            assert row[f"{m}_mean"] == want[f"{m}_mean"], (opt, m)
        assert row["bits_per_token"] == markov_results[opt].language_model["derived_bits_per_token"]
    assert rows[steps]["config"] == dataclasses.asdict(options.GPT2_OPTION3)
    assert rows[-1]["config"] == dataclasses.asdict(options.ORACLE_INPUTS)
    # Option 3 reaches the ceiling's alignment, and predicts text as its n-gram model does.
    assert rows[steps]["cosine_mean"] > rows[-1]["cosine_mean"] - 0.01
    assert abs(rows[steps]["bits_per_token"] / rows[steps]["ngram_bits_per_token"] - 1) < 5e-3
    # The detectors are what lifts the n = 2 layers (a first-order chain leaves them little to
    # add, so only the direction is asserted); the pad does not lower them.
    assert rows[3]["kl"][1] < rows[1]["kl"][1] and rows[3]["cosine"][1] > rows[1]["cosine"][1]
    assert rows[4]["cosine_mean"] >= rows[3]["cosine_mean"] - 1e-3
    text = options.format_ablation(rows)
    assert "ceiling: oracle inputs" in text and "- small writes" in text and "bits" in text.splitlines()[0]


def test_ablation_steps_are_the_ingredients():
    fields = [f for f, _, _ in options.ABLATION_STEPS]
    assert sorted(fields) == sorted(options.INGREDIENTS) and len(set(fields)) == len(fields)


@pytest.mark.slow
def test_greedy_order_and_leave_one_out(markov):
    prep, _ = markov
    order, tried = options.greedy_order(prep, progress=False)
    fields = [f for f, _, _ in options.ABLATION_STEPS]
    assert sorted(order) == sorted(fields)
    assert order.index("embed_stream") < order.index("ngram_queries")
    for rnd, pick in enumerate(order):  # each round kept its best candidate
        cands = [t for t in tried if t["round"] == rnd]
        best = max(cands, key=lambda t: t["cosine_mean"] + t["argmax_match_tied_mean"])
        assert best["candidate"] == pick
    loo = options.leave_one_out(prep, progress=False)
    assert len(loo) == len(fields) + 1 and loo[0]["config"] == dataclasses.asdict(options.ORACLE_INPUTS)
    assert all(r["cosine_mean"] <= loo[0]["cosine_mean"] + 1e-3 for r in loo[1:])


def full_row(step, ingredient, cos, cos_worst, tied, tied_worst, kl, ent, per_cos, per_tied):
    return {
        "step": step,
        "ingredient": ingredient,
        "cosine_mean": cos,
        "cosine_worst_layer": cos_worst,
        "argmax_match_tied_mean": tied,
        "argmax_match_tied_worst_layer": tied_worst,
        "kl_mean": kl,
        "entropy_mean": ent,
        "cosine": per_cos,
        "argmax_match_tied": per_tied,
    }


def test_format_ablation_full_table():
    rows = [
        full_row(0, "seed baseline", 0.5, 0.25, 0.5, 0.125, 1.5, 0.75, [0.75, 0.25], [0.875, 0.125]),
        full_row(1, "pseudo-inverse", 0.875, 0.75, 0.625, 0.5, 0.25, 0.5, [1.0, 0.75], [0.75, 0.5]),
        full_row(2, "- log-P target", 0.875, 0.75, 0.625, 0.5, 0.25, 0.5, [1.0, 0.75], [0.75, 0.5]),
    ]
    assert options.format_ablation(rows) == (
        "step ingredient                  cos  worst   tied  worst     KL entropy\n"
        "------------------------------------------------------------------------\n"
        "   0 seed baseline             0.500  0.250  50.0%  12.5%  1.500   0.750\n"
        "   1 + pseudo-inverse          0.875  0.750  62.5%  50.0%  0.250   0.500\n"
        "   2 - log-P target            0.875  0.750  62.5%  50.0%  0.250   0.500\n"
        "\n"
        "per-layer cosine / tied argmax match:\n"
        "step          L0          L1\n"
        "   0 0.750/ 88% 0.250/ 12%\n"
        "   1 1.000/ 75% 0.750/ 50%\n"
        "   2 1.000/ 75% 0.750/ 50%"
    )
    assert options.format_ablation([]) == (
        "step ingredient                  cos  worst   tied  worst     KL entropy\n"
        "------------------------------------------------------------------------\n"
        "\n"
        "per-layer cosine / tied argmax match:\n"
        "step "
    )


def test_format_ablation_partial_rows_get_the_plain_table():
    """Rows without the per-layer fields (e.g. read back from an older file): the means they have."""
    rows = [
        {"step": 0, "ingredient": "seed baseline", "cosine_mean": 0.5, "kl_mean": 1.25},
        {"step": 1, "ingredient": "an ingredient label longer than 24 chars", "cosine_mean": 0.75, "kl_mean": 0.5},
    ]
    assert options.format_ablation(rows) == (
        "step ingredient                     cosine           kl\n"
        "-------------------------------------------------------\n"
        "   0 seed baseline                   0.500        1.250\n"
        "   1 an ingredient label long        0.750        0.500"
    )
    # One full row does not make the table full: every row needs every field.
    full = full_row(2, "seed baseline", 0.5, 0.25, 0.5, 0.125, 1.5, 0.75, [0.75], [0.875])
    text = options.format_ablation([rows[1], full])
    assert text.splitlines()[0].split() == ["step", "ingredient", "cosine", "kl"]
    assert text.splitlines()[-1] == "   2 seed baseline                   0.500        1.500"
