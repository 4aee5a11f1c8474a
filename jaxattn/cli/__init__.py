"""``jaxattn`` command line: ``analyze`` (the main job), ``compare``, ``export``, ``score`` and ``train``.

* :mod:`~jaxattn.cli.common`: the parser class, the shared flags, load-and-prepare;
* :mod:`~jaxattn.cli.analyze`: ``jaxattn analyze``;
* :mod:`~jaxattn.cli.compare`: ``jaxattn compare``;
* :mod:`~jaxattn.cli.export`: ``jaxattn export`` (one option's model as a HuggingFace GPT-2 checkpoint).
* :mod:`~jaxattn.cli.score`: ``jaxattn score`` (every head of any GPT-2 checkpoint against every (n, s) table).
* :mod:`~jaxattn.cli.train`: ``jaxattn train`` (train the derived GPT-2, or GPT-2's random init, same shapes).

Bad input exits with status 2 and one line on stderr, without a traceback.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence

from jaxattn.cli import analyze, compare, count, export, score, train
from jaxattn.cli.common import Parser, enable_compilation_cache, run_config_from_args, show_warning
from jaxattn.errors import JaxattnError, MemoryBudgetError
from jaxattn.version import VERSION

__all__ = ["build_parser", "main", "run_config_from_args"]

#: The subcommands: name -> handler(args) -> exit status.
COMMANDS = {
    "analyze": analyze.cmd_analyze,
    "compare": compare.cmd_compare,
    "count": count.cmd_count,
    "export": export.cmd_export,
    "score": score.cmd_score,
    "train": train.cmd_train,
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for documentation and tests)."""
    parser = Parser(prog="jaxattn", description=__doc__)
    parser.add_argument("--version", action="version", version=f"jaxattn {VERSION}", help="print the version and exit")
    sub = parser.add_subparsers(
        dest="command", parser_class=Parser, metavar="COMMAND", help="the subcommand (`jaxattn COMMAND --help`)"
    )
    analyze.add_parser(sub)
    compare.add_parser(sub)
    count.add_parser(sub)
    export.add_parser(sub)
    score.add_parser(sub)
    train.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``jaxattn`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    enable_compilation_cache()  # compile each kernel once per machine (JAXATTN_COMPILATION_CACHE=0: off)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = show_warning  # one line per warning, like the errors
            return COMMANDS[args.command](args)
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
