"""Streaming counts: every table ``C^{n,s}`` of a corpus that arrives in chunks, exactly as in memory.

Axes: K tokens of one chunk, H = ``max_n + max_s`` (the longest window minus its target), Z
non-zero counts, M entries of several keyed runs.

:func:`count_stream` gives the same :class:`~jaxattn.counts.CountMatrix` tables as
:func:`~jaxattn.counts.count_tables` on the concatenated chunks, bit for bit, while holding only
one chunk plus the tables. Each chunk is counted with the in-memory kernels
(:func:`~jaxattn.counts.kernels.count_tables_keys`) after the last H tokens of the stream so far
(the *carry*); the windows that lie wholly inside the carry were counted with the chunk before, so
they are counted again on the carry alone and subtracted. Every window is therefore counted once,
in the chunk that holds its last token.

Per table the sorted unique ``(keys, counts)`` accumulate:

* dense bins (one int64 per key) when ``V**(n+1) <= DENSE_BINS_MAX`` (char level);
* otherwise sorted sparse *runs*, merged (:func:`merge_keyed_runs`) whenever the runs in memory
  exceed the table's share of ``memory_budget``, and spilled to disk (``np.save``) when even the
  merged run is over half that share. The final merge reads the spilled runs memory-mapped, one key
  range at a time, so that the peak is the finished table plus one range.

The keyed stage is public (:func:`count_stream_keys`, :class:`StreamCounter`,
:func:`merge_keyed_runs`) for exact merges across processes (:mod:`jaxattn.counts.distributed`);
:func:`jaxattn.counts.tables.tables_from_keys` turns keyed runs into tables.
"""

# ruff: noqa: F722  (jaxtyping shape strings such as "R V" are not Python expressions)
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

import numpy as np

from jaxattn.counts.kernels import DENSE_BINS_MAX, count_tables_keys
from jaxattn.counts.keys import key_dtype, merge_keyed_runs, shrink_counts
from jaxattn.counts.tables import CountMatrix, tables_from_keys
from jaxattn.errors import JaxattnError
from jaxattn.progress import progress_enabled

__all__ = [
    "DEFAULT_STREAM_MEMORY",
    "Keyed",
    "StreamCounter",
    "TokenChunk",
    "count_stream",
    "count_stream_keys",
    "tables_from_counter",
]

#: Default ``memory_budget`` (bytes): sparse runs held in memory, over all tables, before spilling.
DEFAULT_STREAM_MEMORY = 2 * 1024**3
#: Bytes of one sparse run entry (an int64 key and an int64 count).
_ENTRY_BYTES = 16

#: ``{(n, s): (keys, counts)}``: per table, sorted unique packed keys (``key_dtype(V, n)``) [Z] and counts [Z].
Keyed = dict[tuple[int, int], tuple[np.ndarray, np.ndarray]]


class TokenChunk(NamedTuple):
    """One piece of a token stream.

    Attributes:
        tokens: int [K] token ids in ``[0, vocab_size)`` (any integer dtype; K may be 0).
        doc_ids: int [K] document ids. As for :func:`~jaxattn.counts.count_tables`, a change of id
            between two consecutive tokens starts a document, across chunk borders too: a document
            that spans chunks keeps its id. Global, non-decreasing ids (0, 0, 1, 1, 1, 2, ...) do this.
    """

    tokens: np.ndarray
    doc_ids: np.ndarray


class _DenseAccumulator:
    """One int64 bin per packed key: [V**(n+1)]."""

    def __init__(self, nbins: int, dtype: np.dtype) -> None:
        self.bins = np.zeros(nbins, np.int64)
        self.dtype = dtype

    def add(self, keys: np.ndarray, counts: np.ndarray) -> None:
        self.bins[keys] += counts  # keys of one run are unique: no lost updates

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        keys = np.flatnonzero(self.bins)
        vals = self.bins[keys]
        self.bins = np.zeros(0, np.int64)
        return keys.astype(self.dtype), vals


def _spill(directory: str, array: np.ndarray) -> str:
    """Writes one scratch run to a new ``.npy`` file in ``directory`` (not an output: it is read back and removed)."""
    with tempfile.NamedTemporaryFile(dir=directory, suffix=".npy", delete=False) as f:
        np.save(f, array)
    return f.name


class _SparseAccumulator:
    """Sorted runs in memory, merged over ``budget`` bytes and spilled to ``spill()``'s directory."""

    def __init__(self, dtype: np.dtype, budget: int, spill_dir: Any) -> None:
        self.dtype = dtype
        self.budget = max(int(budget), 1 << 16)
        self.spill_dir = spill_dir  # a callable returning the directory (created on first use)
        self.runs: list[tuple[np.ndarray, np.ndarray]] = []
        self.mem = 0
        self.spilled: list[tuple[str, str, int]] = []

    def add(self, keys: np.ndarray, counts: np.ndarray) -> None:
        if keys.size == 0:
            return
        self.runs.append((keys, counts.astype(np.int64, copy=False)))
        self.mem += keys.size * _ENTRY_BYTES
        if self.mem > self.budget:
            self._compact()

    def _compact(self) -> None:
        keys, vals = merge_keyed_runs(self.runs)
        self.runs = [(keys.astype(self.dtype, copy=False), vals)]
        self.mem = keys.size * _ENTRY_BYTES
        if self.mem > self.budget // 2:
            names = [_spill(self.spill_dir(), part) for part in (self.runs[0][0], vals)]
            self.spilled.append((names[0], names[1], keys.size))
            self.runs, self.mem = [], 0

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        if not self.spilled:
            keys, vals = merge_keyed_runs(self.runs)
        else:
            disk = [(np.load(k, mmap_mode="r"), np.load(v, mmap_mode="r")) for k, v, _ in self.spilled]
            keys, vals = _merge_by_ranges(disk + self.runs, max(self.budget // (2 * _ENTRY_BYTES), 1))
        self.runs, self.spilled = [], []
        return keys.astype(self.dtype, copy=False), vals


def _merge_by_ranges(runs: list[tuple[Any, Any]], piece: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`merge_keyed_runs` one key range at a time: about ``piece`` entries of the runs per range.

    Args:
        runs: sorted keyed runs (numpy or memory-mapped arrays).
        piece: entries per range, summed over the runs.

    Returns:
        As :func:`merge_keyed_runs`.
    """
    total = sum(len(k) for k, _ in runs)
    num = max(1, -(-total // piece))
    # Splitters: evenly spaced keys of every run, then evenly spaced among those.
    sample = np.sort(np.concatenate([np.asarray(k[:: max(1, len(k) // (4 * num))]) for k, _ in runs if len(k)]))
    bounds = np.unique(sample[np.linspace(0, sample.size - 1, num + 1).astype(np.int64)[1:-1]])
    edges: list[Any] = [None, *bounds.tolist(), None]
    out_k, out_v = [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        parts = []
        for k, v in runs:
            a = 0 if lo is None else int(np.searchsorted(k, lo, "left"))
            b = len(k) if hi is None else int(np.searchsorted(k, hi, "left"))
            parts.append((np.asarray(k[a:b]), np.asarray(v[a:b])))
        mk, mv = merge_keyed_runs(parts)
        out_k.append(mk.astype(runs[0][0].dtype, copy=False))
        out_v.append(mv)
    return np.concatenate(out_k), np.concatenate(out_v)


def _check_chunk(tokens: Any, doc_ids: Any, vocab_size: int, offset: int) -> tuple[np.ndarray, np.ndarray]:
    """Validates one chunk as :func:`~jaxattn.counts.validate_tokens` does; returns numpy (tokens, doc_ids)."""
    tok = np.asarray(tokens)
    doc = np.asarray(doc_ids)
    if tok.ndim != 1:
        raise JaxattnError(f"tokens must be a 1-D int array, got shape {tok.shape} (chunk at token {offset})")
    if not np.issubdtype(tok.dtype, np.integer) or tok.dtype == np.bool_:
        raise JaxattnError(f"tokens must be integers, got dtype {tok.dtype} (chunk at token {offset})")
    if doc.shape != tok.shape:
        raise JaxattnError(f"doc_ids shape {doc.shape} differs from tokens shape {tok.shape} (chunk at token {offset})")
    if tok.size:
        lo, hi = int(tok.min()), int(tok.max())
        if lo < 0 or hi >= vocab_size:
            bad = lo if lo < 0 else hi
            pos = offset + int(np.flatnonzero(tok == bad)[0])
            raise JaxattnError(f"token id {bad} is outside [0, vocab_size={vocab_size}) (at token {pos})")
    return tok, doc


class StreamCounter:
    """Counts every ``C^{n,s}`` (``n <= max_n``, ``s <= max_s``) of a stream fed chunk by chunk.

    Memory: one chunk (and the kernels' temporaries for it), the H-token carry and the
    accumulated tables; sparse runs beyond ``memory_budget`` go to disk.

    Attributes:
        num_tokens: tokens seen so far.
        longest_doc: length of the longest document so far (tokens).
    """

    def __init__(
        self,
        vocab_size: int,
        max_n: int,
        max_s: int,
        *,
        memory_budget: int | None = None,
        spill_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        if int(max_n) < 1:
            raise JaxattnError(f"n={max_n} must be >= 1")
        if int(max_s) < 0:
            raise JaxattnError(f"s={max_s} must be >= 0")
        if int(vocab_size) < 1:
            raise JaxattnError(f"vocab_size={vocab_size} must be >= 1")
        self.vocab_size, self.max_n, self.max_s = int(vocab_size), int(max_n), int(max_s)
        self.pairs = [(n, s) for n in range(1, self.max_n + 1) for s in range(self.max_s + 1)]
        self._spill_root = None if spill_dir is None else os.fspath(spill_dir)
        self._spill_dir: str | None = None
        budget = DEFAULT_STREAM_MEMORY if memory_budget is None else int(memory_budget)
        self._acc = {p: self._accumulator(p[0], budget) for p in self.pairs}
        self._carry = (np.zeros(0, np.int64), np.zeros(0, np.int64))
        self.num_tokens = 0
        self.longest_doc = 0
        self._run = 0  # length of the document the stream ends in

    def _accumulator(self, n: int, budget: int) -> Any:
        dt = key_dtype(self.vocab_size, n)  # raises for keys that overflow int64
        nbins = self.vocab_size ** (n + 1)
        if nbins <= DENSE_BINS_MAX:
            return _DenseAccumulator(nbins, dt)
        sparse = sum(1 for m, _ in self.pairs if self.vocab_size ** (m + 1) > DENSE_BINS_MAX)
        return _SparseAccumulator(dt, budget // max(sparse, 1), self._spill_path)

    def _spill_path(self) -> str:
        if self._spill_dir is None:
            if self._spill_root is not None:
                os.makedirs(self._spill_root, exist_ok=True)
            self._spill_dir = tempfile.mkdtemp(prefix="jaxattn_spill_", dir=self._spill_root)
        return self._spill_dir

    def add(self, tokens: Any, doc_ids: Any) -> None:
        """Counts one chunk (see :class:`TokenChunk`).

        Args:
            tokens: int [K] token ids in ``[0, vocab_size)``.
            doc_ids: int [K] document ids.

        Raises:
            JaxattnError: a bad shape or dtype, or a token id out of range (named, with its position).
        """
        tok, doc = _check_chunk(tokens, doc_ids, self.vocab_size, self.num_tokens)
        if tok.size == 0:
            return
        self._track_docs(doc)
        ctok, cdoc = self._carry
        buf_tok = np.concatenate([ctok, tok], dtype=np.promote_types(ctok.dtype, tok.dtype)) if ctok.size else tok
        buf_doc = np.concatenate([cdoc, doc], dtype=np.promote_types(cdoc.dtype, doc.dtype)) if cdoc.size else doc
        keyed = count_tables_keys(buf_tok, self.vocab_size, self.max_n, self.max_s, buf_doc)
        for p, (k, v) in keyed.items():
            self._acc[p].add(k, v)
        if ctok.size:  # windows wholly inside the carry were counted with the previous chunk
            for p, (k, v) in count_tables_keys(ctok, self.vocab_size, self.max_n, self.max_s, cdoc).items():
                self._acc[p].add(k, -v.astype(np.int64))
        span = self.max_n + self.max_s
        self._carry = (buf_tok[-span:].copy(), buf_doc[-span:].copy())
        self.num_tokens += int(tok.size)

    def prime(self, tokens: Any, doc_ids: Any) -> None:
        """Makes the last ``H`` of these tokens the carry without counting them.

        For a stream that starts in the middle of a corpus (one process's share of a token file):
        prime with the H tokens before the share, and the windows that start there and end in the
        share are counted here, the others by whoever counts the tokens before.

        Args:
            tokens: int [K] token ids, the tokens just before the stream.
            doc_ids: int [K] their document ids.
        """
        if self.num_tokens:
            raise JaxattnError("prime() must come before the first chunk")
        tok, doc = _check_chunk(tokens, doc_ids, self.vocab_size, 0)
        span = self.max_n + self.max_s
        self._carry = (tok[-span:].copy(), doc[-span:].copy())
        self._run = 0

    def _track_docs(self, doc: np.ndarray) -> None:
        """Updates ``longest_doc`` with the document runs of a chunk (the first may continue the last)."""
        starts = np.flatnonzero(doc[1:] != doc[:-1]) + 1
        lengths = np.diff(np.concatenate([[0], starts, [doc.size]]))
        cdoc = self._carry[1]
        if cdoc.size and cdoc[-1] == doc[0]:
            lengths[0] += self._run
        self.longest_doc = max(self.longest_doc, int(lengths.max()))
        self._run = int(lengths[-1])

    def keyed(self) -> Keyed:
        """The counts so far, as sorted unique keys per table (the counter is emptied).

        Returns:
            ``{(n, s): (keys, counts)}``: keys ``key_dtype(V, n)`` [Z] ascending, counts int32
            (int64 if one overflows int32) [Z] > 0; empty arrays for a table without windows.
        """
        return dict(self.iter_keyed())

    def iter_keyed(self) -> Iterator[tuple[tuple[int, int], tuple[np.ndarray, np.ndarray]]]:
        """:meth:`keyed` one table at a time, in ``(n, s)`` order: only one finished table need be held."""
        try:
            for p in self.pairs:
                keys, vals = self._acc[p].finish()
                self._acc[p] = None
                yield p, (keys, shrink_counts(vals))
        finally:
            if self._spill_dir is not None:
                shutil.rmtree(self._spill_dir, ignore_errors=True)
                self._spill_dir = None


def _chunk_iter(chunks: Iterable[Any], progress: bool) -> Iterable[Any]:
    """The chunks, with a tqdm bar of tokens (and tokens/s) on stderr when enabled."""
    if not progress_enabled(progress):
        yield from chunks
        return
    import sys

    from tqdm.auto import tqdm

    with tqdm(desc="counting", unit="tok", unit_scale=True, file=sys.stderr, leave=False) as bar:
        for c in chunks:
            yield c
            bar.update(int(np.shape(c[0])[0]))


def count_stream_keys(
    chunks: Iterable[TokenChunk | tuple[Any, Any]],
    vocab_size: int,
    max_n: int,
    max_s: int,
    *,
    spill_dir: str | os.PathLike[str] | None = None,
    memory_budget: int | None = None,
    progress: bool = False,
) -> tuple[Keyed, StreamCounter]:
    """The keyed stage of :func:`count_stream`: sorted unique keys and counts of every table.

    Args:
        chunks: :class:`TokenChunk` or ``(tokens [K], doc_ids [K])`` items, in stream order.
        vocab_size, max_n, max_s, spill_dir, memory_budget, progress: as for :func:`count_stream`.

    Returns:
        ``(keyed, counter)``: ``{(n, s): (keys, counts)}`` as :meth:`StreamCounter.keyed`
        returns them, and the counter (``num_tokens``, ``longest_doc``).

    Raises:
        JaxattnError: bad parameters or a bad chunk.
    """
    counter = StreamCounter(vocab_size, max_n, max_s, memory_budget=memory_budget, spill_dir=spill_dir)
    for chunk in _chunk_iter(chunks, progress):
        tokens, doc_ids = chunk
        counter.add(tokens, doc_ids)
    return counter.keyed(), counter


def count_stream(
    chunks: Iterable[TokenChunk | tuple[Any, Any]],
    vocab_size: int,
    max_n: int,
    max_s: int,
    *,
    max_dense_bytes: int | None = None,
    spill_dir: str | os.PathLike[str] | None = None,
    memory_budget: int | None = None,
    progress: bool = False,
) -> dict[tuple[int, int], CountMatrix]:
    """Counts every ``C^{n,s}`` of a chunked token stream: exactly :func:`~jaxattn.counts.count_tables`.

    ``count_stream(chunks, V, max_n, max_s)`` equals ``count_tables(concat(tokens), V, max_n,
    max_s, doc_ids=concat(doc_ids))``, every array bit-identical, for any chunking (chunks
    shorter than a window, empty chunks, documents split across chunks).

    Args:
        chunks: :class:`TokenChunk` or ``(tokens [K], doc_ids [K])`` items, in stream order.
        vocab_size: V.
        max_n: largest context length.
        max_s: largest skip.
        max_dense_bytes: budget for the dense counts of every table.
        spill_dir: where sparse runs spill (a fresh subdirectory, removed at the end; default: the
            system's temporary directory).
        memory_budget: bytes of sparse runs held in memory over all tables before spilling
            (default :data:`DEFAULT_STREAM_MEMORY`, 2 GiB); dense (char-level) tables are not in it.
        progress: a tqdm bar of tokens and tokens/s on stderr (terminal only).

    Returns:
        ``{(n, s): CountMatrix}`` with ``max_n * (max_s + 1)`` tables.

    Raises:
        JaxattnError: as for :func:`~jaxattn.counts.count_tables`: an empty stream, a stream with no
            window of some table, token ids out of range (named), bad shapes or parameters.
    """
    counter = StreamCounter(vocab_size, max_n, max_s, memory_budget=memory_budget, spill_dir=spill_dir)
    for tokens, doc_ids in _chunk_iter(chunks, progress):
        counter.add(tokens, doc_ids)
    if counter.num_tokens == 0:
        raise JaxattnError("corpus is empty: tokens has length 0")
    return tables_from_counter(counter, max_dense_bytes)


def tables_from_counter(
    counter: StreamCounter, max_dense_bytes: int | None = None
) -> dict[tuple[int, int], CountMatrix]:
    """The counter's tables, finished and converted one at a time (peak: the tables plus one keyed table).

    Raises:
        JaxattnError: a table without windows, as :func:`~jaxattn.counts.count_tables`.
    """
    out: dict[tuple[int, int], CountMatrix] = {}
    for p, kv in counter.iter_keyed():
        out.update(tables_from_keys({p: kv}, counter.vocab_size, max_dense_bytes, longest_doc=counter.longest_doc))
    return out
