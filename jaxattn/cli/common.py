"""What every subcommand shares: the argument parser class, the common flags, and load-and-prepare.

Bad input exits with status 2 and one line on stderr, without a traceback (:class:`Parser`
for argument errors; :func:`jaxattn.cli.main` for library errors).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from jaxattn.model import preset
from jaxattn.options import GPT2Config
from jaxattn.output import load_tables, plots
from jaxattn.pipeline import AnalysisResult, Prepared, RunConfig, load_split, prepare
from jaxattn.progress import Timer

__all__ = [
    "Parser",
    "add_common_arguments",
    "byte_count",
    "check_model_config",
    "load_and_prepare",
    "non_negative_int",
    "option_knobs",
    "plot_run_attention",
    "positive_int",
    "run_config_from_args",
    "show_warning",
]


class Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line on stderr and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"jaxattn: error: {message} (see `jaxattn {self.prog.split()[-1]} --help`)\n")


def _int_at_least(low: int) -> Callable[[str], Callable[[str], int]]:
    def make(name: str) -> Callable[[str], int]:
        del name  # argparse names the flag in its own error

        def parse(text: str) -> int:
            try:
                v = int(text)
            except ValueError as e:
                raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from e
            if v < low:
                raise argparse.ArgumentTypeError(f"must be >= {low}, got {v}")
            return v

        return parse

    return make


#: An argparse type for an integer >= 1: ``type=positive_int("--flag")``.
positive_int = _int_at_least(1)
#: An argparse type for an integer >= 0.
non_negative_int = _int_at_least(0)


def byte_count(text: str) -> int:
    """A positive, finite number of bytes such as ``4e9`` (argparse names the flag)."""
    try:
        v = float(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"must be a number of bytes, got {text!r}") from e
    if not (1 <= v < float(2**63)):  # also rejects nan and inf
        raise argparse.ArgumentTypeError(f"must be a number of bytes in [1, 2**63), got {text!r}")
    return int(v)


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    """The corpus, model, evaluation and output flags that ``analyze`` and ``compare`` share."""
    p.add_argument("--corpus", default=None, help="text file, directory or glob (default: Python stdlib docstrings)")
    p.add_argument(
        "--eval-corpus", default=None, help="text scored for alignment (default: a held-out split of --corpus)"
    )
    p.add_argument(
        "--heldout", default=None, help="held-out split when no --eval-corpus: a document name or a fraction"
    )
    p.add_argument("--tokenizer", choices=("char", "word"), default="char")
    p.add_argument("--max-vocab", type=positive_int("--max-vocab"), default=None, help="word level: top-k plus <unk>")
    p.add_argument("--preset", default="seed", help="model preset: seed or small (default: seed)")
    p.add_argument("--d-model", type=positive_int("--d-model"), default=None)
    p.add_argument("--d-head", type=positive_int("--d-head"), default=None)
    p.add_argument("--layers", type=positive_int("--layers"), default=None)
    p.add_argument("--heads", type=positive_int("--heads"), default=None)
    p.add_argument(
        "--max-n", type=positive_int("--max-n"), default=None, help="longest context of the layout (preset: 2)"
    )
    p.add_argument(
        "--max-s", type=non_negative_int("--max-s"), default=None, help="largest skip of the layout (preset: 3)"
    )
    g = p.add_argument_group("Option 3 (a standard GPT-2 derived from the counts)")
    g.add_argument(
        "--prep-blocks",
        type=non_negative_int("--prep-blocks"),
        default=None,
        help="preparation blocks ahead of the layout (default: as few as the MLP n-gram detectors need; "
        "0: the previous-token head takes layout layer 0's last head)",
    )
    g.add_argument(
        "--approximate",
        action="store_true",
        help="when the MLPs are too narrow for every observed context, keep the most frequent ones "
        "(the rest back off to shorter contexts) instead of refusing",
    )
    g.add_argument(
        "--n-ctx", type=positive_int("--n-ctx"), default=None, help="learned positions of the GPT-2 (default 1024)"
    )
    p.add_argument("--out", default="jaxattn_out", help="output directory (default: ./jaxattn_out)")
    p.add_argument(
        "--seq-len", type=positive_int("--seq-len"), default=64, help="tokens per evaluation sequence T (default 64)"
    )
    p.add_argument(
        "--num-seqs", type=positive_int("--num-seqs"), default=32, help="number of evaluation sequences B (default 32)"
    )
    p.add_argument("--batch-size", type=positive_int("--batch-size"), default=16)
    p.add_argument("--seed", type=int, default=0, help="seed of every PRNG key (default 0)")
    p.add_argument(
        "--max-dense-bytes",
        type=byte_count,
        default=None,
        help="memory budget for dense arrays, bytes (default 4 GiB)",
    )
    p.add_argument("--load", default=None, help="reuse count tables saved in this directory instead of counting")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def run_config_from_args(args: argparse.Namespace) -> RunConfig:
    """A :class:`jaxattn.pipeline.RunConfig` from parsed arguments."""
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
        "max_n": getattr(args, "max_n", None),
        "max_s": getattr(args, "max_s", None),
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


def option_knobs(args: argparse.Namespace, option: str) -> dict[str, Any]:
    """The keyword arguments of :func:`jaxattn.options.run_option` that the flags set for ``option``.

    Option 3 gets ``derivation=GPT2Config(...)`` from ``--prep-blocks``, ``--approximate`` and
    ``--n-ctx``; other options get none.
    """
    if str(option) != "3":
        return {}
    kw: dict[str, Any] = {"approximate": bool(getattr(args, "approximate", False))}
    if getattr(args, "prep_blocks", None) is not None:
        kw["prep_blocks"] = int(args.prep_blocks)
    if getattr(args, "n_ctx", None) is not None:
        kw["n_ctx"] = int(args.n_ctx)
    return {"derivation": GPT2Config(**kw)}


def check_model_config(run: RunConfig) -> None:
    """Validates the preset and its overrides before any slow step (raises JaxattnError)."""
    preset(run.preset, 2, **dict(run.model_overrides))


def load_and_prepare(
    args: argparse.Namespace, run: RunConfig, *, timer: Timer, progress: bool
) -> tuple[Prepared, dict[str, Any]]:
    """Loads the corpora, the saved tables when ``--load`` is given, and prepares the run.

    Saved tables are checked against this corpus the same way for every subcommand: the
    vocabulary and tokenizer must match, and another corpus's tables give a warning.

    Args:
        args: parsed arguments (``corpus``, ``eval_corpus``, ``load``).
        run: the run config.
        timer: the run's stage timer.
        progress: progress bars.

    Returns:
        (the prepared run, artefact provenance: ``{"loaded_tables_from": DIR}`` or ``{}``).
    """
    with timer.stage("load"):
        corpus, eval_corpus = load_split(args.corpus, args.eval_corpus, run, progress=progress)
    tables = None
    artefacts: dict[str, Any] = {}
    if getattr(args, "load", None):
        with timer.stage("load_tables"):
            tables = load_tables(args.load, corpus=corpus, max_dense_bytes=run.max_dense_bytes)
        artefacts["loaded_tables_from"] = str(args.load)
    prep = prepare(corpus, eval_corpus, run, tables=tables, progress=progress, timer=timer)
    return prep, artefacts


def plot_run_attention(out: Path, prep: Prepared, result: AnalysisResult, title: str) -> Path:
    """The seed's expected-vs-actual figure of one result on the run's sequence 0; returns its path."""
    vocab = list(prep.corpus.tokenizer.vocab)
    path = out / "expected_vs_actual_attention.png"
    plots.plot_expected_vs_actual(
        path,
        prep.expected,
        prep.mask,
        prep.pair_index,
        result.attn,
        result.records,
        tokens=[vocab[t] for t in prep.tokens[0]],
        title=title,
    )
    return path


def show_warning(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
    """``warnings.showwarning`` replacement: one line per warning on stderr, like the errors."""
    print(f"jaxattn: warning: {' '.join(str(message).splitlines())}", file=sys.stderr)
