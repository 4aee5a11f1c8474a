"""The Option 3 ablation: from the seed baseline to the standard-GPT-2 Option 3, one ingredient per row.

:func:`ablation` is the table ``compare`` prints: the seed baseline, then the ingredients of the
standard-GPT-2 construction (:data:`GPT2_STEPS`) added cumulatively, so that its last step is
Option 3; then Option 3 with one ingredient changed (:data:`GPT2_VARIANTS`); and, beside them,
the "oracle inputs" ceiling, the earlier derivation that feeds each query its n-gram through
the ``qk_inputs`` hook (:data:`~jaxattn.options.factors.ORACLE_INPUTS`).

:func:`oracle_ablation` is the same kind of table for the oracle derivation's own ingredients
(:data:`ABLATION_STEPS`), :func:`greedy_order` how that order was chosen, and
:func:`leave_one_out` its complement. :func:`format_ablation` formats all of them. Every row
is measured like the baseline, on the run's held-out sequences, with its next-token bits.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from jaxattn.errors import JaxattnError
from jaxattn.options.derivation import run_derivation
from jaxattn.options.factors import ORACLE_INPUTS, SEED_DERIVATION, DerivationConfig
from jaxattn.options.gpt2 import GPT2Config, run_gpt2
from jaxattn.pipeline import AnalysisResult, Prepared
from jaxattn.progress import Timer, progress_iter

__all__ = [
    "ABLATION_METRICS",
    "ABLATION_STEPS",
    "GPT2_STEPS",
    "GPT2_VARIANTS",
    "ablation",
    "format_ablation",
    "greedy_order",
    "leave_one_out",
    "oracle_ablation",
    "summarize",
]

#: Summary metrics of the ablation table (per-layer means over heads, and overall means).
ABLATION_METRICS = ("cosine", "argmax_match_tied", "kl", "entropy")

#: Ablation order: (ingredient field, short label, what it changes). The order is the greedy
#: forward selection of :func:`greedy_order` at the seed preset on Shakespeare minus King Lear
#: (evaluated on King Lear): each round adds the ingredient with the largest gain in mean
#: cosine + tie-aware argmax match. The structural fixes (what the layer reads, exact
#: inverses) come first; the log-P target pays off only once they are in place. Its fields
#: are exactly :data:`~jaxattn.options.factors.INGREDIENTS`, so the last row is :data:`ORACLE_INPUTS`.
ABLATION_STEPS: tuple[tuple[str, str, str], ...] = (
    (
        "embed_stream",
        "embedding-stream Q/K",
        "queries and keys read LN(E[t]) via qk_inputs, not the MLP-dominated LN(x)",
    ),
    ("pinv", "pseudo-inverse", "W = pinv(LN(E) rows) A instead of E^T A (exact for independent rows)"),
    ("temperature", "calibrated tau", "drop the std-0.01 rescaling of W_Q/W_K; fit tau on the count corpus"),
    ("ngram_queries", "n-gram queries", "one query row per observed n-gram at n >= 2 (back-off to suffixes)"),
    ("log_target", "log-P target", "factor the smoothed, row-centred log P~ instead of the manifold M"),
    ("frequency_weighting", "frequency weighting", "count-weighted rank-K factorisation and least squares"),
)


#: The standard-GPT-2 construction, ingredient by ingredient: (label, what it adds, its config).
#: Each step keeps the ones above it; the last is Option 3 (:data:`~jaxattn.options.gpt2.GPT2_OPTION3`).
GPT2_STEPS: tuple[tuple[str, str, GPT2Config], ...] = (
    (
        "token block",
        "a standard GPT-2 whose heads read an orthonormal token block: rank-K factors of the centred "
        "log P~, exact inverses, tau = 1, W_V = W_O = 0; n >= 2 queries know only their token",
        GPT2Config(positions=False, detectors=False, norm_pad=False),
    ),
    (
        "positions, prev head",
        "learned positions and previous-token heads in a preparation block (nothing reads them yet)",
        GPT2Config(detectors=False, norm_pad=False),
    ),
    (
        "MLP detectors",
        "closed-form MLP bigram detectors write each context's query factors and the LM readout",
        GPT2Config(norm_pad=False),
    ),
    ("norm pad", "a pad dimension keeps ||x|| equal, so every LayerNorm is one known rescaling", GPT2Config()),
)

#: Option 3 with one thing changed: (label, what changes, its config).
GPT2_VARIANTS: tuple[tuple[str, str, GPT2Config], ...] = (
    (
        "- prep block",
        "no preparation block: the previous-token head takes layout layer 0's last head",
        GPT2Config(prep_blocks=0, approximate=True),
    ),
    ("- small writes", "every layout head also writes O(1) into an unread block", GPT2Config(head_writes=1.0)),
)

#: The ceiling row: the oracle-inputs derivation.
_CEILING = ("oracle inputs", "queries told their n-gram from outside through the qk_inputs hook (not a GPT-2)")


def summarize(records: list[dict[str, Any]], num_layers: int) -> dict[str, Any]:
    """Per-layer means over heads (lists over layers) and overall means of the ablation metrics.

    Args:
        records: per-(layer, head) records of one option.
        num_layers: L.

    Returns:
        For each metric m of :data:`ABLATION_METRICS`: ``m`` [L], ``m_mean`` and ``m_worst_layer``
        (the largest per-layer KL, the smallest per-layer value of the others).
    """
    out: dict[str, Any] = {}
    for m in ABLATION_METRICS:
        # Heads without queries carry None (pipeline.evaluate); a layer of only such heads gives NaN.
        def mean(rs: list[dict[str, Any]], m: str = m) -> float:
            vals = [r[m] for r in rs if r[m] is not None]
            return float(np.mean(vals)) if vals else float("nan")

        per = [mean([r for r in records if r["layer"] == l]) for l in range(num_layers)]
        out[m] = per
        out[f"{m}_mean"] = mean(records)
        out[f"{m}_worst_layer"] = (
            float(np.nanmax(per) if m == "kl" else np.nanmin(per)) if any(np.isfinite(per)) else float("nan")
        )
    return out


def _summary_row(prep: Prepared, k: int, kind: str, label: str, desc: str, config: Any, res: AnalysisResult) -> dict:
    row: dict[str, Any] = {"step": k, "kind": kind, "ingredient": label, "description": desc, "config": config}
    row.update(summarize(res.records, prep.config.num_layers))
    if res.language_model is not None:
        row["bits_per_token"] = res.language_model["derived_bits_per_token"]
        row["ngram_bits_per_token"] = res.language_model["ngram_bits_per_token"]
    return row


def _row(
    prep: Prepared, k: int, label: str, desc: str, dcfg: DerivationConfig, run_label: str, timer: Timer | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """One table row: runs the derivation ``dcfg`` and summarises it (also returns the result's extra)."""
    res = run_derivation(prep, dcfg, label=run_label, progress=False, timer=timer)
    return _summary_row(prep, k, "step", label, desc, dataclasses.asdict(dcfg), res), res.extra


def ablation(prep: Prepared, *, progress: bool = True, timer: Timer | None = None) -> list[dict[str, Any]]:
    """The Option 3 ablation: seed baseline, the GPT-2 ingredients cumulatively, variants, the ceiling.

    Row 0 is the seed baseline (identical to :func:`jaxattn.pipeline.run_baseline`); rows 1 ..
    len(:data:`GPT2_STEPS`) add one ingredient each (``kind`` "step"; the last is Option 3);
    then one row per :data:`GPT2_VARIANTS` (``kind`` "variant"), and the oracle-inputs ceiling
    (``kind`` "ceiling"). A configuration that does not fit the model is reported in its row
    (``error``) instead of stopping the table.

    Args:
        prep: the prepared run.
        progress: progress bars.
        timer: stage timer (each row adds to "derive", "forward", "metrics").

    Returns:
        One dict per row: ``step``, ``kind``, ``ingredient``, ``description``, ``config``, the
        :func:`summarize` numbers, and ``bits_per_token`` / ``ngram_bits_per_token``.
    """
    plan: list[tuple[str, str, str, Any]] = [("step", "seed baseline", "the seed derivation (SPEC §2)", None)]
    plan += [("step", label, desc, cfg) for label, desc, cfg in GPT2_STEPS]
    plan += [("variant", label, desc, cfg) for label, desc, cfg in GPT2_VARIANTS]
    plan.append(("ceiling", *_CEILING, ORACLE_INPUTS))
    rows = []
    for k, (kind, label, desc, cfg) in enumerate(progress_iter(plan, desc="ablation", enabled=progress)):
        if cfg is None:
            res = run_derivation(prep, SEED_DERIVATION, label=f"ablation{k}", progress=False, timer=timer)
            conf: Any = dataclasses.asdict(SEED_DERIVATION)
        elif isinstance(cfg, DerivationConfig):
            res = run_derivation(prep, cfg, label=f"ablation{k}", progress=False, timer=timer)
            conf = dataclasses.asdict(cfg)
        else:
            try:
                res = run_gpt2(prep, cfg, label=f"ablation{k}", progress=False, timer=timer)
            except JaxattnError as e:
                rows.append({"step": k, "kind": kind, "ingredient": label, "description": desc, "error": str(e)})
                continue
            conf = dataclasses.asdict(cfg)
        rows.append(_summary_row(prep, k, kind, label, desc, conf, res))
    return rows


def oracle_ablation(
    prep: Prepared,
    *,
    progress: bool = True,
    timer: Timer | None = None,
    steps: tuple[tuple[str, str, str], ...] = ABLATION_STEPS,
) -> list[dict[str, Any]]:
    """The oracle-inputs derivation's own ablation: the seed derivation, then one ingredient more per row.

    Row 0 is the seed baseline (:data:`SEED_DERIVATION`, identical to
    :func:`jaxattn.pipeline.run_baseline`); row k adds ``steps[k-1]`` to row k-1; the last
    row is the oracle-inputs ceiling (with the default steps). Every row is measured like the
    baseline, on ``prep.tokens``.

    Args:
        prep: the prepared run.
        progress: progress bars.
        timer: stage timer (each row adds to "derive", "forward", "metrics").
        steps: (ingredient field, label, description) in the order to add them.

    Returns:
        One dict per row: ``step``, ``ingredient``, ``description``, ``config`` (the
        :class:`DerivationConfig` as a dict), and for each of cosine, argmax_match_tied, kl,
        entropy: the per-layer means over heads (a list over layers), ``{metric}_mean``
        (over all heads) and ``{metric}_worst_layer``; plus ``tau`` per layer (mean over heads).
    """
    rows = []
    dcfg = SEED_DERIVATION
    plan = [("seed", "seed baseline", "the seed derivation (SPEC §2)")] + list(steps)
    for k, (field, label, desc) in enumerate(progress_iter(plan, desc="oracle ablation", enabled=progress)):
        if k > 0:
            on: dict[str, Any] = {field: True}
            dcfg = dataclasses.replace(dcfg, **on)
        row, extra = _row(prep, k, label, desc, dcfg, f"ablation{k}", timer)
        tau = extra.get("tau")
        row["tau"] = [float(np.mean(t)) for t in tau] if tau is not None else None
        rows.append(row)
    return rows


def greedy_order(
    prep: Prepared, *, progress: bool = True, timer: Timer | None = None, fields: tuple[str, ...] | None = None
) -> tuple[list[str], list[dict[str, Any]]]:
    """Greedy forward selection of the ablation order (how :data:`ABLATION_STEPS` was chosen).

    From the seed derivation, each round tries every remaining ingredient on top of the ones
    chosen so far and keeps the one with the largest mean cosine + mean tie-aware argmax
    match (over all heads) on ``prep.tokens``. Costs ``k (k + 1) / 2`` derivations for k
    ingredients.

    Args:
        prep: the prepared run.
        progress: progress bars.
        timer: stage timer.
        fields: the ingredients to order (default: those of :data:`ABLATION_STEPS`).

    Returns:
        (the chosen order, one row per tried candidate with its round, the ingredients
        already chosen, the candidate and the :func:`summarize` numbers).
    """
    fields = tuple(fields or (f for f, _, _ in ABLATION_STEPS))
    chosen: list[str] = []
    tried: list[dict[str, Any]] = []
    dcfg = SEED_DERIVATION
    for rnd in progress_iter(range(len(fields)), desc="greedy order", enabled=progress):
        best: tuple[float, str, DerivationConfig] | None = None
        for f in fields:
            if f in chosen:
                continue
            try:
                on: dict[str, Any] = {f: True}
                cand = dataclasses.replace(dcfg, **on)
            except JaxattnError:  # e.g. n-gram queries before the embedding stream
                continue
            res = run_derivation(prep, cand, label="greedy", progress=False, timer=timer)
            summ = summarize(res.records, prep.config.num_layers)
            tried.append({"round": rnd, "chosen": list(chosen), "candidate": f, **summ})
            score = summ["cosine_mean"] + summ["argmax_match_tied_mean"]
            if best is None or score > best[0]:
                best = (score, f, cand)
        assert best is not None  # every round has a valid candidate: embed_stream is always allowed
        chosen.append(best[1])
        dcfg = best[2]
    return chosen, tried


def leave_one_out(prep: Prepared, *, progress: bool = True, timer: Timer | None = None) -> list[dict[str, Any]]:
    """Option 3 with one ingredient removed at a time (the complement of :func:`ablation`).

    Removing ``embed_stream`` also removes ``ngram_queries`` (which needs it). Rows have the
    same fields as :func:`ablation`'s (without ``tau``); ``step`` 0 is Option 3 itself.

    Args:
        prep: the prepared run.
        progress: progress bars.
        timer: stage timer.

    Returns:
        One dict per row.
    """
    plan = [("", "option 3", "every ingredient")] + [
        (f, f"- {label}", f"Option 3 without: {desc}") for f, label, desc in ABLATION_STEPS
    ]
    rows = []
    for k, (field, label, desc) in enumerate(progress_iter(plan, desc="leave-one-out", enabled=progress)):
        off: dict[str, Any] = {field: False} if field else {}
        if field == "embed_stream":
            off["ngram_queries"] = False
        dcfg = dataclasses.replace(ORACLE_INPUTS, **off)
        row, _ = _row(prep, k, label, desc, dcfg, f"loo{k}", timer)
        rows.append(row)
    return rows


#: The fields of a row that the full table (:func:`format_ablation`) reads.
_FULL_ROW_KEYS = (
    "step",
    "ingredient",
    "cosine_mean",
    "cosine_worst_layer",
    "argmax_match_tied_mean",
    "argmax_match_tied_worst_layer",
    "kl_mean",
    "entropy_mean",
    "cosine",
    "argmax_match_tied",
)


def _row_label(row: dict[str, Any]) -> str:
    label = row["ingredient"]
    if row.get("kind") == "ceiling":
        return "ceiling: " + label
    return label if row["step"] == 0 or label.startswith("- ") else "+ " + label


def _format_full(rows: list[dict[str, Any]]) -> str:
    """Overall means, the worst layer, and per-layer cosine / tied match of rows with every field.

    With ``bits_per_token`` in every row, a last column gives the model's next-token bits.
    """
    bits = bool(rows) and all("bits_per_token" in r for r in rows)
    head = f"{'step':>4} {'ingredient':<24} {'cos':>6} {'worst':>6} {'tied':>6} {'worst':>6} {'KL':>6} {'entropy':>7}"
    head += f" {'bits':>6}" if bits else ""
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['step']:>4} {_row_label(r):<24} {r['cosine_mean']:6.3f} "
            f"{r['cosine_worst_layer']:6.3f} {r['argmax_match_tied_mean']:6.1%} "
            f"{r['argmax_match_tied_worst_layer']:6.1%} "
            f"{r['kl_mean']:6.3f} {r['entropy_mean']:7.3f}" + (f" {r['bits_per_token']:6.3f}" if bits else "")
        )
    lines.append("")
    L = len(rows[0]["cosine"]) if rows else 0
    lines.append("per-layer cosine / tied argmax match:")
    lines.append(f"{'step':>4} " + " ".join(f"{'L' + str(l):>11}" for l in range(L)))
    for r in rows:
        cells = " ".join(f"{c:5.3f}/{t:4.0%}" for c, t in zip(r["cosine"], r["argmax_match_tied"], strict=True))
        lines.append(f"{r['step']:>4} {cells}")
    return "\n".join(lines)


def _format_plain(rows: list[dict[str, Any]]) -> str:
    """Step, ingredient and the overall means of each metric the rows have (partial rows, e.g. loaded ones)."""
    metrics = [m for m in ABLATION_METRICS if rows and f"{m}_mean" in rows[0]]
    head = f"{'step':>4} {'ingredient':<24} " + " ".join(f"{m[:12]:>12}" for m in metrics)
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['step']:>4} {str(r['ingredient'])[:24]:<24} " + " ".join(f"{r[f'{m}_mean']:12.3f}" for m in metrics)
        )
    return "\n".join(lines)


def format_ablation(rows: list[dict[str, Any]]) -> str:
    """The ablation (or leave-one-out) table as text.

    Rows with every field of :func:`ablation`'s rows get the full table: overall means, the
    worst layer, and per-layer cosine / tied argmax match. When any row lacks one of them (a
    partial row, e.g. read back from an older file), the table falls back to the step, the
    ingredient and the overall mean of each metric the first row has.

    Args:
        rows: :func:`ablation` or :func:`leave_one_out` rows.

    Returns:
        The table, lines joined by newlines (no trailing newline).
    """
    failed = [r for r in rows if "error" in r]
    rows = [r for r in rows if "error" not in r]
    text = _format_full(rows) if all(all(k in r for k in _FULL_ROW_KEYS) for r in rows) else _format_plain(rows)
    for r in failed:
        text += f"\n{r['step']:>4} {_row_label(r)}: not run: {r['error']}"
    return text
