"""``jaxattn count``: stream a corpus from disk into count tables, for ``analyze --load DIR`` / ``compare --load DIR``.

Inputs (``--corpus``): a text file, directory or glob (as ``analyze`` reads them, with ``--glob``),
JSON Lines (``*.jsonl``, one ``{"text": ...}`` per line), Parquet (``*.parquet``, a ``text``
column; needs pyarrow), or a pre-tokenised token file (``*.npy``, ``*.u8``/``*.u16``/``*.u32``
or ``--dtype``; sidecars ``FILE.offsets.npy`` and ``FILE.tokenizer.json``, see
:mod:`jaxattn.corpus.formats`). Documents are read one at a time and counted in chunks of
``--chunk-tokens`` (:func:`jaxattn.counts.count_stream`), so memory is bounded by a chunk plus the
tables, never by the corpus.

The vocabulary is built in one streaming pass over the text, the same as ``load_corpus`` builds it
on the same input (same tokens, same ids), or given with ``--vocab``. With ``--heldout`` or
``--eval-corpus`` the counted documents and the vocabulary are exactly those of ``analyze`` with
the same flags, so ``analyze --load DIR`` uses the tables as if it had counted them itself.

With ``--coordinator HOST:PORT --num-processes N --process-id I`` (one command per process, or
under a cluster launcher that JAX detects) every process reads only its share of the files
(text) or of the tokens (token files), the vocabulary and the counts are reduced exactly across
processes (:mod:`jaxattn.counts.distributed`), and process 0 writes the tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from jaxattn.cli.common import byte_count, corpus_paths, non_negative_int, positive_int
from jaxattn.corpus import (
    Document,
    DocumentStats,
    TokenFile,
    Tokenizer,
    TypeCounts,
    document_chunks,
    encode_raw,
    find_corpus_files,
    is_token_file,
    iter_documents,
    open_token_file,
    split_heldout,
)
from jaxattn.counts import (
    StreamCounter,
    allreduce_counts,
    allreduce_int,
    allreduce_keyed,
    cluster_environment,
    init_distributed,
    process_share,
    tables_from_keys,
)
from jaxattn.counts.stream import tables_from_counter
from jaxattn.errors import JaxattnError
from jaxattn.output import save_tables
from jaxattn.progress import progress_enabled

__all__ = ["DEFAULT_CHUNK_TOKENS", "add_parser", "cmd_count", "load_vocab"]

#: Tokens counted per chunk by default.
DEFAULT_CHUNK_TOKENS = 1 << 23


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Adds the ``count`` subcommand to ``sub`` (an argparse subparsers action)."""
    c = sub.add_parser("count", help="stream a corpus from disk into count tables (for analyze/compare --load DIR)")
    c.add_argument(
        "--corpus",
        required=True,
        help='text file, directory or glob (as analyze reads them), *.jsonl (one {"text": ...} per line), '
        "*.parquet (a text column), or a token file *.npy / *.u8 / *.u16 / *.u32 (sidecars FILE.offsets.npy: "
        "int document start offsets; FILE.tokenizer.json: its tokenizer)",
    )
    c.add_argument("--out", required=True, help="directory for tables.safetensors and tables.json")
    c.add_argument("--glob", default=None, metavar="PATTERN", help="read a directory's files matching PATTERN")
    c.add_argument(
        "--tokenizer",
        choices=("char", "word", "ids"),
        default=None,
        help="char (default for text), word, or ids (whitespace-separated integers; the default for token files)",
    )
    c.add_argument("--max-vocab", type=positive_int("--max-vocab"), default=None, help="top-k tokens plus <unk>")
    c.add_argument(
        "--vocab",
        default=None,
        metavar="FILE",
        help="use this vocabulary instead of building one: a tables directory or tables.json (its tokenizer), "
        'or a tokenizer JSON ({"kind", "vocab", "unk_id"})',
    )
    c.add_argument(
        "--heldout", default=None, help="count analyze's training side: a document name, a fraction, or auto"
    )
    c.add_argument("--eval-corpus", default=None, help="analyze's --eval-corpus: its unseen characters add <unk>")
    c.add_argument("--max-n", type=positive_int("--max-n"), default=2, help="largest context length n (default 2)")
    c.add_argument("--max-s", type=non_negative_int("--max-s"), default=3, help="largest skip s (default 3)")
    c.add_argument(
        "--chunk-tokens",
        type=positive_int("--chunk-tokens"),
        default=DEFAULT_CHUNK_TOKENS,
        help=f"tokens counted per chunk; bounds memory (default {DEFAULT_CHUNK_TOKENS})",
    )
    c.add_argument("--dtype", default=None, help="dtype of a raw token file, e.g. uint16 (default: from its name)")
    c.add_argument("--vocab-size", type=positive_int("--vocab-size"), default=None, help="token files: V")
    c.add_argument(
        "--memory-budget", type=byte_count, default=None, help="bytes of sparse runs in memory before spilling (2e9)"
    )
    c.add_argument("--spill-dir", default=None, help="directory for spilled runs (default: the system's temp dir)")
    c.add_argument("--max-dense-bytes", type=byte_count, default=None, help="budget for dense arrays, bytes")
    c.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    d = c.add_argument_group("multi-process counting (jax.distributed)")
    d.add_argument("--coordinator", default=None, metavar="HOST:PORT", help="process 0's coordinator address")
    d.add_argument("--num-processes", type=positive_int("--num-processes"), default=None, help="number of processes")
    d.add_argument("--process-id", type=non_negative_int("--process-id"), default=None, help="this process's index")
    return c


@dataclasses.dataclass
class _Dist:
    """This process's place in a multi-process run (``count == 1``: a single process)."""

    index: int = 0
    count: int = 1

    def share(self, sizes: list[int]) -> range:
        if self.count == 1:
            return range(len(sizes))
        return process_share(sizes, self.index, self.count)

    def sum(self, value: int, op: str = "sum") -> int:
        if self.count == 1:
            return int(value)
        return allreduce_int(int(value), op)


@dataclasses.dataclass
class _Counted:
    """One process's counting pass: the counter and what the tables.json ``corpus`` block records."""

    counter: StreamCounter
    info: dict[str, Any]
    bytes_read: int
    longest_doc: int | None = None


def load_vocab(path: str) -> Tokenizer:
    """The tokenizer of ``--vocab``: a tables directory, its ``tables.json``, or a tokenizer JSON.

    Raises:
        JaxattnError: a missing or unreadable file, or one without a tokenizer.
    """
    p = Path(os.path.expanduser(path))
    if p.is_dir():
        p = p / "tables.json"
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise JaxattnError(f"--vocab {path}: not a readable JSON file ({e})") from None
    if isinstance(doc, dict) and isinstance(doc.get("tokenizer"), dict):
        doc = doc["tokenizer"]
    if not isinstance(doc, dict) or "vocab" not in doc:
        raise JaxattnError(f'--vocab {path}: no tokenizer in it (expected tables.json or {{"kind", "vocab"}})')
    return Tokenizer.from_dict(doc)


def _metered(chunks: Iterable[Any], total: int | None, bytes_read: Callable[[], int], on: bool) -> Iterator[Any]:
    """The chunks, with a tqdm bar of tokens, tokens/s and MB read when ``on`` (and stderr a terminal)."""
    if not progress_enabled(on):
        yield from chunks
        return
    from tqdm.auto import tqdm

    with tqdm(desc="counting", total=total, unit="tok", unit_scale=True, file=sys.stderr, leave=False) as bar:
        for c in chunks:
            yield c
            bar.update(int(np.shape(c[0])[0]))
            bar.set_postfix_str(f"{bytes_read() / 1e6:,.0f} MB read", refresh=False)


def _new_counter(args: argparse.Namespace, vocab_size: int) -> StreamCounter:
    return StreamCounter(vocab_size, args.max_n, args.max_s, memory_budget=args.memory_budget, spill_dir=args.spill_dir)


# --------------------------------------------------------------------------- #
# Text corpora
# --------------------------------------------------------------------------- #


def _heldout_spec(text: str) -> str | float | None:
    if text.strip().lower() == "auto":
        return None
    try:
        return float(text)
    except ValueError:
        return text


def _text_sides(args: argparse.Namespace, dist: _Dist) -> tuple[Callable[[], Iterator[Document]], Any, Any]:
    """(this process's counted documents, the held-out documents or None, the listed files)."""
    corpus, eval_corpus = corpus_paths(args)
    files = find_corpus_files(str(corpus))
    held: Any = None
    if eval_corpus is not None:
        held = lambda: iter_documents(eval_corpus)
    if args.heldout is not None and eval_corpus is None:
        # analyze's split needs the documents in order (and a single document's text): read them once.
        train_docs, held_docs = split_heldout(list(iter_documents(files)), _heldout_spec(args.heldout))
        mine = dist.share([len(d.text) for d in train_docs])
        return (lambda: iter(train_docs[mine.start : mine.stop])), (lambda: iter(held_docs)), files
    mine = dist.share(files.sizes())
    subset = dataclasses.replace(files, named=files.named[mine.start : mine.stop])
    return (lambda: iter_documents(subset, allow_empty=dist.count > 1)), held, files


def _text_tokenizer(args: argparse.Namespace, docs: Callable[[], Iterator[Document]], held: Any, dist: _Dist) -> Any:
    """The vocabulary: ``--vocab``, or one pass of type counts (summed over processes); <unk> for held-out text."""
    if args.vocab is not None:
        tok = load_vocab(args.vocab)
    else:
        counts = TypeCounts(args.tokenizer or "char")
        for d in docs():
            counts.update(d.text, d.name)
        if dist.count > 1:
            counts = TypeCounts.from_dict(allreduce_counts(counts.to_dict()), counts.kind)
        tok = counts.tokenizer(args.max_vocab)
    if held is not None and tok.kind == "char" and tok.unk_id is None:
        # As load_corpus_split: held-out characters unseen in the counted text get <unk> (the last id).
        if any(bool((encode_raw(tok, d.text) < 0).any()) for d in held()):
            tok = tok.with_unk()
    return tok


def _count_text(args: argparse.Namespace, dist: _Dist) -> tuple[Tokenizer, _Counted]:
    docs, held, files = _text_sides(args, dist)
    tok = _text_tokenizer(args, docs, held, dist)
    stats = DocumentStats()
    counter = _new_counter(args, tok.vocab_size)
    chunks = document_chunks(docs(), tok.encode, args.chunk_tokens, stats=stats)
    for chunk in _metered(chunks, None, lambda: stats.bytes_read, not args.no_progress):
        counter.add(*chunk)
    source = str(corpus_paths(args)[0])
    names = stats.names if dist.count == 1 else [n for n, _ in files.named[:10000]]
    info = {
        "source": source,
        "num_docs": dist.sum(stats.num_docs),
        "num_tokens": dist.sum(stats.num_tokens),
        "vocab_size": tok.vocab_size,
        "tokenizer": tok.kind,
        "unk_id": tok.unk_id,
        "sha256": stats.hexdigest() if dist.count == 1 else None,
        "files": names,
    }
    return tok, _Counted(counter, info, stats.bytes_read, dist.sum(counter.longest_doc, "max"))


# --------------------------------------------------------------------------- #
# Token files
# --------------------------------------------------------------------------- #


def _token_tokenizer(args: argparse.Namespace, tf: TokenFile, mine: range, dist: _Dist) -> Tokenizer:
    """``--vocab``, else the file's tokenizer sidecar, else ids ``0 .. V-1`` (``--vocab-size`` or the max id + 1)."""
    if args.tokenizer not in (None, "ids"):
        raise JaxattnError(f"--tokenizer {args.tokenizer}: {tf.path} is already tokenised (use --vocab)")
    if args.vocab is not None:
        return load_vocab(args.vocab)
    if tf.tokenizer is not None and args.vocab_size is None:
        return Tokenizer.from_dict(tf.tokenizer)
    V = args.vocab_size
    if V is None:
        local = int(tf.tokens[mine.start : mine.stop].max()) if len(mine) else -1
        V = dist.sum(local, "max") + 1
    return Tokenizer(kind="ids", vocab=tuple(str(i) for i in range(V)))


def _count_tokens(args: argparse.Namespace, dist: _Dist) -> tuple[Tokenizer, _Counted]:
    if args.heldout is not None or args.eval_corpus is not None:
        raise JaxattnError("--heldout and --eval-corpus need a text corpus, not a token file")
    tf = open_token_file(args.corpus, dtype=args.dtype)
    N = tf.num_tokens
    mine = range(N * dist.index // dist.count, N * (dist.index + 1) // dist.count)
    tok = _token_tokenizer(args, tf, mine, dist)
    counter = _new_counter(args, tok.vocab_size)
    h = max(mine.start - args.max_n - args.max_s, 0)
    if h < mine.start:  # the tokens before this share: windows that end in it start there
        counter.prime(tf.tokens[h : mine.start], tf.doc_ids(h, mine.start))
    sha = hashlib.sha256() if dist.count == 1 else None
    done = [0]
    chunks = tf.chunks(args.chunk_tokens, mine.start, mine.stop)
    for t, d in _metered(chunks, len(mine), lambda: done[0] * tf.tokens.itemsize, not args.no_progress):
        counter.add(t, d)
        if sha is not None:
            sha.update(np.ascontiguousarray(t).data)
        done[0] += int(t.shape[0])
    info = {
        "source": tf.path,
        "format": f"tokens ({tf.tokens.dtype.str})",
        "num_docs": tf.num_docs,
        "num_tokens": N,
        "vocab_size": tok.vocab_size,
        "tokenizer": tok.kind,
        "unk_id": tok.unk_id,
        "sha256": None if sha is None else sha.hexdigest(),
        "files": [os.path.basename(tf.path)],
    }
    return tok, _Counted(counter, info, done[0] * tf.tokens.itemsize, tf.longest_doc)


# --------------------------------------------------------------------------- #
# The command
# --------------------------------------------------------------------------- #


def _init(args: argparse.Namespace) -> _Dist:
    flags = (args.coordinator, args.num_processes, args.process_id)
    if all(f is None for f in flags) and cluster_environment() is None:
        return _Dist()
    index, count = init_distributed(*flags)
    return _Dist(index, count)


def _count_everywhere(args: argparse.Namespace, dist: _Dist) -> tuple[Tokenizer, _Counted]:
    """Counts this process's share; in a multi-process run a bad input on any process stops all of them."""
    count = _count_tokens if is_token_file(args.corpus) or args.dtype else _count_text
    if dist.count == 1:
        return count(args, dist)
    try:
        result, error = count(args, dist), None
    except JaxattnError as e:
        result, error = None, e
    if dist.sum(error is not None, "max") or result is None:
        raise error or JaxattnError("another process stopped on bad input (see its error)")
    return result


def _reduce_and_save(args: argparse.Namespace, tok: Tokenizer, done: _Counted, dist: _Dist) -> tuple[int, int]:
    """Sums the keyed counts over processes; process 0 writes the tables. Returns (nnz, number of tables)."""
    keyed = allreduce_keyed(done.counter.keyed(), tok.vocab_size)
    nnz, num_tables = sum(int(v.size) for _, v in keyed.values()), len(keyed)
    if dist.index == 0:
        tables = tables_from_keys(
            keyed, tok.vocab_size, args.max_dense_bytes, longest_doc=done.longest_doc, consume=True
        )
        save_tables(args.out, tables, tokenizer=tok, corpus=done.info)
    else:  # the same check (and error) as process 0's, without building the tables
        empty = [p for p in sorted(keyed) if keyed[p][1].size == 0][:1]
        tables_from_keys({p: keyed[p] for p in empty}, tok.vocab_size, longest_doc=done.longest_doc)
    return nnz, num_tables


def cmd_count(args: argparse.Namespace) -> int:
    """``jaxattn count``."""
    t0 = time.perf_counter()
    dist = _init(args)
    tok, done = _count_everywhere(args, dist)
    num_tokens = int(done.info["num_tokens"])
    if num_tokens == 0:
        raise JaxattnError(f"corpus is empty: {done.info['source']}")
    if dist.count == 1:  # one table at a time: peak memory is the tables plus one
        done.counter.longest_doc = int(done.longest_doc or 0)
        tables = tables_from_counter(done.counter, args.max_dense_bytes)
        nnz, num_tables = sum(cm.nnz for cm in tables.values()), len(tables)
        save_tables(args.out, tables, tokenizer=tok, corpus=done.info)
    else:
        nnz, num_tables = _reduce_and_save(args, tok, done, dist)
    secs = time.perf_counter() - t0
    mb = dist.sum(done.bytes_read) / 1e6
    where = f" -> {args.out}" if dist.index == 0 else f" (process {dist.index} of {dist.count})"
    print(
        f"jaxattn count: {num_tokens:,} tokens, {done.info['num_docs']:,} documents, V={tok.vocab_size}, "
        f"{num_tables} tables ({nnz:,} non-zeros) in {secs:.1f} s ({num_tokens / max(secs, 1e-9) / 1e6:.2f} M "
        f"tokens/s, {mb:,.1f} MB read){where}",
        file=sys.stderr,
    )
    return 0
