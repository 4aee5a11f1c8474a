"""``jaxattn`` command line: ``analyze`` (the main job) and ``compare`` (every option side by side).

Bad input exits with status 2 and one line on stderr, without a traceback.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from jaxattn.errors import JaxattnError, MemoryBudgetError

OPTIONS = ("baseline", "1", "2", "3", "4")


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line on stderr and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"jaxattn: error: {message} (see `jaxattn {self.prog.split()[-1]} --help`)\n")


def _positive_int(name: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from e
        if v < 1:
            raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
        return v

    return parse


def _byte_count(text: str) -> int:
    """A positive, finite number of bytes such as ``4e9`` (argparse names the flag)."""
    try:
        v = float(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"must be a number of bytes, got {text!r}") from e
    if not (1 <= v < float(2**63)):  # also rejects nan and inf
        raise argparse.ArgumentTypeError(f"must be a number of bytes in [1, 2**63), got {text!r}")
    return int(v)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--corpus", default=None, help="text file, directory or glob (default: Python stdlib docstrings)")
    p.add_argument(
        "--eval-corpus", default=None, help="text scored for alignment (default: a held-out split of --corpus)"
    )
    p.add_argument(
        "--heldout", default=None, help="held-out split when no --eval-corpus: a document name or a fraction"
    )
    p.add_argument("--tokenizer", choices=("char", "word"), default="char")
    p.add_argument("--max-vocab", type=_positive_int("--max-vocab"), default=None, help="word level: top-k plus <unk>")
    p.add_argument("--preset", default="seed", help="model preset: seed or small (default: seed)")
    p.add_argument("--d-model", type=_positive_int("--d-model"), default=None)
    p.add_argument("--d-head", type=_positive_int("--d-head"), default=None)
    p.add_argument("--layers", type=_positive_int("--layers"), default=None)
    p.add_argument("--heads", type=_positive_int("--heads"), default=None)
    p.add_argument("--out", default="jaxattn_out", help="output directory (default: ./jaxattn_out)")
    p.add_argument(
        "--seq-len", type=_positive_int("--seq-len"), default=64, help="tokens per evaluation sequence T (default 64)"
    )
    p.add_argument(
        "--num-seqs", type=_positive_int("--num-seqs"), default=32, help="number of evaluation sequences B (default 32)"
    )
    p.add_argument("--batch-size", type=_positive_int("--batch-size"), default=16)
    p.add_argument("--seed", type=int, default=0, help="seed of every PRNG key (default 0)")
    p.add_argument(
        "--max-dense-bytes",
        type=_byte_count,
        default=None,
        help="memory budget for dense arrays, bytes (default 4 GiB)",
    )
    p.add_argument("--load", default=None, help="reuse count tables saved in this directory instead of counting")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for documentation and tests)."""
    parser = _Parser(prog="jaxattn", description=__doc__)
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    a = sub.add_parser("analyze", help="derive the seed system and measure its alignment (the main job)")
    _add_common(a)
    a.add_argument("--option", choices=OPTIONS, default="baseline", help="which solution option to run")
    a.add_argument(
        "--save",
        default=None,
        metavar="DIR",
        help="save the count tables, the derived weights with their config and (option 4) the trained embeddings "
        "to DIR, for a later --load DIR (format: jaxattn/io.py)",
    )
    c = sub.add_parser("compare", help="run the baseline and options 1-4 side by side")
    _add_common(c)
    c.add_argument("--train-steps", type=int, default=None, help="Option 4 training steps")
    c.add_argument(
        "--options",
        default="all",
        help="comma list of options to run: all (default) or any of baseline,1,2,3,4 (e.g. baseline,2)",
    )
    c.add_argument("--skip-ablation", action="store_true", help="do not run the Option 3 ablation table")
    c.add_argument("--skip-diagnostics", action="store_true", help="do not run the root-cause diagnostics")
    return parser


def run_config_from_args(args: argparse.Namespace) -> Any:
    """A :class:`jaxattn.pipeline.RunConfig` from parsed arguments."""
    from jaxattn.pipeline import RunConfig

    heldout: str | float | None = args.heldout
    if isinstance(heldout, str):
        try:
            heldout = float(heldout)
        except ValueError:
            pass
    overrides = {
        "d_model": args.d_model,
        "d_head": args.d_head,
        "num_layers": args.layers,
        "num_heads": args.heads,
    }
    return RunConfig(
        preset=args.preset,
        tokenizer=args.tokenizer,
        max_vocab=args.max_vocab,
        seq_len=args.seq_len,
        num_seqs=args.num_seqs,
        seed=args.seed,
        heldout=heldout,
        model_overrides=tuple((k, v) for k, v in overrides.items() if v is not None),
        max_dense_bytes=int(args.max_dense_bytes) if args.max_dense_bytes is not None else None,
        batch_size=args.batch_size,
    )


def cmd_analyze(args: argparse.Namespace) -> int:
    """``jaxattn analyze``."""
    from jaxattn import pipeline, report

    out = report.ensure_out_dir(args.out)
    run = run_config_from_args(args)
    progress = not args.no_progress
    # Validate the model config before any slow step.
    from jaxattn.model import preset

    preset(run.preset, 2, **dict(run.model_overrides))
    timer = pipeline.Timer()
    with timer.stage("load"):
        corpus, eval_corpus = pipeline.load_split(args.corpus, args.eval_corpus, run, progress=progress)
    tables = None
    artefacts: dict[str, Any] = {}
    if args.load:
        from jaxattn import io

        with timer.stage("load_tables"):
            # Checks the vocabulary against this corpus's; warns when another corpus was counted.
            tables = io.load_tables(args.load, corpus=corpus, max_dense_bytes=run.max_dense_bytes)
        artefacts["loaded_tables_from"] = str(args.load)
    prep = pipeline.prepare(corpus, eval_corpus, run, tables=tables, progress=progress, timer=timer)
    if args.save:
        with timer.stage("save"):  # the tables first: reusable even if the option fails later
            artefacts["saved"] = save_artefacts(args.save, prep, None)
    if args.option == "baseline":
        result = pipeline.run_baseline(prep, progress=progress)
    else:
        from jaxattn import options

        result = options.run_option(prep, args.option, progress=progress)
    if args.save:
        with timer.stage("save"):
            artefacts["saved"] = save_artefacts(args.save, prep, result, tables=False)
    write_outputs(out, prep, [result], args=args, extra={"artefacts": artefacts} if artefacts else None)
    return 0


def save_artefacts(directory: str, prep: Any, result: Any, *, tables: bool = True) -> dict[str, Any]:
    """Saves a run's artefacts with :mod:`jaxattn.io` (``--save DIR``).

    Args:
        directory: created if missing.
        prep: the prepared run; its count tables are saved with the tokenizer and corpus info.
        result: an :class:`~jaxattn.pipeline.AnalysisResult` whose ``params`` (if any) are saved
            with the model config; for Option 4 its trained embeddings too. None: tables only.
        tables: save the count tables.

    Returns:
        ``{"dir": directory, "kinds": [...]}``, the kinds written.
    """
    from jaxattn import io

    kinds = ["tables"]  # with tables=False: written by an earlier call, before the option ran
    if tables:
        io.save_tables(directory, prep.tables, tokenizer=prep.corpus.tokenizer, corpus=prep.corpus)
    if result is not None and result.params is not None:
        info = {"option": result.option, "run": prep.run.to_dict(), "corpus_sha256": prep.corpus.sha256}
        io.save_params(directory, result.params, prep.config, info=info)
        kinds.append("params")
        if result.option == "option4":
            extra = {"train_config": result.extra.get("train_config")} if isinstance(result.extra, dict) else {}
            io.save_embeddings(directory, {"embed": result.params["embed"]}, config=prep.config, info=info | extra)
            kinds.append("embeddings")
    return {"dir": str(directory), "kinds": kinds}


def write_outputs(
    out: Path, prep: Any, results: list[Any], *, args: argparse.Namespace, extra: dict[str, Any] | None = None
) -> None:
    """Prints the tables and writes metrics.json and the figures for one or more options."""
    from jaxattn import pipeline, report

    records = [r for res in results for r in res.records]
    print(
        f"corpus: {prep.corpus.source}  ({prep.corpus.num_docs} docs, {prep.corpus.num_tokens:,} tokens, V={prep.corpus.vocab_size})"
    )
    print(
        f"eval:   {prep.eval_corpus.source}  ({prep.eval_corpus.num_tokens:,} tokens); {prep.tokens.shape[0]} sequences x {prep.tokens.shape[1]} tokens"
    )
    c = prep.config
    print(
        f"model:  preset {prep.run.preset}: {c.num_layers} layers x {c.num_heads} heads, d_model {c.d_model}, d_head {c.d_head}, max_n {c.max_n}, max_s {c.max_s}, weight_std {c.weight_std}"
    )
    print()
    print(report.format_table(records))
    print()
    print("per-layer means over heads (min-max over heads):")
    print(report.format_layer_summary(pipeline.layer_summary(records)))
    main_res = results[0]
    vocab = list(prep.corpus.tokenizer.vocab)
    files = []
    with prep.timer.stage("report"):
        tok_strings = [vocab[t] for t in prep.tokens[0]]
        p = out / "expected_vs_actual_attention.png"
        report.plot_expected_vs_actual(
            p,
            prep.expected,
            prep.mask,
            prep.pair_index,
            main_res.attn,
            main_res.records,
            tokens=tok_strings,
            title=f"{main_res.option}: expected (from counts) vs actual attention, first 32 positions of sequence 0; "
            "key j on x, query i on y; rows scaled to their max; blank = masked.\n"
            f"Panel metrics: all {prep.tokens.shape[0]} sequences x {prep.tokens.shape[1]} tokens.",
        )
        files.append(p)
        for res in results:
            prefix = "heatmap" if len(results) == 1 else f"heatmap_{res.option}"
            files += report.plot_metric_heatmaps(out, res.records, prefix=prefix)
        emb_stats = {}
        if main_res.params is not None:
            p = out / "embedding_similarity.png"
            emb_stats = report.plot_embedding_similarity(p, main_res.params["embed"], vocab)
            files.append(p)
    # Each option's own numbers (training curves, costs, ablations): the same field as in compare.
    extras = {res.option: report.jsonable(res.extra) for res in results if res.extra}
    doc = report.metrics_document(
        records,
        config={"run": prep.run.to_dict(), "model": prep.config.to_dict(), "cli_args": vars(args)},
        corpus=prep.corpus.info(),
        eval_corpus=prep.eval_corpus.info(),
        timings=prep.timer.seconds,
        extra={
            "embedding_similarity": emb_stats,
            "layer_summary": pipeline.layer_summary(records),
            **({"option_extras": extras} if extras else {}),
            **(extra or {}),
        },
    )
    report.write_json(out / "metrics.json", doc)
    files.append(out / "metrics.json")
    print()
    print("wrote: " + ", ".join(str(f) for f in files))


def _show_warning(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
    print(f"jaxattn: warning: {' '.join(str(message).splitlines())}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``jaxattn`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    handlers = {"analyze": cmd_analyze}
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning  # one line per warning, like the errors
            if args.command == "compare":
                from jaxattn.compare import cmd_compare

                return cmd_compare(args)
            return handlers[args.command](args)
    except JaxattnError as e:
        msg = " ".join(str(e).splitlines())  # exactly one line on stderr
        if isinstance(e, MemoryBudgetError):
            msg = msg.replace("raise it with max_dense_bytes= or", "raise it with --max-dense-bytes or")
        print(f"jaxattn: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("jaxattn: interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        print(f"jaxattn: error: {e.strerror or e}: {e.filename or ''}".rstrip(": "), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
