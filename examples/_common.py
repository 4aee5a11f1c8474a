"""Shared plumbing of the option example scripts (``examples/option*_*.py``).

Two functions, kept small and stable:

* :func:`setup` parses the common flags (``--corpus``, ``--eval-corpus``, ``--heldout``,
  ``--preset`` (default ``small``), ``--out``, ``--seq-len``, ``--num-seqs``, ``--seed``,
  ``--no-progress``) like ``jaxattn analyze``, loads and counts the corpus, and runs the
  seed baseline; it returns an :class:`Example`.
* :func:`report_before_after` prints the baseline and the option per layer, writes
  ``before_after.png`` (per-layer cosine and tie-aware argmax match, before vs after),
  ``expected_vs_actual_attention.png`` (the option's attention against the expected one)
  and ``metrics.json`` into ``--out``.

Bad input exits with status 2 and one line on stderr, as the CLI does.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from jaxattn import pipeline
from jaxattn.errors import JaxattnError
from jaxattn.output import atomic_open, ensure_out_dir, metrics_document, write_json
from jaxattn.output.plots import plot_expected_vs_actual
from jaxattn.output.tables import format_layer_summary, run_header
from jaxattn.progress import Timer


class Example(NamedTuple):
    """What :func:`setup` returns.

    Attributes:
        args: the parsed arguments.
        prep: the prepared run (count tables, held-out sequences, expected attention).
        baseline: the seed baseline on ``prep``.
        out: the output directory (created).
        timer: the stage timer of the run (pass it to the option; ``metrics.json`` reports it).
    """

    args: argparse.Namespace
    prep: pipeline.Prepared
    baseline: pipeline.AnalysisResult
    out: Path
    timer: Timer


def parser(description: str) -> argparse.ArgumentParser:
    """The common flags; scripts may add their own before calling :func:`setup`."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--corpus", default=None, help="text file, directory or glob (default: Python stdlib docstrings)")
    p.add_argument("--eval-corpus", default=None, help="text scored for alignment (default: a held-out split)")
    p.add_argument(
        "--heldout", default=None, help="held-out split when no --eval-corpus: a document name or a fraction"
    )
    p.add_argument("--preset", default="small", help="model preset: small (default) or seed")
    p.add_argument("--out", default=None, help="output directory (default: ./example_out/<script name>)")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per evaluation sequence (default 64)")
    p.add_argument("--num-seqs", type=int, default=32, help="number of evaluation sequences (default 32)")
    p.add_argument("--seed", type=int, default=0, help="seed of every PRNG key (default 0)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p


def _fail(message: str) -> None:
    print(f"{Path(sys.argv[0]).name}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def setup(
    description: str, argv: Sequence[str] | None = None, *, arg_parser: argparse.ArgumentParser | None = None
) -> Example:
    """Parses the flags, loads and counts the corpus, and runs the seed baseline.

    Args:
        description: the script's one-line description (for ``--help``).
        argv: arguments (default ``sys.argv[1:]``).
        arg_parser: a :func:`parser` with script-specific flags added.

    Returns:
        :class:`Example`.
    """
    args = (arg_parser or parser(description)).parse_args(argv)
    if args.seq_len < 2 or args.num_seqs < 1:
        _fail(f"--seq-len must be >= 2 and --num-seqs >= 1, got {args.seq_len} and {args.num_seqs}")
    heldout: Any = args.heldout
    if isinstance(heldout, str):
        try:
            heldout = float(heldout)
        except ValueError:
            pass
    run = pipeline.RunConfig(
        preset=args.preset, seq_len=args.seq_len, num_seqs=args.num_seqs, seed=args.seed, heldout=heldout
    )
    name = Path(sys.argv[0]).stem or "example"
    progress = not args.no_progress
    try:
        out = ensure_out_dir(args.out or Path("example_out") / name)
        timer = Timer()
        with timer.stage("load"):
            corpus, eval_corpus = pipeline.load_split(args.corpus, args.eval_corpus, run, progress=progress)
        prep = pipeline.prepare(corpus, eval_corpus, run, progress=progress, timer=timer)
        baseline = pipeline.run_baseline(prep, progress=progress, timer=timer)
    except JaxattnError as e:
        _fail(str(e))
    except OSError as e:
        _fail(f"{e.strerror or e}: {e.filename or ''}")
    return Example(args, prep, baseline, out, timer)


def guarded(fn: Callable[[], Any]) -> Any:
    """Runs ``fn`` and turns a :class:`JaxattnError` into exit status 2 and one stderr line."""
    try:
        return fn()
    except JaxattnError as e:
        _fail(str(e))


def _plot_before_after(path: Path, summaries: list[list[dict[str, Any]]], labels: list[str], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L = len(summaries[0])
    x = np.arange(L)
    width = 0.8 / len(summaries)
    fig, axes = plt.subplots(1, 2, figsize=(max(8.0, 0.9 * L + 4), 3.6))
    for ax, metric, name in zip(
        axes, ("cosine", "argmax_match_tied"), ("cosine", "tie-aware argmax match"), strict=True
    ):
        for k, (summ, lab) in enumerate(zip(summaries, labels, strict=True)):
            ax.bar(x + (k - (len(summaries) - 1) / 2) * width, [r[metric] for r in summ], width, label=lab)
        ax.set_xticks(x)
        ax.set_xticklabels([f"L{r['layer']}\nn={r['n']}" for r in summaries[0]], fontsize=7)
        ax.set_ylim(0, 1.02)
        ax.set_ylabel(f"{name} (mean over heads)")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def report_before_after(
    ex: Example, after: pipeline.AnalysisResult, *, title: str, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Prints before/after per-layer tables and writes the figures and ``metrics.json``.

    Args:
        ex: the :func:`setup` result (its ``baseline`` is "before").
        after: the option's result on ``ex.prep``.
        title: figure title.
        extra: more JSON-able facts for ``metrics.json``.

    Returns:
        The ``metrics.json`` document.
    """
    prep = ex.prep
    before_rows = pipeline.layer_summary(ex.baseline.records)
    after_rows = pipeline.layer_summary(after.records)
    c = prep.config
    print(run_header(prep))
    print()
    print("per-layer means over heads (min-max over heads): before (baseline) and after")
    print(format_layer_summary(before_rows + after_rows))
    vocab = list(prep.corpus.tokenizer.vocab)
    out = ex.out
    _plot_before_after(out / "before_after.png", [before_rows, after_rows], ["baseline", after.option], title)
    plot_expected_vs_actual(
        out / "expected_vs_actual_attention.png",
        prep.expected,
        prep.mask,
        prep.pair_index,
        after.attn,
        after.records,
        tokens=[vocab[t] for t in prep.tokens[0]],
        title=f"{after.option}: expected (from counts) vs actual attention, sequence 0; key j on x, query i on y",
    )
    doc = metrics_document(
        ex.baseline.records + after.records,
        config={"run": prep.run.to_dict(), "model": c.to_dict()},
        corpus=prep.corpus.info(),
        eval_corpus=prep.eval_corpus.info(),
        timings=ex.timer.seconds,
        extra={"layer_summary": before_rows + after_rows, after.option: after.extra, **(extra or {})},
    )
    write_json(out / "metrics.json", doc)
    print()
    print(f"wrote: {out / 'before_after.png'}, {out / 'expected_vs_actual_attention.png'}, {out / 'metrics.json'}")
    return doc
