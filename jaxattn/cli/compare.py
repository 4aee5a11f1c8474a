"""``jaxattn compare``: the baseline and options 1-4 side by side, the ablation and the diagnostics.

Every option runs on the same :class:`jaxattn.pipeline.Prepared` run (same count tables, same
held-out sequences, same expected attention), so their numbers are directly comparable.

Outputs in ``--out``:
    metrics.json            SPEC §5 records (one per option, layer and head) plus
                            ``options_summary``, ``language_model`` (each option's
                            next-token bits per token beside the n-gram model's and
                            uniform's), ``layer_summary``, ``option_extras``,
                            ``ablation``, ``diagnostics`` and ``verdicts``.
    options_comparison.png  per-layer cosine and tied argmax match of every option.
    ablation.json / .png    the Option 3 ablation table.
    diagnostics.json / .png the root-cause diagnostics and the verdicts on the seed's claims.
    heatmap_<option>_<metric>.png (one colour range per metric across options; hatched cells
    repeat an earlier head's (n, s) table), expected_vs_actual_attention.png (Option 3, or the
    best ranked option: never the ceiling), embedding_similarity.png (the baseline's E).

``best_option`` ranks the options by mean tied argmax match, then cosine, without the ceilings
(:attr:`jaxattn.options.OptionSpec.ceiling`: Option 2 reads the count tables, so it matches the
expected attention by construction); the ceiling is printed beside them as the ceiling. Every
JSON file is written before the first figure; a figure that fails is one stderr line and exit 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from jaxattn import diagnostics, options
from jaxattn.alignment import METRIC_NAMES
from jaxattn.cli.analyze import embedding_stats, finish_figures
from jaxattn.cli.common import (
    add_common_arguments,
    attention_figure_job,
    check_model_config,
    chosen_heads,
    cli_timer,
    load_and_prepare,
    option_knobs,
    run_config_from_args,
)
from jaxattn.errors import JaxattnError
from jaxattn.output import ensure_out_dir, jsonable, metrics_document, plots, tables, write_json
from jaxattn.output.attention_plots import format_value
from jaxattn.output.documents import language_model_block
from jaxattn.output.figure_pool import FigurePool, figure_pool
from jaxattn.output.html_report import report_job
from jaxattn.pipeline import AnalysisResult, Prepared, layer_summary, run_baseline
from jaxattn.progress import Timer, progress_iter

__all__ = [
    "CompareOutcome",
    "add_parser",
    "attention_result",
    "best_option",
    "ceiling_labels",
    "cmd_compare",
    "option_summary",
    "run_all",
]


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Adds the ``compare`` subcommand to ``sub`` (an argparse subparsers action)."""
    c = sub.add_parser("compare", help="run the baseline and options 1-4 side by side")
    add_common_arguments(c)
    c.add_argument("--train-steps", type=int, default=None, help="Option 4 training steps")
    c.add_argument(
        "--options",
        default="all",
        help="comma list of options to run: all (default) or any of baseline,1,2,3,4 (e.g. baseline,2)",
    )
    c.add_argument("--skip-ablation", action="store_true", help="do not run the Option 3 ablation table")
    c.add_argument("--skip-diagnostics", action="store_true", help="do not run the root-cause diagnostics")
    return c


def option_summary(records: list[dict[str, Any]], num_layers: int, seconds: float | None = None) -> dict[str, Any]:
    """Overall, layer-0 and deeper-layer means of one option's records (means over heads with queries)."""
    out: dict[str, Any] = {"option": records[0]["option"] if records else "?"}
    groups = {"all": lambda l: True, "layer0": lambda l: l == 0, "deeper": lambda l: l > 0}
    for gname, keep in groups.items():
        sel = [r for r in records if keep(r["layer"])]
        if not sel:
            continue
        for m in METRIC_NAMES:
            vals = [float(r[m]) for r in sel if r.get(m) is not None and np.isfinite(r[m])]
            out[f"{m}_{gname}" if gname != "all" else m] = float(np.mean(vals)) if vals else None  # None: no queries
    out["num_layers"] = num_layers
    if seconds is not None:
        out["seconds"] = float(seconds)
    return out


def ceiling_labels() -> set[str]:
    """The labels of the registered ceilings (:attr:`jaxattn.options.OptionSpec.ceiling`, e.g. "option2")."""
    return {spec.label for spec in options.REGISTRY.values() if spec.ceiling}


def _rank_key(s: dict[str, Any]) -> tuple[float, float]:
    vals = [s.get("argmax_match_tied"), s.get("cosine")]
    return tuple(float(v) if v is not None and np.isfinite(v) else -np.inf for v in vals)  # type: ignore[return-value]


def best_option(summaries: list[dict[str, Any]], *, exclude: set[str] | None = None) -> str | None:
    """The option with the highest mean tied argmax match (ties broken by cosine), ceilings excluded.

    Args:
        summaries: :func:`option_summary` rows.
        exclude: labels not ranked (default: :func:`ceiling_labels`; Option 2 scores KL 0 by construction).

    Returns:
        The best label, or None when every option is excluded.
    """
    skip = ceiling_labels() if exclude is None else exclude
    ranked = [s for s in summaries if s["option"] not in skip]
    return max(ranked, key=_rank_key)["option"] if ranked else None


def attention_result(results: list[AnalysisResult], best: str | None) -> AnalysisResult | None:
    """The result drawn in ``expected_vs_actual_attention.png``: a real derivation, never a ceiling.

    Option 3 when it ran, else the best ranked option, else the first non-ceiling one (None: only ceilings ran).
    """
    by = {r.option: r for r in results if r.option not in ceiling_labels()}
    for label in ("option3", best):
        if label in by:
            return by[label]
    return next(iter(by.values()), None)


def run_all(
    prep: Prepared,
    selected: list[str],
    *,
    train_steps: int | None = None,
    progress: bool = True,
    need_baseline: bool = True,
    timer: Timer | None = None,
    option_kw: dict[str, dict[str, Any]] | None = None,
) -> tuple[list[AnalysisResult], AnalysisResult | None, dict[str, float]]:
    """Runs the selected options on one prepared run.

    ``option_kw`` maps an option name to extra keyword arguments of its run function (the
    Option 3 flags, :func:`jaxattn.cli.common.option_knobs`).

    The baseline is computed first whenever it is selected, needed by the diagnostics
    (``need_baseline``) or by Option 4 (which starts from it and reuses its "before" numbers).

    Returns:
        (results of the selected options in order, the baseline result or None,
        wall seconds per option label).
    """
    seconds: dict[str, float] = {}
    base = None
    if "baseline" in selected or need_baseline or "4" in selected:
        t0 = time.perf_counter()
        base = run_baseline(prep, progress=progress, timer=timer)
        seconds["baseline"] = time.perf_counter() - t0
    results = []
    for opt in progress_iter(selected, desc="compare: options", enabled=progress):
        if opt == "baseline":
            assert base is not None
            results.append(base)
            continue
        kw: dict[str, Any] = dict((option_kw or {}).get(opt, {}))
        if opt == "4":
            kw["baseline"] = base
            if train_steps is not None:
                kw["steps"] = int(train_steps)
        t0 = time.perf_counter()
        res = options.run_option(prep, opt, progress=progress, timer=timer, **kw)
        seconds[res.option] = time.perf_counter() - t0
        results.append(res)
    return results, base, seconds


@dataclasses.dataclass(frozen=True)
class CompareOutcome:
    """Everything ``compare`` computed, for printing and writing.

    Attributes:
        results: the selected options' results, in canonical order.
        base: the baseline result (None when neither selected nor needed).
        ablation_rows: the Option 3 ablation rows (None when skipped).
        diag: the diagnostics (None when skipped).
        verdict_rows: the verdicts on the seed's claims (None when skipped).
        seconds: wall seconds per option label (and "ablation").
        selected: the selected option names.
        train_steps: Option 4's ``--train-steps``.
    """

    results: list[AnalysisResult]
    base: AnalysisResult | None
    ablation_rows: list[dict[str, Any]] | None
    diag: dict[str, Any] | None
    verdict_rows: list[dict[str, str]] | None
    seconds: dict[str, float]
    selected: list[str]
    train_steps: int | None


def cmd_compare(args: argparse.Namespace) -> int:
    """``jaxattn compare``: every option on the same held-out sequences, plus ablation and diagnostics."""
    selected = options.parse_options(getattr(args, "options", None))
    train_steps = getattr(args, "train_steps", None)
    if train_steps is not None and int(train_steps) < 1:
        raise JaxattnError(f"--train-steps must be >= 1, got {train_steps}")
    skip_ablation = bool(getattr(args, "skip_ablation", False))
    skip_diagnostics = bool(getattr(args, "skip_diagnostics", False))
    run = run_config_from_args(args)
    progress = not args.no_progress
    # Validate the model config and the output directory before any slow step.
    check_model_config(run)
    heads = chosen_heads(args, run)
    out = ensure_out_dir(args.out)
    timer = cli_timer(args)
    with figure_pool() as pool:  # started now: the workers' start-up overlaps the options
        prep, _ = load_and_prepare(args, run, timer=timer, progress=progress)
        results, base, seconds = run_all(
            prep,
            selected,
            train_steps=train_steps,
            progress=progress,
            need_baseline=not skip_diagnostics,
            timer=timer,
            option_kw={opt: option_knobs(args, opt) for opt in selected},
        )
        ablation_rows = None
        if not skip_ablation:
            t0 = time.perf_counter()
            ablation_rows = options.ablation(prep, progress=progress, timer=timer)
            seconds["ablation"] = time.perf_counter() - t0
        diag, verdict_rows = None, None
        if not skip_diagnostics:
            assert base is not None and base.params is not None
            diag = diagnostics.diagnose(prep, base.params, base.attn, progress=progress, timer=timer)
            verdict_rows = diagnostics.verdicts(diag)
        outcome = CompareOutcome(results, base, ablation_rows, diag, verdict_rows, seconds, selected, train_steps)
        _, status = write_compare_outputs(
            out,
            prep,
            outcome,
            timer=timer,
            heads=heads,
            scaling=getattr(args, "attention_scaling", "absolute"),
            progress=progress,
            pool=pool,
        )
    return status


def print_comparison(
    prep: Prepared,
    summaries: list[dict[str, Any]],
    layer_rows: list[dict[str, Any]],
    extras: dict[str, Any],
    lm_block: dict[str, Any] | None = None,
) -> None:
    """The run header, the options summary, the next-token scores, the per-layer table and each option's scalar extras."""
    print(tables.run_header(prep, same_for_every_option=True))
    print()
    print("options, means over all heads (layer 0 | layers 1+):")
    print(tables.format_options_summary(summaries))
    lm_text = tables.format_language_model(lm_block or {})
    if lm_text:
        print()
        print(lm_text)
    print()
    print("per-option, per-layer means over heads (min-max over heads):")
    print(tables.format_layer_summary(layer_rows))
    for label, ex in extras.items():
        text = tables.format_construction(label, ex)
        if text:
            print()
            print(text)
        line = tables.format_extra_scalars(ex)
        if line:
            print(f"{label}: {line}")


def option_figure_jobs(
    out: Path,
    prep: Prepared,
    outcome: CompareOutcome,
    layer_rows: list[dict[str, Any]],
    best: str | None,
    *,
    emb_stats: dict[str, Any],
    heads: list[tuple[int, int]] | None = None,
    scaling: str = "absolute",
) -> list[tuple[str, Callable[[], Any]]]:
    """The per-option figures, as ``(name, draw)`` jobs (:func:`jaxattn.output.plots.render_figures`).

    Heatmaps share one colour range per metric across options; the attention figure shows a real
    derivation (:func:`attention_result`), never the ceiling.
    """
    jobs: list[tuple[str, Callable[[], Any]]] = []
    results = outcome.results
    if results:
        p = out / "options_comparison.png"
        labels = [res.option for res in results]
        jobs.append(
            (p.name, plots.returning(p, functools.partial(plots.plot_options_comparison, p, layer_rows, labels)))
        )
        ranges = plots.metric_ranges([r for res in results for r in res.records])
        for res in results:
            prefix = f"heatmap_{res.option}"
            jobs += plots.heatmap_jobs(out, res.records, prefix=prefix, ranges=ranges)
        shown = attention_result(results, best)
        if shown is not None:
            how = "absolute probability" if scaling == "absolute" else "rows scaled to their max"
            title = (
                f"{shown.option} (a derivation, not the ceiling): expected (from counts) vs actual attention, "
                f"sequence 0; key j on x, query i on y; {how}; blank = masked"
            )
            jobs.append(attention_figure_job(out, prep, shown, title, heads=heads, scaling=scaling))
    if outcome.base is not None and outcome.base.params is not None:
        p = out / "embedding_similarity.png"
        embed, vocab = np.asarray(outcome.base.params["embed"]), list(prep.corpus.tokenizer.vocab)
        label = str(emb_stats.get("embedding", "token embeddings"))
        jobs.append(
            (
                p.name,
                plots.returning(
                    p, functools.partial(plots.plot_embedding_similarity, p, embed, vocab, label=label, stats=emb_stats)
                ),
            )
        )
    return jobs


def write_ablation_and_diagnostics(
    out: Path, outcome: CompareOutcome, num_layers: int
) -> tuple[list[Path], list[tuple[str, Callable[[], Any]]]]:
    """Prints and writes the ablation table and the diagnostics with their verdicts, when computed.

    Returns:
        (the JSON files written, the figure jobs still to draw).
    """
    files: list[Path] = []
    jobs: list[tuple[str, Callable[[], Any]]] = []
    if outcome.ablation_rows is not None:
        print()
        print(
            "Option 3 ablation (a step adds one ingredient to the row above; a variant removes one part of Option 3):"
        )
        print(options.format_ablation(outcome.ablation_rows))
        write_json(out / "ablation.json", {"rows": jsonable(outcome.ablation_rows), "num_layers": num_layers})
        files.append(out / "ablation.json")
        p_abl, ab_rows = out / "ablation.png", outcome.ablation_rows
        jobs.append((p_abl.name, plots.returning(p_abl, functools.partial(plots.plot_ablation, p_abl, ab_rows))))
    if outcome.diag is not None:
        rows = diagnostics.summary_rows(outcome.diag)
        print()
        print("root-cause diagnostics of the seed derivation (per layer):")
        print(tables.format_diagnostics(rows))
        print()
        print("verdicts on the seed's explanations:")
        print(tables.format_verdicts(outcome.verdict_rows or []))
        doc = {"diagnostics": outcome.diag, "verdicts": outcome.verdict_rows, "layers": rows}
        write_json(out / "diagnostics.json", doc)
        files.append(out / "diagnostics.json")
        p_diag, diag = out / "diagnostics.png", outcome.diag
        jobs.append(
            (p_diag.name, plots.returning(p_diag, functools.partial(plots.plot_diagnostics, p_diag, rows, diag)))
        )
    return files, jobs


def format_ceilings(summaries: list[dict[str, Any]]) -> str:
    """One line per ceiling option: its scores, printed beside (not among) the ranked options."""
    lines = []
    for s in summaries:
        if s["option"] in ceiling_labels():
            tied, cos, kl = (
                format_value(s.get(m), f) for m, f in (("argmax_match_tied", ".3f"), ("cosine", ".3f"), ("kl", ".3f"))
            )
            lines.append(
                f"ceiling (not ranked: reads the count tables, so it matches the expectation by construction): "
                f"{s['option']}  tied {tied}  cos {cos}  KL {kl}"
            )
    return "\n".join(lines)


def write_compare_outputs(
    out: Path,
    prep: Prepared,
    outcome: CompareOutcome,
    *,
    timer: Timer,
    heads: list[tuple[int, int]] | None = None,
    scaling: str = "absolute",
    progress: bool = False,
    pool: FigurePool | None = None,
) -> tuple[list[Path], int]:
    """Prints the comparison, writes every result file (atomically), then draws the figures.

    Every JSON file is on disk before the first figure; a figure that fails is reported in one
    stderr line (see :func:`jaxattn.cli.analyze.finish_figures`).

    Returns:
        (the paths written, the exit status: 0, or 1 when a figure failed).
    """
    L = prep.config.num_layers
    results, seconds = outcome.results, outcome.seconds
    records = [r for res in results for r in res.records]
    summaries = [option_summary(res.records, L, seconds.get(res.option)) for res in results]
    layer_rows = layer_summary(records)
    extras = {res.option: jsonable(res.extra) for res in results}
    lm_block = language_model_block(results)
    print_comparison(prep, summaries, layer_rows, extras, lm_block)
    best = best_option(summaries) if summaries else None
    files, late_jobs = write_ablation_and_diagnostics(out, outcome, L)
    with timer.stage("embedding_stats"):
        emb_stats = embedding_stats(prep, outcome.base) if outcome.base is not None else {}
    ceilings = sorted(ceiling_labels() & {s["option"] for s in summaries})

    def document() -> dict[str, Any]:
        return metrics_document(
            records,
            config={
                "run": prep.run.to_dict(),
                "model": prep.config.to_dict(),
                "options": outcome.selected or [res.option for res in results],
                "train_steps": outcome.train_steps,
            },
            corpus=prep.corpus.info(),
            eval_corpus=prep.eval_corpus.info(),
            timings={**timer.seconds, **{f"option_{k}": v for k, v in seconds.items()}},
            language_model=jsonable(lm_block),
            extra={
                "best_option": best,
                "best_option_rule": "highest mean tied argmax match, then cosine; ceilings not ranked",
                "ceilings": ceilings,
                "options_summary": summaries,
                "layer_summary": layer_rows,
                "option_extras": extras,
                "embedding_similarity": emb_stats,
                "figure_workers": pool.workers if pool is not None else 0,
                "ablation": jsonable(outcome.ablation_rows),
                "diagnostics": outcome.diag,
                "verdicts": outcome.verdict_rows,
            },
        )

    write_json(out / "metrics.json", document())  # every result before any figure
    jobs = option_figure_jobs(out, prep, outcome, layer_rows, best, emb_stats=emb_stats, heads=heads, scaling=scaling)
    jobs.insert(0, report_job(out, prep, results))  # report.html (from metrics.json) before the figures
    with timer.stage("report"):
        figs, status = finish_figures(out, jobs + late_jobs, progress=progress, pool=pool)
    write_json(out / "metrics.json", document())  # again, with the report's time
    files += [*figs, out / "metrics.json"]
    print()
    print(f"best option (tied argmax match, then cosine; the ceiling not ranked): {best}")
    ceiling_text = format_ceilings(summaries)
    if ceiling_text:
        print(ceiling_text)
    print("wrote: " + ", ".join(str(f) for f in files))
    return files, status
