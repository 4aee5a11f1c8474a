"""``jaxattn analyze``: the main job. One option (the seed system by default) on one run.

Outputs in ``--out``: ``metrics.json``, ``expected_vs_actual_attention.png``,
``heatmap_<metric>.png`` and ``embedding_similarity.png``. ``metrics.json``'s
``"language_model"`` block and the printed summary give the option's next-token bits per token
beside its n-gram model's and uniform's.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from jaxattn import options
from jaxattn.cli.common import (
    add_common_arguments,
    check_model_config,
    load_and_prepare,
    option_knobs,
    plot_run_attention,
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
from jaxattn.pipeline import AnalysisResult, Prepared, layer_summary
from jaxattn.progress import Timer

__all__ = ["add_parser", "cmd_analyze", "save_artefacts", "write_outputs"]


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
    timer = Timer()
    prep, artefacts = load_and_prepare(args, run, timer=timer, progress=progress)
    if args.save:
        with timer.stage("save"):  # the tables first: reusable even if the option fails later
            artefacts["saved"] = save_artefacts(args.save, prep, None)
    result = options.run_option(prep, args.option, progress=progress, timer=timer, **option_knobs(args, args.option))
    if args.save:
        with timer.stage("save"):
            artefacts["saved"] = save_artefacts(args.save, prep, result, tables=False)
    write_outputs(out, prep, [result], args=args, timer=timer, extra={"artefacts": artefacts} if artefacts else None)
    return 0


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


def write_figures(out: Path, prep: Prepared, results: list[AnalysisResult]) -> tuple[list[Path], dict[str, Any]]:
    """The figures of an ``analyze`` run; returns (paths written, embedding similarity statistics)."""
    main_res = results[0]
    vocab = list(prep.corpus.tokenizer.vocab)
    files = []
    p = plot_run_attention(
        out,
        prep,
        main_res,
        f"{main_res.option}: expected (from counts) vs actual attention, first 32 positions of sequence 0; "
        "key j on x, query i on y; rows scaled to their max; blank = masked.\n"
        f"Panel metrics: all {prep.tokens.shape[0]} sequences x {prep.tokens.shape[1]} tokens.",
    )
    files.append(p)
    for res in results:
        prefix = "heatmap" if len(results) == 1 else f"heatmap_{res.option}"
        files += plots.plot_metric_heatmaps(out, res.records, prefix=prefix)
    emb_stats: dict[str, Any] = {}
    if main_res.params is not None:
        p = out / "embedding_similarity.png"
        emb_stats = plots.plot_embedding_similarity(p, main_res.params["embed"], vocab)
        files.append(p)
    return files, emb_stats


def write_outputs(
    out: Path,
    prep: Prepared,
    results: list[AnalysisResult],
    *,
    args: argparse.Namespace,
    timer: Timer,
    extra: dict[str, Any] | None = None,
) -> None:
    """Prints the tables and writes metrics.json and the figures for one or more options."""
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
    with timer.stage("report"):
        files, emb_stats = write_figures(out, prep, results)
    # Each option's own numbers (training curves, costs, ablations): the same field as in compare.
    extras = {res.option: jsonable(res.extra) for res in results if res.extra}
    doc = metrics_document(
        records,
        config={"run": prep.run.to_dict(), "model": prep.config.to_dict(), "cli_args": vars(args)},
        corpus=prep.corpus.info(),
        eval_corpus=prep.eval_corpus.info(),
        timings=timer.seconds,
        language_model=jsonable(lm_block),
        extra={
            "embedding_similarity": emb_stats,
            "layer_summary": layer_rows,
            **({"option_extras": extras} if extras else {}),
            **(extra or {}),
        },
    )
    write_json(out / "metrics.json", doc)
    files.append(out / "metrics.json")
    print()
    print("wrote: " + ", ".join(str(f) for f in files))
