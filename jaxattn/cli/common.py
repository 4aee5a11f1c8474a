"""What every subcommand shares: the argument parser class, the common flags, and load-and-prepare.

Bad input exits with status 2 and one line on stderr, without a traceback (:class:`Parser`
for argument errors; :func:`jaxattn.cli.main` for library errors).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from jaxattn.caches import cache_dir
from jaxattn.corpus import directory_glob
from jaxattn.errors import JaxattnError
from jaxattn.model import preset
from jaxattn.options import GPT2Config
from jaxattn.output import load_tables, plots
from jaxattn.pipeline import AnalysisResult, Prepared, RunConfig, load_split, prepare
from jaxattn.progress import Timer, stage_lines_enabled

__all__ = [
    "Parser",
    "add_common_arguments",
    "add_figure_arguments",
    "attention_figure_job",
    "byte_count",
    "check_model_config",
    "compilation_cache_dir",
    "enable_compilation_cache",
    "corpus_paths",
    "chosen_heads",
    "load_and_prepare",
    "non_negative_int",
    "option_knobs",
    "positive_int",
    "run_config_from_args",
    "show_warning",
]


class Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line on stderr and exit status 2.

    The line names the help of the (sub)command that was given: ``(see `jaxattn analyze --help`)``
    for ``jaxattn analyze --bogus``, ``(see `jaxattn --help`)`` at the top level.
    """

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"jaxattn: error: {message} (see `{self.prog} --help`)\n")

    def parse_args(self, args: Any = None, namespace: Any = None) -> Any:  # type: ignore[override]
        """As argparse's, but unrecognised arguments are reported by the subcommand they follow."""
        ns, extras = self.parse_known_args(args, namespace)
        if extras:
            command = getattr(ns, "command", None)
            sub = next(
                (a.choices.get(str(command)) for a in self._actions if isinstance(a, argparse._SubParsersAction)), None
            )
            (sub if isinstance(sub, argparse.ArgumentParser) else self).error(
                f"unrecognized arguments: {' '.join(extras)}"
            )
        return ns


#: Compilations that took at least this long (seconds) are kept in the persistent cache.
CACHE_MIN_COMPILE_SECONDS = 0.05


def compilation_cache_dir() -> str | None:
    """Where the CLI keeps JAX's persistent compilation cache, or None when it is off.

    ``JAXATTN_COMPILATION_CACHE=0`` (or ``off``, ``no``, ``false``) turns it off; any other value
    is the directory. By default ``$XDG_CACHE_HOME/jaxattn/jax`` (``~/.cache/jaxattn/jax``). A run
    then compiles each forward, metric and random-draw kernel once per machine, not once per run.
    """
    return cache_dir("JAXATTN_COMPILATION_CACHE", "jax")


def enable_compilation_cache() -> str | None:
    """Points JAX's persistent compilation cache at :func:`compilation_cache_dir` (the CLI's entry calls it).

    Leaves a directory the user set (``JAX_COMPILATION_CACHE_DIR``) alone. An unusable
    directory only turns the cache off.

    Returns:
        The cache directory in use, or None.
    """
    import jax

    current = getattr(jax.config, "jax_compilation_cache_dir", None)
    if current:
        return str(current)
    path = compilation_cache_dir()
    if path is None:
        return None
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", CACHE_MIN_COMPILE_SECONDS)
    return path


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


def _add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The preset and its shape overrides."""
    p.add_argument("--preset", default="seed", help="model preset: seed or small (default: seed)")
    p.add_argument(
        "--d-model", type=positive_int("--d-model"), default=None, help="residual width D (preset: seed 768, small 384)"
    )
    p.add_argument(
        "--d-head",
        type=positive_int("--d-head"),
        default=None,
        help="per-head width K = the SVD rank of each derived head (preset: seed 64, small 32)",
    )
    p.add_argument(
        "--layers",
        type=positive_int("--layers"),
        default=None,
        help="layout layers L; layer l uses context length n = min(l + 1, --max-n) (preset: seed 12, small 4)",
    )
    p.add_argument(
        "--heads",
        type=positive_int("--heads"),
        default=None,
        help="heads per layer H; head h uses skip s = min(h, --max-s) (preset: 12)",
    )
    p.add_argument(
        "--max-n",
        type=positive_int("--max-n"),
        default=None,
        help="longest context n of the layout, the n of C^{n,s} (preset: 2)",
    )
    p.add_argument(
        "--max-s",
        type=non_negative_int("--max-s"),
        default=None,
        help="largest skip s of the layout, the s of C^{n,s} (preset: 3)",
    )


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    """The corpus, model, evaluation and output flags that ``analyze`` and ``compare`` share."""
    p.add_argument(
        "--corpus",
        default=None,
        help="text file, directory or glob (default: Python stdlib docstrings). A directory contributes its "
        "*.txt and *.text files, recursively (the others are skipped, with one warning naming them); "
        "a file or glob given explicitly is read whatever its extension",
    )
    p.add_argument(
        "--glob",
        default=None,
        metavar="PATTERN",
        help="read the files of a directory --corpus / --eval-corpus whose base name matches PATTERN "
        "(e.g. '*.md'), recursively, instead of its *.txt and *.text files",
    )
    p.add_argument(
        "--eval-corpus", default=None, help="text scored for alignment (default: a held-out split of --corpus)"
    )
    p.add_argument(
        "--heldout", default=None, help="held-out split when no --eval-corpus: a document name or a fraction"
    )
    p.add_argument(
        "--tokenizer",
        choices=("char", "word"),
        default="char",
        help="char: one token per character; word: words and punctuation (see --max-vocab) (default: char)",
    )
    p.add_argument("--max-vocab", type=positive_int("--max-vocab"), default=None, help="word level: top-k plus <unk>")
    _add_model_arguments(p)
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
    p.add_argument(
        "--batch-size",
        type=positive_int("--batch-size"),
        default=8,
        help="evaluation sequences per forward call; bounds memory, not the results (default 8: on CPU "
        "smaller batches stay in cache and run faster)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of every PRNG key (default 0)")
    p.add_argument(
        "--max-dense-bytes",
        type=byte_count,
        default=None,
        help="memory budget for dense arrays, bytes (default 4 GiB)",
    )
    p.add_argument("--load", default=None, help="reuse count tables saved in this directory instead of counting")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_figure_arguments(p)


def add_figure_arguments(p: argparse.ArgumentParser) -> None:
    """The figure flags (``--plot-heads``, ``--attention-scaling``) of ``analyze`` and ``compare``."""
    f = p.add_argument_group("figures")
    f.add_argument(
        "--plot-heads",
        default=None,
        metavar="L:H,...",
        help="heads drawn in expected_vs_actual_attention.png, as layer:head pairs, e.g. 0:1,3:2 (default: the "
        "first, second, middle and last layers x the heads with distinct skips)",
    )
    f.add_argument(
        "--attention-scaling",
        choices=("absolute", "row"),
        default="absolute",
        help="colours of expected_vs_actual_attention.png: absolute probability with a colour bar (default), "
        "or each query row scaled to its own maximum",
    )


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


def corpus_paths(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """``(--corpus, --eval-corpus)`` with ``--glob PATTERN`` applied to each one that is a directory.

    Raises:
        JaxattnError: ``--glob`` with neither path a directory.
    """
    paths = (getattr(args, "corpus", None), getattr(args, "eval_corpus", None))
    pattern = getattr(args, "glob", None)
    if pattern is None:
        return paths
    dirs = [p is not None and os.path.isdir(os.path.expanduser(p)) for p in paths]
    if not any(dirs):
        raise JaxattnError(f"--glob {pattern!r} needs a directory --corpus or --eval-corpus")
    corpus, eval_corpus = (directory_glob(p, pattern) if d and p is not None else p for p, d in zip(paths, dirs))
    return corpus, eval_corpus


#: A stage running longer than this many seconds is announced on stderr (:class:`~jaxattn.progress.Timer`).
STAGE_LINE_SECONDS = 2.0


def cli_timer(args: argparse.Namespace) -> Timer:
    """The command's stage timer; it announces stages over :data:`STAGE_LINE_SECONDS` unless ``--no-progress``."""
    on = stage_lines_enabled(not getattr(args, "no_progress", False))
    return Timer(announce_after=STAGE_LINE_SECONDS if on else None)


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
        corpus, eval_corpus = load_split(*corpus_paths(args), run, progress=progress)
    tables = None
    artefacts: dict[str, Any] = {}
    if getattr(args, "load", None):
        with timer.stage("load_tables"):
            tables = load_tables(args.load, corpus=corpus, max_dense_bytes=run.max_dense_bytes)
        artefacts["loaded_tables_from"] = str(args.load)
    prep = prepare(corpus, eval_corpus, run, tables=tables, progress=progress, timer=timer)
    return prep, artefacts


def chosen_heads(args: argparse.Namespace, run: RunConfig) -> list[tuple[int, int]] | None:
    """The ``--plot-heads`` pairs, checked against the model's layers and heads (None: the default set)."""
    text = getattr(args, "plot_heads", None)
    if text is None:
        return None
    config = preset(run.preset, 2, **dict(run.model_overrides))
    return plots.parse_heads(text, config.num_layers, config.num_heads)


def attention_figure_job(
    out: Path,
    prep: Prepared,
    result: AnalysisResult,
    title: str,
    *,
    heads: list[tuple[int, int]] | None = None,
    scaling: str = "absolute",
) -> tuple[str, Callable[[], Path]]:
    """The seed's expected-vs-actual figure of one result on the run's sequence 0, as a figure job.

    The job holds sequence 0 only (expected and mask [P, 1, T, T], attention [1, L, H, T, T]), so
    that a figure worker can take it (:class:`jaxattn.output.figure_pool.FigurePool`).

    Returns:
        ``(file name, draw)``; ``draw()`` writes ``out/expected_vs_actual_attention.png`` and returns its path.
    """
    vocab = list(prep.corpus.tokenizer.vocab)
    path = out / "expected_vs_actual_attention.png"
    draw = functools.partial(
        plots.plot_expected_vs_actual,
        path,
        np.asarray(prep.expected[:, :1]),
        np.asarray(prep.mask[:, :1]),
        np.asarray(prep.pair_index),
        np.asarray(result.attn[:1]),
        result.records,
        seq=0,
        tokens=[vocab[t] for t in prep.tokens[0]],
        title=title,
        heads=heads,
        scaling=scaling,
    )
    return path.name, plots.returning(path, draw)


def show_warning(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
    """``warnings.showwarning`` replacement: one line per warning on stderr, like the errors."""
    print(f"jaxattn: warning: {' '.join(str(message).splitlines())}", file=sys.stderr)
