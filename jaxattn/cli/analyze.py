"""``jaxattn analyze``: the main job. One option (the seed system by default) on one run.

Outputs in ``--out``: ``metrics.json`` (written first, before any figure),
``expected_vs_actual_attention.png``, ``heatmap_<metric>.png``, ``embedding_similarity.png`` and,
for Option 4, ``training_curves.png``. A figure that fails is reported in one stderr line and
the exit status is 1; every result file is on disk by then. ``metrics.json``'s
``"language_model"`` block and the printed summary give the option's next-token bits per token
beside its n-gram model's and uniform's.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from jaxattn import options
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
from jaxattn.output import (
    ensure_out_dir,
    jsonable,
    metrics_document,
    plots,
    save_embeddings,
    save_params,
    save_tables,
    tables,
    write_json,
)
from jaxattn.output.documents import language_model_block
from jaxattn.output.figure_pool import FigurePool, figure_pool
from jaxattn.output.html_report import report_job
from jaxattn.pipeline import AnalysisResult, Prepared, layer_summary
from jaxattn.progress import Timer

__all__ = [
    "EMBEDDING_LABELS",
    "add_parser",
    "cmd_analyze",
    "embedding_stats",
    "figure_jobs",
    "finish_figures",
    "save_artefacts",
    "write_outputs",
]


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Adds the ``analyze`` subcommand to ``sub`` (an argparse subparsers action)."""
    a = sub.add_parser("analyze", help="derive the seed system and measure its alignment (the main job)")
    add_common_arguments(a)
    described = "; ".join(f"{spec.name}: {spec.description}" for spec in options.REGISTRY.values())
    a.add_argument("--option", choices=options.OPTIONS, default="baseline", help=f"which option to run ({described})")
    a.add_argument(
        "--save",
        default=None,
        metavar="DIR",
        help="save the count tables, the derived weights with their config and (option 4) the trained embeddings "
        "to DIR, for a later --load DIR (format: jaxattn/output/artefacts.py)",
    )
    return a


def cmd_analyze(args: argparse.Namespace) -> int:
    """``jaxattn analyze``."""
    out = ensure_out_dir(args.out)
    run = run_config_from_args(args)
    progress = not args.no_progress
    check_model_config(run)
    heads = chosen_heads(args, run)
    timer = cli_timer(args)
    # The figure workers start now, so that their start-up overlaps the counting and the derivation.
    with figure_pool() as pool:
        prep, artefacts = load_and_prepare(args, run, timer=timer, progress=progress)
        if args.save:
            with timer.stage("save"):  # the tables first: reusable even if the option fails later
                artefacts["saved"] = save_artefacts(args.save, prep, None)
        knobs = option_knobs(args, args.option)
        result = options.run_option(prep, args.option, progress=progress, timer=timer, **knobs)
        if args.save:
            with timer.stage("save"):
                artefacts["saved"] = save_artefacts(args.save, prep, result, tables=False)
        extra = {"artefacts": artefacts} if artefacts else None
        return write_outputs(out, prep, [result], args=args, timer=timer, extra=extra, heads=heads, pool=pool)


def save_artefacts(
    directory: str, prep: Prepared, result: AnalysisResult | None, *, tables: bool = True
) -> dict[str, Any]:
    """Saves a run's artefacts with :mod:`jaxattn.output.artefacts` (``--save DIR``).

    Args:
        directory: created if missing.
        prep: the prepared run; its count tables are saved with the tokenizer and corpus info.
        result: an :class:`~jaxattn.pipeline.AnalysisResult` whose ``params`` (if any) are saved
            with the model config; for Option 4 its trained embeddings too. None: tables only.
        tables: save the count tables.

    Returns:
        ``{"dir": directory, "kinds": [...]}``, the kinds written.
    """
    kinds = ["tables"]  # with tables=False: written by an earlier call, before the option ran
    if tables:
        save_tables(directory, prep.tables, tokenizer=prep.corpus.tokenizer, corpus=prep.corpus)
    if result is not None and result.params is not None:
        info = {"option": result.option, "run": prep.run.to_dict(), "corpus_sha256": prep.corpus.sha256}
        save_params(directory, result.params, prep.config, info=info)
        kinds.append("params")
        if result.option == "option4":
            extra = {"train_config": result.extra.get("train_config")} if isinstance(result.extra, dict) else {}
            save_embeddings(directory, {"embed": result.params["embed"]}, config=prep.config, info=info | extra)
            kinds.append("embeddings")
    return {"dir": str(directory), "kinds": kinds}


#: The title of each option's token-embedding figure (which embedding it shows).
EMBEDDING_LABELS = {
    "baseline": "seed's token embeddings E (random unit-Gaussian rows)",
    "option1": "Option 1 token embeddings (PPMI + SVD)",
    "option3": "Option 3 token embeddings (GPT-2 wte)",
    "option4": "Option 4 token embeddings (trained)",
}


def embedding_stats(prep: Prepared, result: AnalysisResult) -> dict[str, Any]:
    """The off-diagonal cosine statistics of a result's token embeddings (O(V k), within the budget)."""
    if result.params is None:
        return {}
    stats = plots.embedding_similarity_stats(result.params["embed"], max_dense_bytes=prep.run.max_dense_bytes)
    return {"embedding": EMBEDDING_LABELS.get(result.option, f"{result.option} token embeddings"), **stats}


def figure_jobs(
    out: Path,
    prep: Prepared,
    results: list[AnalysisResult],
    *,
    emb_stats: dict[str, Any],
    heads: list[tuple[int, int]] | None = None,
    scaling: str = "absolute",
) -> list[tuple[str, Callable[[], Any]]]:
    """The figures of an ``analyze`` run, as ``(name, draw)`` jobs for :func:`jaxattn.output.plots.render_figures`."""
    main_res = results[0]
    vocab = list(prep.corpus.tokenizer.vocab)
    how = "absolute probability" if scaling == "absolute" else "rows scaled to their max"
    title = (
        f"{main_res.option}: expected (from counts) vs actual attention, first 32 positions of sequence 0; "
        f"key j on x, query i on y; {how}; blank = masked.\n"
        f"Panel metrics: all {prep.tokens.shape[0]} sequences x {prep.tokens.shape[1]} tokens."
    )
    jobs: list[tuple[str, Callable[[], Any]]] = [
        attention_figure_job(out, prep, main_res, title, heads=heads, scaling=scaling)
    ]
    # The two largest figures first, so that figure workers finish together.
    if main_res.params is not None:
        p = out / "embedding_similarity.png"
        label = str(emb_stats.get("embedding", "token embeddings"))
        embed = np.asarray(main_res.params["embed"])  # numpy: a figure worker unpickles it without JAX
        draw_emb = functools.partial(plots.plot_embedding_similarity, p, embed, vocab, label=label, stats=emb_stats)
        jobs.append((p.name, plots.returning(p, draw_emb)))
    ranges = plots.metric_ranges([r for res in results for r in res.records])
    for res in results:
        prefix = "heatmap" if len(results) == 1 else f"heatmap_{res.option}"
        jobs += plots.heatmap_jobs(out, res.records, prefix=prefix, ranges=ranges)
    curves = main_res.extra.get("curves") if isinstance(main_res.extra, dict) else None
    if isinstance(curves, dict) and np.size(curves.get("loss", [])) > 0:
        p = out / "training_curves.png"
        title_tc = f"{main_res.option} training"
        jobs.append((p.name, functools.partial(plots.plot_training_curves, p, curves, title=title_tc)))
    return jobs


def finish_figures(
    out: Path, jobs: list[tuple[str, Callable[[], Any]]], *, progress: bool, pool: FigurePool | None = None
) -> tuple[list[Path], int]:
    """Draws the figures after every result file is written; a failure is one stderr line and status 1.

    Args:
        out: the output directory (named in the error line).
        jobs: ``(name, draw)`` figure jobs.
        progress: a progress bar.
        pool: figure workers for the jobs that pickle (None: all in this process).

    Returns:
        (the figures written, the exit status: 0, or 1 when a figure failed).
    """
    files, failures = plots.render_figures(jobs, progress=progress, pool=pool)
    if not failures:
        return files, 0
    msg = "; ".join(failures)
    print(
        f"jaxattn: error: {len(failures)} figure(s) failed ({msg}); every result file is written "
        f"(see {out / 'metrics.json'})",
        file=sys.stderr,
    )
    return files, 1


def write_outputs(
    out: Path,
    prep: Prepared,
    results: list[AnalysisResult],
    *,
    args: argparse.Namespace,
    timer: Timer,
    extra: dict[str, Any] | None = None,
    heads: list[tuple[int, int]] | None = None,
    pool: FigurePool | None = None,
) -> int:
    """Prints the tables, writes metrics.json, then draws the figures (one or more options).

    With a ``pool``, the figures that pickle are drawn by its workers while this process writes
    ``report.html``.

    Returns:
        The exit status: 0, or 1 when a figure failed (metrics.json is written first either way).
    """
    records = [r for res in results for r in res.records]
    print(tables.run_header(prep))
    print()
    print(tables.format_table(records))
    print()
    print("per-layer means over heads (min-max over heads):")
    layer_rows = layer_summary(records)
    print(tables.format_layer_summary(layer_rows))
    lm_block = language_model_block(results)
    lm_text = tables.format_language_model(lm_block)
    if lm_text:
        print()
        print(lm_text)
    for res in results:
        text = tables.format_construction(res.option, res.extra)
        if text:
            print()
            print(text)
    with timer.stage("embedding_stats"):
        emb_stats = embedding_stats(prep, results[0])
    # Each option's own numbers (training curves, costs, ablations): the same field as in compare.
    extras = {res.option: jsonable(res.extra) for res in results if res.extra}

    def document() -> dict[str, Any]:
        return metrics_document(
            records,
            config={"run": prep.run.to_dict(), "model": prep.config.to_dict(), "cli_args": vars(args)},
            corpus=prep.corpus.info(),
            eval_corpus=prep.eval_corpus.info(),
            timings=timer.seconds,
            language_model=jsonable(lm_block),
            extra={
                "embedding_similarity": emb_stats,
                "figure_workers": pool.workers if pool is not None else 0,
                "layer_summary": layer_rows,
                **({"option_extras": extras} if extras else {}),
                **(extra or {}),
            },
        )

    write_json(out / "metrics.json", document())  # the results first: a figure that fails loses nothing
    jobs = figure_jobs(
        out, prep, results, emb_stats=emb_stats, heads=heads, scaling=getattr(args, "attention_scaling", "absolute")
    )
    jobs.insert(0, report_job(out, prep, results))  # report.html (from metrics.json) before the figures
    with timer.stage("report"):
        files, status = finish_figures(out, jobs, progress=not getattr(args, "no_progress", False), pool=pool)
    write_json(out / "metrics.json", document())  # again, with the report's time
    files.append(out / "metrics.json")
    print()
    print("wrote: " + ", ".join(str(f) for f in files))
    return status
